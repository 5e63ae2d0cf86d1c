import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax.errors import ShapeError
from qjax.formats import layout


@given(
    k=st.sampled_from([8, 16]),
    n=st.sampled_from([4, 12]),
    axis=st.sampled_from([0, 1, -1]),
    group=st.sampled_from(["tensor", "channel", 4, (4, 2)]),
)
def test_unblocked_inverts_blocked(k, n, axis, group):
    x = jnp.arange(k * n, dtype=jnp.float32).reshape(k, n)
    block = layout.block_shape(x.shape, group, axis)
    xb = layout.blocked(x, block)
    assert xb.shape[-1] == np.prod(block)
    np.testing.assert_array_equal(layout.unblocked(xb, x.shape, block), x)


def test_group_blocks_run_along_the_reduction_axis():
    x = np.arange(8 * 3).reshape(8, 3)
    xb = np.asarray(layout.blocked(jnp.asarray(x), layout.block_shape(x.shape, 4, 0)))
    np.testing.assert_array_equal(xb[1, 2], x[4:8, 2])


def test_2d_blocks_need_2d_tensors():
    with pytest.raises(ShapeError, match="2-D"):
        layout.block_shape((4, 4, 4), (2, 2), 0)
