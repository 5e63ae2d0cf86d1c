"""Uniform integer quantization (round-to-nearest on an evenly spaced grid).

For a block ``x`` and ``b`` bits:

* **symmetric** — ``s = max|x| / (2^(b-1) - 1/2)``, ``q = clip(round(x / s), -2^(b-1), 2^(b-1)-1)``,
  ``x̂ = q·s``. This is the GPTQ / compressed-tensors convention: all ``2^b`` levels are available
  and ``±max`` land on the rounding edge of the outermost levels.
  Codes are stored offset by ``2^(b-1)`` (unsigned).
* **asymmetric** — the grid spans ``[min(x, 0), max(x, 0)]`` (so zero is exactly representable, as
  in GPTQ): ``s = (hi - lo) / (2^b - 1)``, ``z = round(-lo / s)``,
  ``q = clip(round(x / s) + z, 0, 2^b - 1)``, ``x̂ = (q - z)·s``. The zero point ``z`` is stored as
  a float of the scale dtype (like HQQ and llama.cpp's mins), so methods that optimize a real-valued
  zero (HQQ) share this format; RTN stores an integer-valued ``z``.

Both keep the round-to-nearest bound ``|x - x̂| <= s/2`` elementwise, with the *stored* scale
(scales are rounded up into ``scale_dtype``, see :func:`qjax.formats.base.cast_up`). A block of
zeros gets ``s = 1`` (any positive scale is exact for it);
see :func:`~qjax.formats.base.stored_scale`.

Storage per block: ``B·b`` bits of codes (:mod:`qjax.formats.packing`), one scale, and one zero
when asymmetric — so int4 g128 with bf16 scales is 4.125 bits/weight, 4.25 with a zero point.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.errors import SpecError
from qjax.formats import packing
from qjax.formats.base import BlockFormat, _scale_dtype, register_format, stored_scale
from qjax.formats.layout import Group
from qjax.qarray import QArray


@register_format
@dataclasses.dataclass(frozen=True)
class Int(BlockFormat):
    """Uniform ``bits``-bit integers with a scale (and zero point if asymmetric) per block.

    Args:
      bits: 2, 3, 4 or 8.
      group: ``"tensor"``, ``"channel"``, a group size along ``axis``, or a 2-D block
        (see :mod:`qjax.formats.layout`).
      symmetric: symmetric grid around zero, else min/max grid with a zero point.
      axis: the reduction (input) axis; 0 for Flax ``(in, out)`` kernels.
      scale_dtype: dtype the scales (and zeros) are stored in.
    """

    name = "int"
    bits: int = 4
    group: Group = 128
    symmetric: bool = True
    axis: int = 0
    scale_dtype: str = "bfloat16"

    def __post_init__(self):
        super().__post_init__()
        if self.bits not in (2, 3, 4, 8):
            raise SpecError(f"Int supports 2, 3, 4 and 8 bits, got bits={self.bits}")
        _scale_dtype(self.scale_dtype)

    @property
    def code_bits(self) -> int:
        return self.bits

    @property
    def qmax(self) -> int:
        """Largest unsigned code, ``2^b - 1``."""
        return (1 << self.bits) - 1

    def label(self) -> str:
        return f"int{self.bits} {'sym' if self.symmetric else 'asym'} {self._group_label()}"

    def encode_blocks(self, xb):
        scale_dtype = _scale_dtype(self.scale_dtype)
        if self.symmetric:
            half = 1 << (self.bits - 1)
            amax = jnp.max(jnp.abs(xb), axis=-1)
            scale = stored_scale(amax / (half - 0.5), scale_dtype)
            s = scale.astype(jnp.float32)[..., None]
            codes = jnp.clip(jnp.round(xb / s), -half, half - 1) + half
            return codes.astype(jnp.uint8), scale, None, {}
        lo = jnp.minimum(jnp.min(xb, axis=-1), 0.0)
        hi = jnp.maximum(jnp.max(xb, axis=-1), 0.0)
        scale = stored_scale((hi - lo) / self.qmax, scale_dtype)
        s = scale.astype(jnp.float32)
        zero = jnp.clip(jnp.round(-lo / s), 0, self.qmax)
        codes = jnp.clip(jnp.round(xb / s[..., None]) + zero[..., None], 0, self.qmax)
        return codes.astype(jnp.uint8), scale, zero.astype(scale_dtype), {}

    def decode_blocks(self, codes, q: QArray):
        s = q.scales.astype(jnp.float32)[..., None]
        c = codes.astype(jnp.float32)
        if self.symmetric:
            return (c - (1 << (self.bits - 1))) * s
        return (c - q.zeros.astype(jnp.float32)[..., None]) * s

    def from_codes(
        self,
        codes: jax.Array,
        scales: jax.Array,
        zeros: jax.Array | None,
        shape: tuple,
        dtype=jnp.float32,
    ) -> QArray:
        """Builds a QArray from unpacked unsigned codes ``(*grid, B)`` computed elsewhere (GPTQ)."""
        return QArray(
            packing.pack(codes, self.bits),
            scales,
            zeros,
            {},
            spec=self,
            shape=tuple(shape),
            dtype=dtype,
        )
