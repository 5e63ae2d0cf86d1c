"""SmoothQuant: migrate activation outliers into the weights, then W8A8.

Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
Models" (ICML 2023, arXiv:2211.10438). Per input channel ``j`` of the linears sharing one input,

    s_j = max|X_j|^α / max|W_j|^(1−α)         (α = 0.5 by default; max|W_j| over all consumers)

is folded into the preceding RMSNorm (:mod:`qjax.ptq.folding`), which flattens the activation
outliers that make per-tensor int8 activations fail. As in the paper, smoothing applies where a
norm produces the input (q/k/v and gate/up); ``o_proj`` and ``down_proj`` are quantized to W8A8
without it. The static activation scale is the calibration ``max|x| / 127`` of the (smoothed)
input; ``act="dynamic"`` uses per-token scales at run time instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qjax.errors import SpecError
from qjax.formats.w8a8 import W8A8
from qjax.qarray import QArray


@dataclasses.dataclass(frozen=True)
class SmoothQuant:
    """Smoothing (migration strength ``alpha``) + W8A8 (``dtype`` int8 | e4m3, ``act`` static |
    dynamic)."""

    alpha: float = 0.5
    act: str = "static"
    dtype: str = "int8"
    needs_calibration: ClassVar[bool] = True
    transforms_block: ClassVar[bool] = True

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise SpecError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha}")

    @property
    def spec(self) -> W8A8:
        return W8A8(act=self.act, dtype=self.dtype)

    def label(self) -> str:
        kind = "" if self.dtype == "int8" else " fp8 e4m3"
        return f"SmoothQuant α={self.alpha} W8A8{kind} ({self.act} act)"

    def input_scales(self, kind: str, kernels: list, stats) -> jax.Array | None:
        """Folding hook: ``max|X|^α / max|W|^(1-α)`` for norm-produced inputs only."""
        if kind != "norm":
            return None
        w_max = jnp.max(jnp.concatenate([jnp.abs(k) for k in kernels], axis=1), axis=1)
        x_max = stats.abs_max
        s = jnp.power(jnp.maximum(x_max, 1e-5), self.alpha) / jnp.power(
            jnp.maximum(w_max, 1e-5), 1 - self.alpha
        )
        return jnp.where((x_max > 0) & (w_max > 0), s, 1.0)

    def __call__(
        self, weight: jax.Array, stats: Any = None, key: Any = None, *, where: str = "tensor"
    ) -> QArray:
        q = self.spec.quantize(weight, where=where)
        if self.act == "static":
            if stats is None:
                raise SpecError(f"{where}: static activation scales need calibration statistics")
            scale = jnp.max(stats.abs_max) / self.spec.qmax
            q = q.replace(aux={"act_scale": jnp.where(scale > 0, scale, 1.0).astype(jnp.float32)})
        return q
