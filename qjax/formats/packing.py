"""Bit packing of unsigned integer codes along the last axis.

=====  ===========================================================================
bits   storage
=====  ===========================================================================
8      ``uint8``, one code per byte (no packing)
4      ``uint8``, two codes per byte, element ``2i`` in the low nibble
2      ``uint8``, four codes per byte, element ``4i + j`` in bits ``2j .. 2j+1``
3      ``uint8``, eight codes in three bytes: the 24-bit little-endian word
       ``sum_j c[8i + j] << 3j`` stored as bytes ``3i, 3i+1, 3i+2``
=====  ===========================================================================

A last axis that is not a multiple of the packing unit (2, 4 or 8 codes) is padded with zero
codes; :func:`unpack` takes the true length and drops the padding. Storage is therefore exactly
``ceil(n / unit) * bytes_per_unit`` bytes per row.
"""

from __future__ import annotations

import jax.numpy as jnp

from qjax.errors import SpecError

# codes per unit, bytes per unit
_UNITS = {8: (1, 1), 4: (2, 1), 2: (4, 1), 3: (8, 3)}


def packed_length(n: int, bits: int) -> int:
    """Bytes needed to pack ``n`` codes of ``bits`` bits."""
    codes, nbytes = _unit(bits)
    return -(-n // codes) * nbytes


def _unit(bits: int) -> tuple[int, int]:
    if bits not in _UNITS:
        raise SpecError(f"cannot pack {bits}-bit codes; supported widths are {sorted(_UNITS)}")
    return _UNITS[bits]


def pack(codes: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Packs unsigned codes in ``[0, 2**bits)`` along the last axis into ``uint8``."""
    per_unit, unit_bytes = _unit(bits)
    codes = codes.astype(jnp.uint32)
    n = codes.shape[-1]
    pad = -n % per_unit
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    units = codes.reshape(*codes.shape[:-1], -1, per_unit)
    shifts = jnp.arange(per_unit, dtype=jnp.uint32) * bits
    words = jnp.sum(units << shifts, axis=-1, dtype=jnp.uint32)
    byte_shifts = jnp.arange(unit_bytes, dtype=jnp.uint32) * 8
    out = (words[..., None] >> byte_shifts) & 0xFF
    return out.reshape(*codes.shape[:-1], -1).astype(jnp.uint8)


def unpack(packed: jnp.ndarray, bits: int, n: int) -> jnp.ndarray:
    """Inverse of :func:`pack`: returns ``uint8`` codes with last axis of length ``n``."""
    per_unit, unit_bytes = _unit(bits)
    units = packed.astype(jnp.uint32).reshape(*packed.shape[:-1], -1, unit_bytes)
    byte_shifts = jnp.arange(unit_bytes, dtype=jnp.uint32) * 8
    words = jnp.sum(units << byte_shifts, axis=-1, dtype=jnp.uint32)
    shifts = jnp.arange(per_unit, dtype=jnp.uint32) * bits
    codes = (words[..., None] >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(*packed.shape[:-1], -1)
    return codes[..., :n].astype(jnp.uint8)
