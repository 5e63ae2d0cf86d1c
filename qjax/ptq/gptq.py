"""GPTQ: one-shot weight quantization with second-order error feedback.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (ICLR 2023, arXiv:2210.17323). For a linear layer with weight rows ``w`` (one per
output channel) and calibration inputs ``X`` the layer-wise objective is ``‖wX − ŵX‖²``, whose
Hessian is ``H = 2XXᵀ/n``. Columns (inputs) are quantized one at a time; after quantizing column
``j`` the rounding error is spread over the not-yet-quantized columns through the inverse Hessian:

    e = (w_j − q(w_j)) / [H⁻¹]_jj,      w_{j+1:} ← w_{j+1:} − e · [H⁻¹]_{j, j+1:}

with ``H⁻¹`` replaced by its upper Cholesky factor ``U`` (``H⁻¹ = UᵀU``), which gives the same
updates in the column order and is numerically robust (paper §4, "Cholesky reformulation").
Details that implementations get wrong (REFERENCE §6), all here:

* dead inputs (``H_jj = 0``) get ``H_jj = 1`` and a zero weight column;
* damping ``λ = damp · mean(diag H)`` added to the diagonal;
* lazy batch updates in blocks of ``block_size`` columns (mathematically identical, faster);
* act-order: columns in order of decreasing ``H_jj``; the permutation is undone exactly. With
  ``static_groups`` the group grids are fixed up front from the original weights in the original
  column order (kernel-friendly); without, groups are consecutive columns of the permuted order and
  the QArray keeps the permutation in ``aux["perm"]`` (``dequantize`` undoes it);
* group grids are chosen when the group's first column is reached, from the weights as updated by
  the error feedback so far; per-channel grids are chosen once from the original weights.

All math is float32 on the device (float64 where enabled); the Hessian must be at least float32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from qjax.errors import QjaxError, ShapeError, SpecError
from qjax.formats import packing
from qjax.formats.uniform import Int
from qjax.qarray import QArray


class HessianError(QjaxError):
    """The damped Hessian of a layer is not positive definite (Cholesky failed)."""


def _prepare_hessian(h: jax.Array, w: jax.Array, damp: float) -> tuple[jax.Array, jax.Array]:
    """Dead-input fix and damping; returns ``(H, W)`` with dead columns of ``W`` zeroed."""
    diag = jnp.diag(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(h.dtype))
    w = jnp.where(dead[None, :], 0.0, w)
    lam = damp * jnp.mean(jnp.diag(h))
    return h + lam * jnp.eye(h.shape[0], dtype=h.dtype), w


def _upper_inverse_cholesky(h: jax.Array) -> jax.Array:
    """``U`` upper triangular with ``H⁻¹ = UᵀU``."""
    lower = jnp.linalg.cholesky(h)
    eye = jnp.eye(h.shape[0], dtype=h.dtype)
    lower_inv = jax.scipy.linalg.solve_triangular(lower, eye, lower=True)
    h_inv = lower_inv.T @ lower_inv
    return jnp.linalg.cholesky(h_inv).T


@functools.partial(jax.jit, static_argnames=("spec", "group", "block_size", "static_grid"))
def _gptq_core(
    w,
    u,
    static_scale,
    static_zero,
    group_of_col,
    *,
    spec: Int,
    group: int,
    block_size: int,
    static_grid: bool,
):
    """Quantizes ``w (N, Kp)`` column by column; ``u`` is the upper Cholesky factor of ``H⁻¹``.

    Returns codes ``(N, Kp)`` and the grids ``scale, zero`` of shape ``(N, G)``. With
    ``static_grid`` the grids are given (``static_*`` indexed by ``group_of_col``); otherwise a
    group's grid is computed from the current weights when its first column is reached.
    """
    n, kp = w.shape
    n_groups = static_scale.shape[1]
    cols = jnp.arange(block_size)

    def column(i, carry, i1):
        w1, err1, codes, scales, zeros, s, z = carry
        j = i1 + i
        if static_grid:
            g = group_of_col[j]
            s, z = static_scale[:, g], static_zero[:, g]
        else:

            def new_grid(_):
                chunk = jax.lax.dynamic_slice(w1, (0, i), (n, group))
                gs, gz = spec.grid(chunk)
                return gs.astype(w1.dtype), gz.astype(w1.dtype)

            s, z = jax.lax.cond(j % group == 0, new_grid, lambda _: (s, z), None)
            gi = j // group
            scales = jax.lax.dynamic_update_slice(scales, s[:, None], (0, gi))
            zeros = jax.lax.dynamic_update_slice(zeros, z[:, None], (0, gi))
        col = jax.lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
        code = spec.encode(col, s, z)
        err = (col - spec.decode(code, s, z)) / u[j, j]
        row = jax.lax.dynamic_slice(u, (j, i1), (1, block_size))[0]
        w1 = w1 - err[:, None] * jnp.where(cols > i, row, 0.0)[None, :]
        err1 = jax.lax.dynamic_update_slice(err1, err[:, None], (0, i))
        codes = jax.lax.dynamic_update_slice(codes, code[:, None], (0, j))
        return w1, err1, codes, scales, zeros, s, z

    def block(b, carry):
        w, codes, scales, zeros, s, z = carry
        i1 = b * block_size
        w1 = jax.lax.dynamic_slice(w, (0, i1), (n, block_size))
        err1 = jnp.zeros_like(w1)
        w1, err1, codes, scales, zeros, s, z = jax.lax.fori_loop(
            0, block_size, functools.partial(column, i1=i1), (w1, err1, codes, scales, zeros, s, z)
        )
        rows = jax.lax.dynamic_slice(u, (i1, 0), (block_size, kp))
        later = (jnp.arange(kp) >= i1 + block_size)[None, :]
        w = w - err1 @ jnp.where(later, rows, 0.0)
        w = jax.lax.dynamic_update_slice(w, w1, (0, i1))
        return w, codes, scales, zeros, s, z

    init = (
        w,
        jnp.zeros((n, kp), jnp.uint8),
        jnp.zeros((n, n_groups), w.dtype),
        jnp.zeros((n, n_groups), w.dtype),
        static_scale[:, 0],
        static_zero[:, 0],
    )
    _, codes, scales, zeros, _, _ = jax.lax.fori_loop(0, kp // block_size, block, init)
    if static_grid:
        scales, zeros = static_scale, static_zero
    return codes, scales, zeros


def gptq_quantize(
    w: jax.Array,
    h: jax.Array,
    spec: Int,
    **options,
) -> dict:
    """GPTQ of ``w (N, K)`` (rows = output channels) given the Hessian ``h (K, K)``.

    Options: ``damp`` (0.01, relative to the mean diagonal), ``block_size`` (128, lazy batch),
    ``act_order``, ``static_groups``, ``where`` (the name used in errors). Returns ``codes (N, K)``
    uint8 in the *stored* column order, ``scale``/``zero`` ``(N, G)`` float32 and ``perm`` (the
    stored order's original column indices, or None). float32 matmuls run at full precision
    (not TF32 on GPUs): the Cholesky and the error feedback need it.
    """
    with jax.default_matmul_precision("highest"):
        return _gptq(w, h, spec, **options)


def _gptq(
    w: jax.Array,
    h: jax.Array,
    spec: Int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    where: str = "layer",
) -> dict:
    n, k = w.shape
    if h.shape != (k, k):
        raise ShapeError(f"{where}: Hessian {h.shape} does not match weight with {k} inputs")
    per_channel = spec.group == "channel"
    if not per_channel and not isinstance(spec.group, int):
        raise SpecError(f"{where}: GPTQ needs a group size or 'channel', got group={spec.group!r}")
    group = k if per_channel else spec.group
    if not per_channel and block_size % group and group % block_size:
        raise SpecError(f"{where}: group {group} and block size {block_size} must nest")
    bs = block_size if per_channel or group <= block_size else group
    # float32 at least; float64 when given float64 inputs with jax_enable_x64 (used by the tests
    # to show that the remaining differences from a float64 reference are float32 rounding)
    dt = jnp.result_type(jnp.asarray(w).dtype, jnp.asarray(h).dtype, jnp.float32)
    w = jnp.asarray(w, dt)
    h, w = _prepare_hessian(jnp.asarray(h, dt), w, damp)
    perm = None
    if act_order:
        perm = jnp.argsort(-jnp.diag(h), stable=True)
        w, h = w[:, perm], h[perm][:, perm]
    kp = math.ceil(k / bs) * bs
    pad = kp - k
    w = jnp.pad(w, ((0, 0), (0, pad)))
    h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(kp) >= k).astype(h.dtype)
    u = _upper_inverse_cholesky(h)
    if not bool(jnp.all(jnp.isfinite(u))):
        raise HessianError(
            f"{where}: the damped Hessian is not positive definite "
            f"(damp={damp}); raise damp or check the calibration inputs"
        )
    if per_channel:  # one grid per row, from the original weights
        s, z = spec.grid(w[:, :k])
        static = (s.astype(dt)[:, None], z.astype(dt)[:, None])
        group_of_col = jnp.zeros(kp, jnp.int32)
        n_groups, static_grid = 1, True
    elif act_order and static_groups:  # grids of the original column order, fixed up front
        n_groups = math.ceil(k / group)
        orig = jnp.pad(w[:, jnp.argsort(perm)][:, :k], ((0, 0), (0, n_groups * group - k)))
        s, z = spec.grid(orig.reshape(n, n_groups, group))
        static = (s.astype(dt), z.astype(dt))
        group_of_col = jnp.concatenate([perm // group, jnp.zeros(pad, perm.dtype)])
        static_grid = True
    else:
        n_groups = kp // group
        static = (jnp.zeros((n, n_groups), dt), jnp.zeros((n, n_groups), dt))
        group_of_col = jnp.zeros(kp, jnp.int32)
        static_grid = False
    codes, scale, zero = _gptq_core(
        w, u, *static, group_of_col, spec=spec, group=group, block_size=bs, static_grid=static_grid
    )
    codes = codes[:, :k]
    if perm is not None and (per_channel or static_groups):
        codes, perm = codes[:, jnp.argsort(perm)], None
    return {
        "codes": codes,
        "scale": scale[:, : math.ceil(k / group)],
        "zero": zero[:, : math.ceil(k / group)],
        "perm": perm,
    }


def to_qarray(result: dict, spec: Int, shape: tuple, dtype: Any = jnp.float32) -> QArray:
    """Packs a :func:`gptq_quantize` result for a Flax ``(K, N)`` kernel as a canonical QArray."""
    k, n = shape
    group = k if spec.group == "channel" else spec.group
    n_groups = math.ceil(k / group)
    codes = jnp.pad(result["codes"], ((0, 0), (0, n_groups * group - k)))
    if not spec.symmetric:  # pad with the zero point, as quantizing a zero element would
        codes = codes + (jnp.arange(n_groups * group) >= k)[None, :] * jnp.repeat(
            result["zero"], group, axis=1
        ).astype(jnp.uint8)
    elif n_groups * group > k:
        codes = codes.at[:, k:].set(1 << (spec.bits - 1))
    blocked = codes.reshape(n, n_groups, group).transpose(1, 0, 2)
    scale_dtype = jnp.dtype(spec.scale_dtype)
    scales = result["scale"].T.astype(scale_dtype)
    zeros = None if spec.symmetric else result["zero"].T.astype(scale_dtype)
    aux = {} if result["perm"] is None else {"perm": result["perm"].astype(jnp.int32)}
    return QArray(
        packing.pack(blocked, spec.bits),
        scales,
        zeros,
        aux,
        spec=spec,
        shape=tuple(shape),
        dtype=dtype,
    )


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """GPTQ onto an :class:`~qjax.formats.Int` grid.

    ``stats`` is the layer's Hessian ``2XXᵀ/n`` or a :class:`~qjax.ptq.calibrate.LayerStats`.
    """

    spec: Int
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.spec, Int) or self.spec.axis != 0:
            raise SpecError(
                f"GPTQ quantizes onto Int specs with axis=0 (Flax kernels), got {self.spec!r}"
            )

    def label(self) -> str:
        extra = " act-order" if self.act_order else ""
        extra += " static-groups" if self.static_groups else ""
        return f"GPTQ {self.spec.label()}{extra}"

    def __call__(
        self, weight: jax.Array, stats: Any = None, key: Any = None, *, where: str = "tensor"
    ) -> QArray:
        if stats is None:
            raise SpecError(f"{where}: GPTQ needs the layer's Hessian (run it through qjax.ptq)")
        result = gptq_quantize(
            jnp.asarray(weight).T,
            getattr(stats, "hessian", stats),
            self.spec,
            damp=self.damp,
            block_size=self.block_size,
            act_order=self.act_order,
            static_groups=self.static_groups,
            where=where,
        )
        return to_qarray(result, self.spec, tuple(weight.shape), weight.dtype)


def hessian(x: np.ndarray | jax.Array) -> jax.Array:
    """``H = 2XXᵀ/n`` (float32) from inputs ``x (..., K)``."""
    x = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    return 2.0 * jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST) / x.shape[0]
