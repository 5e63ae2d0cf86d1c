"""The spec protocol shared by every number format, and the format registry.

A spec is a frozen, hashable dataclass (``Int(bits=4, group=128)``, ``NF4()``, ``FP8("e4m3")``)
with a pure ``quantize(x) -> QArray`` and the reference ``dequantize(q) -> Array``. Specs
round-trip through ml-collections ``ConfigDict``s (``spec.to_config()`` /
``spec_from_config(cfg)``), so the CLI and experiment configs name them the same way.

Block-scaled formats subclass :class:`BlockFormat`: they implement ``encode_blocks`` (float32
blocks ``(*grid, B)`` → codes and per-block scales) and ``decode_blocks``; cutting the tensor into
blocks (:mod:`qjax.formats.layout`), packing codes (:mod:`qjax.formats.packing`) and validation
live here, once.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from qjax.errors import SpecError
from qjax.formats import layout, packing
from qjax.qarray import QArray

_REGISTRY: dict[str, type[QSpec]] = {}


def register_format(cls: type[QSpec]) -> type[QSpec]:
    """Class decorator: makes ``cls`` constructible from a config with ``format=cls.name``."""
    if cls.name in _REGISTRY:
        raise SpecError(f"format {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_formats() -> list[str]:
    return sorted(_REGISTRY)


def spec_from_config(config: Any) -> QSpec:
    """Builds a spec from a ``ConfigDict``/dict with a ``format`` key (inverse of ``to_config``)."""
    fields = dict(config)
    name = fields.pop("format", None)
    if name not in _REGISTRY:
        raise SpecError(f"unknown format {name!r}; known formats: {', '.join(available_formats())}")
    cls = _REGISTRY[name]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(fields) - known
    if unknown:
        raise SpecError(
            f"format {name!r} has no option(s) {sorted(unknown)}; options: {sorted(known)}"
        )
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return cls(**fields)


def _scale_dtype(name: str) -> jnp.dtype:
    try:
        dtype = jnp.dtype(name)
    except TypeError as err:
        raise SpecError(f"unknown scale dtype {name!r}") from err
    if not jnp.issubdtype(dtype, jnp.floating):
        raise SpecError(f"scale dtype must be floating, got {name!r}")
    return dtype


def cast_up(x: jax.Array, dtype: Any) -> jax.Array:
    """Casts positive ``x`` to ``dtype``, rounding up, so that ``cast_up(x) >= x``.

    Scales are rounded *up* when stored in a narrow dtype, so that ``|x / scale|`` never exceeds the
    grid's range and the ``scale / 2`` error bound of round-to-nearest holds with the stored scale.
    """
    dtype = jnp.dtype(dtype)
    y = x.astype(dtype)
    return jnp.where(y.astype(x.dtype) < x, jnp.nextafter(y, jnp.array(jnp.inf, dtype)), y)


def stored_scale(raw: jax.Array, dtype: Any) -> jax.Array:
    """A per-block scale as stored: ``raw`` clamped into the normal range of ``dtype``, rounded up.

    Zero (an all-zero block) becomes 1. Clamping to the smallest *normal* number keeps scales
    clear of subnormals, which XLA on CPU flushes to zero; scales too large for ``dtype`` saturate
    at its max (only possible with float16 scales, whose range is small).
    """
    info = jnp.finfo(jnp.dtype(dtype))
    raw = raw.astype(jnp.float32)
    clamped = jnp.clip(raw, float(info.tiny), float(info.max))
    return cast_up(jnp.where(raw > 0, clamped, 1.0), dtype)


@dataclasses.dataclass(frozen=True)
class QSpec:
    """Base class of every format spec."""

    name: ClassVar[str] = ""

    def quantize(self, x: jax.Array, *, where: str = "tensor") -> QArray:
        raise NotImplementedError

    def dequantize(self, q: QArray) -> jax.Array:
        raise NotImplementedError

    def label(self) -> str:
        """A short human label, e.g. ``int4 sym g128``."""
        return self.name

    def to_config(self) -> ml_collections.ConfigDict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ml_collections.ConfigDict({"format": self.name, **fields})

    def abstract(self, shape: tuple, dtype: Any = jnp.float32, where: str = "tensor") -> QArray:
        """The QArray this spec would produce for ``shape``, as ``ShapeDtypeStruct`` leaves.

        Used to count bytes without quantizing (``qjax.explain``) and as a restore target.
        """
        return jax.eval_shape(
            lambda x: self.quantize(x, where=where), jax.ShapeDtypeStruct(shape, dtype)
        )


@dataclasses.dataclass(frozen=True)
class BlockFormat(QSpec):
    """A format whose blocks (see :mod:`qjax.formats.layout`) each carry their own scale(s).

    Subclasses set ``group``/``axis`` fields and implement ``code_bits``, ``encode_blocks`` and
    ``decode_blocks``.
    """

    def __post_init__(self):
        group = layout.normalize_group(self.group)
        if "group" in {f.name for f in dataclasses.fields(self)}:
            object.__setattr__(self, "group", group)
        if not isinstance(self.axis, int):
            raise SpecError(f"axis must be an int, got {self.axis!r}")

    # -- to implement ----------------------------------------------------------------------------
    @property
    def code_bits(self) -> int | None:
        """Bits per packed code, or None when codes are stored unpacked (e.g. fp8 values)."""
        raise NotImplementedError

    def encode_blocks(self, xb: jax.Array) -> tuple[jax.Array, jax.Array, Any, dict]:
        """float32 ``(*grid, B)`` → ``(codes (*grid, B), scales (*grid), zeros | None, aux)``."""
        raise NotImplementedError

    def decode_blocks(self, codes: jax.Array, q: QArray) -> jax.Array:
        """Unpacked codes ``(*grid, B)`` → float32 values ``(*grid, B)``."""
        raise NotImplementedError

    # -- shared plumbing ------------------------------------------------------------------------
    def block_for(self, shape: tuple, where: str = "tensor") -> tuple:
        return layout.block_shape(shape, self.group, self.axis, where)

    def quantize(self, x: jax.Array, *, where: str = "tensor") -> QArray:
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise SpecError(f"{where}: can only quantize floating tensors, got {x.dtype}")
        block = self.block_for(x.shape, where)
        xb = layout.blocked(x.astype(jnp.float32), block)
        codes, scales, zeros, aux = self.encode_blocks(xb)
        if self.code_bits is not None:
            codes = packing.pack(codes, self.code_bits)
        return QArray(codes, scales, zeros, aux, spec=self, shape=tuple(x.shape), dtype=x.dtype)

    def unpacked_codes(self, q: QArray) -> jax.Array:
        block_elems = math.prod(self.block_for(q.shape))
        if self.code_bits is None:
            return q.codes
        return packing.unpack(q.codes, self.code_bits, block_elems)

    def dequantize(self, q: QArray) -> jax.Array:
        block = self.block_for(q.shape)
        values = self.decode_blocks(self.unpacked_codes(q), q)
        values = layout.unblocked(values, q.shape, block)
        if "perm" in q.aux:  # stored with its reduction axis permuted: stored[j] = x[perm[j]]
            values = jnp.take(values, jnp.argsort(q.aux["perm"]), axis=self.axis)
        return values.astype(q.dtype)

    def _group_label(self) -> str:
        g = self.group
        if isinstance(g, int):
            return f"g{g}"
        if isinstance(g, tuple):
            return f"b{g[0]}x{g[1]}"
        return "per-" + g
