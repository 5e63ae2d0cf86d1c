"""Layers shared by the decoder-only language models (Llama, Gemma 3).

Every linear layer multiplies through :func:`qjax.ops.matmul`, so a kernel that the rules engine
replaced with a :class:`~qjax.QArray` runs through the quantized-matmul dispatch unchanged. Kernels
are stored Flax-style as ``(in, out)``: ``y = x @ W``.

Shapes: ``B`` batch, ``T`` query tokens, ``S`` key tokens, ``H`` query heads, ``K`` key/value
heads, ``G = H / K`` queries per key/value head, ``D`` head dimension.

Block protocol (what the calibration engine relies on)::

    h = model.embed(tokens)                       # (B, T) int -> (B, T, d)
    h, cache = model.layers[i](h, positions, cache=None)
    logits = model.head(h)                        # final norm, LM head, optional softcap

``model(tokens)`` composes exactly these; ``model.forward(tokens, positions, caches)`` also returns
the updated KV caches (see :class:`KVCache`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from qjax.ops import matmul
from qjax.qarray import QArray

_F32 = jnp.float32


def _value(param: nnx.Variable) -> Any:
    """A Variable's value: a plain array or a QArray (never indexed, so a QArray passes)."""
    return param.get_value()


def _dense(x: Any) -> jax.Array:
    return x.dequantize() if isinstance(x, QArray) else x


class Linear(nnx.Module):
    """``y = x @ W`` with ``W: (in, out)`` (no bias), through :func:`qjax.ops.matmul`."""

    def __init__(self, d_in: int, d_out: int, *, rngs: nnx.Rngs, dtype: Any = _F32):
        init = jax.nn.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul(x, _value(self.kernel))


class Embed(nnx.Module):
    """Token embedding ``h = scale * E[tokens]``, ``E: (vocab, d)``; ``attend(h) = h @ Eᵀ``.

    ``scale`` is ``None`` (Llama) or ``sqrt(d)`` (Gemma, cast to the table's dtype first, as the
    reference implementation does). A quantized table is dequantized for the lookup and the tied
    head.
    """

    def __init__(
        self, vocab: int, d: int, *, scale: float | None = None, rngs: nnx.Rngs, dtype: Any = _F32
    ):
        self.embedding = nnx.Param(
            jax.nn.initializers.normal(0.02)(rngs.params(), (vocab, d), dtype)
        )
        self.scale = scale

    def __call__(self, tokens: jax.Array) -> jax.Array:
        table = _dense(_value(self.embedding))
        h = jnp.take(table, tokens, axis=0)
        if self.scale is not None:
            h = h * jnp.asarray(self.scale, dtype=table.dtype)
        return h

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied LM head: logits ``h @ Eᵀ`` with float32 accumulation."""
        table = _dense(_value(self.embedding))
        return jnp.matmul(h, table.T.astype(h.dtype), preferred_element_type=_F32).astype(h.dtype)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019, arXiv:1910.07467).

    ``y = x / sqrt(mean(x², axis=-1) + eps) * (offset + w)``, computed in float32 and cast back to
    ``x.dtype``. Llama uses ``offset = 0`` with ``w`` initialised to ones; Gemma stores the weight
    zero-centred and scales by ``(1 + w)`` (``offset = 1``, ``w`` initialised to zeros).
    """

    def __init__(self, d: int, *, eps: float, offset: float = 0.0, dtype: Any = _F32):
        self.scale = nnx.Param(jnp.full((d,), 1.0 - offset, dtype))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(_F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        w = _dense(_value(self.scale)).astype(_F32)
        return (y * (self.offset + w) if self.offset else y * w).astype(x.dtype)


# ----------------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, scaling: float = 1.0) -> jax.Array:
    """RoPE inverse frequencies ``ω_i = θ^(-2i/D) / scaling`` for ``i < D/2`` (float32).

    ``scaling > 1`` is linear position interpolation (Chen et al. 2023, arXiv:2306.15595), used by
    the global layers of the larger Gemma 3 models.
    """
    exponent = jnp.arange(0, head_dim, 2, dtype=_F32) / head_dim
    return 1.0 / (jnp.asarray(theta, _F32) ** exponent) / scaling


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al. 2021, RoFormer, arXiv:2104.09864), half-split layout.

    With angles ``a_i = p · ω_i`` for position ``p`` and ``c = [cos a, cos a]``,
    ``s = [sin a, sin a]`` (each ``D`` long), ``rope(x) = x · c + rotate_half(x) · s`` where
    ``rotate_half([x₁, x₂]) = [-x₂, x₁]`` splits the head dimension in halves: dimension ``i``
    is rotated together with ``i + D/2`` (the Hugging Face layout; llama.cpp's GGUF export permutes
    Q/K rows into the interleaved layout, which the loader undoes).

    ``x: (B, T, heads, D)``, ``positions: (B, T)`` integers.
    """
    angles = positions.astype(_F32)[..., None] * inv_freq  # (B, T, D/2)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# ------------------------------------------------------------------------------ attention


class KVCache(NamedTuple):
    """Keys and values of one attention layer, preallocated to ``max_len`` slots.

    ``k, v: (B, max_len, K, D)``; ``end``: int32 scalar, the number of filled slots. Slot ``j``
    holds the token at position ``j`` (keys are stored after RoPE), so a call with ``T`` new
    tokens writes slots ``end .. end + T - 1`` and its queries must be at those positions (the
    default). All sequences of the batch share ``end`` (no padding support).
    """

    k: jax.Array
    v: jax.Array
    end: jax.Array

    @classmethod
    def zeros(cls, batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype: Any):
        shape = (batch, max_len, n_kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def attention_mask(
    q_pos: jax.Array, k_pos: jax.Array, window: int | None = None, k_valid: Any = None
) -> jax.Array:
    """Boolean ``(B, T, S)`` mask: query at ``p`` sees key at ``j`` iff ``j <= p`` (causal) and,
    for a sliding window of ``W`` tokens, ``j > p - W`` (the key window holds ``W`` tokens,
    the query's own included; transformers' convention). ``k_valid`` further masks keys."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    if k_valid is not None:
        mask = mask & k_valid[:, None, :]
    return mask


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float,
    softcap: float | None = None,
) -> jax.Array:
    """Scaled dot-product attention (Vaswani et al. 2017) with grouped KV heads (GQA, Ainslie et
    al. 2023, arXiv:2305.13245).

    ``softmax(s) V`` with scores ``s = scale · q kᵀ`` (``scale = 1/sqrt(D)`` for Llama,
    ``query_pre_attn_scalar^(-1/2)`` for Gemma), optionally soft-capped ``s ← c·tanh(s/c)``
    (Gemma 2), masked positions set to the float32 minimum; query head ``h`` uses KV head
    ``h // G``. Scores and softmax in float32. ``q: (B, T, H, D)``, ``k, v: (B, S, K, D)``,
    ``mask: (B, T, S)`` → ``(B, T, H·D)``.
    """
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    qg = q.reshape(b, t, n_kv, h // n_kv, d)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=_F32) * scale
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask[:, None, None], s, jnp.finfo(_F32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=_F32)
    return out.astype(q.dtype).reshape(b, t, h * d)


def default_positions(tokens_or_h: jax.Array, cache: KVCache | None = None) -> jax.Array:
    """``(B, T)`` positions ``start + [0, T)``, ``start`` = ``cache.end`` (0 without a cache)."""
    b, t = tokens_or_h.shape[:2]
    start = jnp.zeros((), jnp.int32) if cache is None else cache.end
    return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))


