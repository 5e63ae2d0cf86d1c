"""Our GGUF reader and (de)quantizers against gguf-py on the two real model files.

gguf-py's reader takes ~15 s on Gemma's 262k-token vocabulary, so each file is parsed once per
module (module-scoped, parametrized fixture) and every tensor is dequantized once.
"""

from __future__ import annotations

import mmap
import tracemalloc

import gguf
import numpy as np
import pytest
from _testing import gguf_py_value

from qjax.convert.gguf import GGMLType, GGUFValueType, dequantize, quantize, read_gguf, row_bytes


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def readers(request):
    """(our reader, gguf-py's reader) of one real file."""
    path = request.getfixturevalue(f"{request.param}_gguf")
    return read_gguf(path), gguf.GGUFReader(path)


def test_header_and_tensor_infos_match_gguf_py(readers):
    ours, ref = readers
    assert ours.version == int(ref.fields["GGUF.version"].contents())
    assert ours.alignment == ref.alignment
    assert ours.data_offset == ref.data_offset
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(reversed(t.shape.tolist())), t.name
        assert info.ggml_type == int(t.tensor_type) and info.type_name == t.tensor_type.name
        assert (info.offset, info.nbytes, info.n_elements) == (
            t.data_offset,
            t.n_bytes,
            t.n_elements,
        ), t.name


def test_metadata_matches_gguf_py(readers):
    ours, ref = readers
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        assert ours.value_types[key] == tuple(GGUFValueType(int(t)) for t in field.types), key
        assert gguf_py_value(ours.metadata[key]) == field.contents(), key


def test_every_tensor_dequantizes_bit_identically(readers):
    ours, ref = readers
    mismatched = []
    for t in ref.tensors:
        got = ours.dequantize(t.name)
        want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert got.dtype == np.float32 and got.shape == ours.tensors[t.name].shape
        if got.shape != want.shape or not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            mismatched.append((t.name, t.tensor_type.name))
    assert not mismatched


def _some_tensors(reader, per_type: int = 2) -> list[str]:
    """A handful of tensors: the first ``per_type`` of each type we can re-encode."""
    picked: dict[GGMLType, list[str]] = {}
    for name, info in reader.tensors.items():
        if (
            info.ggml_type in (GGMLType.Q8_0, GGMLType.Q4_1, GGMLType.Q5_0)
            and len(picked.setdefault(info.ggml_type, [])) < per_type
        ):
            picked[info.ggml_type].append(name)
    return [n for names in picked.values() for n in names]


def _head(reader, name: str, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``rows`` rows of a 2-D tensor: (their bytes, dequantized)."""
    info = reader.tensors[name]
    rows = min(rows, info.shape[0])
    raw = np.asarray(reader.raw(name)[: rows * row_bytes(info.ggml_type, info.shape[1])])
    return raw, dequantize(raw, info.ggml_type, (rows, info.shape[1]))


def test_requantizing_dequantized_weights_reproduces_the_file_bytes(readers):
    """The files were written by ggml's reference encoders, which ours replicate."""
    ours, _ = readers
    names = _some_tensors(ours)
    assert names
    for name in names:
        raw, w = _head(ours, name, 4096)
        got = quantize(w, ours.tensors[name].ggml_type).reshape(-1)
        assert np.array_equal(got, raw), name


ENCODERS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.mark.parametrize("qtype", ENCODERS)
def test_encoders_byte_identical_to_gguf_py_on_real_weights(readers, qtype):
    ours, _ = readers
    for name in _some_tensors(ours, per_type=1):
        _, w = _head(ours, name, 1024)
        got = quantize(w, GGMLType[qtype])
        want = gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])
        want = np.ascontiguousarray(want).view(np.uint8).reshape(got.shape)
        assert np.array_equal(got, want), (name, qtype)


def test_open_maps_without_copying(gemma3_gguf):
    """Parsing the 253 MB file allocates only the metadata (tokens, scores), not the data."""
    tracemalloc.start()
    try:
        reader = read_gguf(gemma3_gguf)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20
    raw = reader.raw("token_embd.weight")
    assert raw.dtype == np.uint8 and raw.nbytes == reader.tensors["token_embd.weight"].nbytes
    assert not raw.flags.owndata and not raw.flags.writeable
    base = raw
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, mmap.mmap)
