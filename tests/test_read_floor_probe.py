"""experiments/read_floor_probe: its Pallas reader reads every word exactly once (interpret mode,
row counts that do and do not fill the programs' blocks), checked against numpy's sum, and the
check catches a reader that skips words."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import read_floor_probe as rf


@pytest.mark.parametrize(("rows", "programs", "br"), [(64, 4, 8), (37, 3, 16), (301, 5, 8)])
def test_pallas_reader_sums_every_word_once(rows, programs, br):
    words = jax.random.bits(jax.random.key(rows), (rows, rf.ROW_WORDS), jnp.uint32)
    partial = np.asarray(rf.pallas_read(rows, programs, br, 4, 3, interpret=True)(words))
    want = np.asarray(words).astype(np.uint64).sum(axis=0) % (1 << 32)
    got = partial.reshape(programs, rf.ROW_WORDS).astype(np.uint64).sum(axis=0) % (1 << 32)
    np.testing.assert_array_equal(got, want)
    assert rf.read_sum_ok(jax.jit(lambda w: w[:-1].sum(axis=0, dtype=jnp.uint32)), words) is False


def test_read_rows_covers_the_bytes():
    assert rf.read_rows(1024) == 1
    assert rf.read_rows(1025) == 2
    assert rf.read_rows(34603008) * 1024 == 34603008  # int4 g128 8192², a whole number of KiB