class Attention(nnx.Module):
    """Multi-head attention with GQA, RoPE, optional per-head q/k RMSNorm and sliding window.

    Params: ``q_proj (d, H·D)``, ``k_proj (d, K·D)``, ``v_proj (d, K·D)``, ``o_proj (H·D, d)``,
    and, if ``qk_norm_eps`` is given (Gemma 3), ``q_norm``, ``k_norm``: RMSNorms of size ``D``
    applied to each head before RoPE (``norm_offset`` as in :class:`RMSNorm`).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        rope_theta: float,
        rope_scaling: float = 1.0,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
        qk_norm_eps: float | None = None,
        norm_offset: float = 0.0,
        rngs: nnx.Rngs,
        dtype: Any = _F32,
    ):
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}")
        self.q_proj = Linear(d_model, n_heads * head_dim, rngs=rngs, dtype=dtype)
        self.k_proj = Linear(d_model, n_kv_heads * head_dim, rngs=rngs, dtype=dtype)
        self.v_proj = Linear(d_model, n_kv_heads * head_dim, rngs=rngs, dtype=dtype)
        self.o_proj = Linear(n_heads * head_dim, d_model, rngs=rngs, dtype=dtype)
        if qk_norm_eps is None:
            self.q_norm = self.k_norm = None
        else:
            self.q_norm = RMSNorm(head_dim, eps=qk_norm_eps, offset=norm_offset, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, eps=qk_norm_eps, offset=norm_offset, dtype=dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling
        self.scale, self.window, self.softcap = scale, window, softcap

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        inv_freq = rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        if cache is None:
            mask = attention_mask(positions, positions, self.window)
        else:
            start = cache.end
            zero = jnp.zeros((), jnp.int32)
            idx = (zero, start, zero, zero)
            k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), idx)
            v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), idx)
            slots = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), (b, k.shape[1]))
            mask = attention_mask(positions, slots, self.window, k_valid=slots < start + t)
            cache = KVCache(k, v, start + t)
        y = attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=self.scale,
                      softcap=self.softcap)  # fmt: skip
        return self.o_proj(y), cache


class GatedMLP(nnx.Module):
    """Gated feed-forward (Shazeer 2020, "GLU Variants Improve Transformer", arXiv:2002.05202).

    ``y = W_down (act(W_gate x) ⊙ W_up x)``: SwiGLU with ``act = SiLU`` (Llama), GeGLU with the
    tanh-approximated GELU (Hendrycks & Gimpel 2016) in Gemma.
    """

    def __init__(
        self, d_model: int, d_ff: int, act: Callable, *, rngs: nnx.Rngs, dtype: Any = _F32
    ):
        self.gate_proj = Linear(d_model, d_ff, rngs=rngs, dtype=dtype)
        self.up_proj = Linear(d_model, d_ff, rngs=rngs, dtype=dtype)
        self.down_proj = Linear(d_ff, d_model, rngs=rngs, dtype=dtype)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def gelu_tanh(x: jax.Array) -> jax.Array:
    """``0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))``: PyTorch's ``gelu(approximate='tanh')``."""
    return jax.nn.gelu(x, approximate=True)


