"""Gemma 3 text decoder (Gemma Team 2025, "Gemma 3 Technical Report", arXiv:2503.19786).

Follows transformers' ``Gemma3ForCausalLM``::

    h = sqrt(d) · E[tokens]                                  # sqrt(d) cast to E's dtype first
    per block (all norms RMSNorm with (1 + w) scaling, w stored zero-centred):
        a = Attention(norm_in(h))                            # GQA, per-head q/k RMSNorm, RoPE
        h = h + norm_post_attn(a)
        m = GeGLU_tanh(norm_pre_mlp(h))
        h = h + norm_post_mlp(m)
    logits = norm_final(h) @ Eᵀ,  then  c · tanh(logits / c)  if final_logit_softcap = c

Attention alternates local and global layers (by default five sliding-window layers, then one
global one: layer ``i`` is global iff ``(i + 1) % 6 == 0``). Local layers see the last
``sliding_window`` keys (their own included) and use RoPE base ``rope_local_theta`` (10 000);
global layers see every earlier key and use ``rope_theta`` (1 000 000), with linear RoPE
scaling ``rope_scaling`` on the larger models. Scores are scaled by
``query_pre_attn_scalar^(-1/2)`` (``head_dim`` by default). Gemma 3 replaced Gemma 2's attention
logit soft-capping with the q/k norms: transformers' Gemma 3 ignores ``attn_logit_softcapping``,
and so do we; the final logits are soft-capped (Gemma 2, arXiv:2408.00118) only if configured.

Param paths::

    embed/embedding                                       (vocab, d)
    layers/{i}/input_norm/scale                           (d,)  before attention
    layers/{i}/attn/{q,k,v,o}_proj/kernel                 (in, out)
    layers/{i}/attn/{q,k}_norm/scale                      (head_dim,)
    layers/{i}/post_attn_norm/scale                       (d,)  on the attention output
    layers/{i}/pre_mlp_norm/scale                         (d,)  before the MLP
    layers/{i}/mlp/{gate,up,down}_proj/kernel             (in, out)
    layers/{i}/post_mlp_norm/scale                        (d,)  on the MLP output
    final_norm/scale                                      (d,)
"""

from __future__ import annotations

import dataclasses
import math
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
    gelu_tanh,
)

__all__ = ["Gemma3", "Gemma3Block", "Gemma3Config", "default_layer_types"]

SLIDING, FULL = "sliding", "full"


def default_layer_types(n_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Every ``pattern``-th layer global (``(i + 1) % pattern == 0``), the rest sliding."""
    return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers))


@dataclasses.dataclass(frozen=True)
class Gemma3Config:
    """Hyper-parameters of a Gemma 3 text model (gemma-3-270m values in the comments)."""

    vocab_size: int  # 262144
    d_model: int  # 640
    n_layers: int  # 18
    n_heads: int  # 4
    n_kv_heads: int  # 1
    head_dim: int  # 256
    d_ff: int  # 2048
    rms_eps: float = 1e-6
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_theta: float = 10_000.0  # sliding-window layers
    rope_scaling: float = 1.0  # linear position scaling of the global layers
    sliding_window: int = 512
    #: ``"sliding"`` / ``"full"`` per layer; empty means :func:`default_layer_types`.
    layer_types: tuple[str, ...] = ()
    query_pre_attn_scalar: float | None = None  # None: head_dim
    final_logit_softcap: float | None = None
    tie_embeddings: bool = True
    max_seq_len: int = 32768

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.n_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.n_layers or set(self.layer_types) - {SLIDING, FULL}:
            raise ValueError(
                f"layer_types must hold {self.n_layers} entries of {SLIDING!r}/{FULL!r}, "
                f"got {self.layer_types}"
            )


class Gemma3Block(nnx.Module):
    """A Gemma 3 block with pre- and post-norms: ``block(h, positions, cache) -> (h, cache)``."""

    #: Which norm feeds which sub-layer (for scale folding by calibration methods).
    PRE_NORMS: ClassVar[dict[str, str]] = {"attn": "input_norm", "mlp": "pre_mlp_norm"}

    def __init__(self, c: Gemma3Config, layer: int, *, rngs: nnx.Rngs, dtype: Any):
        local = c.layer_types[layer] == SLIDING
        self.is_sliding = local

        def norm(d):
            return RMSNorm(d, eps=c.rms_eps, offset=1.0, dtype=dtype)

        self.input_norm = norm(c.d_model)
        self.attn = Attention(
            c.d_model, c.n_heads, c.n_kv_heads, c.head_dim,
            rope_theta=c.rope_local_theta if local else c.rope_theta,
            rope_scaling=1.0 if local else c.rope_scaling,
            scale=attention_scale(c.query_pre_attn_scalar or c.head_dim),
            window=c.sliding_window if local else None,
            qk_norm_eps=c.rms_eps, norm_offset=1.0, rngs=rngs, dtype=dtype,
        )  # fmt: skip
        self.post_attn_norm = norm(c.d_model)
        self.pre_mlp_norm = norm(c.d_model)
        self.mlp = GatedMLP(c.d_model, c.d_ff, gelu_tanh, rngs=rngs, dtype=dtype)
        self.post_mlp_norm = norm(c.d_model)

    def __call__(
        self, h: jax.Array, positions: jax.Array | None = None, cache: KVCache | None = None
    ) -> tuple[jax.Array, KVCache | None]:
        if positions is None:
            positions = default_positions(h, cache)
        a, cache = self.attn(self.input_norm(h), positions, cache)
        h = h + self.post_attn_norm(a)
        h = h + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(h)))
        return h, cache


class Gemma3(DecoderLM):
    """Gemma 3 causal LM (text only). See the module docstring for the math and param paths."""

    def __init__(self, config: Gemma3Config, *, rngs: nnx.Rngs | None = None, dtype: Any = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dtype = dtype or jax.numpy.float32
        c = config
        self._init_trunk(
            c,
            Embed(c.vocab_size, c.d_model, scale=math.sqrt(c.d_model), rngs=rngs, dtype=dtype),
            [Gemma3Block(c, i, rngs=rngs, dtype=dtype) for i in range(c.n_layers)],
            RMSNorm(c.d_model, eps=c.rms_eps, offset=1.0, dtype=dtype),
            c.final_logit_softcap,
            rngs=rngs,
            dtype=dtype,
        )
