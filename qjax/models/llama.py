"""Llama-architecture decoder (Touvron et al. 2023, arXiv:2302.13971), e.g. SmolLM2-135M.

Pre-norm residual blocks::

    h = h + Attention(RMSNorm_in(h))          # GQA, RoPE, scale 1/sqrt(D), causal
    h = h + SwiGLU(RMSNorm_post_attn(h))

then ``logits = RMSNorm_final(h) @ Eᵀ`` (tied) or ``@ W_lm_head``. Numerically this follows
transformers' ``LlamaForCausalLM`` (norms and softmax in float32).

Param paths (``jax.tree_util.keystr(path, simple=True, separator="/")``)::

    embed/embedding                                   (vocab, d)
    layers/{i}/input_norm/scale                       (d,)     norm before attention
    layers/{i}/attn/{q,k,v,o}_proj/kernel             (in, out)
    layers/{i}/post_attn_norm/scale                   (d,)     norm before the MLP
    layers/{i}/mlp/{gate,up,down}_proj/kernel         (in, out)
    final_norm/scale                                  (d,)
    lm_head/kernel                                    (d, vocab), only if not tied
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
from flax import nnx

from qjax.models.common import (
    Attention,
    DecoderLM,
    Embed,
    GatedMLP,
    KVCache,
    RMSNorm,
    attention_scale,
    default_positions,
)

__all__ = ["Llama", "LlamaBlock", "LlamaConfig"]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-architecture model (SmolLM2-135M values in the comments)."""

    vocab_size: int  # 49152
    d_model: int  # 576
    n_layers: int  # 30
    n_heads: int  # 9
    n_kv_heads: int  # 3
    head_dim: int  # 64
    d_ff: int  # 1536
    rms_eps: float = 1e-5
    rope_theta: float = 10_000.0  # 100000
    tie_embeddings: bool = True
    max_seq_len: int = 2048  # 8192


class LlamaBlock(nnx.Module):
    """One pre-norm decoder block; ``block(h, positions, cache=None) -> (h, cache)``."""

    #: Which norm feeds which sub-layer (for scale folding by calibration methods).
    PRE_NORMS: ClassVar[dict[str, str]] = {"attn": "input_norm", "mlp": "post_attn_norm"}

    def __init__(self, c: LlamaConfig, *, rngs: nnx.Rngs, dtype: Any):
        self.input_norm = RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype)
        self.attn = Attention(
            c.d_model, c.n_heads, c.n_kv_heads, c.head_dim,
            rope_theta=c.rope_theta, scale=attention_scale(c.head_dim), rngs=rngs, dtype=dtype,
        )  # fmt: skip
        self.post_attn_norm = RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype)
        self.mlp = GatedMLP(c.d_model, c.d_ff, jax.nn.silu, rngs=rngs, dtype=dtype)

    def __call__(
        self, h: jax.Array, positions: jax.Array | None = None, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        if positions is None:
            positions = default_positions(h, cache)
        a, cache = self.attn(self.input_norm(h), positions, cache)
        h = h + a
        h = h + self.mlp(self.post_attn_norm(h))
        return h, cache


class Llama(DecoderLM):
    """Llama / SmolLM2 causal LM. See the module docstring for the math and param paths."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None = None, dtype: Any = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = dtype or jax.numpy.float32
        c = config
        self._init_trunk(
            c,
            Embed(c.vocab_size, c.d_model, rngs=rngs, dtype=dtype),
            [LlamaBlock(c, rngs=rngs, dtype=dtype) for _ in range(c.n_layers)],
            RMSNorm(c.d_model, eps=c.rms_eps, dtype=dtype),
            None,
            rngs=rngs,
            dtype=dtype,
        )
