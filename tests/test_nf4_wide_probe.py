"""``experiments/nf4_wide_probe``: NF4's skinny kernel with 64- or 128-code tile rows, decodes
and ``wgmma`` lowers for CUDA on the CPU; 128 gives the codes' tiles 64-byte rows (swizzle 64
where 64-code tiles have 32); int4 traces to the same kernel either way; the block scaling
refuses operands that do not split. Its numbers are checked on the H100 (the probe's checks)."""

from unittest import mock

import jax
import jax.numpy as jnp
import pytest

import qjax
from experiments import nf4_wide_probe as probe
from qjax.kernels import repack as rp
from qjax.kernels.gpu import mgpu_decode as dec
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk


def _weight(spec, layout):
    return jax.eval_shape(
        lambda: rp.repack(spec.quantize(jnp.zeros((8192, 8192), jnp.float32)), layout)
    )


def _lowered(w, m: int, codes: int, tiles: list | None = None) -> str:
    """The dispatched kernel for ``m`` rows of ``x`` lowered for CUDA with ``codes`` per NF4
    load; ``tiles`` records its shared-memory tilings ``(elements per row, bits, operand)``."""
    x = jax.ShapeDtypeStruct((m, 8192), jnp.bfloat16)
    tiled = mg._tiled

    def logged(minor, bits, what):
        (tiles if tiles is not None else []).append((minor, bits, what))
        return tiled(minor, bits, what)

    with probe.nf4_loads(codes), mock.patch.object(mg, "_tiled", logged):
        cfg = mg.config_for(w, m)
        assert cfg.path == "skinny"
        f = jax.jit(lambda x, w: sk.matmul_rows(x, w, cfg))
        return f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("m", [1, 16])
def test_nf4_lowers_with_either_load_and_128_codes_give_64_byte_code_rows(m):
    w = _weight(qjax.NF4(), "gpu_nf4t")
    narrow_tiles, wide_tiles = [], []
    narrow, wide = _lowered(w, m, 64, narrow_tiles), _lowered(w, m, 128, wide_tiles)
    assert "mosaic_gpu" in narrow and "mosaic_gpu" in wide and narrow != wide
    # codes: 64 × 4 bits = 32-byte tile rows, 128 × 4 bits = 64 (swizzle 64)
    assert (64, 4, "lhs") in narrow_tiles and (128, 4, "lhs") not in narrow_tiles
    assert (128, 4, "lhs") in wide_tiles and (64, 4, "lhs") not in wide_tiles
    assert "swizzle<64 : i32>" in wide


def test_int4_is_the_same_kernel_either_way():
    w = _weight(qjax.Int(4, group=128), "gpu_i4t")
    assert _lowered(w, 1, 64) == _lowered(w, 1, 128)


def test_block_scaling_refuses_blocks_that_do_not_split_the_operand():
    a = jax.ShapeDtypeStruct((64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="does not split"):
        dec.times_column_blocks(a, [jax.ShapeDtypeStruct((64, 48), jnp.bfloat16)] * 2)
