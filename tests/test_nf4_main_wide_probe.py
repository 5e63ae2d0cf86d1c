"""``experiments/nf4_main_wide_probe``: every case it checks or times runs the main kernel and
lowers for CUDA (on the CPU) with its NF4 codes tiled as many codes wide as the variant loads:
128 (64-byte TMA rows) for ``loads128``, 64 for ``slices64``."""

import jax
import jax.numpy as jnp
import pytest

import qjax
from experiments import mgpu_probe_lib as lib
from experiments import nf4_main_wide_probe as probe
from qjax.kernels import repack as rp
from qjax.kernels.gpu import mgpu_matmul as mg

CASES = (
    [(m, k, n, "check") for m, k, n in probe.CHECKS]
    + [(m, k, n, "check_256") for m, k, n in probe.CHECKS_256]
    + [(m, *reversed(lib.shape(s)), "timed") for s, m in probe.CASES]
)


def _config(w, m: int, kind: str) -> mg.Config:
    if kind == "check":
        return lib.main_config(w, m)
    if kind == "check_256":
        return mg.config_for(w, m, mg.TABLE[mg.MAX_ROWS][1])
    return mg.config_for(w, m)  # the dispatch, as `compiled_under` with no config


@pytest.mark.parametrize(("m", "k", "n", "kind"), CASES, ids=str)
def test_probe_cases_run_the_main_kernel_with_128_code_nf4_tiles(m, k, n, kind):
    w = jax.eval_shape(
        lambda: rp.repack(qjax.NF4().quantize(jnp.zeros((k, n), jnp.float32)), "gpu_nf4t")
    )
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    for codes in probe.LOADS.values():
        tiles = []
        with probe.nf4_loads(codes), lib.logged_tilings(tiles):
            cfg = _config(w, m, kind)
            assert cfg.path == "mgpu"
            f = jax.jit(lambda x, w, cfg=cfg: mg._mgpu_matmul(x, w, cfg))
            assert "mosaic_gpu" in f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
        assert [t for t in tiles if t[2] == "lhs"] == [(codes, 4, "lhs")]  # the codes' tiles
