import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import ops


@pytest.mark.parametrize(
    "spec",
    [
        qjax.Int(4, group=32),
        qjax.NF4(),
        qjax.FP8("e4m3"),
        qjax.MXFP4(),
        qjax.Int(8, group="channel"),
    ],
)
def test_matmul_matches_float64_dequantized_product(spec):
    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (5, 128))
    w = spec.quantize(jax.random.normal(kw, (128, 48)))
    want = np.asarray(x, np.float64) @ np.asarray(w.dequantize(), np.float64)
    got = np.asarray(qjax.matmul(x, w))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fallback_logged_once_with_reason(caplog):
    ops._LOGGED.clear()
    w = qjax.Int(4, group=32).quantize(jnp.ones((64, 8)))
    with caplog.at_level(logging.WARNING, logger="qjax.ops"):
        for _ in range(3):
            qjax.matmul(jnp.ones((2, 64)), w)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "no kernel registered" in msgs[0]


def test_registered_kernel_is_dispatched():
    calls = []
    kernel = ops.Kernel(
        "probe",
        lambda x, w: calls.append(1) or ops.reference_matmul(x, w),
        supports=lambda x, w: x.shape[0] == 3,
    )
    ops.register_kernel(jax.default_backend(), "fp4", "canonical", kernel)
    try:
        w = qjax.FP4().quantize(jnp.ones((64, 8)))
        qjax.matmul(jnp.ones((3, 64)), w)
        qjax.matmul(jnp.ones((4, 64)), w)  # not supported → reference
        assert calls == [1]
    finally:
        ops._KERNELS.pop((jax.default_backend(), "fp4", "canonical"))


def test_matmul_shape_error():
    with pytest.raises(qjax.ShapeError):
        qjax.matmul(jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_metrics_against_closed_forms():
    x = np.array([3.0, 4.0])
    y = np.array([3.0, 3.0])
    assert qjax.sqnr_db(x, y) == pytest.approx(10 * np.log10(25.0))
    assert qjax.relative_frobenius_error(x, y) == pytest.approx(0.2)
    assert qjax.max_abs_error(x, y) == 1.0
    assert qjax.sqnr_db(x, x) == float("inf")
    # uniform rounding noise: SQNR of b-bit RTN on uniform data ≈ 6.02·b dB
    u = np.random.default_rng(0).uniform(-1, 1, 1 << 16).astype(np.float32)
    q = qjax.Int(8, group="tensor", scale_dtype="float32").quantize(jnp.asarray(u).reshape(-1, 1))
    assert qjax.sqnr_db(u, np.asarray(q.dequantize()).ravel()) == pytest.approx(6.02 * 8, abs=0.5)
