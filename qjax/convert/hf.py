"""Hugging Face checkpoint directories: ``config.json`` + safetensors weights, memory-mapped.

A directory holds ``config.json`` and either one ``model.safetensors`` or a sharded checkpoint:
``model.safetensors.index.json`` = ``{"metadata": {...}, "weight_map": {tensor: shard file}}``
next to the shard files.

A safetensors file is ``header_len: u64`` (little-endian), then ``header_len`` bytes of UTF-8
JSON ``{name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the data section; offsets are relative to the data section's start, tensors
are C-ordered and little-endian.  :func:`read_safetensors` checks the header against the file
(known dtype, ``end - begin == prod(shape) * itemsize``, inside the file, no overlaps) and returns
read-only NumPy views into a memory map of the file: nothing is copied until used.  ``BF16`` and
``F8_*`` tensors come back as ``ml_dtypes`` arrays.  Every malformed input raises
:class:`~qjax.errors.FormatError` naming the file and, where it applies, the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from qjax.errors import FormatError

__all__ = ["SAFETENSORS_DTYPES", "read_hf_checkpoint", "read_json", "read_safetensors"]

#: safetensors dtype name -> NumPy dtype (little-endian).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20  # safetensors itself refuses headers over 100 MB


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a missing file or bad JSON raises FormatError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(
            f"{path}: bad JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None


def _header(path: Path, mm: np.ndarray) -> tuple[dict, int]:
    if mm.size < 8:
        raise FormatError(f"{path}: truncated: {mm.size} bytes, the header length needs 8")
    (n,) = struct.unpack("<Q", mm[:8].tobytes())
    if n > min(_MAX_HEADER, mm.size - 8):
        raise FormatError(
            f"{path}: header length {n} exceeds the {mm.size - 8} bytes after it (or 100 MB)"
        )
    try:
        header = json.loads(mm[8 : 8 + n].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: header is not valid UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: header is a JSON {type(header).__name__}, not an object")
    return header, 8 + n


def _tensor_entry(path: Path, name: str, entry: Any, data_size: int) -> tuple[np.dtype, tuple, int]:
    def bad(msg: str) -> FormatError:
        return FormatError(f"{path}: tensor {name!r}: {msg}")

    if not isinstance(entry, dict):
        raise bad(f"header entry is {type(entry).__name__}, not an object")
    dtype_name, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype_name not in SAFETENSORS_DTYPES:
        raise bad(f"unsupported dtype {dtype_name!r}; supported: {', '.join(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise bad(f"bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"bad data_offsets {offsets!r}")
    dtype = SAFETENSORS_DTYPES[dtype_name]
    begin, end = offsets
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != nbytes:
        raise bad(
            f"data_offsets {offsets} hold {end - begin} bytes, {dtype_name}{shape} needs {nbytes}"
        )
    if end > data_size:
        raise bad(f"data [{begin}, {end}) extends past the data section ({data_size} bytes)")
    return dtype, tuple(shape), begin


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of one safetensors file; tensors are read-only memory-mapped views.

    ``metadata`` is the header's ``__metadata__`` (``{}`` if absent).
    """
    path = Path(path)
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise FormatError(f"{path}: file not found") from None
    except ValueError as e:  # numpy refuses to map an empty file
        raise FormatError(f"{path}: truncated: cannot map the file ({e})") from None
    header, start = _header(path, mm)
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: __metadata__ is not an object")
    data_size = mm.size - start
    tensors, spans = {}, []
    for name, entry in header.items():
        dtype, shape, begin = _tensor_entry(path, name, entry, data_size)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = mm[start + begin : start + begin + nbytes]
        tensors[name] = raw.view(dtype).reshape(shape)
        if nbytes:
            spans.append((begin, begin + nbytes, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:], strict=False):
        if begin_b < end_a:
            raise FormatError(f"{path}: tensor {b!r}: data overlaps tensor {a!r}")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _read_sharded(directory: Path) -> dict[str, np.ndarray]:
    index_path = directory / INDEX
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index_path}: no 'weight_map' object of tensor name -> shard file")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise FormatError(f"{index_path}: tensor {name!r}: bad shard file name {shard!r}")
        shards.setdefault(shard, []).append(name)
    tensors = {}
    for shard, names in shards.items():
        shard_path = directory / shard
        if not shard_path.is_file():
            raise FormatError(
                f"{index_path}: shard {shard!r} (holding tensor {names[0]!r} and "
                f"{len(names) - 1} more) is missing: {shard_path} not found"
            )
        found, _ = read_safetensors(shard_path)
        for name in names:
            if name not in found:
                raise FormatError(
                    f"{shard_path}: tensor {name!r} is listed in {INDEX} but absent from the shard"
                )
            tensors[name] = found[name]
    return tensors


def read_hf_checkpoint(
    directory: str | os.PathLike[str],
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, tensors)`` of a Hugging Face checkpoint directory.

    ``config`` is ``config.json`` parsed; ``tensors`` maps the checkpoint's tensor names
    (``"encoder.layer.0.attention.self.query.weight"``) to read-only memory-mapped NumPy arrays in
    the stored dtype and the stored (PyTorch, ``(out, in)`` for linears) layout.  A sharded
    checkpoint (``model.safetensors.index.json``) takes precedence over ``model.safetensors``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FormatError(f"{directory}: not a checkpoint directory")
    config = read_json(directory / CONFIG)
    if not isinstance(config, dict):
        raise FormatError(f"{directory / CONFIG}: a JSON {type(config).__name__}, not an object")
    if (directory / INDEX).is_file():
        return config, _read_sharded(directory)
    if (directory / SINGLE).is_file():
        return config, read_safetensors(directory / SINGLE)[0]
    raise FormatError(f"{directory}: no {SINGLE} or {INDEX} (only .safetensors weights are read)")
