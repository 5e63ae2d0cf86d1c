"""What every quantized-matmul kernel checks and does around its ``pallas_call``.

Kernels take bf16 activations ``x: (..., K)`` and a QArray repacked to one of their layouts;
:func:`supports` is the registry predicate (``qjax.ops.matmul`` falls back, logged, when it is
false), :func:`check` raises the error a direct call gets, and :func:`as_rows` flattens ``x`` to
``(M, K_p)`` rows zero-padded to the repacked ``K_p``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.errors import FormatError, ShapeError
from qjax.qarray import QArray


def supports(x: jax.Array, w, layouts: tuple[str, ...]) -> bool:
    """bf16 activations, a non-empty ``x`` and a weight in one of ``layouts`` with ``K`` rows."""
    return (
        isinstance(w, QArray)
        and w.layout in layouts
        and x.dtype == jnp.bfloat16
        and x.ndim >= 1
        and x.shape[-1] == w.shape[0]
        and x.size > 0
    )


def check(name: str, x: jax.Array, w, layouts: tuple[str, ...]) -> None:
    """Raises a :class:`~qjax.QjaxError` saying why kernel ``name`` cannot take ``x @ w``."""
    if not isinstance(w, QArray) or w.layout not in layouts:
        got = w.layout if isinstance(w, QArray) else type(w).__name__
        raise FormatError(
            f"{name} needs a weight repacked to {layouts} "
            f"(qjax.kernels.repack.repack), got layout {got!r}"
        )
    if x.dtype != jnp.bfloat16:
        raise FormatError(f"{name} takes bf16 activations, got {x.dtype}")
    if len(w.shape) != 2 or x.shape[-1] != w.shape[0]:
        raise ShapeError(f"{name}: x {tuple(x.shape)} @ w {tuple(w.shape)}: K mismatch")


def as_rows(x: jax.Array, k_p: int) -> jax.Array:
    """``x (..., K)`` → ``(M, K_p)``, zero-padded along K to the repacked length."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if k_p == x2.shape[1] else jnp.pad(x2, [(0, 0), (0, k_p - x2.shape[1])])


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The split-K factor: the largest divisor of ``n`` K chunks not above ``cap`` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)
