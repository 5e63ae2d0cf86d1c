"""llama.cpp quantization mixes (``qjax.convert.gguf.mixes``).

Fast tests (no llama.cpp): the per-tensor type table of SmolLM2 and Gemma 3 for every mix against
``data/gguf_mix_types.json`` (the types llama.cpp's own quantizer chose, written by
``experiments/gguf_mixes_vs_llamacpp.py --write-golden``), the fallback and layer rules, and
small synthetic models written with a mix and read back.
Slow tests (``-m slow``, need llama-cpp-python): the live comparison with llama.cpp's quantizer,
types and bytes.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from qjax.convert.gguf import GGMLType, GGUFValueType, quantize, read_gguf, write_gguf
from qjax.convert.gguf.mixes import (
    MIXES,
    ModelInfo,
    allows_quantization,
    fallback_type,
    quantize_model_gguf,
    tensor_category,
    tensor_type,
    tensor_types,
    use_more_bits,
)
from qjax.errors import FormatError, SpecError

T = GGMLType
GOLDEN = Path(__file__).parent / "data" / "gguf_mix_types.json"


# ---------------------------------------------------------------------------------- golden


def _golden() -> dict:
    return json.loads(GOLDEN.read_text())


def _golden_cases():
    g = _golden()
    return [(m, mix) for m, v in g["models"].items() for mix in v["mixes"]]


@pytest.mark.parametrize(("model", "mix"), _golden_cases())
def test_types_match_llamacpp_golden(model, mix):
    g = _golden()["models"][model]
    info = ModelInfo(**g["info"])
    tensors = [(n, tuple(s), T.F32) for n, s in g["tensors"]]  # the golden source is all F32
    want = dict(zip([n for n, _ in g["tensors"]], g["mixes"][mix].split(), strict=True))
    got = tensor_types(mix, tensors, info)
    assert {n: t.name for n, t in got.items()} == want
    # the stateless form agrees for these one-attn_v-per-layer models
    for name, shape, _ in tensors:
        one = tensor_type(
            mix, name, shape, info.n_layers, info.arch, n_head=info.n_head, n_head_kv=info.n_head_kv
        )
        assert (T.F32 if one is None else one) == got[name], name
    # and the input order does not matter (llama.cpp sorts by layer, then name)
    assert tensor_types(mix, tensors[::-1], info) == got


def test_golden_covers_the_mixes_and_hits_the_fallbacks():
    g = _golden()["models"]
    assert set(g) == {"smollm2", "gemma3"}
    for model in g.values():
        assert {"Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M", "Q6_K", "Q8_0", "Q4_0"} <= set(
            model["mixes"]
        )
    sm = dict(
        zip(
            [n for n, _ in g["smollm2"]["tensors"]],
            g["smollm2"]["mixes"]["Q4_K_M"].split(),
            strict=True,
        )
    )
    assert sm["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K on rows of 576 -> Q5_0
    assert sm["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K (use_more_bits) -> Q8_0
    assert sm["blk.0.ffn_down.weight"] == "Q6_K"  # rows of 1536 = 6 x 256: no fallback
    assert sm["token_embd.weight"] == "Q8_0"  # tied output, 576 % 256 != 0
    assert sm["output_norm.weight"] == "F32"


# ---------------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("t", "row", "want"),
    [
        (T.Q4_K, 576, T.Q5_0),
        (T.Q5_K, 576, T.Q5_1),
        (T.Q6_K, 640, T.Q8_0),
        (T.Q3_K, 576, T.Q4_0),
        (T.Q2_K, 576, T.Q4_0),
        (T.IQ4_XS, 576, T.IQ4_NL),
        (T.IQ2_XS, 96, T.IQ4_NL),
        (T.Q4_K, 1536, T.Q4_K),
        (T.Q6_K, 256, T.Q6_K),
        (T.Q4_K, 48, T.F16),  # the fallback does not fit either
        (T.Q8_0, 48, T.F16),
        (T.Q8_0, 64, T.Q8_0),
        (T.F16, 7, T.F16),
    ],
)
def test_fallback_type(t, row, want):
    assert fallback_type(t, row) == want


def test_use_more_bits_pattern():
    # n = 30: n/8 = 3, 7n/8 = 26: layers 0-2, 26-29, and 5, 8, ..., 23
    want = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(30) if use_more_bits(i, 30)] == want
    assert [i for i in range(18) if use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


def test_allows_quantization_and_categories():
    assert allows_quantization("blk.0.attn_q.weight", (64, 64))
    assert not allows_quantization("blk.0.attn_norm.weight", (64,))
    assert not allows_quantization("blk.0.attn_q_norm.weight", (4, 64))  # a norm, even 2-D
    assert not allows_quantization("blk.0.attn_q.weight", (1, 64))  # ggml_n_dims == 1
    assert not allows_quantization("blk.0.attn_q.bias", (64, 64))
    assert not allows_quantization("blk.0.ffn_gate_inp.weight", (8, 64))
    assert not allows_quantization("position_embd.weight", (512, 64))
    assert not allows_quantization("output.weight", (64, 64), quantize_output=False)
    cats = {
        "output.weight": "output",
        "token_embd.weight": "token_embd",
        "blk.3.attn_qkv.weight": "attn_qkv",
        "blk.3.attn_v.weight": "attn_v",
        "blk.3.attn_k.weight": "attn_k",
        "blk.3.attn_output.weight": "attn_output",
        "blk.3.ffn_down_exps.weight": "ffn_down",
        "blk.3.ffn_norm.weight": "other",
    }
    assert {n: tensor_category(n) for n in cats} == cats


def _llama_tensors(n_layers: int, width: int, ff: int, vocab: int = 64, tied: bool = True):
    out = [("token_embd.weight", (vocab, width)), ("output_norm.weight", (width,))]
    if not tied:
        out.append(("output.weight", (vocab, width)))
    for i in range(n_layers):
        p = f"blk.{i}."
        out += [
            (p + "attn_norm.weight", (width,)),
            (p + "attn_q.weight", (width, width)),
            (p + "attn_k.weight", (width // 4, width)),
            (p + "attn_v.weight", (width // 4, width)),
            (p + "attn_output.weight", (width, width)),
            (p + "ffn_norm.weight", (width,)),
            (p + "ffn_gate.weight", (ff, width)),
            (p + "ffn_up.weight", (ff, width)),
            (p + "ffn_down.weight", (width, ff)),
        ]
    return out


def test_rule_table_on_a_256_wide_model():
    info = ModelInfo("llama", 16, n_head=8, n_head_kv=2)
    tensors = _llama_tensors(16, 256, 512)
    q4km = tensor_types("Q4_K_M", tensors, info)
    more = [i for i in range(16) if use_more_bits(i, 16)]
    assert q4km["token_embd.weight"] == T.Q6_K  # tied: the output rule
    assert q4km["output_norm.weight"] is None  # not quantizable: keeps its source type
    for i in range(16):
        want = T.Q6_K if i in more else T.Q4_K
        assert q4km[f"blk.{i}.attn_v.weight"] == want
        assert q4km[f"blk.{i}.ffn_down.weight"] == want
        assert q4km[f"blk.{i}.attn_q.weight"] == T.Q4_K
    q3km = tensor_types("Q3_K_M", tensors, info)
    assert [q3km[f"blk.{i}.attn_v.weight"] for i in (0, 1, 2)] == [T.Q5_K, T.Q5_K, T.Q4_K]
    assert [q3km[f"blk.{i}.ffn_down.weight"] for i in (0, 1)] == [T.Q5_K, T.Q4_K]
    assert q3km["blk.5.attn_output.weight"] == T.Q4_K
    assert q3km["blk.5.ffn_up.weight"] == T.Q3_K
    q4ks = tensor_types("Q4_K_S", tensors, info)
    assert [q4ks[f"blk.{i}.attn_v.weight"] for i in (3, 4)] == [T.Q5_K, T.Q4_K]
    assert [q4ks[f"blk.{i}.ffn_down.weight"] for i in (1, 2)] == [T.Q5_K, T.Q4_K]
    q2k = tensor_types("Q2_K", tensors, info)  # n_gqa = 4
    assert q2k["blk.0.attn_v.weight"] == T.Q4_K and q2k["blk.0.ffn_down.weight"] == T.Q3_K
    assert tensor_types("Q8_0", tensors, info)["token_embd.weight"] == T.Q8_0
    assert tensor_types("F16", tensors, info)["token_embd.weight"] == T.F16
    untied = tensor_types("Q4_K_M", _llama_tensors(16, 256, 512, tied=False), info)
    assert untied["token_embd.weight"] == T.Q4_K and untied["output.weight"] == T.Q6_K
    # Q4_0/Q5_0 with an imatrix: the first n/8 ffn_down layers in Q4_1/Q5_1
    q40 = tensor_types("Q4_0", tensors, info, has_imatrix=True)
    assert [q40[f"blk.{i}.ffn_down.weight"] for i in (1, 2)] == [T.Q4_1, T.Q4_0]
    assert tensor_types("Q4_0", tensors, info)["blk.0.ffn_down.weight"] == T.Q4_0


def test_unknown_mix():
    with pytest.raises(SpecError, match="unknown llama.cpp mix"):
        tensor_type("Q4_K_XL", "blk.0.attn_q.weight", (256, 256), 4)
    assert MIXES["Q4_K_M"].ftype == 15 and MIXES["Q4_K_M"].default == T.Q4_K


# ---------------------------------------------------------------------------------- writing


def _write_source(path: Path, width: int, n_layers: int = 4, ff: int = 512) -> Path:
    rng = np.random.default_rng(0)
    meta = {
        "general.architecture": "llama",
        "general.name": "tiny",
        "general.file_type": 0,
        "llama.block_count": n_layers,
        "llama.embedding_length": width,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 1,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(64)],
    }
    vt = {"general.file_type": (GGUFValueType.UINT32,)}
    tensors = []
    for name, shape in _llama_tensors(n_layers, width, ff):
        x = rng.standard_normal(shape).astype(np.float32)
        tensors.append((name, T.F32, x, shape))
    return write_gguf(path, meta, tensors, value_types=vt)


@pytest.mark.parametrize(
    ("mix", "width"), [("Q4_K_M", 256), ("Q4_K_M", 96), ("Q3_K_M", 96), ("Q8_0", 96), ("F16", 96)]
)
def test_quantize_model_gguf_round_trip(tmp_path, mix, width):
    src = _write_source(tmp_path / "src.gguf", width)
    dst = quantize_model_gguf(src, tmp_path / f"{mix}.gguf", mix)
    r, s = read_gguf(dst), read_gguf(src)
    info = ModelInfo.from_metadata(s.metadata)
    assert info == ModelInfo("llama", 4, 4, 1, 0)
    want = tensor_types(mix, [(t.name, t.shape, t.ggml_type) for t in s.tensors.values()], info)
    assert list(r.tensors) == list(s.tensors)  # source order
    for name, t in r.tensors.items():
        assert t.ggml_type == want[name] and t.shape == s.tensors[name].shape
        expect = quantize(s.dequantize(name), t.ggml_type)
        assert np.array_equal(r.raw(name).reshape(expect.shape), expect), name
    assert r.metadata["general.file_type"] == MIXES[mix].ftype
    assert r.value_types["general.file_type"] == (GGUFValueType.UINT32,)
    assert r.metadata["general.quantization_version"] == 2
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.tokens", "general.name"):
        assert r.metadata[key] == s.metadata[key]
    types = {t.ggml_type for t in r.tensors.values()}
    if mix == "Q4_K_M" and width == 256:
        assert types == {T.F32, T.Q4_K, T.Q6_K}
    elif mix == "Q4_K_M":  # 96 = 3 x 32: Q4_K -> Q5_0, Q6_K -> Q8_0 (ffn_down rows of 512 fit)
        assert r.tensors["blk.0.attn_q.weight"].ggml_type == T.Q5_0
        # 4 layers: use_more_bits only for layer 3 (i >= 7n/8)
        assert r.tensors["blk.0.attn_v.weight"].ggml_type == T.Q5_0
        assert r.tensors["blk.3.attn_v.weight"].ggml_type == T.Q8_0
        assert r.tensors["blk.0.ffn_down.weight"].ggml_type == T.Q4_K
        assert r.tensors["blk.3.ffn_down.weight"].ggml_type == T.Q6_K
        assert r.tensors["token_embd.weight"].ggml_type == T.Q8_0
    elif mix == "Q3_K_M":
        assert r.tensors["blk.2.ffn_up.weight"].ggml_type == T.Q4_0  # Q3_K -> Q4_0


def test_quantize_model_gguf_copies_matching_types_and_takes_an_imatrix(tmp_path):
    src = _write_source(tmp_path / "src.gguf", 96)
    q8 = quantize_model_gguf(src, tmp_path / "q8.gguf", "Q8_0")
    # requantizing a Q8_0 file to Q4_K_M: the tied token_embd stays Q8_0 and is copied byte-exact
    q4 = quantize_model_gguf(q8, tmp_path / "q4.gguf", "Q4_K_M")
    a, b = read_gguf(q8), read_gguf(q4)
    assert b.tensors["token_embd.weight"].ggml_type == T.Q8_0
    assert np.array_equal(a.raw("token_embd.weight"), b.raw("token_embd.weight"))
    qw = {"blk.1.attn_q.weight": np.linspace(0.1, 3, 96, dtype=np.float32)}
    w = quantize_model_gguf(src, tmp_path / "qw.gguf", "Q4_K_M", imatrix=qw)
    s, r = read_gguf(src), read_gguf(w)
    want = quantize(s.dequantize("blk.1.attn_q.weight"), T.Q5_0, imatrix=qw["blk.1.attn_q.weight"])
    assert np.array_equal(r.raw("blk.1.attn_q.weight").reshape(want.shape), want)
    with pytest.raises(FormatError, match="imatrix"):
        quantize_model_gguf(
            src,
            tmp_path / "bad.gguf",
            "Q4_K_M",
            imatrix={"blk.1.attn_q.weight": np.ones(5, np.float32)},
        )
    assert not (tmp_path / "bad.gguf").exists()
    with pytest.raises(FormatError, match="onto itself"):
        quantize_model_gguf(src, src, "Q4_K_M")
    with pytest.raises(FormatError, match="source="):
        quantize_model_gguf({"not": "a file"}, tmp_path / "x.gguf", "Q4_K_M")


# ---------------------------------------------------------------------------------- live


def _need_llamacpp():
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install is a skip, not a failure
        pytest.skip(f"llama_cpp does not import: {e}")
    from experiments import gguf_mixes_vs_llamacpp as exp

    return exp


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_mixes_identical_to_live_llamacpp(tmp_path, model):
    exp = _need_llamacpp()
    exp.quiet_llama_logs()
    src = exp.f32_gguf(model, tmp_path)
    for mix in ("Q4_K_M", "Q3_K_M"):
        theirs, ours = tmp_path / f"{mix}_l.gguf", tmp_path / f"{mix}_q.gguf"
        exp.llamacpp_quantize(src, theirs, mix)
        quantize_model_gguf(src, ours, mix)
        res = exp.compare(ours, theirs)
        assert res["same_type"] == res["same_bytes"] == res["tensors"], res["mismatches"][:5]
        assert not res["metadata_differences"] and not res["extra_in_qjax"]
        theirs.unlink()
        ours.unlink()


@pytest.mark.slow
def test_qjax_q4_k_m_runs_in_llamacpp(tmp_path):
    exp = _need_llamacpp()
    from experiments import gguf_llamacpp_ppl as ppl
    from qjax import assets

    q = quantize_model_gguf(assets.path("smollm2"), tmp_path / "q4km.gguf", "Q4_K_M")
    windows, _ = ppl.windows_for("smollm2", 128, 2)
    del exp
    r = ppl.llamacpp_ppl(q, windows, 2)
    assert np.isfinite(r["ppl"]) and 1 < r["ppl"] < 100


def test_quantize_model_gguf_from_params(smollm2_gguf, tmp_path):
    """A qjax Llama's params (exported via F32) give the same file as the GGUF they came from."""
    from qjax.convert.gguf.load import load_gguf_model

    smollm2_model = load_gguf_model(smollm2_gguf)[1]
    a = quantize_model_gguf(smollm2_model, tmp_path / "p.gguf", "Q8_0", source=smollm2_gguf)
    b = quantize_model_gguf(smollm2_gguf, tmp_path / "g.gguf", "Q8_0")
    ra, rb = read_gguf(a), read_gguf(b)
    assert list(ra.tensors) == list(rb.tensors)
    for name in rb.tensors:
        assert ra.tensors[name].ggml_type == rb.tensors[name].ggml_type, name
        assert np.array_equal(ra.raw(name), rb.raw(name)), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.gguf", "p.gguf"]  # temp F32 gone
