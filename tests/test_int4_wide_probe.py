"""``experiments/int4_wide_probe``: int4 g128's skinny kernel with 256-code tile rows, decodes and
``wgmma`` lowers for CUDA on the CPU with 128-byte code rows (swizzle 128); with its scales on the
float32 slice sums (``scale_acc``, the dispatch) the setting changes nothing; int8 never widens.
Its numbers are checked on the H100 (the probe's checks)."""

from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given
from hypothesis import strategies as st

import qjax
from experiments import int4_wide_probe as probe
from qjax.kernels import repack as rp
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk


def _weight(spec, layout):
    return jax.eval_shape(
        lambda: rp.repack(spec.quantize(jnp.zeros((8192, 8192), jnp.float32)), layout)
    )


def _lowered(w, m: int, codes: int, scale_acc, tiles: list) -> str:
    """The probe's kernel for ``m`` rows of ``x`` lowered for CUDA with ``codes`` per int4 load;
    ``tiles`` records its shared-memory tilings ``(elements per row, bits, operand)``."""
    tiled = mg._tiled

    def logged(minor, bits, what):
        tiles.append((minor, bits, what))
        return tiled(minor, bits, what)

    x = jax.ShapeDtypeStruct((m, 8192), jnp.bfloat16)
    with probe.int4_loads(codes), mock.patch.object(mg, "_tiled", logged):
        cfg = probe.config(w, m, scale_acc)
        assert cfg.path == "skinny"
        f = jax.jit(lambda x, w: sk.matmul_rows(x, w, cfg))
        return f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("m", [1, 16])
def test_int4_g128_with_256_code_loads_lowers_with_128_byte_code_rows(m):
    w = _weight(qjax.Int(4, group=128), "gpu_i4t")
    wide_tiles, narrow_tiles = [], []
    wide, narrow = _lowered(w, m, 256, False, wide_tiles), _lowered(w, m, 128, False, narrow_tiles)
    assert "mosaic_gpu" in wide and wide != narrow
    assert (256, 4, "lhs") in wide_tiles and (128, 4, "lhs") not in wide_tiles
    assert (128, 4, "lhs") in narrow_tiles and (256, 4, "lhs") not in narrow_tiles
    assert "swizzle<128 : i32>" in wide


def test_scales_on_the_slice_sums_keep_128_code_loads():
    w = _weight(qjax.Int(4, group=128), "gpu_i4t")
    assert probe.config(w, 1, None).scale_acc  # the dispatch's config
    assert _lowered(w, 1, 256, None, []) == _lowered(w, 1, 128, None, [])


@given(
    decode=st.sampled_from(["int", "nf4", "e4m3"]),
    bits=st.sampled_from([4, 8]),
    span=st.sampled_from([64, 128]),
    steps=st.integers(1, 8),
    by_slice=st.booleans(),
    int4=st.sampled_from([128, 256]),
)
def test_loads_are_whole_scale_blocks_dividing_the_step(decode, bits, span, steps, by_slice, int4):
    bk = 128 * steps
    with mock.patch.object(sk, "INT4_LOAD_CODES", int4):
        load = sk.load_codes(decode, bits, span, bk, by_slice)
    assert load % span == 0 and bk % load == 0
    if by_slice or (decode == "int" and bits == 8) or decode == "e4m3":
        assert load == span
    want = {"nf4": sk.NF4_LOAD_CODES, "int": int4}.get(decode)
    if not by_slice and want and bits == 4 and want % span == 0 and bk % want == 0:
        assert load == want
