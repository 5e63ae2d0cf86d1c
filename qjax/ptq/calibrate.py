"""The calibration engine: runs a decoder LM block by block and quantizes it as it goes.

Written once for every method. For ``N`` calibration windows of ``L`` tokens:

1. the embeddings of all windows are computed (with the embedding already quantized if a rule
   says so);
2. for each block ``k`` in order, the block runs on its input hidden states — the outputs of the
   already-*quantized* blocks ``< k`` (true-sequential) — and every linear layer's input ``x``
   is captured at the single dispatch point :func:`qjax.ops.matmul` (no model changes), giving
   the statistics methods ask for, accumulated in float32 under ``jit``:
   ``H = 2·Σ xxᵀ / n`` (GPTQ), per-input-channel ``mean|x|`` and ``max|x|`` (AWQ, SmoothQuant);
3. the block's params are quantized by their rules' methods (statistics passed to those that
   need calibration), and the *quantized* block's outputs become the next block's inputs;
4. params outside the blocks (embedding, final norm, untied head) take calibration-free methods.

Only one block's activations (``N × L × d``) are held at a time, so memory is bounded by one
block, not the model. Deterministic for a given set of windows.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from qjax import data
from qjax.errors import RuleError
from qjax.ops import capture_inputs
from qjax.ptq import folding
from qjax.qarray import QArray
from qjax.rules import _NO_DEFAULT, _check_finite, path_str, plan


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Statistics of one linear layer's inputs ``x (n, K)`` over the calibration set."""

    hessian: jax.Array  # 2·XᵀX/n, (K, K) float32
    abs_mean: jax.Array  # mean |x| per input channel, (K,)
    abs_max: jax.Array  # max |x| per input channel, (K,)
    tokens: int


def calibration_tokens(
    encode, n: int, length: int, seed: int = 0, bos_id: int | None = None
) -> np.ndarray:
    """``n`` random windows of ``length`` tokens from the calibration split (REFERENCE §2).

    ``encode(text) -> ids`` tokenizes the calibration articles joined with ``"\\n\\n"``. With
    ``bos_id`` each window is ``[BOS] + (length - 1)`` tokens.
    """
    ids = np.asarray(encode("\n\n".join(data.calibration_texts())), np.int32)
    body = length - 1 if bos_id is not None else length
    windows = data.calibration_windows(ids, n, body, seed)
    if bos_id is not None:
        windows = np.concatenate([np.full((n, 1), bos_id, np.int32), windows], axis=1)
    return windows


def _param_values(module: nnx.Module) -> dict[str, Any]:
    """``{relative path: value}`` of a module's params (values as the model sees them)."""
    state = nnx.state(module, nnx.Param)
    leaves = jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    return {path_str(p): v.get_value() if isinstance(v, nnx.Variable) else v for p, v in leaves}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _block_forward(graphdef, state, h, want_stats: bool):
    block = nnx.merge(graphdef, state)
    stats: dict[str, dict] = {}
    if not want_stats:
        return block(h, None)[0], stats
    ids = {id(v): p for p, v in _param_values(block).items()}
    by_input: dict[int, dict] = {}

    def record(x, w):
        path = ids.get(id(w))
        if path is None:
            return
        if id(x) not in by_input:  # q/k/v (and gate/up) share one input: one XᵀX
            x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
            by_input[id(x)] = {
                "xtx": x2.T @ x2,
                "abs_sum": jnp.sum(jnp.abs(x2), 0),
                "abs_max": jnp.max(jnp.abs(x2), 0),
            }
        stats[path] = by_input[id(x)]

    with capture_inputs(record):
        out = block(h, None)[0]
    return out, stats


def _accumulate(total: dict, part: dict) -> dict:
    if not total:
        return part
    return {
        p: {
            "xtx": total[p]["xtx"] + s["xtx"],
            "abs_sum": total[p]["abs_sum"] + s["abs_sum"],
            "abs_max": jnp.maximum(total[p]["abs_max"], s["abs_max"]),
        }
        for p, s in part.items()
    }


def _apply(method, weight, stats, key, where) -> QArray:
    _check_finite(weight, where)
    return method(weight, stats, key, where=where)


