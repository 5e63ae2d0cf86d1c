import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax.eval import eval_windows, evaluate

V = 11


def _bigram(table, tokens):
    """A toy LM: logits at position t depend only on token t (a V×V table)."""
    return jnp.asarray(table)[tokens]


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_windows_follow_the_protocol():
    ids = np.arange(23)
    w = eval_windows(ids, 5)
    np.testing.assert_array_equal(w, np.arange(20).reshape(4, 5))  # partial window dropped
    wb = eval_windows(ids, 5, bos_id=99)
    assert wb.shape == (5, 5) and (wb[:, 0] == 99).all()
    np.testing.assert_array_equal(wb[:, 1:].ravel(), np.arange(20))
    with pytest.raises(qjax.ShapeError, match="too few"):
        eval_windows(ids[:3], 5)


def test_ppl_kld_top1_match_a_float64_oracle():
    rng = np.random.default_rng(0)
    table_q = rng.standard_normal((V, V)).astype(np.float32) * 2
    table_ref = table_q + rng.standard_normal((V, V)).astype(np.float32) * 0.3
    windows = rng.integers(0, V, size=(6, 9)).astype(np.int32)
    res = evaluate(_bigram, table_q, windows, ref_params=table_ref, batch_size=4, progress=False)
    lq, lr = _log_softmax64(table_q), _log_softmax64(table_ref)
    prev, nxt = windows[:, :-1].ravel(), windows[:, 1:].ravel()
    nll = -lq[prev, nxt]
    kld = (np.exp(lr[prev]) * (lr[prev] - lq[prev])).sum(-1)
    assert res.tokens == 6 * 8 and res.windows == 6
    assert res.ppl == pytest.approx(math.exp(nll.mean()), rel=1e-5)
    assert res.ref_ppl == pytest.approx(math.exp((-lr[prev, nxt]).mean()), rel=1e-5)
    assert res.kld_mean == pytest.approx(kld.mean(), rel=1e-4)
    assert res.top1_agreement == pytest.approx((lq[prev].argmax(-1) == lr[prev].argmax(-1)).mean())


def test_identical_models_have_zero_kld_and_full_agreement():
    table = jax.random.normal(jax.random.key(1), (V, V))
    windows = np.random.default_rng(1).integers(0, V, size=(3, 7)).astype(np.int32)
    res = evaluate(_bigram, table, windows, ref_params=table, progress=False)
    assert res.kld_mean == pytest.approx(0.0, abs=1e-6) and res.top1_agreement == 1.0
    assert res.ppl == pytest.approx(res.ref_ppl)
