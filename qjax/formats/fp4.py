"""FP4 (e2m1) elements with three scaling schemes: plain, MXFP4 and NVFP4.

E2M1 (OCP Microscaling spec v1.0, 2023) has 1 sign, 2 exponent and 1 mantissa bit; its magnitudes
are ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` for codes 0–7 and bit 3 is the sign. Casting rounds to nearest,
ties to even code, and saturates at ±6 (e2m1 has no Inf/NaN; quantizers reject non-finite input).

* :class:`FP4` — ``s = amax / 6`` per group, stored in ``scale_dtype`` (rounded up).
* :class:`MXFP4` — OCP MX: blocks of 32, a shared power-of-two scale ``X = 2^(⌊log2 amax⌋ - 2)``
  stored as E8M0 (``uint8`` biased exponent, bias 127); ``x / X`` is cast with saturation, so the
  largest elements may clip (the spec's choice): 4 + 8/32 = 4.25 bits/weight.
* :class:`NVFP4` — NVIDIA's format: blocks of 16, an e4m3 block scale ``amax_b / 6 / s_t`` and one
  fp32 tensor scale ``s_t = amax / (6 · 448)``; ``x̂ = e2m1 · s_b · s_t`` (4.5 bits/weight).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from qjax.errors import SpecError
from qjax.formats.base import BlockFormat, _scale_dtype, register_format, stored_scale
from qjax.formats.fp8 import saturating_cast
from qjax.formats.layout import Group
from qjax.qarray import QArray

E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
E2M1_VALUES = np.concatenate([E2M1_MAGNITUDES, -E2M1_MAGNITUDES])  # indexed by the 4-bit code
E2M1_MAX = 6.0


def e2m1_encode(x: jnp.ndarray) -> jnp.ndarray:
    """4-bit e2m1 codes of ``x``: round to nearest, ties to even code, saturate at ±6."""
    mag = jnp.abs(x)
    mids = (E2M1_MAGNITUDES[1:] + E2M1_MAGNITUDES[:-1]) / 2
    idx = jnp.zeros(x.shape, jnp.uint8)
    for lower_code, mid in enumerate(mids):
        up = (mag > mid) | ((mag == mid) & (lower_code % 2 == 1))
        idx = idx + up.astype(jnp.uint8)
    sign = (jnp.signbit(x)).astype(jnp.uint8) << 3
    return idx | sign


def e2m1_decode(codes: jnp.ndarray) -> jnp.ndarray:
    return jnp.asarray(E2M1_VALUES)[codes]


@register_format
@dataclasses.dataclass(frozen=True)
class FP4(BlockFormat):
    """e2m1 values with an absmax scale per group (``s = amax / 6``)."""

    name = "fp4"
    group: Group = 32
    axis: int = 0
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        super().__post_init__()
        _scale_dtype(self.scale_dtype)

    @property
    def code_bits(self) -> int:
        return 4

    def label(self) -> str:
        return f"fp4 e2m1 {self._group_label()}"

    def encode_blocks(self, xb):
        amax = jnp.max(jnp.abs(xb), axis=-1)
        scale = stored_scale(amax / E2M1_MAX, _scale_dtype(self.scale_dtype))
        return e2m1_encode(xb / scale.astype(jnp.float32)[..., None]), scale, None, {}

    def decode_blocks(self, codes, q: QArray):
        return e2m1_decode(codes) * q.scales.astype(jnp.float32)[..., None]


@dataclasses.dataclass(frozen=True)
class _ScaledE2M1(BlockFormat):
    """e2m1 codes in blocks of a size fixed by the format's definition (``BLOCK``)."""

    BLOCK: ClassVar[int] = 0
    block: int = 0
    axis: int = 0

    def __post_init__(self):
        if self.block != self.BLOCK:
            raise SpecError(
                f"{self.name} uses blocks of {self.BLOCK} by definition, got block={self.block}"
            )
        super().__post_init__()

    @property
    def group(self) -> int:
        return self.block

    @property
    def code_bits(self) -> int:
        return 4

    def label(self) -> str:
        return self.name


@register_format
@dataclasses.dataclass(frozen=True)
class MXFP4(_ScaledE2M1):
    """OCP MXFP4: e2m1 elements, blocks of 32, E8M0 power-of-two scales."""

    name = "mxfp4"
    BLOCK = 32
    block: int = 32

    def encode_blocks(self, xb):
        amax = jnp.max(jnp.abs(xb), axis=-1)
        _, exp = jnp.frexp(jnp.where(amax > 0, amax, 1.0))  # amax = m·2^exp, m in [0.5, 1)
        shared = jnp.where(amax > 0, exp - 1 - 2, 0)  # ⌊log2 amax⌋ - emax(e2m1)
        biased = jnp.clip(shared + 127, 0, 254).astype(jnp.uint8)
        scale = jnp.ldexp(jnp.ones_like(amax), biased.astype(jnp.int32) - 127)
        return e2m1_encode(xb / scale[..., None]), biased, None, {}

    def decode_blocks(self, codes, q: QArray):
        scale = jnp.ldexp(jnp.ones(q.scales.shape, jnp.float32), q.scales.astype(jnp.int32) - 127)
        return e2m1_decode(codes) * scale[..., None]


@register_format
@dataclasses.dataclass(frozen=True)
class NVFP4(_ScaledE2M1):
    """NVFP4: e2m1 elements, blocks of 16, e4m3 block scales and one fp32 tensor scale."""

    name = "nvfp4"
    BLOCK = 16
    block: int = 16

    def encode_blocks(self, xb):
        e4m3_max = float(jnp.finfo(jnp.float8_e4m3fn).max)
        amax = jnp.max(jnp.abs(xb), axis=-1)
        tensor_amax = jnp.max(amax)
        tensor_scale = jnp.where(tensor_amax > 0, tensor_amax / (E2M1_MAX * e4m3_max), 1.0)
        block_scale = saturating_cast(amax / E2M1_MAX / tensor_scale, jnp.float8_e4m3fn)
        s = block_scale.astype(jnp.float32) * tensor_scale
        safe = jnp.where(s > 0, s, 1.0)
        codes = e2m1_encode(xb / safe[..., None])
        return codes, block_scale, None, {"tensor_scale": tensor_scale.astype(jnp.float32)}

    def decode_blocks(self, codes, q: QArray):
        s = q.scales.astype(jnp.float32) * q.aux["tensor_scale"]
        return e2m1_decode(codes) * s[..., None]
