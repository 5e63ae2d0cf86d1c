import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.formats import Int
from qjax.ptq.hqq import HQQ, shrink_lp


def _heavy_tailed(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_t(3, size=shape).astype(np.float32))


def test_shrink_is_the_lp_proximal_operator():
    # prox of (1/β)|e|^p: for p = 1 it is soft-thresholding by 1/β
    x = jnp.linspace(-2, 2, 41)
    np.testing.assert_allclose(
        shrink_lp(x, 4.0, 1.0), np.sign(x) * np.maximum(np.abs(x) - 0.25, 0), atol=1e-6
    )


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_hqq_lowers_the_lp_error_and_usually_the_l2_error_vs_rtn(bits):
    spec = Int(bits, group=64, symmetric=False, scale_dtype="float16")
    w = _heavy_tailed((512, 64))
    rtn = spec.quantize(w).dequantize()
    hqq = HQQ(spec)(w).dequantize()

    def lp(q, p=0.7):
        return float(jnp.sum(jnp.abs(q - w) ** p))

    assert lp(hqq) < lp(rtn)
    # the per-group objective never gets worse than the min/max start
    assert float(jnp.linalg.norm(hqq - w)) < 1.1 * float(jnp.linalg.norm(rtn - w))


def test_hqq_is_a_rule_method_and_needs_no_calibration():
    tree = {"a": {"kernel": _heavy_tailed((128, 32))}}
    q = qjax.quantize(tree, [("a/kernel", HQQ())])
    assert q["a"]["kernel"].bits_per_weight == pytest.approx(4 + 32 / 64)
    jax.jit(lambda t: qjax.quantize(t, [("a/kernel", HQQ())]))(tree)


def test_hqq_rejects_symmetric_specs():
    with pytest.raises(qjax.SpecError, match="asymmetric"):
        HQQ(Int(4, group=64))
