"""Hugging Face GPTQ / compressed-tensors export and re-import of quantized Llama params.

Oracles, independent of the code under test:

* GPTQ packing: AutoGPTQ's own packing loop (``QuantLinear.pack``, the 10-1-10-1-10 scheme for
  3 bits) transcribed below, and an unpacker that reads bit ``i·b`` of the word stream directly;
  the dequantization ``(q - z[g_idx])·s[g_idx]`` (v1: ``z = stored + 1``) written from the spec.
* compressed-tensors: the library itself (``pack_to_int32`` / ``unpack_from_int32`` and the
  ``pack-quantized`` compressor's ``decompress``), and transformers loading the directory.

The real-model tests export SmolLM2 and compare transformers' logits (CPU, float32) with qjax's
on the first 128 tokens of the Wikipedia test text. transformers' GPTQ path needs ``gptqmodel``
(+ ``optimum``), which qjax does not depend on: ``test_smollm2_gptq_loads_in_gptqmodel`` (slow)
runs it when this Python has them or ``$QJAX_GPTQMODEL_PYTHON`` names one that does, and skips
otherwise; ``test_smollm2_gptq_matches_transformers`` checks the same files with a NumPy oracle.
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
import qjax.data
from qjax.convert import hf_quantized as hq
from qjax.convert.hf_export import export_hf_quantized, load_hf_quantized, read_hf_quantized
from qjax.errors import FormatError, ShapeError, SpecError
from qjax.models import Llama, LlamaConfig
from qjax.ptq.gptq import GPTQ, hessian
from qjax.qarray import is_qarray
from qjax.rules import path_str

# ---------------------------------------------------------------------------------- oracles


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``QuantLinear.pack`` loop: ``(K, N)`` codes -> int32 ``(K·bits/32, N)``."""
    k, n = intweight.shape
    w = intweight.astype(np.uint64)
    qweight = np.zeros((k * bits // 32, n), np.uint64)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= w[j] << np.uint64(bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 10 values, 1 split, 10 values, 1 split, 10 values in 3 words
            for j in range(i, i + 10):
                qweight[row] |= w[j] << np.uint64(3 * (j - i))
            i += 10
            qweight[row] |= w[i] << np.uint64(30)
            row += 1
            qweight[row] |= (w[i] >> np.uint64(2)) & np.uint64(1)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= w[j] << np.uint64(3 * (j - i) + 1)
            i += 10
            qweight[row] |= w[i] << np.uint64(31)
            row += 1
            qweight[row] |= (w[i] >> np.uint64(1)) & np.uint64(3)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= w[j] << np.uint64(3 * (j - i) + 2)
            i += 10
            row += 1
    return (qweight & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)


def bit_unpack(words: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Element ``i`` = bits ``[i·bits, (i+1)·bits)`` of the stream of words along axis 0."""
    w = np.concatenate([words.view(np.uint32), np.zeros((1, *words.shape[1:]), np.uint32)])
    w = w.astype(np.uint64)
    p = np.arange(n) * bits
    pair = w[p // 32] | (w[p // 32 + 1] << np.uint64(32))  # the two words element i touches
    shift = (p % 32).astype(np.uint64).reshape(-1, *([1] * (words.ndim - 1)))
    return ((pair >> shift) & np.uint64((1 << bits) - 1)).astype(np.uint8)


def gptq_dequantize(t: dict, bits: int, version: str) -> np.ndarray:
    """HF ``(out, in)`` float32 weight of one GPTQ layer, written from the format spec."""
    k = t["g_idx"].shape[0]
    n = t["scales"].shape[1]
    q = bit_unpack(np.asarray(t["qweight"]), bits, k).astype(np.float32)  # (K, N)
    z = bit_unpack(np.ascontiguousarray(np.asarray(t["qzeros"]).T), bits, n).T  # (G, N)
    z = z.astype(np.float32) + (1 if version == "gptq" else 0)
    g = np.asarray(t["g_idx"]).astype(np.int64)
    s = np.asarray(t["scales"]).astype(np.float32)
    return np.ascontiguousarray(((q - z[g]) * s[g]).T)  # safetensors.numpy needs C order


# ----------------------------------------------------------------------------- helpers


def _kernel(k: int, n: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((k, n)) * 0.05, jnp.float32)


def _act_order_qarray(k: int, n: int, spec: qjax.Int, seed: int = 0) -> qjax.QArray:
    """GPTQ with act-order (no static groups): codes stored permuted, ``aux["perm"]``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, k)) * rng.gamma(1.0, 1.0, k)
    q = GPTQ(spec, act_order=True)(_kernel(k, n, seed), hessian(x.astype(np.float32)))
    assert "perm" in q.aux
    return q


def _fp16_scales(q: qjax.QArray) -> jax.Array:
    """``q`` dequantized with its scales rounded to float16 (what a GPTQ file holds)."""
    spec = q.spec.__class__(**{**q.spec.__dict__, "scale_dtype": "float16"})
    return q.replace(scales=q.scales.astype(jnp.float16), spec=spec).dequantize()


def _codes_in_original_order(q: qjax.QArray) -> np.ndarray:
    return hq._codes(q, "test")["codes"]


def _logits(model, ids) -> np.ndarray:
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return np.asarray(fn(state, jnp.asarray(ids)[None])[0])


def _qjax_logits(model, qstate, ids) -> np.ndarray:
    """Logits of ``model`` with ``qstate``'s (quantized) params; ``model`` is not modified."""
    qmodel = nnx.clone(model)
    nnx.update(qmodel, qstate)
    return _logits(qmodel, ids)


LAYER_CASES = [
    qjax.Int(4, group=32),
    qjax.Int(4, group=48, symmetric=False),  # ragged: 80 = 48 + 32
    qjax.Int(8, group="channel"),
    qjax.Int(2, group=16, symmetric=False),
    qjax.Int(3, group=32, symmetric=False),
]

# -------------------------------------------------------------------------------- packing


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 5),
    n=st.integers(1, 70),
    axis=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_int32_round_trip(bits, rows, n, axis, seed):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, n)).astype(np.uint8)
    codes = codes if axis == 1 else codes.T
    packed = hq.pack_int32(codes, bits, axis=axis)
    assert packed.dtype == np.int32 and packed.shape[axis] == math.ceil(n * bits / 32)
    np.testing.assert_array_equal(hq.unpack_int32(packed, bits, n, axis=axis), codes)


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    words=st.integers(1, 3),
    n=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_gptq_packing_matches_autogptq(bits, words, n, seed):
    k = 32 * words if bits == 3 else words * 32 // bits
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (k, n)).astype(np.uint8)
    packed = hq.pack_int32(codes, bits, axis=0)
    np.testing.assert_array_equal(packed, autogptq_pack(codes, bits))
    np.testing.assert_array_equal(bit_unpack(packed, bits, k), codes)


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    rows=st.integers(1, 4),
    n=st.integers(1, 80),
    packed_dim=st.sampled_from([0, 1]),
    seed=st.integers(0, 2**32 - 1),
)
def test_ct_packing_matches_compressed_tensors(bits, rows, n, packed_dim, seed):
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import (
        pack_to_int32,
        unpack_from_int32,
    )

    codes = np.random.default_rng(seed).integers(0, 1 << bits, (rows, n)).astype(np.uint8)
    codes = codes if packed_dim == 1 else np.ascontiguousarray(codes.T)
    signed = torch.from_numpy(codes.astype(np.int16) - (1 << (bits - 1))).to(torch.int8)
    want = pack_to_int32(signed, bits, packed_dim=packed_dim).numpy()
    got = hq.pack_int32(codes, bits, axis=packed_dim)
    np.testing.assert_array_equal(got, want)
    back = unpack_from_int32(torch.from_numpy(got), bits, torch.Size(codes.shape), packed_dim)
    np.testing.assert_array_equal(back.numpy().astype(np.int16) + (1 << (bits - 1)), codes)


