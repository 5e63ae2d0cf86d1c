"""QArray → GGUF exact export: bit-exact values, the file's own codes back, warnings once."""

from __future__ import annotations

import logging

import jax.numpy as jnp
import numpy as np
import pytest
from _tiny_llama import write_tiny_llama

import qjax
from qjax import assets
from qjax.convert.cli_convert import convert
from qjax.convert.gguf import GGMLType, read_gguf, write_gguf
from qjax.convert.gguf import qarray_export as qx
from qjax.convert.gguf.load import native_qarray
from qjax.convert.gguf.writer import permute_qk


@pytest.fixture(autouse=True)
def _fresh_warnings():
    qx.reset_warnings()
    yield
    qx.reset_warnings()


def _roundtrip(tmp_path, q, *, transpose=True, heads=None, ggml_type=GGMLType.Q8_0, **kw):
    row_t = None if heads is None else (lambda a: permute_qk(a, heads))
    plan = qx.plan_tensor(
        "w", q, transpose=transpose, ggml_type=ggml_type, row_transform=row_t, **kw
    )
    raw = plan.data()
    path = write_gguf(tmp_path / "w.gguf", {"general.architecture": "llama"},
                      [("w", plan.ggml_type, raw, plan.shape)])  # fmt: skip
    r = read_gguf(path)
    want = np.asarray(q.dequantize(), np.float32)
    want = want.T if transpose else want
    want = want if row_t is None else row_t(want)
    return plan, r, r.dequantize("w"), np.ascontiguousarray(want)


@pytest.mark.parametrize(
    "spec, gtype",
    [
        (qjax.Int(8, group=32, scale_dtype="float16"), GGMLType.Q8_0),
        (qjax.Int(8, group=32), GGMLType.Q8_0),  # bfloat16 scales are float16 values too
        (qjax.Int(4, group=32, scale_dtype="float16"), GGMLType.Q4_0),
        (qjax.Int(4, group=32), GGMLType.Q4_0),
    ],
)
@pytest.mark.parametrize("heads", [None, 3])
def test_symmetric_int_g32_is_bit_exact(tmp_path, spec, gtype, heads):
    w = np.random.default_rng(0).standard_normal((96, 48)).astype(np.float32)
    w[:32, 0] = 0.0  # an all-zero group (stored scale 1)
    q = spec.quantize(jnp.asarray(w))
    plan, r, got, want = _roundtrip(tmp_path, q, heads=heads)
    assert (plan.ggml_type, plan.how, plan.max_abs_error) == (gtype, "exact", 0.0)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    if heads is None:  # the native import gives back the same codes and scales
        back = native_qarray(r, "w", kernel=True)
        assert np.array_equal(np.asarray(back.codes), np.asarray(q.codes))
        assert np.array_equal(np.asarray(back.scales, np.float32), np.asarray(q.scales, np.float32))


def test_embedding_layout_blocks_along_the_last_axis(tmp_path):
    q = qjax.Int(8, group=32, axis=1).quantize(
        jnp.asarray(np.random.default_rng(1).random((5, 64)))
    )
    plan, r, got, want = _roundtrip(tmp_path, q, transpose=False)
    assert plan.how == "exact" and np.array_equal(got, want)
    back = native_qarray(r, "w", kernel=False)
    assert np.array_equal(np.asarray(back.codes), np.asarray(q.codes))


def test_asymmetric_int4_exact_when_the_minimum_is_a_float16(tmp_path):
    rng = np.random.default_rng(2)
    spec = qjax.Int(4, group=32, symmetric=False, scale_dtype="float16")
    codes = jnp.asarray(rng.integers(0, 16, (2, 8, 32)), jnp.uint8)  # grid (K/32, N) = (2, 8)
    scales = jnp.asarray(2.0 ** rng.integers(-8, -2, (2, 8)), jnp.float16)
    zeros = jnp.asarray(rng.integers(0, 16, (2, 8)), jnp.float16)  # z·s exact in float16
    q = spec.from_codes(codes, scales, zeros, (64, 8))
    plan, _, got, want = _roundtrip(tmp_path, q)
    assert (plan.ggml_type, plan.how) == (GGMLType.Q4_1, "exact")
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_asymmetric_int4_near_exact_or_strict_requantization(tmp_path, caplog):
    w = np.random.default_rng(3).standard_normal((64, 16)).astype(np.float32)
    q = qjax.Int(4, group=32, symmetric=False, scale_dtype="float16").quantize(jnp.asarray(w))
    with caplog.at_level(logging.WARNING):
        plan, _, got, want = _roundtrip(tmp_path, q)
    assert (plan.ggml_type, plan.how) == (GGMLType.Q4_1, "near-exact")
    scale = float(np.max(np.asarray(q.scales, np.float32)))
    # |m| <= 15 s, rounded to float16: off by at most half an ulp, 15 s · 2^-11
    assert 0 < plan.max_abs_error == float(np.abs(got - want).max()) <= 15 * scale * 2**-11
    assert "not bit-exact" in caplog.text and "'w'" in caplog.text
    plan, _, _, _ = _roundtrip(tmp_path, q, near_exact=False, ggml_type=GGMLType.Q8_0)
    assert (plan.ggml_type, plan.how) == (GGMLType.Q8_0, "requantized")


