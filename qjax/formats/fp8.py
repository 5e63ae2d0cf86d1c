"""FP8 (e4m3 / e5m2) with per-tensor, per-channel, group or 2-D block scales.

Micikevicius et al., "FP8 Formats for Deep Learning" (arXiv:2209.05433). ``e4m3`` (the ``fn``
variant: no infinities, max 448) is used for weights and activations, ``e5m2`` (max 57344) for
gradients. A block stores ``s = amax / fmax`` (float32) and ``x / s`` cast to fp8 with a
*saturating* cast (:func:`saturating_cast`): finite values beyond ``±fmax`` clamp to ``±fmax``
instead of becoming NaN, NaN stays NaN. DeepSeek-V3-style 128×128 blocks are ``group=(128, 128)``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from qjax.errors import SpecError
from qjax.formats.base import BlockFormat, register_format, stored_scale
from qjax.formats.layout import Group
from qjax.qarray import QArray

FP8_DTYPES = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}


def fp8_dtype(fmt: str):
    if fmt not in FP8_DTYPES:
        raise SpecError(f"unknown fp8 format {fmt!r}; use one of {sorted(FP8_DTYPES)}")
    return FP8_DTYPES[fmt]


def fp8_max(fmt: str) -> float:
    return float(jnp.finfo(fp8_dtype(fmt)).max)


def saturating_cast(x: jnp.ndarray, dtype) -> jnp.ndarray:
    """Round-to-nearest-even cast to a narrow float that clamps overflow to ±max (NaN stays NaN)."""
    fmax = float(jnp.finfo(dtype).max)
    return jnp.clip(x, -fmax, fmax).astype(dtype)


@register_format
@dataclasses.dataclass(frozen=True)
class FP8(BlockFormat):
    """FP8 values with one float32 scale per block (``group``: ``"tensor"``, ``"channel"``, ...)."""

    name = "fp8"
    fmt: str = "e4m3"
    group: Group = "channel"
    axis: int = 0

    def __post_init__(self):
        super().__post_init__()
        fp8_dtype(self.fmt)

    @property
    def code_bits(self) -> None:
        return None

    def label(self) -> str:
        return f"fp8 {self.fmt} {self._group_label()}"

    def encode_blocks(self, xb):
        amax = jnp.max(jnp.abs(xb), axis=-1)
        scale = stored_scale(amax / fp8_max(self.fmt), jnp.float32)
        codes = saturating_cast(xb / scale[..., None], fp8_dtype(self.fmt))
        return codes, scale, None, {}

    def decode_blocks(self, codes, q: QArray):
        return codes.astype(jnp.float32) * q.scales[..., None]
