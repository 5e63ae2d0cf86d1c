"""W8A8 GPU path (fused row quantization + 8-bit GEMM) in Pallas interpret mode, against the
format's own reference (codes bit-exact) and a float64 oracle of the product."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax.errors import FormatError, ShapeError
from qjax.kernels.gpu.w8a8_matmul import quantize_rows, supports, w8a8_matmul


def _x(rng, m, k, zero_row=True):
    x = rng.standard_normal((m, k)) * rng.uniform(0.05, 20, size=(m, 1))
    x[:, rng.integers(0, k, 3)] *= 40  # outlier channels, as SmoothQuant sees them
    if zero_row and m > 1:
        x[m // 2] = 0.0  # s_x = 1, codes 0
    return jnp.asarray(x, jnp.bfloat16)


@pytest.mark.parametrize("dtype", ["int8", "e4m3"])
@pytest.mark.parametrize("m,k", [(5, 384), (9, 1024), (1, 128), (3, 33 * 128)])  # last: > 32 chunks
def test_quantize_rows_equals_the_formats_cast(dtype, m, k):
    rng = np.random.default_rng(m * k)
    x = _x(rng, m, k)
    spec = qjax.W8A8(dtype=dtype)
    codes, sx = quantize_rows(x, dtype=dtype, interpret=True)
    x32 = np.asarray(x, np.float32)
    want_sx = np.abs(x32).max(-1, keepdims=True) / np.float32(spec.qmax)
    want_sx = np.where(want_sx > 0, want_sx, 1.0).astype(np.float32)
    got_sx = np.asarray(sx)
    np.testing.assert_array_max_ulp(got_sx, want_sx, maxulp=1)  # x/448 may become x·(1/448)
    v = x32 / got_sx  # the codes are the cast of x / s_x, exactly
    if dtype == "int8":
        want = np.clip(np.rint(v), -127, 127).astype(np.int8)  # rint: ties to even
    else:
        want = np.clip(v, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    got = np.asarray(codes)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    assert np.abs(got.astype(np.float32)).max() > 0.9 * spec.qmax  # the range is used


def test_int8_rounding_is_half_to_even():
    # a row whose values land exactly on .5 after scaling by s_x = 127/127 = 1
    row = np.array([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5] + [0.0] * 120, np.float32)
    codes, sx = quantize_rows(jnp.asarray(row[None], jnp.bfloat16), dtype="int8", interpret=True)
    assert float(sx[0, 0]) == 1.0
    np.testing.assert_array_equal(np.asarray(codes)[0, :8], [127, 0, 2, 2, 0, -2, -2, 4])


@pytest.mark.parametrize("dtype", ["int8", "e4m3"])
@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_w8a8_matmul_matches_float64_oracle(dtype, act):
    rng = np.random.default_rng(7)
    m, k, n = 6, 256, 72
    x = _x(rng, m, k)
    w = rng.standard_normal((k, n)).astype(np.float32)
    spec = qjax.W8A8(act=act, dtype=dtype)
    q = spec.quantize(jnp.asarray(w))
    x64 = np.asarray(x, np.float64)
    if act == "static":
        q = q.replace(aux={"act_scale": jnp.float32(np.abs(x64).max() / spec.qmax)})
        sx = np.float64(np.asarray(q.aux["act_scale"]))
    else:
        sx = np.abs(x64).max(-1, keepdims=True) / spec.qmax
        sx = np.where(sx > 0, sx, 1.0)
    assert supports(x, q)
    y = np.asarray(w8a8_matmul(x, q, interpret=True), np.float64)
    c = np.asarray(q.codes[0].T).astype(np.float64)
    if dtype == "int8":
        xq = np.clip(np.rint(x64 / sx), -127, 127)
    else:
        xq = np.clip(x64 / sx, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
        xq = xq.astype(np.float64)
    want = (xq @ c) * sx * np.asarray(q.scales[0], np.float64)
    err = np.linalg.norm(y - want) / np.linalg.norm(want)
    assert err < 8e-3, err  # bf16 output (and, for e4m3, the GEMM's bf16 result) roundings
    ref = np.asarray(spec.matmul(x, q), np.float64)  # the format's reference product
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 8e-3


def test_w8a8_matmul_rejects_what_it_cannot_take():
    q = qjax.W8A8().quantize(jnp.ones((200, 16), jnp.float32))
    x = jnp.ones((2, 200), jnp.bfloat16)
    assert not supports(x, q)  # dynamic needs K % 128 == 0
    with pytest.raises(FormatError, match="K % 128"):
        w8a8_matmul(x, q, interpret=True)
    with pytest.raises(ShapeError, match="multiple of 128"):
        quantize_rows(x, dtype="int8", interpret=True)
    static = qjax.W8A8(act="static").quantize(jnp.ones((200, 16), jnp.float32))
    assert supports(x, static)
    assert not supports(x, qjax.Int(8).quantize(jnp.ones((200, 16), jnp.float32)))


def test_registered_for_gpu_w8a8():
    from qjax import ops

    names = [kern.name for kern in ops._KERNELS.get(("gpu", "w8a8", "canonical"), [])]
    assert names == ["pallas_triton_canonical"]
