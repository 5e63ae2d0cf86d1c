"""``experiments/table_wait_probe``: NF4's skinny kernel waits for its pair table before its
weight pipeline starts (``before``) or inside it (``in_pipeline``); both lower for CUDA on the
CPU; int4 (no table) traces to the same kernel either way."""

from unittest import mock

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import pytest

import qjax
from experiments import table_wait_probe as probe
from qjax.kernels import repack as rp
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk


def _weight(spec, layout):
    return jax.eval_shape(
        lambda: rp.repack(spec.quantize(jnp.zeros((8192, 8192), jnp.float32)), layout)
    )


def _traced(w, in_pipeline: bool, events: list):
    """The kernel for one row of x lowered for CUDA, with the order in which its trace waited
    on a barrier and started the weight pipeline recorded in ``events``."""
    wait, emit = plgpu.barrier_wait, plgpu.emit_pipeline

    def logged_wait(*a, **k):
        events.append("wait")
        return wait(*a, **k)

    def logged_emit(*a, **k):
        run = emit(*a, **k)

        def start(*refs):
            events.append("pipeline")
            return run(*refs)

        return start

    x = jax.ShapeDtypeStruct((1, 8192), jnp.bfloat16)
    assert mg.config_for(w, 1).path == "skinny"
    f = jax.jit(lambda x, w: sk.matmul_rows(x, w, mg.config_for(w, 1)))
    with (
        probe.table_wait(in_pipeline),
        mock.patch.multiple(plgpu, barrier_wait=logged_wait, emit_pipeline=logged_emit),
    ):
        return f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("in_pipeline", [False, True])
def test_nf4_waits_for_its_table_before_or_inside_the_pipeline(in_pipeline):
    events = []
    _traced(_weight(qjax.NF4(), "gpu_nf4t"), in_pipeline, events)
    assert "pipeline" in events and "wait" in events
    assert (events.index("wait") > events.index("pipeline")) == in_pipeline


def test_int4_has_no_table_to_wait_for():
    w = _weight(qjax.Int(4, group=128), "gpu_i4t")
    assert _traced(w, False, []) == _traced(w, True, [])
