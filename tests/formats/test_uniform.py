import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _testing import awkward_tensors, per_element
from hypothesis import given
from hypothesis import strategies as st

import qjax
from qjax.formats import Int

GROUPS = st.sampled_from([32, "channel", "tensor", (32, 2)])


def _bound_ok(x, q, spec):
    # XLA flushes float32 subnormals to zero (``stored_scale``'s docstring), so the quantizer
    # sees |x| < 2^-126 as 0: the half-step bound holds for that input
    seen = np.where(np.abs(x) < np.finfo(np.float32).tiny, 0.0, x.astype(np.float64))
    err = np.abs(np.asarray(q.dequantize(), np.float64) - seen)
    scale = np.asarray(per_element(spec, x.shape, q.scales), np.float64)
    # half a step of the *stored* scale; 1e-6 relative slack for float32 division rounding
    return err <= scale / 2 * (1 + 1e-6) + 1e-45


@given(x=awkward_tensors(), bits=st.sampled_from([2, 3, 4, 8]), sym=st.booleans(), group=GROUPS)
def test_rtn_error_at_most_half_a_step(x, bits, sym, group):
    if isinstance(group, tuple) and x.shape[1] % group[1]:
        group = "channel"
    spec = Int(bits=bits, group=group, symmetric=sym)
    q = spec.quantize(jnp.asarray(x))
    ok = _bound_ok(x, q, spec)
    assert ok.all(), f"{(~ok).sum()} elements exceed scale/2 for {spec}"


@given(x=awkward_tensors(), bits=st.sampled_from([2, 3, 4, 8]))
def test_asymmetric_grid_represents_group_min_and_max(x, bits):
    spec = Int(bits=bits, group=32, symmetric=False)
    q = spec.quantize(jnp.asarray(x))
    xb = x.reshape(-1, 32, x.shape[1])
    deq = np.asarray(q.dequantize(), np.float64).reshape(xb.shape)
    s = np.asarray(q.scales, np.float64)  # (K/32, N)
    for reduce in (np.argmin, np.argmax):
        idx = reduce(xb, axis=1)
        true = np.take_along_axis(xb, idx[:, None], 1)[:, 0]
        got = np.take_along_axis(deq, idx[:, None], 1)[:, 0]
        assert np.all(np.abs(got - true) <= s / 2 * (1 + 1e-6) + 1e-45)


@pytest.mark.parametrize("sym", [True, False])
def test_codes_match_float64_oracle_of_the_documented_formula(sym):
    x = np.random.default_rng(0).standard_normal((128, 8)).astype(np.float32)
    q = Int(bits=4, group=32, symmetric=sym, scale_dtype="float32").quantize(jnp.asarray(x))
    # the rounding argument x/s is formed in float32, as documented; the rest in float64
    xb = x.reshape(4, 32, 8).transpose(0, 2, 1)
    s32 = np.asarray(q.scales, np.float32)[..., None]
    ratio = (xb / s32).astype(np.float64)
    s, xb = s32.astype(np.float64), xb.astype(np.float64)
    if sym:
        np.testing.assert_allclose(s[..., 0], np.abs(xb).max(-1) / 7.5, rtol=1e-6)
        want = np.clip(np.round(ratio), -8, 7) * s
    else:
        lo, hi = np.minimum(xb.min(-1), 0), np.maximum(xb.max(-1), 0)
        np.testing.assert_allclose(s[..., 0], (hi - lo) / 15, rtol=1e-6)
        z = np.round(-lo / s[..., 0])[..., None]
        want = (np.clip(np.round(ratio) + z, 0, 15) - z) * s
    got = np.asarray(q.dequantize(), np.float64).reshape(4, 32, 8).transpose(0, 2, 1)
    # XLA may divide via a reciprocal (1 ulp off IEEE division): only at a rounding tie may the
    # code differ, and then by one step
    at_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5
    agree = np.isclose(got, want, rtol=0, atol=1e-6)
    assert (agree | (at_tie & np.isclose(np.abs(got - want), s, rtol=1e-5))).all()
    assert agree.mean() > 0.99


@pytest.mark.parametrize(
    "spec, bpw",
    [
        (Int(4, group=128), 4.125),
        (Int(4, group=128, symmetric=False), 4.25),
        (Int(8, group="channel", scale_dtype="float32"), 8 + 32 / 4096),
        (Int(3, group=128), 3.125),
        (Int(2, group=64), 2.25),
    ],
)
def test_bits_per_weight_exact(spec, bpw):
    q = spec.abstract((4096, 1024))
    assert q.bits_per_weight == pytest.approx(bpw, abs=1e-12)


@pytest.mark.parametrize(
    "spec",
    [
        Int(4, group=128),
        Int(3, group=128, symmetric=False),
        qjax.NF4(),
        qjax.MXFP4(),
        Int(8, group=(128, 32)),
    ],
)
def test_ragged_last_group_equals_quantizing_the_zero_padded_tensor(spec):
    x = jax.random.normal(jax.random.key(5), (576, 40))  # 576 = 4·128 + 64, as in SmolLM2
    padded = jnp.pad(x, ((0, 640 - 576), (0, 0)))
    ragged = np.asarray(spec.quantize(x).dequantize())
    reference = np.asarray(spec.quantize(padded).dequantize())[:576]
    np.testing.assert_array_equal(ragged, reference)
    # the last, 64-element group's scale depends only on its real elements
    if isinstance(spec, Int) and spec.group == 128 and spec.symmetric:
        np.testing.assert_allclose(
            spec.quantize(x).scales[-1], np.abs(x[512:]).max(0) / 7.5, rtol=1e-2
        )


def test_bad_axis_names_the_param():
    tree = {"layer": {"kernel": jnp.ones((100, 8))}}
    with pytest.raises(qjax.ShapeError, match="layer/kernel.*axis 2 is out of range"):
        qjax.quantize(tree, [(".*", Int(4, group=128, axis=2))])


def test_invalid_specs_rejected():
    for bad in (dict(bits=5), dict(group=0), dict(group="row"), dict(scale_dtype="int8")):
        with pytest.raises(qjax.SpecError):
            Int(**bad)


def test_quantize_under_jit_and_vmap_matches_eager():
    x = jax.random.normal(jax.random.key(1), (3, 64, 16))
    spec = Int(4, group=32)
    eager = jnp.stack([spec.quantize(x[i]).dequantize() for i in range(3)])
    vmapped = jax.vmap(lambda a: spec.quantize(a).dequantize())(x)
    jitted = jax.jit(lambda a: spec.quantize(a).dequantize())(x[0])
    np.testing.assert_array_equal(eager, vmapped)
    np.testing.assert_array_equal(eager[0], jitted)


def test_per_channel_along_any_axis():
    x = jax.random.normal(jax.random.key(2), (8, 16)) * jnp.arange(1, 17)[None, :]
    q0 = Int(8, group="channel", axis=0, scale_dtype="float32").quantize(x)
    q1 = Int(8, group="channel", axis=1, scale_dtype="float32").quantize(x)
    np.testing.assert_allclose(np.asarray(q0.scales)[0], np.abs(x).max(0) / 127.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(q1.scales)[:, 0], np.abs(x).max(1) / 127.5, rtol=1e-6)
