import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax.formats import NF4
from qjax.formats.nf4 import dynamic_map, nf4_levels

# bitsandbytes' published NF4 table (bitsandbytes/functional.py, also QLoRA appendix E)
BNB_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_levels_equal_bitsandbytes_table():
    np.testing.assert_allclose(nf4_levels(), BNB_NF4, rtol=0, atol=1e-7)


def test_dynamic_map_matches_its_definition():
    d = dynamic_map()
    assert d.shape == (256,) and np.all(np.diff(d) > 0)
    assert d[0] == pytest.approx(-0.99296875) and d[-1] == 1.0 and 0.0 in d
    # smallest magnitude: 1e-6 times the midpoint of linspace(0.1, 1, 2) = 0.55e-6
    assert np.min(np.abs(d[d != 0])) == pytest.approx(0.55e-6, rel=1e-6)


def test_dequantize_is_nearest_level_times_absmax_float64_oracle():
    x = np.random.default_rng(3).standard_normal((128, 4)).astype(np.float32)
    q = NF4().quantize(jnp.asarray(x))
    xb = x.reshape(2, 64, 4).transpose(0, 2, 1).astype(np.float64)
    absmax = np.abs(xb).max(-1, keepdims=True)
    levels = np.asarray(BNB_NF4)
    want = levels[np.abs((xb / absmax)[..., None] - levels).argmin(-1)] * absmax
    got = np.asarray(q.dequantize(), np.float64).reshape(2, 64, 4).transpose(0, 2, 1)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_double_quant_bits_and_accuracy():
    q = NF4(double_quant=True).abstract((4096, 4096))
    assert q.bits_per_weight == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)
    assert q.bits_per_weight == pytest.approx(4.127, abs=5e-4)
    assert NF4().abstract((4096, 4096)).bits_per_weight == pytest.approx(4.5)
    x = jax.random.normal(jax.random.key(0), (1024, 64))
    plain = NF4().quantize(x)
    dq = NF4(double_quant=True).quantize(x)
    # the absmaxes are reconstructed to within the 8-bit dynamic map's resolution
    rel = np.abs(NF4(double_quant=True).absmax(dq) - plain.scales) / plain.scales
    assert rel.max() < 0.02
    err_plain = float(jnp.linalg.norm(plain.dequantize() - x))
    err_dq = float(jnp.linalg.norm(dq.dequantize() - x))
    assert err_dq < 1.02 * err_plain
