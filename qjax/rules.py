"""Rules: which parameter of a pytree gets which quantization method.

A rule list is ``[(pattern, method), ...]``. Each floating-point leaf's path — ``keystr`` with
``/`` separators, e.g. ``layers/3/attn/q_proj/kernel`` (a trailing ``/value`` of Flax NNX
variables is dropped) — is matched with ``re.fullmatch`` against the patterns in order; the first
match wins. ``method`` is a format spec (meaning RTN onto it), an algorithm, or ``None`` to keep the
param in full precision. A param that no rule matches is an error unless ``default`` is given, and a
rule that matches nothing is an error (a typo must not pass silently).

The same call works on a Flax NNX ``State``, a Linen params dict, or any nested dict/list.
Non-floating leaves (integer buffers, step counters) and existing ``QArray`` leaves pass through.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qjax.algorithms import as_algorithm
from qjax.errors import NonFiniteError, RuleError
from qjax.qarray import QArray

_NO_DEFAULT = object()
Rules = Sequence[tuple[str, Any]]


def path_str(keypath) -> str:
    """``layers/0/kernel`` style path of a pytree key path (NNX ``/value`` suffix dropped)."""
    s = jax.tree_util.keystr(keypath, simple=True, separator="/")
    return s[: -len("/value")] if s.endswith("/value") else s


def _is_param(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and hasattr(leaf, "shape")


@dataclasses.dataclass(frozen=True)
class Assignment:
    """What the rules decided for one param."""

    path: str
    shape: tuple
    dtype: Any
    pattern: str | None  # None: taken by the default
    method: Any  # an algorithm, or None (kept)


def _compile(rules: Rules) -> list[tuple[str, re.Pattern, Any]]:
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise RuleError(f"rule {i} must be a (pattern, method) pair, got {rule!r}")
        try:
            compiled.append((rule[0], re.compile(rule[0]), as_algorithm(rule[1])))
        except re.error as err:
            raise RuleError(f"rule {i}: invalid regex {rule[0]!r}: {err}") from err
    return compiled


def plan(tree: Any, rules: Rules, *, default: Any = _NO_DEFAULT) -> list[Assignment]:
    """Matches every floating leaf of ``tree`` against ``rules`` (see the module docstring)."""
    compiled = _compile(rules)
    used = [False] * len(compiled)
    out, unmatched = [], []
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, QArray))[0]
    for keypath, leaf in leaves:
        if isinstance(leaf, QArray) or not _is_param(leaf):
            continue
        path = path_str(keypath)
        for i, (pattern, regex, method) in enumerate(compiled):
            if regex.fullmatch(path):
                used[i] = True
                out.append(Assignment(path, tuple(leaf.shape), leaf.dtype, pattern, method))
                break
        else:
            if default is _NO_DEFAULT:
                unmatched.append(path)
            else:
                out.append(
                    Assignment(path, tuple(leaf.shape), leaf.dtype, None, as_algorithm(default))
                )
    if unmatched:
        shown = ", ".join(unmatched[:10]) + (" ..." if len(unmatched) > 10 else "")
        raise RuleError(
            f"{len(unmatched)} param(s) matched by no rule and no default given: {shown}"
        )
    unused = [compiled[i][0] for i in range(len(compiled)) if not used[i]]
    if unused:
        raise RuleError(f"rule(s) matching no param (typo?): {unused}")
    return out


def _check_finite(x, path: str) -> None:
    if isinstance(x, jax.core.Tracer):
        return
    arr = np.asarray(x)
    if not np.isfinite(arr).all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise NonFiniteError(f"{path}: cannot quantize a tensor with {n_nan} NaN and {n_inf} Inf")


def quantize(tree: Any, rules: Rules, *, default: Any = _NO_DEFAULT, key: Any = None) -> Any:
    """Returns ``tree`` with each param replaced by its method's ``QArray`` (or kept).

    Pure: ``tree`` is not modified. Only calibration-free methods apply here; methods that need
    calibration statistics (GPTQ, AWQ, ...) run through ``qjax.ptq``.
    """
    decided = {a.path: a for a in plan(tree, rules, default=default)}
    for a in decided.values():
        if a.method is not None and getattr(a.method, "needs_calibration", False):
            raise RuleError(f"{a.path}: {a.method!r} needs calibration data; use qjax.ptq")

    def apply(keypath, leaf):
        a = decided.get(path_str(keypath)) if not isinstance(leaf, QArray) else None
        if a is None or a.method is None:
            return leaf
        _check_finite(leaf, a.path)
        return a.method(leaf, None, key, where=a.path)

    return jax.tree_util.tree_map_with_path(apply, tree, is_leaf=lambda x: isinstance(x, QArray))


def explain(tree: Any, rules: Rules, *, default: Any = _NO_DEFAULT, console: Any = None) -> list:
    """Prints which rule takes which param, with shapes, bits/weight and bytes; returns the rows."""
    from rich.console import Console
    from rich.table import Table

    rows = []
    for a in plan(tree, rules, default=default):
        before = math.prod(a.shape) * np.dtype(a.dtype).itemsize
        if a.method is None:
            after, label = before, "keep"
        else:
            after = a.method.spec.abstract(a.shape, a.dtype, where=a.path).nbytes
            label = a.method.label()
        n = math.prod(a.shape)
        rows.append(
            {
                "path": a.path,
                "shape": a.shape,
                "rule": a.pattern or "<default>",
                "method": label,
                "bits_per_weight": 8.0 * after / max(n, 1),
                "bytes_before": before,
                "bytes_after": after,
            }
        )
    table = Table(title="qjax.explain")
    for col in ("path", "shape", "rule", "method", "bits/w", "bytes before", "bytes after"):
        table.add_column(col, justify="right" if "bytes" in col or "bits" in col else "left")
    for r in rows:
        table.add_row(
            r["path"],
            str(r["shape"]),
            r["rule"],
            r["method"],
            f"{r['bits_per_weight']:.3f}",
            f"{r['bytes_before']:,}",
            f"{r['bytes_after']:,}",
        )
    tot_b = sum(r["bytes_before"] for r in rows)
    tot_a = sum(r["bytes_after"] for r in rows)
    n_tot = sum(math.prod(r["shape"]) for r in rows)
    table.add_row(
        "total",
        f"{n_tot:,} params",
        "",
        "",
        f"{8.0 * tot_a / max(n_tot, 1):.3f}",
        f"{tot_b:,}",
        f"{tot_a:,}",
        style="bold",
    )
    (console or Console(width=None if sys.stdout.isatty() else 160)).print(table)
    return rows
