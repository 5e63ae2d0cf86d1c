"""Language-model evaluation: perplexity, KL divergence from a reference, top-1 agreement.

Protocol (GPTQ paper and peers; REFERENCE §2): the test text is joined with ``"\\n\\n"`` and
tokenized once; :func:`eval_windows` cuts the ids into non-overlapping windows of ``context``
tokens. For models that need a BOS token at the start of every window (Gemma), each window is
``[BOS] + context - 1`` text tokens. Every token after the first of a window is scored — the
first is only context — and ``ppl = exp(mean NLL)``; a trailing partial window is dropped.

Against a reference model (the unquantized weights) we also report, per scored token, the KL
divergence ``KL(P_ref ‖ P_q) = Σ_v p_ref(v)·(log p_ref(v) − log p_q(v))`` (as llama.cpp's
``--kl-divergence``) and whether both models' argmax agree (top-1 agreement). All of it is reduced
on the device in one jitted step per batch, so the ``(B, T, V)`` logits never leave it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qjax.errors import ShapeError


def eval_windows(
    ids: np.ndarray, context: int, bos_id: int | None = None, max_windows: int | None = None
) -> np.ndarray:
    """Non-overlapping ``(n, context)`` windows of the token ids (see the module docstring)."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    body = context - 1 if bos_id is not None else context
    n = len(ids) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ShapeError(f"eval text has {len(ids)} tokens: too few for one window of {context}")
    windows = ids[: n * body].reshape(n, body)
    if bos_id is not None:
        windows = np.concatenate([np.full((n, 1), bos_id, np.int32), windows], axis=1)
    return windows


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate` measured. KLD fields are None without a reference."""

    ppl: float
    tokens: int
    windows: int
    context: int
    seconds: float
    ref_ppl: float | None = None
    kld_mean: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    top1_agreement: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _token_stats(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Log-probs ``(B, T-1, V)`` of the next-token predictions and the NLL of the true tokens."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return logp, nll


def _batch_stats(logits: jax.Array, ref_logits: jax.Array | None, tokens: jax.Array) -> dict:
    logp, nll = _token_stats(logits, tokens)
    out = {"nll": nll}
    if ref_logits is not None:
        ref_logp, ref_nll = _token_stats(ref_logits, tokens)
        out["ref_nll"] = ref_nll
        out["kld"] = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
        out["top1"] = jnp.argmax(logp, -1) == jnp.argmax(ref_logp, -1)
    return out


def evaluate(
    apply: Callable[[Any, jax.Array], jax.Array],
    params: Any,
    windows: np.ndarray,
    *,
    ref_params: Any = None,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Perplexity of ``apply(params, ·)`` over ``windows``, and KLD/top-1 against ``ref_params``.

    ``apply(params, tokens (B, T)) -> logits (B, T, V)``; the reference uses the same ``apply``
    with ``ref_params`` (e.g. the unquantized weights). Params are jit arguments, not constants.
    """

    @jax.jit
    def step(params, ref_params, tokens):
        ref = apply(ref_params, tokens) if ref_params is not None else None
        return _batch_stats(apply(params, tokens), ref, tokens)

    stats: dict[str, list] = {}
    t0 = time.perf_counter()
    n = len(windows)
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        batch = windows[start : start + batch_size]
        for k, v in step(params, ref_params, jnp.asarray(batch)).items():
            stats.setdefault(k, []).append(np.asarray(v))
    seconds = time.perf_counter() - t0
    cat = {k: np.concatenate(v).reshape(-1) for k, v in stats.items()}
    result = dict(
        ppl=math.exp(float(np.mean(cat["nll"], dtype=np.float64))),
        tokens=int(cat["nll"].size),
        windows=n,
        context=int(windows.shape[1]),
        seconds=seconds,
    )
    if "kld" in cat:
        kld = cat["kld"].astype(np.float64)
        result.update(
            ref_ppl=math.exp(float(np.mean(cat["ref_nll"], dtype=np.float64))),
            kld_mean=float(kld.mean()),
            kld_median=float(np.median(kld)),
            kld_p99=float(np.percentile(kld, 99)),
            top1_agreement=float(cat["top1"].mean()),
        )
    return EvalResult(**result)