def quantize_model(
    model: nnx.Module,
    rules,
    tokens: np.ndarray,
    *,
    default: Any = _NO_DEFAULT,
    batch_size: int = 8,
    key: Any = None,
    progress: bool = True,
):
    """Quantizes a decoder LM (``embed``, ``layers``, ``head``) with calibration data.

    Args:
      model: a :class:`qjax.models.common.DecoderLM` (not modified).
      rules: as in :func:`qjax.quantize`; methods may need calibration (GPTQ) or not (RTN, HQQ).
      tokens: ``(N, L)`` calibration windows, e.g. from :func:`calibration_tokens`.
    Returns:
      ``(qstate, report)``: the quantized ``nnx.State`` of params (apply with ``nnx.update``) and
      one report row per quantized param (method, seconds, relative output error ``tr(ΔᵀHΔ) /
      tr(WᵀHW)`` for calibrated layers).
    """
    with jax.default_matmul_precision("highest"):  # see the module docstring
        return _quantize_blocks(model, rules, tokens, default, batch_size, key, progress)


def _quantize_blocks(model, rules, tokens, default, batch_size, key, progress):
    state = nnx.state(model, nnx.Param)
    decided = {a.path: a for a in plan(state, rules, default=default) if a.method is not None}
    n_layers = len(model.layers)
    in_blocks = {p for p in decided if p.startswith("layers/")}
    for p in set(decided) - in_blocks:
        if getattr(decided[p].method, "needs_calibration", False):
            raise RuleError(f"{p}: calibration methods apply to the blocks' linear layers only")
    values = _param_values(model)
    new: dict[str, QArray] = {}
    report: list[dict] = []

    def quantize_now(path, stats=None):
        t0 = time.perf_counter()
        method = decided[path].method
        weight = values[path]
        needs = getattr(method, "needs_calibration", False)
        q = jax.block_until_ready(_apply(method, weight, stats if needs else None, key, path))
        row = {
            "path": path,
            "method": method.label(),
            "seconds": time.perf_counter() - t0,
            "bits_per_weight": q.bits_per_weight,
        }
        if stats is not None:
            delta = q.dequantize().astype(jnp.float32) - weight.astype(jnp.float32)
            hw = stats.hessian
            num = jnp.sum(delta * (hw @ delta))
            den = jnp.sum(weight * (hw @ weight.astype(jnp.float32)))
            row["rel_output_error"] = float(num / den)
        report.append(row)
        new[path] = q

    # the embedding first: block 0 must see its quantized output
    for p in [p for p in decided if p.startswith("embed/")]:
        quantize_now(p)
    embed_graph, embed_state = nnx.split(model.embed)
    if any(p.startswith("embed/") for p in new):
        embed_state = _replace(
            embed_state, {p[len("embed/") :]: q for p, q in new.items() if p.startswith("embed/")}
        )
    embed_fn = jax.jit(lambda s, t: nnx.merge(embed_graph, s)(t))
    hs = [
        embed_fn(embed_state, jnp.asarray(tokens[i : i + batch_size]))
        for i in range(0, len(tokens), batch_size)
    ]

    for k in tqdm(range(n_layers), desc="calibrating blocks", unit="block", disable=not progress):
        prefix = f"layers/{k}/"
        mine = sorted(p for p in in_blocks if p.startswith(prefix))
        graph, bstate = nnx.split(model.layers[k])
        needs_stats = any(getattr(decided[p].method, "needs_calibration", False) for p in mine)
        total: dict = {}
        if needs_stats:
            for h in hs:
                total = _accumulate(total, _block_forward(graph, bstate, h, True)[1])
        n_tok = sum(int(np.prod(h.shape[:-1])) for h in hs)
        stats = {
            rel: LayerStats(2.0 * s["xtx"] / n_tok, s["abs_sum"] / n_tok, s["abs_max"], n_tok)
            for rel, s in total.items()
        }
        methods = {p[len(prefix) :]: decided[p].method for p in mine}
        if any(getattr(m, "transforms_block", False) for m in methods.values()):
            before = {rel: values[prefix + rel] for rel in _param_values(model.layers[k])}
            after, stats = folding.transform_block(model.layers[k], before, stats, methods)
            for rel, v in after.items():
                values[prefix + rel] = v
                if rel not in methods and v is not before[rel]:
                    new[prefix + rel] = v  # folded scales (norm weights) stay float
        for p in mine:
            quantize_now(p, stats.get(p[len(prefix) :]))
        block_new = {p[len(prefix) :]: v for p, v in new.items() if p.startswith(prefix)}
        qstate = _replace(bstate, block_new)
        hs = [_block_forward(graph, qstate, h, False)[0] for h in hs]

    for p in [p for p in decided if p not in new]:  # final norm, untied head
        quantize_now(p)
    return _replace(state, new), report


def _replace(state, by_path: dict):
    """``state`` with the leaves at ``by_path``'s paths replaced."""

    def swap(keypath, leaf):
        return by_path.get(path_str(keypath), leaf)

    return jax.tree_util.tree_map_with_path(swap, state)
