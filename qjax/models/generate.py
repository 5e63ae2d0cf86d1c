"""Greedy decoding with a KV cache.

The prompt is run once through ``model.forward`` with empty caches (prefill); each later step
feeds the last chosen token alone (decode), ``argmax`` picking the next one. Both are one jitted
function of ``(params, tokens, caches)`` (the model's graph is static), compiled once for the
prompt's shape and once for a single token; the decode step is reused for every step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["generate"]


@functools.partial(jax.jit, static_argnums=0)
def _forward_last(graphdef, state, tokens, caches):
    """Logits of the last position ``(B, vocab)`` and the updated caches."""
    model = nnx.merge(graphdef, state)
    logits, caches = model.forward(tokens, caches=caches)
    return logits[:, -1], caches


def generate(model, prompt_ids, steps: int, *, max_len: int | None = None) -> np.ndarray:
    """Greedy continuation of ``prompt_ids`` by ``steps`` tokens.

    Args:
        model: a :class:`~qjax.models.common.DecoderLM` (plain or quantized params).
        prompt_ids: ``(T,)`` or ``(B, T)`` integer token ids (all rows of the same length).
        steps: number of new tokens; no early stop at end-of-sequence.
        max_len: KV cache length (default ``T + steps``).

    Returns:
        ``(T + steps,)`` or ``(B, T + steps)`` int32 ids: the prompt followed by the new tokens.
    """
    ids = jnp.asarray(prompt_ids, jnp.int32)
    squeeze = ids.ndim == 1
    if squeeze:
        ids = ids[None]
    batch, t = ids.shape
    if steps < 0:
        raise ValueError(f"generate: steps must be >= 0, got {steps}")
    max_len = max_len or t + steps
    if max_len < t + steps:
        raise ValueError(f"generate: max_len {max_len} < prompt {t} + steps {steps}")
    out = [np.asarray(ids)]
    if steps:
        graphdef, state = nnx.split(model)
        caches = model.init_cache(batch, max_len)
        logits, caches = _forward_last(graphdef, state, ids, caches)
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
        out.append(np.asarray(tok))
        for _ in range(steps - 1):
            logits, caches = _forward_last(graphdef, state, tok, caches)
            tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]
            out.append(np.asarray(tok))
    result = np.concatenate(out, axis=1)
    return result[0] if squeeze else result
