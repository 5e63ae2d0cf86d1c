"""A streaming GGUF v3 writer, and a re-exporter built on our reader.

File layout written (all integers little-endian; the layout our reader parses):

* header: ``magic "GGUF"``, ``version: u32 = 3``, ``tensor_count: u64``, ``kv_count: u64``;
* ``kv_count`` metadata pairs, in the order given: ``key: string``, ``value_type: u32``, value.
  A string is ``length: u64`` + its UTF-8 bytes; an array is ``elem_type: u32``, ``count: u64``
  and the elements (nested arrays repeat this for each element);
* ``tensor_count`` tensor infos, in the order given: ``name: string``, ``n_dims: u32``,
  ``dims: u64[n_dims]`` (GGML order: the NumPy shape reversed), ``type: u32``, ``offset: u64``
  relative to the start of the data section;
* zero padding to ``general.alignment``, then the data section: each tensor's bytes followed by
  zero padding to the alignment (after the last tensor too, as llama.cpp and gguf-py do), so every
  offset is a multiple of the alignment.

Streaming: tensors are consumed one at a time. The header must list every tensor before the
data, so tensor data given as bytes or arrays is first spooled to a temporary file next to the
output, then copied after the header in chunks; data given as a zero-argument callable (as
:func:`copy_gguf` does) is fetched only when its turn comes in the final pass, without spooling.
Everything is written to a temporary file in the output's directory and moved into place with
:func:`os.replace` at the end; on any error every temporary file is removed and the output path
is left untouched.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from qjax.convert.gguf.constants import (
    BLOCK_SIZES,
    DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MAX_DIMS,
    SCALAR_DTYPES,
    SCALAR_STRUCT,
    GGMLType,
    GGUFValueType,
)
from qjax.convert.gguf.reader import GGUFReader, read_gguf
from qjax.errors import FormatError

__all__ = ["copy_gguf", "infer_value_types", "write_gguf"]

GGUF_VERSION = 3
_COPY_CHUNK = 16 << 20  # bytes copied at a time from the spool file

#: NumPy dtype a non-uint8 array must have to be written as a plain GGML type.
_PLAIN_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.F32: np.dtype("<f4"),
    GGMLType.F16: np.dtype("<f2"),
    GGMLType.F64: np.dtype("<f8"),
    GGMLType.I8: np.dtype("i1"),
    GGMLType.I16: np.dtype("<i2"),
    GGMLType.I32: np.dtype("<i4"),
    GGMLType.I64: np.dtype("<i8"),
}

_NUMPY_VALUE_TYPES: dict[np.dtype, GGUFValueType] = {
    np.dtype(dt): t for t, dt in SCALAR_DTYPES.items() if t != GGUFValueType.BOOL
}
_NUMPY_VALUE_TYPES[np.dtype(bool)] = GGUFValueType.BOOL

_INT_RANGES = {
    GGUFValueType.UINT8: (0, 2**8 - 1),
    GGUFValueType.INT8: (-(2**7), 2**7 - 1),
    GGUFValueType.UINT16: (0, 2**16 - 1),
    GGUFValueType.INT16: (-(2**15), 2**15 - 1),
    GGUFValueType.UINT32: (0, 2**32 - 1),
    GGUFValueType.INT32: (-(2**31), 2**31 - 1),
    GGUFValueType.UINT64: (0, 2**64 - 1),
    GGUFValueType.INT64: (-(2**63), 2**63 - 1),
}

TensorData = bytes | bytearray | memoryview | np.ndarray | Callable[[], Any]


# ------------------------------------------------------------------------------- metadata


def _infer_int(values: list[int]) -> GGUFValueType:
    lo, hi = min(values, default=0), max(values, default=0)
    for t in (GGUFValueType.INT32, GGUFValueType.INT64, GGUFValueType.UINT64):
        if _INT_RANGES[t][0] <= lo and hi <= _INT_RANGES[t][1]:
            return t
    raise ValueError(f"integer {lo if lo < 0 else hi} does not fit in 64 bits")


def _infer(value: Any) -> tuple[GGUFValueType, ...]:
    """The value types of one metadata value (see :func:`infer_value_types`)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value[()]
    if isinstance(value, bool | np.bool_):
        return (GGUFValueType.BOOL,)
    if isinstance(value, np.generic):
        if value.dtype in _NUMPY_VALUE_TYPES:
            return (_NUMPY_VALUE_TYPES[value.dtype.newbyteorder("<")],)
        raise ValueError(f"unsupported NumPy scalar type {value.dtype}")
    if isinstance(value, int):
        return (_infer_int([value]),)
    if isinstance(value, float):
        return (GGUFValueType.FLOAT32,)
    if isinstance(value, str):
        return (GGUFValueType.STRING,)
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError(f"metadata arrays must be 1-D, got shape {value.shape}")
        dt = value.dtype.newbyteorder("<") if value.dtype.byteorder == ">" else value.dtype
        if dt.kind == "U":
            return (GGUFValueType.ARRAY, GGUFValueType.STRING)
        if dt not in _NUMPY_VALUE_TYPES:
            raise ValueError(f"unsupported NumPy array dtype {value.dtype}")
        return (GGUFValueType.ARRAY, _NUMPY_VALUE_TYPES[dt])
    if isinstance(value, list | tuple):
        items = list(value)
        if not items:
            raise ValueError("cannot infer the element type of an empty array; pass value_types")
        if all(isinstance(x, bool | np.bool_) for x in items):
            return (GGUFValueType.ARRAY, GGUFValueType.BOOL)
        if all(isinstance(x, int | np.integer) and not isinstance(x, bool) for x in items):
            return (GGUFValueType.ARRAY, _infer_int([int(x) for x in items]))
        if all(isinstance(x, int | float | np.integer | np.floating) for x in items):
            return (GGUFValueType.ARRAY, GGUFValueType.FLOAT32)
        if all(isinstance(x, str) for x in items):
            return (GGUFValueType.ARRAY, GGUFValueType.STRING)
        if all(isinstance(x, list | tuple | np.ndarray) for x in items):
            subs = {_infer(x) for x in items}
            if len(subs) != 1:
                raise ValueError(f"nested arrays of different types {sorted(subs)}")
            return (GGUFValueType.ARRAY, *subs.pop())
        raise ValueError("array elements of mixed or unsupported types")
    raise ValueError(f"unsupported value type {type(value).__name__}")


