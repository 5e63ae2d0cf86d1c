"""Block layouts: how a tensor is cut into the blocks that share one scale.

Every format in qjax quantizes *blocks*: rectangular tiles of the tensor that share a scale (and a
zero point, absmax, exponent, ...). A layout is described by a ``group`` value and a reduction
``axis``:

=====================  ======================================================================
``group``               block shape for a tensor of shape ``S`` with reduction axis ``a``
=====================  ======================================================================
``"tensor"``            ``S`` — one scale for the whole tensor
``"channel"``           ``S[a]`` along ``a``, 1 elsewhere — one scale per output channel
``g`` (int)             ``g`` along ``a``, 1 elsewhere — groups of ``g`` inputs per channel
``(b0, b1)``            a 2-D tile: ``b0`` along ``a``, ``b1`` along the other axis (2-D tensors)
=====================  ======================================================================

``blocked(x, block)`` reorders ``x`` into ``(*grid, B)``: the grid of blocks (``grid[i] =
S[i] / block[i]``) followed by the ``B = prod(block)`` elements of each block, in row-major order
inside the block. Scales then have shape ``grid``, which broadcasts against ``blocked(x)[..., 0]``.
``unblocked`` is its exact inverse.

**Ragged last block.** A block size that does not divide its axis gives a shorter last block, as
GPTQ's ``g_idx = i // group`` does (SmolLM2's width 576 with group 128: 4 groups of 128 and one of
64). It is stored zero-padded to a full block: ``grid[i] = ceil(S[i] / block[i])``. Zero padding
changes no block statistic the formats use (absmax, or a min/max range that includes 0), so the
padded elements never affect the real ones; they cost storage, which ``nbytes`` counts exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp

from qjax.errors import ShapeError, SpecError

Group = int | str | tuple[int, int]


def normalize_group(group: Group) -> Group:
    """Validates a ``group`` value and returns it in canonical form (lists become tuples)."""
    if isinstance(group, str):
        if group not in ("tensor", "channel"):
            raise SpecError(f"group must be 'tensor', 'channel', an int or a pair; got {group!r}")
        return group
    if isinstance(group, bool):
        raise SpecError(f"group must be 'tensor', 'channel', an int or a pair; got {group!r}")
    if isinstance(group, int):
        if group <= 0:
            raise SpecError(f"group size must be positive, got {group}")
        return group
    if isinstance(group, Sequence) and len(group) == 2 and all(isinstance(b, int) for b in group):
        if min(group) <= 0:
            raise SpecError(f"2-D block sizes must be positive, got {tuple(group)}")
        return (int(group[0]), int(group[1]))
    raise SpecError(f"group must be 'tensor', 'channel', an int or a pair; got {group!r}")


def block_shape(shape: Sequence[int], group: Group, axis: int, where: str = "tensor") -> tuple:
    """The block shape for a tensor of ``shape`` (see the module docstring).

    Raises :class:`ShapeError` naming ``where`` when a block size does not divide its axis.
    """
    shape = tuple(int(d) for d in shape)
    ndim = len(shape)
    if ndim == 0:
        return ()
    if not -ndim <= axis < ndim:
        raise ShapeError(f"{where}: reduction axis {axis} is out of range for shape {shape}")
    axis %= ndim
    if group == "tensor":
        block = shape
    elif group == "channel":
        block = tuple(d if i == axis else 1 for i, d in enumerate(shape))
    elif isinstance(group, int):
        block = tuple(group if i == axis else 1 for i in range(ndim))
    else:
        if ndim != 2:
            raise ShapeError(f"{where}: 2-D blocks {group} need a 2-D tensor, got shape {shape}")
        block = (group[0], group[1]) if axis == 0 else (group[1], group[0])
    return block


def grid_shape(shape: Sequence[int], block: Sequence[int]) -> tuple:
    """Number of blocks along each axis (a ragged last block counts as one)."""
    return tuple(-(-d // b) for d, b in zip(shape, block, strict=True))


def blocked(x: jnp.ndarray, block: Sequence[int]) -> jnp.ndarray:
    """Reorders ``x`` of shape ``S`` into ``(*grid, prod(block))``."""
    ndim = x.ndim
    grid = grid_shape(x.shape, block)
    pad = [(0, g * b - d) for g, b, d in zip(grid, block, x.shape, strict=True)]
    if any(p for _, p in pad):
        x = jnp.pad(x, pad)
    interleaved = [v for g, b in zip(grid, block, strict=True) for v in (g, b)]
    x = x.reshape(interleaved)
    order = list(range(0, 2 * ndim, 2)) + list(range(1, 2 * ndim, 2))
    return x.transpose(order).reshape(*grid, math.prod(block))


def unblocked(xb: jnp.ndarray, shape: Sequence[int], block: Sequence[int]) -> jnp.ndarray:
    """Inverse of :func:`blocked`: ``(*grid, prod(block))`` back to ``shape``."""
    ndim = len(shape)
    grid = grid_shape(shape, block)
    x = xb.reshape(*grid, *block)
    order = [v for i in range(ndim) for v in (i, ndim + i)]
    x = x.transpose(order).reshape([g * b for g, b in zip(grid, block, strict=True)])
    return x[tuple(slice(0, d) for d in shape)]
