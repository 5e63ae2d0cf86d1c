"""``experiments/skinny_step_probe``: the variants it times are the dispatch's skinny config with
only the named fields changed, each one the kernel accepts, none a duplicate."""

import jax
import jax.numpy as jnp
import pytest

import qjax
from experiments import skinny_step_probe as probe
from qjax.kernels import repack as rp
from qjax.kernels.gpu import mgpu_skinny as sk


def _abstract(spec, layout, k, n):
    return jax.eval_shape(lambda: rp.repack(spec.quantize(jnp.zeros((k, n), jnp.float32)), layout))


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize(("n", "k"), [(8192, 8192), (10240, 8192), (8192, 28672)])
def test_variants_change_only_their_named_fields(m, n, k):
    w = _abstract(qjax.Int(4, group=128), "gpu_i4t", k, n)
    cfgs = probe.configs(w, m)
    base = cfgs["dispatch"]
    assert set(cfgs) == {"dispatch", *probe.VARIANTS}  # int4 g128: all fit, all differ
    assert len(set(cfgs.values())) == len(cfgs)
    for label, (bk, stages, lead) in probe.VARIANTS.items():
        cfg = cfgs[label]
        assert cfg.block_k == (bk or base.block_k) and cfg.stages == (stages or base.stages)
        assert cfg.lead == lead and cfg.cluster == base.cluster == 2
        # the same work per CTA in codes: the schedule's shape is kept
        assert cfg.cta_steps * cfg.block_k == base.cta_steps * base.block_k
        sk.check_config(jax.ShapeDtypeStruct((m, k), jnp.bfloat16), w, cfg)


def test_leads_are_dropped_where_no_cluster_holds_one_tile():
    w = _abstract(qjax.Int(4, group=128), "gpu_i4t", 4096, 6144)  # the XLA pass adds the sums
    cfgs = probe.configs(w, 1)
    assert cfgs["dispatch"].cluster == 0
    assert not any(c.lead for c in cfgs.values()) and "bk256_st4" in cfgs
