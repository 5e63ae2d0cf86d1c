import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from qjax.formats import packing


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 4),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**31),
)
def test_unpack_pack_is_identity(bits, rows, n, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, n), dtype=np.uint8)
    packed = packing.pack(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape[-1] == packing.packed_length(n, bits)
    np.testing.assert_array_equal(packing.unpack(packed, bits, n), codes)


def test_layouts_are_the_documented_ones():
    codes = np.array([[1, 2, 3, 0, 1, 2, 3, 0]], np.uint8)
    assert packing.pack(jnp.asarray(codes), 4).tolist() == [[0x21, 0x03, 0x21, 0x03]]
    assert packing.pack(jnp.asarray(codes), 2).tolist() == [[0b00111001, 0b00111001]]
    c3 = np.arange(8, dtype=np.uint8)[None]
    word = sum(int(c) << (3 * i) for i, c in enumerate(c3[0]))
    assert packing.pack(jnp.asarray(c3), 3).tolist() == [
        [word & 255, (word >> 8) & 255, word >> 16]
    ]