@pytest.mark.parametrize(
    "spec, why",
    [
        (qjax.Int(4, group=128), "groups of 32"),
        (qjax.Int(4, group=32, axis=1), "axis"),
        (qjax.Int(8, group=32, symmetric=False), "no GGML type"),
        (qjax.Int(4, group="channel"), "groups of 32"),
        (qjax.NF4(), "not an Int"),
        (qjax.FP8(), "not an Int"),
    ],
)
def test_no_exact_type_requantizes_with_one_warning(tmp_path, caplog, spec, why):
    w = jnp.asarray(np.random.default_rng(4).standard_normal((128, 64)), jnp.float32)
    q = spec.quantize(w)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            plan, _, got, want = _roundtrip(tmp_path, q, ggml_type=GGMLType.F32)
    assert (plan.ggml_type, plan.how) == (GGMLType.F32, "requantized")
    assert np.array_equal(got, want)  # F32 holds the dequantized values exactly
    warnings = [r for r in caplog.records if "no exact GGML type" in r.getMessage()]
    assert len(warnings) == 1 and why in warnings[0].getMessage()


def test_act_order_perm_and_ragged_group_are_not_exact():
    w = jnp.asarray(np.random.default_rng(5).standard_normal((64, 8)), jnp.float32)
    q = qjax.Int(4, group=32).quantize(w)
    perm = q.replace(aux={"perm": jnp.arange(64)[::-1]})
    assert "act-order" in qx.exact_type(perm, transpose=True)[1]
    ragged = qjax.Int(4, group=32).quantize(w[:48])
    assert "ragged" in qx.exact_type(ragged, transpose=True)[1]
    half = q.replace(scales=q.scales.astype(jnp.float32) * (1 + 2**-20))
    assert "float16" in qx.exact_type(half, transpose=True)[1]


def test_tiny_llama_gguf_orbax_gguf_is_byte_identical(tmp_path):
    src = write_tiny_llama(tmp_path / "tiny.gguf")
    convert(src, tmp_path / "ck", to="orbax")
    out, summary = convert(tmp_path / "ck", tmp_path / "back.gguf")
    assert summary["how"] == {"exact": 16, "quantized": 5}
    assert (tmp_path / "back.gguf").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("linear_type, dequantize", [(GGMLType.Q4_1, False), (GGMLType.Q4_0, True)])
def test_gguf_to_orbax_streams_the_params_of_load_gguf_model(tmp_path, linear_type, dequantize):
    """GGUF → orbax writes the params one at a time, yet holds exactly what the model loaded
    by ``load_gguf_model`` holds: same tree (int layer keys), QArray metadata and bits."""
    import jax
    from flax import nnx

    from qjax.convert.gguf.load import load_gguf_model

    src = write_tiny_llama(tmp_path / "tiny.gguf", linear_type)
    convert(src, tmp_path / "ck", to="orbax", dequantize=dequantize)
    _, model = load_gguf_model(src, native=not dequantize)
    want = nnx.state(model, nnx.Param).to_pure_dict()
    got = qjax.load(tmp_path / "ck")
    leaves_w, def_w = jax.tree_util.tree_flatten(want)
    leaves_g, def_g = jax.tree_util.tree_flatten(got)
    assert def_g == def_w  # keys, QArray spec / shape / dtype / layout
    params = jax.tree_util.tree_leaves(want, is_leaf=lambda x: isinstance(x, qjax.QArray))
    n_q = 0 if dequantize else 16  # 14 linears, embedding, head
    assert sum(isinstance(v, qjax.QArray) for v in params) == n_q
    for g, w in zip(leaves_g, leaves_w, strict=True):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype == w.dtype and g.tobytes() == w.tobytes()


def test_smollm2_q4_1_round_trip_gives_the_file_back(tmp_path):
    """SmolLM2's Q4_1 tensors imported natively (z = -m/d in float32) and exported again: the
    QArray's own codes, d = s and m = f16(-z·s) reproduce the original file byte for byte."""
    src = assets.path("smollm2")
    convert(src, tmp_path / "ck", to="orbax")
    _, summary = convert(tmp_path / "ck", tmp_path / "back.gguf")
    assert summary["how"]["near-exact"] == 210 and summary["how"]["exact"] == 1
    a, b = read_gguf(src), read_gguf(tmp_path / "back.gguf")
    assert list(a.tensors) == list(b.tensors) and a.metadata.keys() == b.metadata.keys()
    for name in a.tensors:
        assert np.array_equal(a.raw(name), b.raw(name)), name
