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

    def grid(self, xb: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Scale (in ``scale_dtype``) and zero point (float32) of each row of ``xb`` (last axis).

        Symmetric grids use the fixed zero point ``2^(b-1)``, so both cases share
        :meth:`encode` / :meth:`decode`: ``q = clip(round(x/s) + z, 0, 2^b - 1)``, ``x̂ = (q-z)·s``.
        """
        scale_dtype = _scale_dtype(self.scale_dtype)
        if self.symmetric:
            half = 1 << (self.bits - 1)
            amax = jnp.max(jnp.abs(xb), axis=-1)
            scale = stored_scale(amax / (half - 0.5), scale_dtype)
            return scale, jnp.full(scale.shape, half, jnp.float32)
        lo = jnp.minimum(jnp.min(xb, axis=-1), 0.0)
        hi = jnp.maximum(jnp.max(xb, axis=-1), 0.0)
        scale = stored_scale((hi - lo) / self.qmax, scale_dtype)
        zero = jnp.clip(jnp.round(-lo / scale.astype(jnp.float32)), 0, self.qmax)
        return scale, zero

    def encode(self, x: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
        """Unsigned codes of ``x`` on the grid (``scale``, ``zero`` broadcast against ``x``)."""
        q = jnp.round(x / scale.astype(jnp.float32)) + zero
        return jnp.clip(q, 0, self.qmax).astype(jnp.uint8)

    @staticmethod
    def decode(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
        return (codes.astype(jnp.float32) - zero) * scale.astype(jnp.float32)

    def encode_blocks(self, xb):
        scale, zero = self.grid(xb)
        codes = self.encode(xb, scale[..., None], zero[..., None])
        stored_zero = None if self.symmetric else zero.astype(scale.dtype)
        return codes, scale, stored_zero, {}

    def zero_point(self, q: QArray) -> jax.Array:
        if self.symmetric:
            return jnp.float32(1 << (self.bits - 1))
        return q.zeros.astype(jnp.float32)[..., None]

    def decode_blocks(self, codes, q: QArray):
        return self.decode(codes, q.scales[..., None], self.zero_point(q))

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
