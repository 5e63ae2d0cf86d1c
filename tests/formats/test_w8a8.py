"""W8A8 FP8 (e4m3 weights and activations): the product against a float64 oracle built with
ml_dtypes' own e4m3 rounding (the int8 variant is tested with SmoothQuant in tests/ptq)."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import qjax
from qjax.errors import SpecError


def _e4m3(v: np.ndarray) -> np.ndarray:
    """Saturating round-to-nearest-even e4m3 of float64 values, back in float64."""
    return (
        np.clip(v, -448, 448).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    )


@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_fp8_w8a8_matmul_matches_float64_oracle(act):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((5, 96)).astype(np.float32) * np.linspace(0.1, 8, 96, dtype=np.float32)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    spec = qjax.W8A8(act=act, dtype="e4m3")
    q = spec.quantize(jnp.asarray(w))
    assert q.codes.dtype == jnp.float8_e4m3fn
    if act == "static":
        q = q.replace(aux={"act_scale": jnp.float32(np.abs(x).max() / 448)})
    y = np.asarray(qjax.matmul(jnp.asarray(x), q), np.float64)
    s_w = np.asarray(q.scales[0], np.float64)
    c = np.asarray(q.codes[0].T).astype(np.float64)
    np.testing.assert_array_equal(c, _e4m3(w.astype(np.float64) / s_w))  # weight codes
    x64 = x.astype(np.float64)
    if act == "dynamic":
        sx = np.abs(x64).max(-1, keepdims=True) / 448
    else:
        sx = np.float64(np.asarray(q.aux["act_scale"]))
    want = (_e4m3(x64 / sx) @ c) * sx * s_w
    np.testing.assert_allclose(y, want, rtol=2e-6, atol=1e-6)
    # and the quantized product is close to the float one (e4m3 has a 3-bit mantissa)
    assert np.linalg.norm(y - x64 @ w) / np.linalg.norm(x64 @ w) < 0.06


def test_w8a8_dtype_is_checked_and_round_trips_config():
    with pytest.raises(SpecError, match="dtype"):
        qjax.W8A8(dtype="e5m2")
    spec = qjax.W8A8(act="static", dtype="e4m3")
    assert qjax.spec_from_config(spec.to_config()) == spec
