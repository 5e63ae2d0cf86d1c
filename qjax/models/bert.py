"""BERT encoder (all-MiniLM-L6-v2 and other post-LN BERTs) in Flax NNX.

For token ids ``t`` (B, T), token types ``s`` and a padding mask ``m`` (1 = real token):

    x   = LN(E_word[t] + E_pos[0..T) + E_type[s])
    per layer:
        q, k, v = x Wq + bq, x Wk + bk, x Wv + bv              (split into H heads of size d)
        A   = softmax(q k^T / sqrt(d) + (m == 0) * finfo.min)  (padded keys get no weight)
        x   = LN(x + (A v) Wo + bo)
        x   = LN(x + GELU(x Wup + bup) Wdown + bdown)          (GELU with erf, exact)

LN is LayerNorm with ``layer_norm_eps`` (1e-12 for BERT), computed in float32.  Every dense
layer multiplies through :func:`qjax.ops.matmul` with an ``(in, out)`` kernel, so a QArray kernel
works anywhere a plain one does.  Param paths::

    embeddings/{word,position,token_type}/embedding   embeddings/norm/{scale,bias}
    layers/{i}/attn/{q_proj,k_proj,v_proj,o_proj}/{kernel,bias}   layers/{i}/attn_norm/{scale,bias}
    layers/{i}/mlp/{up_proj,down_proj}/{kernel,bias}              layers/{i}/mlp_norm/{scale,bias}

:func:`sentence_embeddings` is sentence-transformers' pooling: the mean of the last hidden states
over real tokens, L2-normalized.  The pooler head is not built (sentence embeddings do not use it).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax import ops
from qjax.convert.hf import read_hf_checkpoint
from qjax.errors import FormatError, SpecError
from qjax.rules import path_str

__all__ = ["BertConfig", "BertEncoder", "load_bert", "params_from_hf", "sentence_embeddings"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    #: "gelu" (erf, exact) or "gelu_tanh" (the tanh approximation).
    activation: str = "gelu"

    @classmethod
    def from_hf(cls, config: dict[str, Any], name: str = "config.json") -> BertConfig:
        """From a Hugging Face ``BertConfig`` dict; unsupported variants raise SpecError."""
        if config.get("model_type", "bert") != "bert":
            raise SpecError(f"{name}: model_type {config.get('model_type')!r} is not 'bert'")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise SpecError(
                f"{name}: position_embedding_type {config['position_embedding_type']!r} "
                "is not supported (only 'absolute')"
            )
        acts = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
        act = config.get("hidden_act", "gelu")
        if act not in acts:
            raise SpecError(f"{name}: hidden_act {act!r} not supported; supported: {list(acts)}")
        try:
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=int(config["hidden_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=int(config["num_attention_heads"]),
                intermediate_size=int(config["intermediate_size"]),
                max_position=int(config.get("max_position_embeddings", 512)),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                activation=acts[act],
            )
        except KeyError as e:
            raise FormatError(f"{name}: missing key {e.args[0]!r}") from None

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise SpecError(
                f"BertConfig: hidden_size {self.hidden_size} is not a multiple of "
                f"num_heads {self.num_heads}"
            )


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> jax.Array:
    return 0.02 * jax.random.normal(rngs.params(), shape, dtype)


class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with an ``(in, out)`` kernel, through :func:`qjax.ops.matmul`."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.kernel = nnx.Param(_init(rngs, (d_in, d_out), dtype))
        self.bias = nnx.Param(jnp.zeros((d_out,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return ops.matmul(x, self.kernel.get_value()) + self.bias.get_value().astype(x.dtype)


class LayerNorm(nnx.Module):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, in float32."""

    def __init__(self, dim: int, eps: float, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale.get_value().astype(jnp.float32) + self.bias.get_value()
        return y.astype(x.dtype)


class Embed(nnx.Module):
    def __init__(self, n: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.embedding = nnx.Param(_init(rngs, (n, dim), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding.get_value(), ids, axis=0)


class Embeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d = cfg.hidden_size
        self.word = Embed(cfg.vocab_size, d, rngs=rngs, dtype=dtype)
        self.position = Embed(cfg.max_position, d, rngs=rngs, dtype=dtype)
        self.token_type = Embed(cfg.type_vocab_size, d, rngs=rngs, dtype=dtype)
        self.norm = LayerNorm(d, cfg.layer_norm_eps, dtype)

    def __call__(self, ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        pos = jnp.arange(ids.shape[-1])
        x = self.word(ids) + self.position(pos) + self.token_type(token_type_ids)
        return self.norm(x)


class Attention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = Dense(d, d, rngs=rngs, dtype=dtype)
        self.k_proj = Dense(d, d, rngs=rngs, dtype=dtype)
        self.v_proj = Dense(d, d, rngs=rngs, dtype=dtype)
        self.o_proj = Dense(d, d, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, t, d = x.shape
        h = self.num_heads

        def heads(y):
            return y.reshape(b, t, h, d // h)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / np.sqrt(d // h)
        keep = mask[:, None, None, :].astype(bool)
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return self.o_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.up_proj = Dense(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=dtype)
        self.down_proj = Dense(cfg.intermediate_size, cfg.hidden_size, rngs=rngs, dtype=dtype)
        self.approximate = cfg.activation == "gelu_tanh"

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.gelu(self.up_proj(x), approximate=self.approximate))


class Layer(nnx.Module):
    """One post-LN transformer layer: ``x = LN(x + attn(x)); x = LN(x + mlp(x))``."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
        self.attn_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype)
        self.mlp_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = self.attn_norm(x + self.attn(x, mask))
        return self.mlp_norm(x + self.mlp(x))


class BertEncoder(nnx.Module):
    """``model(ids, mask=None, token_type_ids=None) -> last hidden states (B, T, hidden)``."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.config = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([Layer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_layers)])

    def __call__(
        self, ids: jax.Array, mask: jax.Array | None = None, token_type_ids: jax.Array | None = None
    ) -> jax.Array:
        ids = jnp.asarray(ids)
        mask = jnp.ones(ids.shape, jnp.int32) if mask is None else jnp.asarray(mask)
        types = jnp.zeros_like(ids) if token_type_ids is None else jnp.asarray(token_type_ids)
        x = self.embeddings(ids, types)
        for layer in self.layers:
            x = layer(x, mask)
        return x


def sentence_embeddings(
    model: BertEncoder, ids: jax.Array, mask: jax.Array, token_type_ids: jax.Array | None = None
) -> jax.Array:
    """Mean of the last hidden states over real tokens, L2-normalized: ``(B, hidden)``.

    ``e = sum_t m_t h_t / max(sum_t m_t, 1e-9)``, then ``e / max(||e||_2, 1e-12)``
    (sentence-transformers' ``Pooling(mean)`` + ``Normalize``).  Wrap in ``nnx.jit`` for speed.
    """
    h = model(ids, mask, token_type_ids).astype(jnp.float32)
    m = jnp.asarray(mask, jnp.float32)[..., None]
    e = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------- loading

#: Checkpoint tensors a BertEncoder does not use.
_IGNORED = re.compile(r"(bert\.)?(pooler\..*|embeddings\.position_ids)")
_HF_LINEARS = {
    "attention.self.query": "attn/q_proj",
    "attention.self.key": "attn/k_proj",
    "attention.self.value": "attn/v_proj",
    "attention.output.dense": "attn/o_proj",
    "intermediate.dense": "mlp/up_proj",
    "output.dense": "mlp/down_proj",
}
_HF_NORMS = {"attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "mlp_norm"}
_HF_EMBEDS = {
    "word_embeddings": "word",
    "position_embeddings": "position",
    "token_type_embeddings": "token_type",
}


def _hf_name_to_path(name: str) -> tuple[str, bool] | None:
    """Our param path for a HF BERT tensor name and whether to transpose it (linear weights)."""
    name = name.removeprefix("bert.")
    norm = {"weight": "scale", "bias": "bias", "gamma": "scale", "beta": "bias"}
    if m := re.fullmatch(r"embeddings\.(\w+)\.weight", name):
        if m.group(1) in _HF_EMBEDS:
            return f"embeddings/{_HF_EMBEDS[m.group(1)]}/embedding", False
    if m := re.fullmatch(r"embeddings\.LayerNorm\.(\w+)", name):
        if m.group(1) in norm:
            return f"embeddings/norm/{norm[m.group(1)]}", False
    if m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(\w+)", name):
        i, mod, leaf = m.groups()
        if mod in _HF_LINEARS and leaf in ("weight", "bias"):
            return f"layers/{i}/{_HF_LINEARS[mod]}/{'kernel' if leaf == 'weight' else 'bias'}", (
                leaf == "weight"
            )
        if mod in _HF_NORMS and leaf in norm:
            return f"layers/{i}/{_HF_NORMS[mod]}/{norm[leaf]}", False
    return None


def params_from_hf(tensors: dict[str, np.ndarray], source: str = "checkpoint") -> dict[str, Any]:
    """``{our/param/path: array}`` from HF BERT tensors (linear weights transposed to
    ``(in, out)``).  An unknown tensor raises FormatError naming it (pooler and position_ids are
    skipped)."""
    out = {}
    for name, value in tensors.items():
        if _IGNORED.fullmatch(name):
            continue
        mapped = _hf_name_to_path(name)
        if mapped is None:
            raise FormatError(f"{source}: tensor {name!r} is not part of a BERT encoder")
        path, transpose = mapped
        arr = np.asarray(value)
        out[path] = arr.T if transpose else arr
    return out


def load_bert(
    directory: str | os.PathLike[str], dtype=jnp.float32
) -> tuple[BertConfig, BertEncoder]:
    """``(config, model)`` from a Hugging Face BERT checkpoint directory (read by
    :func:`qjax.convert.hf.read_hf_checkpoint`).  Every param must be present with its exact shape
    and every checkpoint tensor must be used (or be the pooler / ``position_ids``), else
    FormatError naming the tensor."""
    hf_config, tensors = read_hf_checkpoint(directory)
    cfg = BertConfig.from_hf(hf_config, f"{directory}/config.json")
    params = params_from_hf(tensors, str(directory))
    model = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    new = []
    for keypath, leaf in leaves:
        path = path_str(keypath)
        if path not in params:
            raise FormatError(f"{directory}: no checkpoint tensor for param {path!r}")
        arr = params.pop(path)
        if tuple(arr.shape) != tuple(leaf.shape):
            raise FormatError(
                f"{directory}: param {path!r}: checkpoint shape {tuple(arr.shape)}, "
                f"config expects {tuple(leaf.shape)}"
            )
        new.append(jnp.asarray(arr, dtype))
    if params:
        raise FormatError(f"{directory}: checkpoint tensors not used: {sorted(params)[:5]}")
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
    return cfg, model
