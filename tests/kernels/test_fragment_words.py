"""The fragment-major repack of the skinny kernel's codes (``Config.ldg``,
:func:`qjax.kernels.gpu.mgpu_decode.fragment_words`): each thread's 128-bit loads must hold, in
register order, exactly the words that Mosaic GPU's own layout gives it. The oracle is Mosaic
GPU's :class:`TiledLayout` itself — its tiling, warp and lane dimensions — evaluated in
integers the way its ``thread_idxs`` does in MLIR. Device checks (the kernel's bits against the
TMA kernel's): ``python -m experiments.ldg_probe``."""

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


@settings(max_examples=20, deadline=None)
@given(
    st.sampled_from([(4, 512), (4, 256), (8, 256)]),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
)
def test_fragment_words_is_a_permutation_of_the_codes_words(bits_bk, tiles, steps, seed):
    bits, bk = bits_bk
    n_p, k_p = 64 * tiles, bk * steps
    dtype = jnp.int4 if bits == 4 else jnp.int8
    lim = 2 ** (bits - 1)
    codes = jax.random.randint(jax.random.key(seed), (n_p, k_p), -lim, lim).astype(dtype)
    frag = np.asarray(dec.fragment_words(codes, bk))
    v = dec.VEC[bits]
    words = np.asarray(jax.lax.bitcast_convert_type(codes.reshape(n_p, k_p // v, v), jnp.uint32))
    order = dec.fragment_order(n_p, k_p, bits, bk)
    assert frag.shape == (tiles * steps, 128 * bk // (2 * v))
    assert np.array_equal(np.sort(order, axis=None), np.arange(words.size))
    np.testing.assert_array_equal(frag, words.reshape(-1)[order])
    # nibbles / bytes in element order from the low bits, as the kernel's registers read them
    c = np.asarray(codes.astype(jnp.int8)).astype(np.int64).reshape(n_p, k_p // v, v) % 2**bits
    packed = sum(c[..., e].astype(np.uint64) << (bits * e) for e in range(v)).astype(np.uint32)
    np.testing.assert_array_equal(words, packed)


def test_steps_that_do_not_split_into_the_layouts_blocks_are_refused():
    with pytest.raises(ValueError, match="64-row tiles"):
        dec.fragment_order(100, 512, 4, 512)
    with pytest.raises(ValueError, match="even number"):
        dec.fragment_order(64, 96, 4, 96)