# --------------------------------------------------------------------------- one layer


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("spec", LAYER_CASES, ids=lambda s: s.label().replace(" ", "-"))
def test_gptq_layer_matches_oracle_and_round_trips(spec, version):
    k, n = (96, 64) if spec.bits == 3 else (80, 48)
    # shifted down so that no asymmetric zero point is 0 (v1 cannot store it: test_layer_errors)
    q = spec.quantize(_kernel(k, n) - 0.03)
    t = hq.gptq_tensors(q, version, where="layer")
    g = k if spec.group == "channel" else spec.group
    assert t["qweight"].shape == (k * spec.bits // 32, n) and t["scales"].dtype == np.float16
    assert t["qzeros"].shape == (math.ceil(k / g), n * spec.bits // 32)
    np.testing.assert_array_equal(t["g_idx"], np.arange(k) // g)
    want = np.asarray(_fp16_scales(q))
    np.testing.assert_array_equal(gptq_dequantize(t, spec.bits, version), want.T)
    args = hq.gptq_args(q)
    back = hq.qarray_from_gptq(
        t, bits=args["bits"], group_size=args["group_size"], sym=args["sym"],
        checkpoint_format=version,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(back.dequantize()), want)
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(q.codes))  # padding too
    # bfloat16 scales are exact in float16: the same tensor, bit for bit
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))


