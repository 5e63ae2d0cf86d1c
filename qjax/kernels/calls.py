"""What every quantized-matmul kernel checks and does around its ``pallas_call``.

Kernels take bf16 activations ``x: (..., K)`` and a QArray repacked to one of their layouts;
:func:`supports` is the registry predicate (``qjax.ops.matmul`` falls back, logged, when it is
false), :func:`check` raises the error a direct call gets, and :func:`as_rows` flattens ``x`` to
``(M, K_p)`` rows zero-padded to the repacked ``K_p``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from qjax.errors import FormatError, ShapeError
from qjax.kernels import repack as rp
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


def split_k_output(split: int, m: int, n_p: int, bm: int, bn: int, dtype, tile, split_id):
    """``(out_shape, out_spec)`` of a split-K GPU kernel: ``(m, n_p)`` blocks in ``dtype`` when
    ``split == 1``, else float32 partials ``(split, m, n_p)`` that :func:`sum_splits` adds.
    ``tile(*grid_ids)`` gives the output tile ``(row, column)``, ``split_id(*grid_ids)`` the
    split."""
    if split == 1:
        return jax.ShapeDtypeStruct((m, n_p), dtype), pl.BlockSpec((bm, bn), tile)
    spec = pl.BlockSpec((None, bm, bn), lambda *g: (split_id(*g), *tile(*g)))
    return jax.ShapeDtypeStruct((split, m, n_p), jnp.float32), spec


def sum_splits(y: jax.Array, dtype) -> jax.Array:
    """The kernel's output as is, or its float32 split-K partials summed by XLA into ``dtype``."""
    return y if y.ndim == 2 else jnp.sum(y, axis=0).astype(dtype)


@jax.jit
def dequantized_matmul(x2: jax.Array, w: QArray) -> jax.Array:
    """The GPU kernels' large-M path: the weight dequantized by one elementwise XLA pass from its
    kernel layout, then XLA's bf16 GEMM with float32 accumulation.

    The Mosaic GPU layouts are dequantized as stored (``(N_p, K_p)``, K in the kernel's register
    order, :func:`qjax.kernels.repack.dequantize_stored`) and ``x``'s columns are permuted to
    match, so the GEMM reads the weight transposed and nothing large is permuted; the barrier
    keeps XLA from fusing the dequantization into its GEMM (permuting the weight back instead
    ran at 0.12–0.21× bf16 at M = 2048 on the H100; ``experiments/results/kernels/README.md``).
    """
    if w.layout in rp.SLICED_DTYPES:
        from qjax.kernels.gpu.mgpu_decode import x_to_stored

        wd = jax.lax.optimization_barrier(rp.dequantize_stored(w))
        # bf16 out: the GEMM accumulates in float32 and rounds once (no separate cast pass)
        nt = (((1,), (1,)), ((), ()))
        xs = x_to_stored(x2, rp.LAYOUTS[w.layout])
        return jax.lax.dot_general(xs, wd, nt, preferred_element_type=x2.dtype)
    wd = rp.dequantize_bf16(w)
    return jnp.dot(x2, wd, preferred_element_type=jnp.float32).astype(x2.dtype)
