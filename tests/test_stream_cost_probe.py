"""``experiments/stream_cost_probe``: each variant of the skinny kernel, lowered for CUDA on the
CPU, lacks exactly the part it names and keeps the ones the next variant removes."""

import collections
import re

import jax
import jax.numpy as jnp
import pytest

import qjax
from experiments import stream_cost_probe as probe
from qjax.kernels import repack as rp


@pytest.fixture(scope="module")
def ops():
    """``variant: Counter`` of the NVVM ops and Mosaic GPU transforms in its lowered text (and
    ``bytes``: the size of its serialized kernel module)."""
    spec = qjax.Int(4, group=128)
    w = jax.eval_shape(
        lambda: rp.repack(spec.quantize(jnp.zeros((8192, 8192), jnp.float32)), "gpu_i4t")
    )
    pattern = r"nvvm\.[a-z_.0-9]+|mosaic_gpu\.(?:swizzle|tile)|lop3"  # lop3: int4's decoder
    ops = {}
    for v in probe.VARIANTS:
        text = probe.lowered(w, 1, v).as_text()
        ops[v] = collections.Counter(re.findall(pattern, text))
        ops[v]["bytes"] = len(re.search(r'module = "(.*?)"', text).group(1))  # the kernel's
    return ops


def test_each_variant_removes_its_part(ops):
    issue, tma_store = (
        "nvvm.wgmma.commit.group.sync.aligned",
        "nvvm.cp.async.bulk.tensor.global.shared.cta",
    )
    dsmem, tma_load = "nvvm.mapa", "nvvm.cp.async.bulk.tensor.shared.cluster.global"
    assert ops["real"]["lop3"] and not ops["no_decode"]["lop3"]  # no decode ...
    assert ops["no_decode"][issue]  # ... but the wgmma chain
    assert not ops["stream"][issue]  # no wgmma issued
    assert ops["stream"][tma_store] and not ops["no_y"][tma_store]  # no store of y
    assert ops["no_y"][dsmem] and not ops["no_exchange"][dsmem]  # no distributed smem
    # x's copies are gone (what the pipeline is given: the test below), the weight's stay
    assert ops["no_x"]["bytes"] < ops["no_exchange"]["bytes"]
    assert all(ops[v][tma_load] for v in probe.VARIANTS)


def test_pipeline_without_x_drops_the_second_input():
    seen = {}

    def emit(body, *, in_specs, **kwargs):
        seen["specs"], seen["kwargs"] = in_specs, kwargs
        return lambda *gmem: (seen.setdefault("gmem", gmem), body(0, "w_smem", "s_smem"))

    def body(idx, w_smem, x_smem, *scale_smem):
        seen["body"] = (idx, w_smem, x_smem, scale_smem)

    run = probe._pipeline_without_x(emit)(body, in_specs=["w", "x", "s"], grid=(3,))
    run("w_gmem", "x_gmem", "s_gmem")
    assert seen["specs"] == ["w", "s"] and seen["kwargs"] == {"grid": (3,)}
    assert seen["gmem"] == ("w_gmem", "s_gmem")
    assert seen["body"] == (0, "w_smem", "w_smem", ("s_smem",))


OTHER_FORMATS = [(qjax.NF4(), "gpu_nf4t"), (qjax.Int(8, group="channel"), "gpu_i8t")]


@pytest.mark.parametrize(("spec", "layout"), OTHER_FORMATS, ids=["nf4", "int8"])
def test_other_formats_lose_the_decode_then_the_wgmma(spec, layout):
    w = jax.eval_shape(
        lambda: rp.repack(spec.quantize(jnp.zeros((8192, 8192), jnp.float32)), layout)
    )
    issue = "nvvm.wgmma.commit.group.sync.aligned"
    texts = {v: probe.lowered(w, 16, v).as_text() for v in probe.variants_for(w)}
    sizes = {v: len(re.search(r'module = "(.*?)"', t).group(1)) for v, t in texts.items()}
    assert sizes["real"] > sizes["no_decode"] and issue in texts["no_decode"]
    if "stream" in texts:
        assert sizes["no_decode"] > sizes["stream"] and issue not in texts["stream"]