def infer_value_types(value: Any) -> tuple[GGUFValueType, ...]:
    """GGUF value types for a Python / NumPy metadata value, in our reader's ``value_types`` form.

    ``bool`` → BOOL; ``int`` → INT32, else INT64, else UINT64 (the first that holds it);
    ``float`` → FLOAT32 (llama.cpp's hyperparameters are float32); ``str`` → STRING; a NumPy
    scalar or 1-D array keeps its dtype; a list is an ARRAY whose element type is inferred the
    same way from all its elements (ints in one common type, ints mixed with floats → FLOAT32).
    An empty list has no inferable element type: pass it in ``value_types``.
    Raises ``ValueError`` for values GGUF cannot hold.
    """
    return _infer(value)


def _check_int(v: Any, vtype: GGUFValueType) -> int:
    if isinstance(v, float | np.floating) or not isinstance(v, int | np.integer):
        raise ValueError(f"{vtype.name} value must be an integer, got {v!r}")
    lo, hi = _INT_RANGES[vtype]
    if not lo <= int(v) <= hi:
        raise ValueError(f"{int(v)} is out of range for {vtype.name}")
    return int(v)


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(value: Any, types: tuple[GGUFValueType, ...]) -> bytes:
    """The bytes of ``value`` of value types ``types`` (without the leading type id)."""
    vtype = types[0]
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, str):
            raise ValueError(f"STRING value must be a str, got {type(value).__name__}")
        return _encode_string(value)
    if vtype == GGUFValueType.BOOL:
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"BOOL value must be a bool, got {value!r}")
        return struct.pack("<B", bool(value))
    if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        if not isinstance(value, int | float | np.integer | np.floating) or isinstance(value, bool):
            raise ValueError(f"{vtype.name} value must be a number, got {value!r}")
        return struct.pack(SCALAR_STRUCT[vtype], float(value))
    if vtype in _INT_RANGES:
        return struct.pack(SCALAR_STRUCT[vtype], _check_int(value, vtype))
    if vtype != GGUFValueType.ARRAY:
        raise ValueError(f"unknown value type {vtype!r}")
    if len(types) < 2:
        raise ValueError("ARRAY value types need an element type")
    etype = types[1]
    if isinstance(value, np.ndarray) and value.ndim != 1:
        raise ValueError(f"metadata arrays must be 1-D, got shape {value.shape}")
    if not isinstance(value, list | tuple | np.ndarray):
        raise ValueError(f"ARRAY value must be a list or 1-D array, got {type(value).__name__}")
    head = struct.pack("<IQ", int(etype), len(value))
    if etype in SCALAR_DTYPES and etype != GGUFValueType.BOOL:
        arr = np.asarray(value)
        if len(value) and etype in _INT_RANGES:
            if arr.dtype.kind not in "iu":
                raise ValueError(f"{etype.name} array must hold integers, got {arr.dtype}")
            lo, hi = _INT_RANGES[etype]
            if int(arr.min()) < lo or int(arr.max()) > hi:
                raise ValueError(f"array values out of range for {etype.name}")
        elif len(value) and arr.dtype.kind not in "iuf":
            raise ValueError(f"{etype.name} array must hold numbers, got {arr.dtype}")
        return head + arr.astype(SCALAR_DTYPES[etype]).tobytes()
    return head + b"".join(_encode_value(x, types[1:]) for x in value)


