"""A defensive, zero-copy GGUF reader.

File layout (all integers little-endian; versions 2 and 3 share it):

* header: ``magic "GGUF"``, ``version: u32``, ``tensor_count: u64``, ``kv_count: u64``;
* ``kv_count`` metadata pairs: ``key: string``, ``value_type: u32``, value. A string is
  ``length: u64`` + that many UTF-8 bytes; an array is ``elem_type: u32``, ``count: u64`` and the
  elements (arrays may nest);
* ``tensor_count`` tensor infos: ``name: string``, ``n_dims: u32``, ``dims: u64[n_dims]`` (GGML
  order: fastest-varying first), ``type: u32``, ``offset: u64`` relative to the data section;
* padding to ``general.alignment`` (a ``u32`` key, default 32), then the data section, where every
  tensor's offset is a multiple of the alignment.

The file is memory-mapped read-only; nothing is copied until a tensor is dequantized. Every read
is bounds-checked and every count is checked against the bytes left before anything is allocated,
so malformed input raises :class:`~qjax.errors.FormatError` (naming the file, and the key or
tensor) instead of crashing, hanging or allocating wildly.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qjax.convert.gguf import quants
from qjax.convert.gguf.constants import (
    BLOCK_SIZES,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MAX_DIMS,
    SCALAR_DTYPES,
    SCALAR_STRUCT,
    SUPPORTED_VERSIONS,
    GGMLType,
    GGUFValueType,
)
from qjax.errors import FormatError, ShapeError

__all__ = ["GGUFReader", "TensorInfo", "read_gguf", "NUMPY_ARRAY_MIN_LEN"]

# Numeric metadata arrays at least this long are returned as NumPy arrays, shorter ones as lists.
NUMPY_ARRAY_MIN_LEN = 64
_MAX_NESTING = 8

# Smallest possible encodings, used to reject counts that cannot fit in the bytes left.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
_MIN_VALUE_BYTES = {t: np.dtype(dt).itemsize for t, dt in SCALAR_DTYPES.items()}
_MIN_VALUE_BYTES[GGUFValueType.STRING] = 8
_MIN_VALUE_BYTES[GGUFValueType.ARRAY] = 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    """Where and how one tensor is stored.

    ``shape`` is in NumPy order (GGUF dims reversed: the last axis is the contiguous row);
    ``offset`` is absolute in the file; ``nbytes`` is the size of its data.
    """

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class _Cursor:
    """Bounds-checked sequential reads over a buffer; errors name the file and context."""

    def __init__(self, buf: memoryview, path: str):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path
        self.where = "header"

    def fail(self, msg: str) -> FormatError:
        return FormatError(f"{self.path}: {self.where}: {msg}")

    def left(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.left():
            raise self.fail(
                f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                f"only {self.left()} left in the file"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items of at least ``min_item_bytes`` each that must fit in the file."""
        n = self.u64(what)
        if n * min_item_bytes > self.left():
            raise self.fail(f"{what} {n} cannot fit in the {self.left()} bytes left in the file")
        return n

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e.reason} at byte {e.start})") from None

    def array(self, dtype: str, n: int, what: str) -> np.ndarray:
        nbytes = np.dtype(dtype).itemsize * n
        self.need(nbytes, what)
        out = np.frombuffer(self.buf, dtype=dtype, count=n, offset=self.pos).copy()
        self.pos += nbytes
        return out


