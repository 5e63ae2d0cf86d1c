"""BERT encoder (all-MiniLM-L6-v2) against transformers' ``AutoModel`` in torch float32."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import qjax
from qjax import assets, data
from qjax.errors import FormatError, SpecError
from qjax.models.bert import BertConfig, load_bert, sentence_embeddings
from qjax.rules import path_str


@pytest.fixture(scope="module")
def minilm() -> Path:
    return assets.path("minilm")


@pytest.fixture(scope="module")
def loaded(minilm):
    return load_bert(minilm)


@pytest.fixture(scope="module")
def batch(minilm):
    """Eight real news sentences of different lengths, tokenized and padded by transformers."""
    from transformers import AutoTokenizer

    articles = data.lee_articles()
    sentences = [articles[i].split(". ")[0] + "." for i in range(0, 80, 10)]
    tok = AutoTokenizer.from_pretrained(minilm)
    enc = tok(sentences, padding=True, truncation=True, max_length=256, return_tensors="np")
    assert enc["attention_mask"].sum(1).min() < enc["input_ids"].shape[1]  # real padding
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.fixture(scope="module")
def reference(minilm, batch):
    """transformers' last hidden states and mean-pooled, L2-normalized embeddings (float64)."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm, dtype=torch.float32).eval()
    with torch.no_grad():
        h = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state
    h = h.numpy().astype(np.float64)
    m = batch["attention_mask"][..., None]
    e = (h * m).sum(1) / m.sum(1)
    return h, e / np.linalg.norm(e, axis=-1, keepdims=True)


@nnx.jit
def _forward(model, ids, mask, types):
    return model(ids, mask, types), sentence_embeddings(model, ids, mask, types)


def _run(model, batch):
    h, e = _forward(model, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return np.asarray(h, np.float64), np.asarray(e, np.float64)


def test_config_and_param_paths(loaded):
    cfg, model = loaded
    assert cfg == BertConfig(30522, 384, 6, 12, 1536, 512, 2, 1e-12, "gelu")
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    shapes = {path_str(k): tuple(v.shape) for k, v in leaves}
    assert len(shapes) == 5 + 6 * 16
    assert shapes["embeddings/word/embedding"] == (30522, 384)
    assert shapes["embeddings/norm/scale"] == (384,)
    assert shapes["layers/5/attn/q_proj/kernel"] == (384, 384)
    assert shapes["layers/0/attn/o_proj/bias"] == (384,)
    assert shapes["layers/0/mlp/up_proj/kernel"] == (384, 1536)
    assert shapes["layers/0/mlp/down_proj/kernel"] == (1536, 384)
    assert shapes["layers/3/mlp_norm/bias"] == (384,)


def test_parity_with_transformers(loaded, batch, reference):
    _, model = loaded
    h, e = _run(model, batch)
    ref_h, ref_e = reference
    real = batch["attention_mask"].astype(bool)
    assert np.abs(h - ref_h)[real].max() < 2e-5
    cos = (e * ref_e).sum(-1)
    assert cos.min() >= 0.99999, cos
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-6)


def test_padding_does_not_change_embeddings(loaded, batch):
    _, model = loaded
    _, e = _run(model, batch)
    n = int(batch["attention_mask"][0].sum())
    alone = {k: v[:1, :n] for k, v in batch.items()}
    _, e0 = _run(model, alone)
    np.testing.assert_allclose(e0[0], e[0], atol=1e-6)


def test_int8_kernels_through_qarray(loaded, batch, reference):
    """Quantized kernels (QArrays) go through qjax.ops.matmul; int8 per channel stays close."""
    _, model = loaded
    state = nnx.state(model, nnx.Param)
    rules = [(r".*kernel", qjax.Int(bits=8, group="channel")), (r".*", None)]
    qstate = qjax.quantize(state, rules)
    qmodel = nnx.merge(nnx.graphdef(model), qstate)
    kernel = nnx.state(qmodel, nnx.Param)["layers"][0]["attn"]["q_proj"]["kernel"].get_value()
    assert isinstance(kernel, qjax.QArray)
    _, e = _run(qmodel, batch)
    cos = (e * reference[1]).sum(-1)
    assert cos.min() > 0.999, cos


# ---------------------------------------------------------------------------- bad checkpoints


def _variant(src: Path, dst: Path, config=None, drop=(), add=None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if not drop and not add:
        (dst / "model.safetensors").symlink_to(src / "model.safetensors")
        return dst
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    save_file({**tensors, **(add or {})}, dst / "model.safetensors")
    return dst


def test_bad_checkpoints(minilm, tmp_path):
    d = _variant(minilm, tmp_path / "act", config={"hidden_act": "relu"})
    with pytest.raises(SpecError, match=r"act/config\.json: hidden_act 'relu'"):
        load_bert(d)
    d = _variant(minilm, tmp_path / "rel", config={"position_embedding_type": "relative_key"})
    with pytest.raises(SpecError, match="position_embedding_type 'relative_key'"):
        load_bert(d)
    d = _variant(minilm, tmp_path / "layers", config={"num_hidden_layers": 7})
    with pytest.raises(FormatError, match=r"no checkpoint tensor for param 'layers/6/"):
        load_bert(d)
    d = _variant(minilm, tmp_path / "width", config={"intermediate_size": 1024})
    with pytest.raises(FormatError, match=r"'layers/0/mlp/\w+_proj/kernel': checkpoint shape"):
        load_bert(d)
    d = _variant(minilm, tmp_path / "missing", drop={"encoder.layer.2.output.dense.bias"})
    with pytest.raises(FormatError, match=r"no checkpoint tensor for param 'layers/2/mlp/down"):
        load_bert(d)
    d = _variant(minilm, tmp_path / "extra", add={"cls.predictions.bias": np.zeros(3, np.float32)})
    with pytest.raises(FormatError, match=r"tensor 'cls\.predictions\.bias' is not part"):
        load_bert(d)