# ------------------------------------------------------------------------------ the model


class DecoderLM(nnx.Module):
    """Shared skeleton of a decoder-only LM: ``embed``, ``layers``, ``final_norm``, LM head.

    Subclasses set ``config``, ``embed`` (:class:`Embed`), ``layers`` (an ``nnx.List`` of blocks
    with ``block(h, positions, cache=None) -> (h, cache)``), ``final_norm``, ``lm_head`` (a
    :class:`Linear`, or ``None`` when tied to the embedding) and ``logit_softcap``.
    """

    config: Any
    embed: Embed
    layers: nnx.List
    final_norm: RMSNorm
    lm_head: Linear | None
    logit_softcap: float | None = None

    def _init_trunk(
        self,
        config,
        embed: Embed,
        layers: list,
        final_norm: RMSNorm,
        logit_softcap: float | None,
        *,
        rngs: nnx.Rngs,
        dtype: Any,
    ) -> None:
        """Sets the parts every decoder shares; an untied config gets its own ``lm_head``."""
        self.config = config
        self.embed = embed
        self.layers = nnx.List(layers)
        self.final_norm = final_norm
        self.lm_head = (
            None
            if config.tie_embeddings
            else Linear(config.d_model, config.vocab_size, rngs=rngs, dtype=dtype)
        )
        self.logit_softcap = logit_softcap

    def head(self, h: jax.Array) -> jax.Array:
        """Final norm, LM head (tied: ``h @ Eᵀ``), then ``c·tanh(logits/c)`` if soft-capped."""
        h = self.final_norm(h)
        logits = self.embed.attend(h) if self.lm_head is None else self.lm_head(h)
        if self.logit_softcap is not None:
            c = self.logit_softcap
            logits = c * jnp.tanh(logits / c)
        return logits

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        caches: list[KVCache] | None = None,
    ) -> tuple[jax.Array, list[KVCache] | None]:
        """Logits ``(B, T, vocab)`` and the updated caches (``None`` if none were given).

        ``positions`` defaults to ``arange(T)``, or ``cache.end + arange(T)`` with caches.
        """
        if positions is None:
            positions = default_positions(tokens, None if caches is None else caches[0])
        h = self.embed(tokens)
        new_caches = None if caches is None else []
        for i, layer in enumerate(self.layers):
            h, cache = layer(h, positions, None if caches is None else caches[i])
            if new_caches is not None:
                new_caches.append(cache)
        return self.head(h), new_caches

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """Logits ``(B, T, vocab)`` of ``tokens: (B, T)`` (no cache)."""
        return self.forward(tokens, positions)[0]

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> list[KVCache]:
        """Empty KV caches, one per layer, of ``max_len`` slots (dtype: the embedding's)."""
        c = self.config
        dtype = dtype or _dense(_value(self.embed.embedding)).dtype
        return [
            KVCache.zeros(batch, max_len, c.n_kv_heads, c.head_dim, dtype)
            for _ in range(len(self.layers))
        ]


def attention_scale(query_pre_attn_scalar: float) -> float:
    """``1 / sqrt(query_pre_attn_scalar)`` (``= 1/sqrt(D)`` for standard attention)."""
    return 1.0 / math.sqrt(query_pre_attn_scalar)