@settings(max_examples=25)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    sym=st.booleans(),
    group=st.sampled_from([32, 48, "channel"]),
    version=st.sampled_from(["gptq_v2", "gptq"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_gptq_layer_property(bits, sym, group, version, seed):
    """Any Int layer: the spec oracle dequantizes the files to the QArray (fp16 scales), and the
    import gives back the same codes, scales and zeros."""
    spec = qjax.Int(bits, group=group, symmetric=sym)
    q = spec.quantize(_kernel(96, 32, seed % 1000) - 0.05 * (version == "gptq"))
    try:
        t = hq.gptq_tensors(q, version)
    except FormatError:  # v1 with a zero point of 0
        assert version == "gptq" and not sym and (np.asarray(q.zeros) == 0).any()
        return
    np.testing.assert_array_equal(gptq_dequantize(t, bits, version), np.asarray(q.dequantize()).T)
    a = hq.gptq_args(q)
    back = hq.qarray_from_gptq(
        t, bits=bits, group_size=a["group_size"], sym=sym, checkpoint_format=version
    )
    for x, y in zip(back.stored_arrays(), q.stored_arrays(), strict=True):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def test_gptq_act_order_g_idx_round_trip():
    spec = qjax.Int(4, group=32, symmetric=False)
    q = _act_order_qarray(96, 32, spec)
    t = hq.gptq_tensors(q, "gptq_v2")
    perm = np.asarray(q.aux["perm"])
    np.testing.assert_array_equal(t["g_idx"], np.argsort(perm) // 32)
    assert hq.gptq_args(q)["desc_act"]
    want = np.asarray(_fp16_scales(q))
    np.testing.assert_array_equal(gptq_dequantize(t, 4, "gptq_v2"), want.T)
    back = hq.qarray_from_gptq(t, bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")
    assert "perm" in back.aux
    np.testing.assert_array_equal(np.asarray(back.dequantize()), want)
    np.testing.assert_array_equal(_codes_in_original_order(back), _codes_in_original_order(q))
    # the perm is recovered up to the order inside each group
    np.testing.assert_array_equal(
        np.sort(np.asarray(back.aux["perm"]).reshape(3, 32)), np.sort(perm.reshape(3, 32))
    )


def test_gptq_float32_scales_round_to_float16():
    """float32 scales are rounded to nearest float16: relative weight error <= 2^-11."""
    q = qjax.Int(4, group=32, scale_dtype="float32").quantize(_kernel(64, 16, seed=3))
    t = hq.gptq_tensors(q)
    exact = np.asarray(q.dequantize())
    got = gptq_dequantize(t, 4, "gptq").T
    assert not np.array_equal(got, exact)  # float32 scales are not all float16 numbers
    np.testing.assert_allclose(got, exact, rtol=2.0**-11, atol=0)
    np.testing.assert_array_equal(got, np.asarray(_fp16_scales(q)))


@pytest.mark.parametrize("spec", LAYER_CASES[:1] + LAYER_CASES[2:], ids=lambda s: s.label())
def test_ct_layer_matches_compressed_tensors(spec):
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    k, n = 96, 40
    q = spec.quantize(_kernel(k, n, seed=1))
    t = hq.ct_tensors(q, scale_dtype="float32")
    args = hq.ct_args(q)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**args))
    dense = PackedQuantizationCompressor.decompress(
        {name: torch.from_numpy(np.asarray(v)) for name, v in t.items()}, scheme
    )["weight"]
    np.testing.assert_array_equal(dense.numpy(), np.asarray(q.dequantize()).T)
    back = hq.qarray_from_ct(t, args)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(q.dequantize()))
    # the QArray's own (bfloat16) scales are kept by default: the very same codes and scales
    back = hq.qarray_from_ct(hq.ct_tensors(q), args)
    for a, b in zip(back.stored_arrays(), q.stored_arrays(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------ errors


def test_layer_errors():
    w = _kernel(64, 16)
    hqq_like = qjax.Int(4, group=32, symmetric=False).quantize(w)
    hqq_like = hqq_like.replace(zeros=hqq_like.zeros + 0.5)
    for fn in (hq.gptq_tensors, hq.ct_tensors):
        with pytest.raises(FormatError, match=r"layers/0/q.*zero point.*not integers"):
            fn(hqq_like, where="layers/0/q")
    with pytest.raises(SpecError, match="only qjax.Int"):
        hq.gptq_tensors(qjax.NF4().quantize(w), where="nf4")
    with pytest.raises(SpecError, match="no Hugging Face equivalent"):
        hq.ct_tensors(qjax.Int(4, group=(32, 8)).quantize(w))
    with pytest.raises(ShapeError, match="in=48, out=16.*divisible by 32"):
        hq.gptq_tensors(qjax.Int(3, group=16).quantize(_kernel(48, 16)), where="three")
    with pytest.raises(ShapeError, match="divisible by the group size 48"):
        hq.ct_tensors(qjax.Int(4, group=48).quantize(_kernel(80, 16)))
    with pytest.raises(SpecError, match="act-order"):
        hq.ct_tensors(_act_order_qarray(64, 16, qjax.Int(4, group=32)))
    # v1 stores zero - 1: a zero point of 0 (a group with no negative weight) cannot be written
    pos = qjax.Int(4, group=32, symmetric=False).quantize(jnp.abs(w) + 0.01)
    with pytest.raises(FormatError, match="gptq_v2"):
        hq.gptq_tensors(pos, "gptq", where="pos")
    t = hq.gptq_tensors(pos, "gptq_v2")
    np.testing.assert_array_equal(gptq_dequantize(t, 4, "gptq_v2"), np.asarray(pos.dequantize()).T)
    with pytest.raises(FormatError, match="not representable"):
        hq.gptq_tensors(qjax.Int(8, group=32, scale_dtype="float32").quantize(w * 1e9))
    bad = dict(t, g_idx=np.zeros_like(t["g_idx"]))  # 64 inputs in group 0: not our layout
    with pytest.raises(FormatError, match="g_idx"):
        hq.qarray_from_gptq(bad, bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")


# -------------------------------------------------------------------- tiny model, files

TINY = LlamaConfig(
    vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96,
    rms_eps=1e-5, rope_theta=10_000.0, max_seq_len=64, tie_embeddings=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [
        jax.random.normal(k, x.shape) * 0.3 + (x.ndim == 1)
        for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, leaves))
    return model


def _flat(tree) -> dict:
    return {
        path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qarray)[0]
    }


def _values(v) -> np.ndarray:
    return np.asarray(v.dequantize() if is_qarray(v) else v)


@pytest.mark.parametrize(
    "fmt, rules",
    [
        ("gptq", [(r".*_proj/kernel", qjax.Int(4, group=32))]),
        ("gptq_v2", [(r".*_proj/kernel", qjax.Int(8, group="channel", symmetric=False))]),
        ("compressed-tensors", [
            (r".*down_proj/kernel", qjax.Int(8, group="channel")),
            (r"layers/0/attn/v_proj/kernel", None),
            (r".*_proj/kernel", qjax.Int(4, group=16, symmetric=False)),
        ]),
    ],
)  # fmt: skip
def test_tiny_model_round_trip(tiny, tmp_path, fmt, rules):
    rules = [*rules, (r"lm_head/kernel", qjax.Int(8, group="channel")), (r".*", None)]
    qstate = qjax.quantize(nnx.state(tiny, nnx.Param), rules)
    out = export_hf_quantized(tmp_path / "m", qstate, TINY, format=fmt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert cfg["tie_word_embeddings"] is False and cfg["num_key_value_heads"] == 2
    if fmt == "compressed-tensors":
        assert qc["format"] == "pack-quantized" and len(qc["config_groups"]) == 2
        assert qc["ignore"] == ["lm_head", "model.layers.0.self_attn.v_proj"]
    else:
        assert qc["checkpoint_format"] == fmt and qc["quant_method"] == "gptq"
        assert qc["desc_act"] is False and qc["group_size"] == (32 if fmt == "gptq" else -1)
    config, flat = read_hf_quantized(out)
    assert config == TINY
    want = _flat(qstate)
    assert set(flat) == set(want)
    for path, v in want.items():
        assert is_qarray(flat[path]) == (is_qarray(v) and path != "lm_head/kernel"), path
        np.testing.assert_array_equal(_values(flat[path]), _values(v), err_msg=path)
    _, model = load_hf_quantized(out)
    ids = np.arange(1, 17)
    np.testing.assert_array_equal(_logits(model, ids), _qjax_logits(tiny, qstate, ids))


def test_export_errors_leave_nothing(tiny, tmp_path):
    state = nnx.state(tiny, nnx.Param)
    mixed = qjax.quantize(
        state,
        [(r".*down_proj/kernel", qjax.Int(8, group="channel")),
         (r".*_proj/kernel", qjax.Int(4, group=32)), (r".*", None)],
    )  # fmt: skip
    with pytest.raises(SpecError, match="alike"):
        export_hf_quantized(tmp_path / "m", mixed, TINY, format="gptq")
    hqq = qjax.HQQ(qjax.Int(4, group=32, symmetric=False))
    hqq_like = qjax.quantize(state, [(r".*_proj/kernel", hqq), (r".*", None)])
    with pytest.raises(FormatError, match=r"layers/0/attn/\w_proj/kernel: \d+ asym.*not integers"):
        export_hf_quantized(tmp_path / "m", hqq_like, TINY, format="compressed-tensors")
    with pytest.raises(SpecError, match="nothing to export"):
        export_hf_quantized(tmp_path / "m", state, TINY)
    with pytest.raises(SpecError, match="unknown format"):
        export_hf_quantized(tmp_path / "m", mixed, TINY, format="awq")
    assert list(tmp_path.iterdir()) == []
    good = export_hf_quantized(tmp_path / "m", mixed, TINY, format="compressed-tensors")
    before = (good / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError):
        export_hf_quantized(good, mixed, TINY, format="compressed-tensors")
    with pytest.raises(SpecError):  # a failed overwrite keeps the old directory as it was
        export_hf_quantized(good, mixed, TINY, format="gptq", overwrite=True)
    assert (good / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# ---------------------------------------------------------------- SmolLM2 vs transformers

N_TOKENS = 128


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from qjax.convert.gguf.load import load_gguf_model
    from qjax.data import test_text
    from qjax.tokenizer import tokenizer_from_gguf

    config, model = load_gguf_model(smollm2_gguf)
    tok = tokenizer_from_gguf(smollm2_gguf)
    ids = np.asarray(tok.encode(test_text()[:2000])[:N_TOKENS], np.int32)
    assert len(ids) == N_TOKENS
    return config, model, tok, ids


def _torch_logits(hf_model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].numpy()


def _agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    return rel, top1


def test_smollm2_gptq_matches_transformers(smollm2, tmp_path):
    """GPTQ act-order (layers 0-1) + RTN (the rest), one Int4 g128 sym spec, exported as v1.

    transformers loads GPTQ checkpoints only through ``gptqmodel`` (+ optimum), which qjax does
    not depend on (gptqmodel 7.x pins numpy==2.2.6, pulls torchao, datasets, pyarrow, ... and
    patches transformers on import; 7.7 needs torch>=2.14.1). The real load path is
    ``test_smollm2_gptq_loads_in_gptqmodel`` (slow, skipped without gptqmodel); here the files
    are checked by an independent oracle that always runs: :func:`gptq_dequantize` (from the
    spec) feeds transformers' unquantized ``LlamaForCausalLM``.
    """
    from safetensors.numpy import load_file, save_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    from qjax.ptq import calibration_tokens, quantize_model

    config, model, tok, ids = smollm2
    spec = qjax.Int(4, group=128)
    rules = [
        (r"layers/[01]/(attn|mlp)/\w+_proj/kernel", GPTQ(spec, act_order=True)),
        (r"layers/\d+/(attn|mlp)/\w+_proj/kernel", spec),
    ]
    calib = calibration_tokens(tok.encode, n=2, length=64)
    qstate, _ = quantize_model(model, rules, calib, default=None, progress=False)
    assert "perm" in qstate["layers"][0]["attn"]["q_proj"]["kernel"].get_value().aux
    out = export_hf_quantized(tmp_path / "gptq", qstate, config, format="gptq", tokenizer=tok)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg.pop("quantization_config")
    assert qc["desc_act"] and qc["sym"] and (qc["bits"], qc["group_size"]) == (4, 128)

    # the exported tokenizer is ours
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok(qjax.data.test_text()[:2000])["input_ids"][:N_TOKENS] == ids.tolist()

    # oracle: dequantize the files from the spec into a plain float32 checkpoint
    tensors = load_file(out / "model.safetensors")
    dense = {k: v for k, v in tensors.items() if k.endswith(".weight")}
    for name in {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}:
        layer = {s: tensors[f"{name}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
        dense[f"{name}.weight"] = gptq_dequantize(layer, 4, "gptq")
    want_q = qstate["layers"][0]["attn"]["q_proj"]["kernel"].get_value().dequantize()
    np.testing.assert_array_equal(dense["model.layers.0.self_attn.q_proj.weight"], want_q.T)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps(cfg))
    save_file(dense, plain / "model.safetensors", metadata={"format": "pt"})
    hf = LlamaForCausalLM.from_pretrained(plain).eval()
    _, plain_params = read_hf_quantized(plain)  # a plain checkpoint reads as float params
    np.testing.assert_array_equal(plain_params["layers/0/attn/q_proj/kernel"], want_q)
    rel, top1 = _agreement(_torch_logits(hf, ids), _qjax_logits(model, qstate, ids))
    print(f"GPTQ export: max|dlogits|/max|logits| = {rel:.2e}, top-1 agreement {top1:.2%}")
    assert rel < 1e-2 and top1 >= 0.99

    _, got = read_hf_quantized(out)  # and back into qjax: the same params
    for path, v in _flat(qstate).items():
        np.testing.assert_array_equal(_values(got[path]), _values(v), err_msg=path)


def _gptqmodel_python() -> str:
    """A Python with gptqmodel + optimum: this one, else ``$QJAX_GPTQMODEL_PYTHON``, else skip."""
    import importlib.util
    import sys

    if all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum")):
        return sys.executable  # still a subprocess: gptqmodel patches transformers on import
    from experiments.hf_gptq_transformers import gptqmodel_python

    python = gptqmodel_python()
    if python is None:
        pytest.skip(
            "gptqmodel + optimum not installed (transformers' only GPTQ load path; not a qjax "
            "dependency, CI has neither) and $QJAX_GPTQMODEL_PYTHON not set; see "
            "experiments/results/hf_export/README.md for a venv that has them"
        )
    return python


GPTQMODEL_CASES = {
    # name: (spec, GPTQ on layers 0-1 with act-order?, format, [(backend, dtype)], max rel f32)
    "v1-sym-g128-actorder": (qjax.Int(4, group=128), True, "gptq",
                             [("gptq_torch", "float32"), ("gptq_torch", "bfloat16")], 1e-4),
    "v2-asym-g128-actorder": (qjax.Int(4, group=128, symmetric=False), True, "gptq_v2",
                              [("gptq_torch", "float32")], 2e-3),
    "v1-sym-g64-auto": (qjax.Int(4, group=64), False, "gptq", [("auto", "float32")], None),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(GPTQMODEL_CASES))
def test_smollm2_gptq_loads_in_gptqmodel(smollm2, tmp_path, case):
    """``AutoModelForCausalLM.from_pretrained`` of our GPTQ export, through gptqmodel's kernels.

    Runs ``experiments/hf_gptq_transformers.py``'s transformers side in a subprocess (files on
    disk, no pickle). Every decoder linear must be a gptqmodel quantized linear. Kernels, as
    gptqmodel 7.6 selects them on CPU: ``auto`` picks ``TorchAtenLinear`` (torch's int4pack
    matmul, in bfloat16), which needs ``in_features`` to be whole groups: SmolLM2's 576 is 4.5
    groups of 128, so g128 loads with ``backend="gptq_torch"`` (``TorchLinear``: dequantize in
    the float16 scales' dtype, then matmul in the model's dtype). Its dequantized weights are
    ours rounded to float16 (exactly ours for symmetric bfloat16 scales); float32 logits match
    ours to ~1e-6 (sym) / ~3e-4 (asym: float16 rounding of ``(q - z)·s``); with bfloat16
    activations (a bfloat16 model, or the int4pack kernel) they are as close to ours as qjax's
    own bfloat16 model is (128 tokens: ~4e-2 and 92 % top-1 vs 4.9e-2 and 94 %).
    """
    from experiments import hf_gptq_transformers as exp
    from qjax.ptq import calibration_tokens, quantize_model

    python = _gptqmodel_python()
    config, model, tok, ids = smollm2
    spec, act_order, fmt, runs, tol = GPTQMODEL_CASES[case]
    rules = [(r"layers/\d+/(attn|mlp)/\w+_proj/kernel", spec)]
    if act_order:
        rules.insert(0, (r"layers/[01]/(attn|mlp)/\w+_proj/kernel", GPTQ(spec, act_order=True)))
        calib = calibration_tokens(tok.encode, n=2, length=64)
        qstate, _ = quantize_model(model, rules, calib, default=None, progress=False)
    else:
        qstate = qjax.quantize(nnx.state(model, nnx.Param), [*rules, (r".*", None)])
    out = export_hf_quantized(tmp_path / case, qstate, config, format=fmt, tokenizer=tok)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["checkpoint_format"], qc["desc_act"], qc["sym"]) == (fmt, act_order, spec.symmetric)
    ours = exp.reference(out, model, qstate, ids)
    result, logits = exp.run_hf_side(out, python, runs)
    print(f"gptqmodel {result['versions']['gptqmodel']}, optimum {result['versions']['optimum']}")
    for run in result["runs"]:
        assert run["ok"], run
        kernel = (
            "torch_aten_kernel.TorchAtenLinear" if run["backend"] == "auto" else "torch.TorchLinear"
        )
        assert run["classes"] == {f"gptqmodel.nn_modules.qlinear.{kernel}": 7 * config.n_layers}
        assert run["lm_head"] == "torch.nn.modules.linear.Linear"
        for name, d in run["weight_max_abs_diff"].items():  # gptqmodel's dequantize_weight()
            assert d["fp16"] == 0 and (d["exact"] == 0 or not spec.symmetric), (name, d)
        rel, top1 = _agreement(logits[f"{run['backend']}/{run['dtype']}"], ours)
        print(f"{case} {run['backend']} {run['dtype']}: {kernel.rsplit('.')[-1]}, "
              f"max|dlogits|/max|logits| = {rel:.2e}, top-1 {top1:.2%}")  # fmt: skip
        if run["dtype"] == "float32" and tol is not None:
            assert rel < tol and top1 >= 0.99
        else:  # bfloat16 activations (a bfloat16 model, or TorchAtenLinear's int4pack matmul):
            # no further from ours than qjax's own bfloat16 model is (x2, 3 points of top-1)
            bf_rel, bf_top1 = _agreement(exp.qjax_bfloat16_logits(out, ids), ours)
            print(f"  qjax's own bfloat16 model: {bf_rel:.2e}, top-1 {bf_top1:.2%}")
            assert rel < 2 * bf_rel and top1 >= bf_top1 - 0.03


CT_CASES = {
    # transformers' compressed path (modules decompressed by compressed-tensors), two schemes
    "mixed-sym": [
        (r"layers/\d+/mlp/down_proj/kernel", qjax.Int(8, group="channel")),
        (r"layers/\d+/(attn|mlp)/\w+_proj/kernel", qjax.Int(4, group=64)),
    ],
    # asymmetric: only transformers' dequantize-at-load path (see the docstring)
    "asym": [(r"layers/\d+/(attn|mlp)/\w+_proj/kernel", qjax.Int(4, group=64, symmetric=False))],
}


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("case", list(CT_CASES))
def test_smollm2_compressed_tensors_loads_in_transformers(smollm2, tmp_path, case):
    """RTN Int4 g64 (576 and 1536 are multiples of 64; compressed-tensors has no ragged group).

    transformers 5.23 has two load paths. The default keeps compressed-tensors modules (per-module
    schemes, so mixed schemes work), but allocates *unpacked* asymmetric zero points and rejects
    the packed ones the library's own compressor writes. ``dequantize=True`` decompresses at load
    (asymmetric works) but applies the first config group's scheme to every layer (one scheme
    only). Both dequantize in the scales' dtype: with float32 scales transformers' weights are
    ours bit for bit; with the QArrays' own bfloat16 scales (the default) ``(q - z)·s`` is
    rounded to bfloat16, a bf16 model's agreement.
    """
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config, model, _, ids = smollm2
    dequantize = case == "asym"
    qstate = qjax.quantize(nnx.state(model, nnx.Param), [*CT_CASES[case], (r".*", None)])
    ours = _qjax_logits(model, qstate, ids)
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    for scale_dtype in ["float32", None] if dequantize else ["float32"]:
        out = export_hf_quantized(
            tmp_path / f"ct-{scale_dtype}", qstate, config, format="compressed-tensors",
            scale_dtype=scale_dtype,
        )  # fmt: skip
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
        if dequantize:  # dense modules (the compressed path holds weight_packed, not weight)
            w = hf.model.layers[3].mlp.up_proj.weight.detach().numpy()
            want = qstate["layers"][3]["mlp"]["up_proj"]["kernel"].get_value().dequantize()
            want = np.asarray(want).T
            if scale_dtype is None:  # transformers rounds (q - z)·s to bfloat16, the scales'
                want = want.astype(jnp.bfloat16).astype(np.float32)
            np.testing.assert_array_equal(w, want)
        rel, top1 = _agreement(_torch_logits(hf, ids), ours)
        print(f"compressed-tensors {case} {scale_dtype or 'bfloat16'} scales: "
              f"max|dlogits|/max|logits| = {rel:.2e}, top-1 {top1:.2%}")  # fmt: skip
        if scale_dtype == "float32":
            assert rel < 1e-4 and top1 >= 0.99
        else:  # every weight rounded to bfloat16 by transformers
            assert rel < 0.1 and top1 >= 0.95
    _, flat = read_hf_quantized(out)
    for path, v in _flat(qstate).items():
        np.testing.assert_array_equal(_values(flat[path]), _values(v), err_msg=path)
