import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _testing import awkward_tensors
from hypothesis import given

from qjax.formats import FP4, FP8, MXFP4, NVFP4
from qjax.formats.fp4 import E2M1_VALUES, e2m1_decode, e2m1_encode
from qjax.formats.fp8 import saturating_cast

SPECIAL = [
    0.0,
    -0.0,
    1e-9,
    448.0,
    449.0,
    464.0,
    465.0,
    1e6,
    -1e6,
    np.inf,
    -np.inf,
    np.nan,
    57344.0,
    61440.0,
    1e-40,
]


@pytest.mark.parametrize(
    "fmt, dtype", [("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2)]
)
def test_fp8_saturating_cast_agrees_with_ml_dtypes(fmt, dtype):
    x = np.concatenate([np.random.default_rng(0).standard_normal(4096) * 300, SPECIAL])
    x = x.astype(np.float32)
    fmax = float(ml_dtypes.finfo(dtype).max)
    want = np.clip(x, -fmax, fmax).astype(dtype).astype(np.float32)  # NaN stays NaN
    got = np.asarray(saturating_cast(jnp.asarray(x), jnp.dtype(dtype)).astype(jnp.float32))
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[np.isnan(x)]).all()
    assert np.abs(got[np.isinf(x)]).max() == fmax


def test_e2m1_cast_agrees_with_ml_dtypes_including_ties_and_saturation():
    grid = np.arange(-8, 8.01, 0.125, dtype=np.float32)  # every tie of e2m1 lies on this grid
    x = np.concatenate([grid, [1e9, -1e9, np.inf, -np.inf, 1e-40]]).astype(np.float32)
    want = x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    got = np.asarray(e2m1_decode(e2m1_encode(jnp.asarray(x))))
    np.testing.assert_array_equal(got, want)


def test_e2m1_codes_are_the_ieee_like_bit_patterns():
    codes = np.arange(16, dtype=np.uint8)
    want = (
        codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
        if hasattr(ml_dtypes, "float4_e2m1fn")
        else E2M1_VALUES
    )
    np.testing.assert_array_equal(E2M1_VALUES, want)


@given(x=awkward_tensors(group=32))
def test_mxfp4_scales_are_powers_of_two_and_follow_the_ocp_rule(x):
    if not np.any(x):
        return
    q = MXFP4().quantize(jnp.asarray(x))
    exps = np.asarray(q.scales).astype(np.int64) - 127
    amax = np.abs(x.reshape(-1, 32, x.shape[1])).max(1)
    normal = amax >= np.finfo(np.float32).tiny * 8  # XLA flushes subnormals
    want = np.floor(np.log2(amax[normal].astype(np.float64))) - 2
    np.testing.assert_array_equal(exps[normal], want)
    # elements: the dequantized value is e2m1(x / 2^e) * 2^e
    deq = np.asarray(q.dequantize())
    scale = np.repeat(2.0**exps, 32, axis=0)
    ratio = (deq / scale)[np.repeat(normal, 32, axis=0)]
    assert np.isin(ratio, E2M1_VALUES).all()


def test_nvfp4_two_level_scales():
    x = np.random.default_rng(1).standard_normal((64, 8)).astype(np.float32) * 3
    q = NVFP4().quantize(jnp.asarray(x))
    ts = float(q.aux["tensor_scale"])
    assert ts == pytest.approx(np.abs(x).max() / (6 * 448), rel=1e-6)
    assert q.scales.dtype == jnp.float8_e4m3fn
    deq = np.asarray(q.dequantize())
    assert np.abs(deq - x).max() <= np.abs(x).max() / 6 * 1.1  # at most ~one step of the top block
    assert q.bits_per_weight == pytest.approx(4 + 8 / 16 + 32 / x.size)


@pytest.mark.parametrize(
    "spec",
    [
        FP8("e4m3", group="tensor"),
        FP8("e4m3", group="channel"),
        FP8("e5m2", group=(128, 128)),
        FP4(group=32),
    ],
)
def test_float_formats_roundtrip_error_is_bounded_by_relative_precision(spec):
    x = np.random.default_rng(2).standard_normal((256, 128)).astype(np.float32)
    deq = np.asarray(spec.quantize(jnp.asarray(x)).dequantize())
    rel = np.linalg.norm(deq - x) / np.linalg.norm(x)
    bound = {"e4m3": 2**-4, "e5m2": 2**-3}.get(getattr(spec, "fmt", ""), 0.2)
    assert rel < bound