class GGUFReader:
    """Parse a GGUF file's header and give zero-copy access to its tensors.

    Attributes:
        path: the file.
        version: GGUF version (2 or 3).
        metadata: key -> value. Scalars are Python ``int``/``float``/``bool``/``str``; arrays are
            lists, except numeric arrays of at least :data:`NUMPY_ARRAY_MIN_LEN` elements, which
            are 1-D NumPy arrays of the stored dtype. Nested arrays are lists of those.
        value_types: key -> the GGUF value types of the value: ``(type,)`` for a scalar,
            ``(ARRAY, elem_type, ...)`` for an array (one entry per nesting level; the element
            type of an empty nested array is not recorded).
        tensors: name -> :class:`TensorInfo`, in file order.
        alignment: ``general.alignment`` (default 32).
        data_offset: absolute offset of the tensor data section.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._name = str(self.path)
        try:  # OSError (missing file, no permission) propagates as is
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except ValueError as e:  # numpy refuses to map an empty file
            raise FormatError(
                f"{self._name}: header: truncated: cannot map the file ({e})"
            ) from None
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, tuple[GGUFValueType, ...]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._parse()

    # ------------------------------------------------------------------ parsing

    def _parse(self) -> None:
        cur = _Cursor(memoryview(self._mm), self._name)
        cur.need(4, "magic")
        magic = bytes(cur.buf[0:4])
        if magic != GGUF_MAGIC:
            raise cur.fail(f"not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (a big-endian file?)" if self.version & 0xFFFF == 0 else ""
            raise cur.fail(
                f"unsupported GGUF version {self.version}{hint}; "
                f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        n_tensors = cur.u64("tensor count")
        n_kv = cur.count("metadata key/value count", _MIN_KV_BYTES)

        for i in range(n_kv):
            cur.where = f"metadata entry {i}"
            key = cur.string("key")
            cur.where = f"metadata key {key!r}"
            if key in self.metadata:
                raise cur.fail("duplicate key")
            vtype = self._value_type(cur, cur.u32("value type"))
            value, types = self._value(cur, vtype, depth=0)
            self.metadata[key] = value
            self.value_types[key] = types

        self.alignment = self._alignment(cur)
        cur.where = "tensor infos"
        if n_tensors * _MIN_TENSOR_INFO_BYTES > cur.left():
            raise cur.fail(f"tensor count {n_tensors} cannot fit in the {cur.left()} bytes left")
        infos = [self._tensor_info(cur, i) for i in range(n_tensors)]

        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self._place_tensors(infos)

    def _value_type(self, cur: _Cursor, raw: int) -> GGUFValueType:
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise cur.fail(f"unknown value type {raw}") from None

    def _value(
        self, cur: _Cursor, vtype: GGUFValueType, depth: int
    ) -> tuple[Any, tuple[GGUFValueType, ...]]:
        if vtype == GGUFValueType.STRING:
            return cur.string("string value"), (vtype,)
        if vtype != GGUFValueType.ARRAY:
            value = cur.unpack(SCALAR_STRUCT[vtype], f"{vtype.name} value")
            return (bool(value) if vtype == GGUFValueType.BOOL else value), (vtype,)
        if depth >= _MAX_NESTING:
            raise cur.fail(f"arrays nested deeper than {_MAX_NESTING} levels")
        etype = self._value_type(cur, cur.u32("array element type"))
        n = cur.count("array length", _MIN_VALUE_BYTES[etype])
        if etype in SCALAR_DTYPES:
            arr = cur.array(SCALAR_DTYPES[etype], n, f"{etype.name} array of {n}")
            if etype == GGUFValueType.BOOL:
                arr = arr.astype(bool)
            value = arr if n >= NUMPY_ARRAY_MIN_LEN else arr.tolist()
            return value, (vtype, etype)
        if etype == GGUFValueType.STRING:
            return [cur.string(f"string {j} of array") for j in range(n)], (vtype, etype)
        items, sub = [], (etype,)
        for _ in range(n):
            item, sub = self._value(cur, etype, depth + 1)
            items.append(item)
        return items, (vtype, *sub)

    def _alignment(self, cur: _Cursor) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        cur.where = "metadata key 'general.alignment'"
        if self.value_types["general.alignment"] != (GGUFValueType.UINT32,):
            raise cur.fail("must be a UINT32")
        align = self.metadata["general.alignment"]
        if align == 0 or align & (align - 1):
            raise cur.fail(f"alignment {align} is not a power of two")
        return align

    def _tensor_info(self, cur: _Cursor, i: int) -> tuple[str, GGMLType, tuple[int, ...], int]:
        cur.where = f"tensor info {i}"
        name = cur.string("tensor name")
        cur.where = f"tensor {name!r}"
        n_dims = cur.u32("n_dims")
        if n_dims > MAX_DIMS:
            raise cur.fail(f"n_dims {n_dims} > {MAX_DIMS}")
        dims = [cur.u64(f"dim {d}") for d in range(n_dims)]
        for d, v in enumerate(dims):
            if v <= 0 or v >= 1 << 62:
                raise cur.fail(f"dim {d} = {v} is not a positive size")
        raw_type = cur.u32("tensor type")
        try:
            ggml_type = GGMLType(raw_type)
        except ValueError:
            raise cur.fail(f"unknown GGML tensor type {raw_type}") from None
        rel = cur.u64("data offset")
        if rel % self.alignment:
            raise cur.fail(f"data offset {rel} is not a multiple of the alignment {self.alignment}")
        return name, ggml_type, tuple(reversed(dims)), rel

    def _place_tensors(self, infos: list[tuple[str, GGMLType, tuple[int, ...], int]]) -> None:
        size = self._mm.size
        for name, ggml_type, shape, rel in infos:
            if name in self.tensors:
                raise self._tensor_error(name, "duplicate tensor name")
            elems, block_bytes = BLOCK_SIZES[ggml_type]
            row = shape[-1] if shape else 1
            if row % elems:
                raise self._tensor_error(
                    name,
                    f"row length {row} is not a multiple of the "
                    f"{ggml_type.name} block size {elems}",
                )
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel // elems * block_bytes
            start = self.data_offset + rel
            if start + nbytes > size:
                raise self._tensor_error(
                    name,
                    f"data [{start}, {start + nbytes}) extends past "
                    f"the end of the file ({size} bytes)",
                )
            self.tensors[name] = TensorInfo(name, ggml_type, shape, start, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
            if start_b < end_a:
                raise self._tensor_error(b, f"data overlaps tensor {a!r}")

    def _tensor_error(self, name: str, msg: str) -> FormatError:
        return FormatError(f"{self._name}: tensor {name!r}: {msg}")

    # ------------------------------------------------------------------ access

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self._name}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes: a read-only uint8 view into the memory map (no copy)."""
        info = self._info(name)
        return self._mm[info.offset : info.offset + info.nbytes]

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a new float32 array in NumPy-order shape."""
        info = self._info(name)
        try:
            return quants.dequantize(self.raw(name), info.ggml_type, info.shape)
        except (FormatError, ShapeError) as e:
            raise self._tensor_error(name, str(e)) from None

    def __repr__(self) -> str:
        return (
            f"GGUFReader({self._name!r}, version={self.version}, "
            f"{len(self.metadata)} keys, {len(self.tensors)} tensors)"
        )


def read_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """Open and parse a GGUF file (see :class:`GGUFReader`)."""
    return GGUFReader(path)
