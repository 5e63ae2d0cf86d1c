"""AWQ: activation-aware weight quantization (per-input-channel scaling, then clipping).

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"
(MLSys 2024, arXiv:2306.00978). Input channels that see large activations matter most; scaling
such a channel's weights up by ``s_j`` (and its input down by ``s_j``) shrinks its *relative*
rounding error. For the linears ``W = [W_1 … W_m]`` sharing one input ``x``:

    s(α) = mean|x|^α / mean|Ŵ|^(1−α),  normalized so that max(s)·min(s) = 1,
    α* = argmin_α  Σ_i ‖x W_i − x · Q(diag(s) W_i) / s‖²        (α on a 20-point grid in [0, 1))

where ``mean|Ŵ|`` is the mean over output channels of ``|W|`` normalized by each group's max.
The objective is evaluated exactly from the layer Hessian ``H = 2XᵀX/n``:
``‖XΔ‖² ∝ tr(ΔᵀHΔ)``. Then each (group, output channel) gets the max-value shrink ratio
``r ∈ {1, 0.95, …, 0.55}`` minimizing ``δᵀ H_gg δ`` (the group's own output error, as in the
reference implementation's clipping search).

The scales are folded into the op that produces ``x`` — the RMSNorm weight (``(offset + w) / s``)
or the preceding linear's output columns — so the unquantized model computes exactly the same
function; the quantized weights are ``Q(diag(s) W)``. With ``then="gptq"`` GPTQ quantizes the
scaled weights with the Hessian of the scaled inputs, ``D⁻¹ H D⁻¹`` (AWQ + GPTQ).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qjax.errors import SpecError
from qjax.formats import layout
from qjax.formats.uniform import Int
from qjax.qarray import QArray


def _fake_quant(w: jax.Array, spec: Int) -> jax.Array:
    """``dequantize(quantize(w))`` for a Flax ``(K, N)`` kernel."""
    return spec.quantize(w).dequantize()


def _group_mean_abs(w: jax.Array, spec: Int) -> jax.Array:
    """Per input channel: mean over outputs of ``|w|`` normalized by each block's max."""
    block = spec.block_for(w.shape)
    wb = jnp.abs(layout.blocked(w, block))
    wb = wb / jnp.maximum(jnp.max(wb, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(layout.unblocked(wb, w.shape, block), axis=1)


def _output_error(delta: jax.Array, h: jax.Array) -> jax.Array:
    return jnp.sum(delta * (h @ delta))


def _normalize(s):
    s = jnp.maximum(s, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def _alpha_grid(n_grid: int) -> jax.Array:
    return jnp.arange(n_grid, dtype=jnp.float32) / n_grid


@functools.partial(jax.jit, static_argnames=("spec", "n_grid"))
def _scale_search(w, h, x_mean, *, spec: Int, n_grid: int):
    """Output error for every α of the grid (one compiled program per shape and spec)."""
    w_mean = jnp.maximum(_group_mean_abs(w, spec), 1e-12)

    def loss(alpha):
        s = _normalize(jnp.power(x_mean, alpha) / jnp.power(w_mean, 1 - alpha))
        delta = _fake_quant(w * s[:, None], spec) / s[:, None] - w
        return _output_error(delta, h)

    errs = jax.lax.map(loss, _alpha_grid(n_grid))
    alpha = _alpha_grid(n_grid)[jnp.argmin(errs)]  # first minimum, as a strict < scan would pick
    return _normalize(jnp.power(x_mean, alpha) / jnp.power(w_mean, 1 - alpha)), alpha


def search_scales(
    kernels: list[jax.Array], h: jax.Array, x_abs_mean: jax.Array, spec: Int, n_grid: int = 20
) -> tuple[jax.Array, float]:
    """The AWQ per-input-channel scales ``s (K,)`` for kernels sharing one input, and ``α*``."""
    w = jnp.concatenate([k.astype(jnp.float32) for k in kernels], axis=1)
    with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: errors are differences
        s, alpha = _scale_search(w, h, x_abs_mean.astype(jnp.float32), spec=spec, n_grid=n_grid)
    return s, float(alpha)


@functools.partial(jax.jit, static_argnames=("spec", "ratios"))
def _clip_search(w, h, *, spec: Int, ratios: tuple[float, ...]):
    k, n = w.shape
    group = k if spec.group == "channel" else spec.group
    n_groups = -(-k // group)
    pad = n_groups * group - k
    wp = jnp.pad(w.astype(jnp.float32), ((0, pad), (0, 0))).reshape(n_groups, group, n)
    hp = jnp.pad(h, ((0, pad), (0, pad))).reshape(n_groups, group, n_groups, group)
    h_blocks = hp[jnp.arange(n_groups), :, jnp.arange(n_groups), :]  # (G, g, g)
    hi = jnp.max(wp, axis=1, keepdims=True)
    lo = jnp.min(wp, axis=1, keepdims=True)
    amax = jnp.maximum(jnp.abs(hi), jnp.abs(lo))

    def clip(r):
        if spec.symmetric:
            return jnp.clip(wp, -r * amax, r * amax)
        return jnp.clip(wp, r * lo, r * hi)

    def err_for(r):
        q = _fake_quant(clip(r).reshape(-1, n)[:k], spec)
        delta = jnp.pad(q, ((0, pad), (0, 0))).reshape(n_groups, group, n) - wp
        return jnp.einsum("gin,gij,gjn->gn", delta, h_blocks, delta)

    def step(carry, r):
        best_err, best_r = carry
        err = err_for(r)
        better = err < best_err  # strict: the first (largest) ratio wins ties
        return (jnp.where(better, err, best_err), jnp.where(better, r, best_r)), None

    r = jnp.asarray(ratios, jnp.float32)
    init = (jnp.full((n_groups, n), jnp.inf, jnp.float32), jnp.ones((n_groups, n), jnp.float32))
    (_, best_r), _ = jax.lax.scan(step, init, r)
    return clip(best_r[:, None, :]).reshape(-1, n)[:k].astype(w.dtype)


def search_clip(
    w: jax.Array, h: jax.Array, spec: Int, n_grid: int = 20, max_shrink: float = 0.5
) -> jax.Array:
    """``w (K, N)`` clipped per (group, output channel) to the best shrink ratio of its range."""
    ratios = tuple(1 - i / n_grid for i in range(int(n_grid * max_shrink)))
    with jax.default_matmul_precision("highest"):
        return _clip_search(w, h, spec=spec, ratios=ratios)


@dataclasses.dataclass(frozen=True)
class AWQ:
    """AWQ scales (+ clipping) onto an :class:`~qjax.formats.Int` grid; ``then`` = rtn | gptq."""

    spec: Int
    n_grid: int = 20
    clip: bool = True
    then: str = "rtn"
    needs_calibration: ClassVar[bool] = True
    transforms_block: ClassVar[bool] = True

    def __post_init__(self):
        if not isinstance(self.spec, Int) or self.spec.axis != 0:
            raise SpecError(f"AWQ needs an Int spec with axis=0 (Flax kernels), got {self.spec!r}")
        if self.then not in ("rtn", "gptq"):
            raise SpecError(f"AWQ then= must be 'rtn' or 'gptq', got {self.then!r}")

    def label(self) -> str:
        return f"AWQ{'+GPTQ' if self.then == 'gptq' else ''} {self.spec.label()}"

    def input_scales(self, kind: str, kernels: list, stats) -> jax.Array:
        """Folding hook: the searched per-input-channel scales (any producer kind)."""
        return search_scales(kernels, stats.hessian, stats.abs_mean, self.spec, self.n_grid)[0]

    def adjust_weight(self, kernel: jax.Array, stats) -> jax.Array:
        """Folding hook: the clipping search, on the already scaled kernel."""
        return search_clip(kernel, stats.hessian, self.spec, self.n_grid) if self.clip else kernel

    def __call__(
        self, weight: jax.Array, stats: Any = None, key: Any = None, *, where: str = "tensor"
    ) -> QArray:
        """Quantizes an already scaled (and clipped) kernel; the engine does the scaling."""
        if self.then == "gptq":
            from qjax.ptq.gptq import GPTQ

            return GPTQ(self.spec)(weight, stats, key, where=where)
        return self.spec.quantize(weight, where=where)
