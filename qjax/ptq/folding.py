"""Folding per-input-channel scales into the op that produces a linear layer's input.

AWQ and SmoothQuant both rescale input channel ``j`` of the linears that share one input: the
consumers' kernel rows are multiplied by ``s_j`` and the producer's output divided by ``s_j``, so
the float model's function is unchanged:

* producer an RMSNorm ``y = x̂ · (offset + w)``: ``w ← (offset + w) / s − offset``;
* producer a linear (``up → down``, and ``v → o`` without GQA head sharing): its output columns
  ``W[:, j] ← W[:, j] / s_j``.

The consumers' input statistics follow: ``H ← D⁻¹HD⁻¹``, ``mean|x| ← mean|x| / s``.
A method takes part through two hooks: ``input_scales(kind, kernels, stats) -> s | None`` and
``adjust_weight(kernel, stats) -> kernel`` (e.g. AWQ's clipping search).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def _scale_groups(block, params: dict) -> list[tuple[str, str, list[str]]]:
    """``(kind, producer, consumers)``: which op produces the input of which linears.

    ``kind`` is ``"norm"`` (an RMSNorm weight) or ``"linear"`` (a preceding linear's output
    columns). From the block's ``PRE_NORMS`` and the standard projection names; ``v → o`` only
    when the shapes allow it (no GQA head sharing), as in the reference implementation.
    """
    norms = getattr(block, "PRE_NORMS", {})
    groups = []
    if "attn" in norms:
        groups.append(
            ("norm", f"{norms['attn']}/scale", [f"attn/{p}_proj/kernel" for p in ("q", "k", "v")])
        )
    if "mlp" in norms:
        groups.append(
            ("norm", f"{norms['mlp']}/scale", [f"mlp/{p}_proj/kernel" for p in ("gate", "up")])
        )
    groups.append(("linear", "mlp/up_proj/kernel", ["mlp/down_proj/kernel"]))
    v, o = params.get("attn/v_proj/kernel"), params.get("attn/o_proj/kernel")
    if v is not None and o is not None and v.shape[1] == o.shape[0]:
        groups.append(("linear", "attn/v_proj/kernel", ["attn/o_proj/kernel"]))
    return [
        (k, prod, [c for c in cons if c in params])
        for k, prod, cons in groups
        if prod in params and all(c in params for c in cons)
    ]


def transform_block(block, params: dict, stats: dict, methods: dict) -> tuple[dict, dict]:
    """Folds the methods' input scales into one block; returns updated ``params`` and ``stats``.

    ``params``: relative path → float array (the block's params); ``stats``: relative path →
    :class:`~qjax.ptq.calibrate.LayerStats` of each linear; ``methods``: relative path → the
    param's method. A group is scaled when its first consumer's method has ``input_scales``.
    """
    params, stats = dict(params), dict(stats)
    for kind, producer, consumers in _scale_groups(block, params):
        method = methods.get(consumers[0])
        if not hasattr(method, "input_scales"):
            continue
        s = method.input_scales(kind, [params[c] for c in consumers], stats[consumers[0]])
        if s is None:
            continue
        if kind == "norm":
            offset = getattr(block, producer.split("/")[0]).offset
            w = params[producer].astype(jnp.float32)
            params[producer] = ((offset + w) / s - offset).astype(params[producer].dtype)
        else:
            w = params[producer].astype(jnp.float32)
            params[producer] = (w / s[None, :]).astype(params[producer].dtype)
        for c in consumers:  # every consumer of the input sees x / s
            params[c] = (params[c].astype(jnp.float32) * s[:, None]).astype(params[c].dtype)
            old = stats[c]
            stats[c] = dataclasses.replace(
                old,
                hessian=old.hessian / (s[:, None] * s[None, :]),
                abs_mean=old.abs_mean / s,
                abs_max=old.abs_max / s,
            )
    for c, m in methods.items():
        if hasattr(m, "adjust_weight") and c in stats:
            params[c] = m.adjust_weight(params[c], stats[c])
    return params, stats