def _encode_metadata(
    metadata: Mapping[str, Any], value_types: Mapping[str, tuple] | None
) -> list[bytes]:
    """One encoded ``key, type, value`` entry per metadata key; errors name the key."""
    out = []
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise FormatError(f"metadata key {key!r} is not a str")
        try:
            if value_types is not None and key in value_types:
                types = tuple(GGUFValueType(int(t)) for t in value_types[key])
            else:
                types = _infer(value)
            out.append(
                _encode_string(key) + struct.pack("<I", types[0]) + _encode_value(value, types)
            )
        except (ValueError, TypeError, OverflowError, struct.error) as e:
            raise FormatError(f"metadata key {key!r}: {e}") from None
    return out


# ------------------------------------------------------------------------------- tensors


@dataclass
class _Entry:
    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # relative to the data section
    spool_offset: int | None  # where the bytes are in the spool file, or None if deferred
    fetch: Callable[[], Any] | None


def _tensor_bytes(
    name: str, ggml_type: GGMLType, shape: tuple[int, ...], data: Any, nbytes: int
) -> memoryview:
    """``data`` as a flat byte view of exactly ``nbytes``; else a FormatError naming the tensor."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            want = _PLAIN_DTYPES.get(ggml_type)
            if want is None or data.dtype.newbyteorder("<") != want:
                raise FormatError(
                    f"tensor {name!r}: a {data.dtype} array cannot be written as "
                    f"{ggml_type.name}; pass uint8 raw bytes (e.g. from quants.quantize)"
                )
            data = data.astype(want, copy=False)
        data = np.ascontiguousarray(data)
        view = memoryview(data).cast("B") if data.size else memoryview(b"")
    elif isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data).cast("B")
    else:
        raise FormatError(
            f"tensor {name!r}: data must be bytes, a NumPy array or a callable returning one, "
            f"got {type(data).__name__}"
        )
    if view.nbytes != nbytes:
        raise FormatError(
            f"tensor {name!r}: data has {view.nbytes} bytes, expected {nbytes} "
            f"(row_bytes({ggml_type.name}, row) * rows for shape {shape})"
        )
    return view


def _check_tensor(name: Any, ggml_type: Any, shape: Any) -> tuple[str, GGMLType, tuple, int]:
    if not isinstance(name, str):
        raise FormatError(f"tensor name {name!r} is not a str")
    try:
        gtype = GGMLType(int(ggml_type))
    except ValueError:
        raise FormatError(f"tensor {name!r}: unknown GGML type {ggml_type!r}") from None
    shape = tuple(int(s) for s in shape)
    if not 1 <= len(shape) <= MAX_DIMS:
        raise FormatError(f"tensor {name!r}: {len(shape)} dims, expected 1 to {MAX_DIMS}")
    if any(s <= 0 for s in shape):
        raise FormatError(f"tensor {name!r}: shape {shape} has a non-positive size")
    elems, block_bytes = BLOCK_SIZES[gtype]
    if shape[-1] % elems:
        raise FormatError(
            f"tensor {name!r}: row length {shape[-1]} is not a multiple of the "
            f"{gtype.name} block size {elems}"
        )
    numel = int(np.prod(shape, dtype=np.int64))
    return name, gtype, shape, numel // elems * block_bytes


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


# ------------------------------------------------------------------------------- writer


def _alignment(metadata: Mapping[str, Any], alignment: int | None) -> int:
    md_align = metadata.get("general.alignment")
    if alignment is None:
        alignment = DEFAULT_ALIGNMENT if md_align is None else md_align
    if not isinstance(alignment, int | np.integer) or alignment <= 0 or alignment & (alignment - 1):
        raise FormatError(f"alignment {alignment!r} is not a positive power of two")
    if md_align is not None and md_align != alignment:
        raise FormatError(
            f"metadata key 'general.alignment' = {md_align} conflicts with alignment={alignment}"
        )
    return int(alignment)


def write_gguf(
    path: str | os.PathLike[str],
    metadata: Mapping[str, Any],
    tensors: Iterable[tuple[str, GGMLType | int, TensorData, tuple[int, ...]]],
    *,
    alignment: int | None = None,
    value_types: Mapping[str, tuple] | None = None,
) -> Path:
    """Write a GGUF v3 file (layout in the module docstring), atomically; return its path.

    Args:
        path: the output file; replaced only once the whole file is written.
        metadata: key -> value, written in this order. Types come from ``value_types[key]``
            when given (our reader's ``value_types`` form: ``(type,)`` or ``(ARRAY, elem, ...)``),
            else from :func:`infer_value_types`.
        tensors: ``(name, ggml_type, data, numpy_shape)`` items, consumed one at a time (a
            generator is fine). ``data`` is the tensor's raw bytes (``bytes``/``memoryview`` or
            a ``uint8`` array, e.g. from :func:`~qjax.convert.gguf.quants.quantize`), an array of
            the plain type's own dtype (float32 for F32, float16 for F16, ...), or a zero-argument
            callable returning one of those, called only when the tensor is written (no
            spooling). GGUF dims are ``numpy_shape`` reversed.
        alignment: data alignment; default ``metadata["general.alignment"]`` if present, else
            32. A value other than 32 that is not in ``metadata`` is added as the UINT32 key
            ``general.alignment`` (after the given keys), so readers find it.
        value_types: explicit value types per key (keys absent here are inferred).

    Raises :class:`~qjax.errors.FormatError` naming the key or tensor for a duplicate tensor
    name, a value that does not fit its type, an unknown GGML type, a shape whose rows are not
    whole blocks, or data whose size is not ``row_bytes(type, shape[-1]) * rows``. On any error
    (including I/O errors, which propagate) no file is left behind.
    """
    path = Path(path)
    metadata = dict(metadata)
    align = _alignment(metadata, alignment)
    value_types = dict(value_types or {})
    if "general.alignment" not in metadata and align != DEFAULT_ALIGNMENT:
        metadata["general.alignment"] = align
        value_types["general.alignment"] = (GGUFValueType.UINT32,)
    if "general.alignment" in metadata:
        types = value_types.get("general.alignment", (GGUFValueType.UINT32,))
        if tuple(types) != (GGUFValueType.UINT32,):
            raise FormatError("metadata key 'general.alignment' must be a UINT32")
        value_types["general.alignment"] = (GGUFValueType.UINT32,)
    kv = _encode_metadata(metadata, value_types)

    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    spool: IO[bytes] | None = None
    done = False
    try:
        with os.fdopen(fd, "wb") as out:
            entries: list[_Entry] = []
            names: set[str] = set()
            offset = 0
            for item in tensors:
                if not isinstance(item, tuple | list) or len(item) != 4:
                    raise FormatError(
                        f"tensor items must be (name, ggml_type, data, shape), got {item!r:.80}"
                    )
                name, gtype, shape, nbytes = _check_tensor(item[0], item[1], item[3])
                if name in names:
                    raise FormatError(f"tensor {name!r}: duplicate tensor name")
                names.add(name)
                data = item[2]
                entry = _Entry(name, gtype, shape, nbytes, offset, None, None)
                if callable(data):
                    entry.fetch = data
                else:
                    view = _tensor_bytes(name, gtype, shape, data, nbytes)
                    if spool is None:
                        spool = tempfile.TemporaryFile(dir=directory)
                    entry.spool_offset = spool.tell()
                    spool.write(view)
                    del view, data
                entries.append(entry)
                offset += nbytes + _pad(nbytes, align)

            head = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(entries), len(kv)), *kv]
            for e in entries:
                head.append(_encode_string(e.name))
                head.append(struct.pack(f"<I{len(e.shape)}Q", len(e.shape), *reversed(e.shape)))
                head.append(struct.pack("<IQ", int(e.ggml_type), e.offset))
            header = b"".join(head)
            out.write(header)
            out.write(bytes(_pad(len(header), align)))

            if spool is not None:
                spool.seek(0)
            for e in entries:
                if e.fetch is not None:
                    view = _tensor_bytes(e.name, e.ggml_type, e.shape, e.fetch(), e.nbytes)
                    out.write(view)
                    del view
                else:
                    assert spool is not None and spool.tell() == e.spool_offset
                    _copy_exact(spool, out, e.nbytes)
                out.write(bytes(_pad(e.nbytes, align)))
        os.replace(tmp, path)
        done = True
    finally:  # on any error (or interrupt) remove the temp file; the error propagates
        if not done:
            tmp.unlink(missing_ok=True)
        if spool is not None:
            spool.close()
    return path


def _copy_exact(src: IO[bytes], dst: IO[bytes], n: int) -> None:
    """Copy exactly ``n`` bytes from ``src`` to ``dst`` in bounded chunks."""
    while n:
        chunk = src.read(min(n, _COPY_CHUNK))
        if not chunk:
            raise OSError("spool file ended early")
        dst.write(chunk)
        n -= len(chunk)


# ------------------------------------------------------------------------------- copy


def copy_gguf(src: str | os.PathLike[str] | GGUFReader, dst: str | os.PathLike[str]) -> Path:
    """Re-export a GGUF file unchanged through our reader and :func:`write_gguf`.

    Metadata keeps its order and value types; tensors keep their order, types, shapes and bytes,
    each streamed from the source's memory map when its turn comes (nothing is spooled). The
    output is a GGUF v3 file with the source's alignment. For a v3 source written with the usual
    conventions (llama.cpp / gguf-py: tensors in file order, packed, each padded to the
    alignment) the output is byte-identical to the input.
    """
    reader = src if isinstance(src, GGUFReader) else read_gguf(src)
    if Path(dst).resolve() == reader.path.resolve():
        raise FormatError(f"{dst}: cannot copy a GGUF file onto itself")

    def fetcher(name: str) -> Callable[[], np.ndarray]:
        return lambda: reader.raw(name)

    tensors = ((t.name, t.ggml_type, fetcher(t.name), t.shape) for t in reader.tensors.values())
    return write_gguf(
        dst,
        reader.metadata,
        tensors,
        alignment=reader.alignment,
        value_types=reader.value_types,
    )


# ------------------------------------------------------------------------------- llama export

#: ``general.file_type`` (llama.cpp's ``llama_ftype``) of a file whose matrices are all this type.
_FILE_TYPES = {GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q8_0: 7}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's export permutation of a Q or K weight ``(heads·D, in)``, per head.

    ``W.reshape(heads, 2, D/2, in).swapaxes(1, 2)``: the half-split RoPE row order becomes the
    interleaved one; the inverse of :func:`~qjax.convert.gguf.load.unpermute_qk`. K takes the
    number of *KV* heads.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_llama_params(
    path: str | os.PathLike[str],
    params: Any,
    source: str | os.PathLike[str] | GGUFReader,
    ggml_type: GGMLType | int = GGMLType.Q8_0,
) -> Path:
    """Write a qjax :class:`~qjax.models.Llama`'s float weights as a GGUF file.

    Args:
        path: the output file (written atomically by :func:`write_gguf`).
        params: the model, or its ``nnx.Param`` state (float arrays; QArrays are not supported).
        source: the GGUF file (or reader) the model came from: every metadata key and value type
            is copied from it (tokenizer included), except ``general.file_type``, which is set to
            match ``ggml_type``; tensors are written in its order, and it must hold exactly the
            tensors the model maps to.
        ggml_type: type of the 2-D weights (linears and embedding): F32, F16, Q8_0 or Q4_0,
            encoded with our :func:`~qjax.convert.gguf.quants.quantize` (byte-identical to
            gguf-py). A matrix whose rows are not whole blocks falls back to F16. 1-D weights
            (norms) are F32.

    The mapping is the inverse of :func:`~qjax.convert.gguf.load.load_gguf_model`: kernels
    ``(in, out)`` are transposed to GGUF's ``(out, in)``, and Q / K rows are permuted back with
    :func:`permute_qk` (K with the KV-head count). Tensors are converted one at a time.
    """
    import jax
    from flax import nnx

    from qjax.convert.gguf import load, quants
    from qjax.rules import path_str

    reader = source if isinstance(source, GGUFReader) else read_gguf(source)
    if reader.metadata.get("general.architecture") != "llama":
        raise FormatError(f"{reader.path}: export_llama_params needs a llama source file")
    gtype = GGMLType(int(ggml_type))
    if gtype not in _FILE_TYPES:
        raise FormatError(f"cannot export Llama weights as {gtype.name}")
    config = load.config_from_gguf(reader)
    state = nnx.state(params, nnx.Param) if isinstance(params, nnx.Module) else params
    table = [*load._llama_tensors(config), *((p, g, None) for p, g in load._COMMON)]
    heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}
    by_name: dict[str, tuple[str, Any]] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        param = path_str(keypath)
        name, _ = load._tensor_for(param, table)
        by_name[name] = (param, leaf)
    missing = [n for n in reader.tensors if n not in by_name]
    extra = [n for n in by_name if n not in reader.tensors]
    if missing or extra:
        raise FormatError(
            f"{reader.path}: the params do not match the source's tensors "
            f"(missing: {missing[:4]}, not in the source: {extra[:4]})"
        )

    def convert(name: str) -> tuple[GGMLType, Callable[[], np.ndarray]]:
        param, leaf = by_name[name]
        kernel = param.endswith("/kernel")
        row = leaf.shape[0] if kernel else leaf.shape[-1]  # GGUF rows run along the input axis
        t = GGMLType.F32 if len(leaf.shape) == 1 else gtype
        if row % BLOCK_SIZES[t][0]:
            t = GGMLType.F16

        def data() -> np.ndarray:
            w = np.asarray(jax.device_get(leaf), dtype=np.float32)
            if kernel:
                w = w.T
            kind = name.split(".")[2] if name.startswith("blk.") else ""
            if kind in heads:
                w = permute_qk(w, heads[kind])
            return quants.quantize(w, t)

        return t, data

    def tensors():
        for name, info in reader.tensors.items():
            t, data = convert(name)
            leaf = by_name[name][1]
            shape = tuple(reversed(leaf.shape)) if by_name[name][0].endswith("/kernel") else None
            shape = shape or tuple(leaf.shape)
            if shape != info.shape:
                raise FormatError(
                    f"tensor {name!r}: param {by_name[name][0]} gives shape {shape}, "
                    f"the source has {info.shape}"
                )
            yield name, t, data, shape

    metadata = dict(reader.metadata)
    value_types = dict(reader.value_types)
    metadata["general.file_type"] = _FILE_TYPES[gtype]
    value_types["general.file_type"] = (GGUFValueType.UINT32,)
    return write_gguf(
        path, metadata, tensors(), alignment=reader.alignment, value_types=value_types
    )
