"""The fragment-major order of the 8-bit layouts' codes (``gpu_i8t`` / ``gpu_f8t``,
:func:`qjax.kernels.gpu.mgpu_decode.to_fragments`): each thread's 128-bit loads must hold, in
register order, exactly the words that Mosaic GPU's own layout gives it. The oracle is Mosaic
GPU's :class:`TiledLayout` itself — its tiling, warp and lane dimensions — evaluated in
integers the way its ``thread_idxs`` does in MLIR, and its ``WGStridedFragLayout`` for the
loads. Device checks (every kernel path against the float32 reference and against each other):
``python -m experiments.ldg_probe`` and ``kernel_bench --check``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax.kernels.gpu import mgpu_decode as dec


def _thread_elements(layout, shape, tid):
    """``(row, col)`` of the first element of each register of thread ``tid`` (0 – 127) in
    ``layout``, registers in ``np.ndindex`` order — ``TiledLayout.thread_idxs`` in integers."""
    from jax.experimental.mosaic.gpu import utils
    from jax.experimental.mosaic.gpu.fragmented_array import Replicated

    strides = layout.tiling.tile_strides(tuple(utils.get_contiguous_strides(shape)))
    inner = strides[-layout.tiled_tiling_rank :]

    def indices(idx, dims):
        tiled = layout.tiled_tiling_shape
        sizes = [d.times if isinstance(d, Replicated) else tiled[d] for d in dims]
        full = [0] * len(tiled)
        for d, stride, size in zip(dims, utils.get_contiguous_strides(sizes), sizes, strict=True):
            if not isinstance(d, Replicated):
                full[d] = idx // stride % size
        return full

    warp, lane = indices(tid // 32 % 4, layout.warp_dims), indices(tid % 32, layout.lane_dims)
    offset = sum(i * s for i, s in zip(warp + lane, inner + inner, strict=True))
    for reg in np.ndindex(layout.registers_shape(shape)):
        yield np.unravel_index(
            offset + sum(i * s for i, s in zip(reg, strides, strict=True)), shape
        )


@pytest.mark.parametrize(("bits", "bk"), [(4, 512), (4, 256), (8, 256), (8, 128)])
def test_each_threads_loads_hold_the_words_of_its_registers_in_mosaic_gpus_layout(bits, bk):
    v, n_p, k_p = dec.VEC[bits], 128, 2 * bk
    layout = dec.load_layout(bits).to_mgpu()
    assert layout.vector_length == v  # one 32-bit word per register
    order = dec.fragment_order(n_p, k_p, bits, bk)
    per_row, steps = k_p // v, k_p // bk
    for t in range(n_p // dec.ROWS):
        for s in range(steps):
            row = order[t * steps + s]
            for tid in (0, 1, 6, 31, 32, 77, 127):
                for j, (r, c) in enumerate(_thread_elements(layout, (dec.ROWS, bk), tid)):
                    got = row[128 * dec.LDG_VEC * (j // 4) + dec.LDG_VEC * tid + j % 4]
                    assert c % v == 0
                    assert got == (dec.ROWS * t + r) * per_row + (s * bk + c) // v


def _words(codes, bits):
    n_p, k_p = codes.shape
    v = dec.VEC[bits]
    return np.asarray(jax.lax.bitcast_convert_type(codes.reshape(n_p, k_p // v, v), jnp.uint32))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_to_fragments_stores_the_word_order_of_128_code_steps_and_inverts(tiles, blocks, seed):
    n_p, k_p = 64 * tiles, 128 * blocks
    codes = jax.random.randint(jax.random.key(seed), (n_p, k_p), -128, 128).astype(jnp.int8)
    frag = dec.to_fragments(codes)
    assert frag.shape == codes.shape and frag.dtype == codes.dtype
    order = dec.fragment_order(n_p, k_p, 8, dec.FRAGMENT_CODES)
    want = _words(codes, 8).reshape(-1)[order.reshape(-1)]
    np.testing.assert_array_equal(_words(frag, 8).reshape(-1), want)
    np.testing.assert_array_equal(np.asarray(dec.from_fragments(frag)), np.asarray(codes))
    # numpy gives the same bytes (the repack runs on either)
    np.testing.assert_array_equal(dec.to_fragments(np.asarray(codes)), np.asarray(frag))


@pytest.mark.parametrize("bk", [256, 512])
def test_a_k_step_is_consecutive_128_code_blocks(bk):
    # the kernels load a bk-code step of a stripe as bk / 128 blocks in a row (TMA box, or
    # `load_fragments` over the step's bytes): the step's own word order must be theirs
    n_p, k_p = 128, 2 * bk
    step = dec.fragment_order(n_p, k_p, 8, bk).reshape(-1)
    blocks = dec.fragment_order(n_p, k_p, 8, dec.FRAGMENT_CODES).reshape(-1)
    np.testing.assert_array_equal(step, blocks)


def test_steps_that_do_not_split_into_the_layouts_blocks_are_refused():
    with pytest.raises(ValueError, match="64-row tiles"):
        dec.fragment_order(100, 512, 4, 512)
    with pytest.raises(ValueError, match="even number"):
        dec.fragment_order(64, 96, 4, 96)
    with pytest.raises(ValueError, match="128-code blocks"):
        dec.to_fragments(np.zeros((64, 192), np.int8))
