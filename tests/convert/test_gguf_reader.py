"""The GGUF reader on a small synthetic file: values, zero-copy access, and malformed input."""

from __future__ import annotations

import itertools
import mmap
import struct
from collections.abc import Callable
from datetime import timedelta

import gguf
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from qjax.convert.gguf import GGMLType, GGUFReader, GGUFValueType, read_gguf
from qjax.errors import FormatError

V = GGUFValueType


def test_small_file_metadata(small_gguf):
    r = read_gguf(small_gguf)
    md, types = r.metadata, r.value_types
    assert r.version == 3 and r.alignment == 32 and r.data_offset % 32 == 0
    assert md["general.architecture"] == "llama"
    assert md["general.name"] == "tiny ünïcödé"
    scalars = {
        "t.u8": (V.UINT8, 200),
        "t.i8": (V.INT8, -100),
        "t.u16": (V.UINT16, 60000),
        "t.i16": (V.INT16, -30000),
        "t.u32": (V.UINT32, 4_000_000_000),
        "t.i32": (V.INT32, -2_000_000_000),
        "t.u64": (V.UINT64, 2**63 + 5),
        "t.i64": (V.INT64, -(2**62)),
        "t.f64": (V.FLOAT64, 0.1),
        "t.f32": (V.FLOAT32, float(np.float32(0.1))),
        "t.bool": (V.BOOL, True),
    }
    for key, (vtype, value) in scalars.items():
        assert types[key] == (vtype,) and md[key] == value and type(md[key]) is type(value), key
    assert md["t.strs"] == ["a", "", "ß"] and types["t.strs"] == (V.ARRAY, V.STRING)
    assert md["t.short_ints"] == [1, -2, 3] and types["t.short_ints"] == (V.ARRAY, V.INT32)
    assert md["t.bools"] == [True, False, True] and types["t.bools"] == (V.ARRAY, V.BOOL)
    floats = md["t.long_floats"]  # long numeric arrays come back as NumPy arrays
    assert isinstance(floats, np.ndarray) and floats.dtype == np.float32
    np.testing.assert_array_equal(floats, np.arange(100, dtype=np.float32) / 8)
    assert md["t.nested"] == [[1, 2], [3]]
    assert types["t.nested"] == (V.ARRAY, V.ARRAY, V.INT32)


def test_small_file_matches_gguf_py(small_gguf, small_tensors):
    ours, ref = read_gguf(small_gguf), gguf.GGUFReader(small_gguf)
    assert list(ours.tensors) == list(small_tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.type_name == small_tensors[t.name][0]
        assert info.shape == small_tensors[t.name][1] == tuple(reversed(t.shape.tolist()))
        assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes)
        want = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        np.testing.assert_array_equal(ours.dequantize(t.name).view(np.uint32), want.view(np.uint32))


def test_raw_is_a_read_only_view_of_the_map(small_gguf):
    r = read_gguf(small_gguf)
    for name, info in r.tensors.items():
        raw = r.raw(name)
        assert raw.dtype == np.uint8 and raw.shape == (info.nbytes,)
        assert not raw.flags.owndata and not raw.flags.writeable
        assert np.shares_memory(raw, r.raw(name))
        base = raw
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, mmap.mmap)
        assert raw.tobytes() == small_gguf.read_bytes()[info.offset : info.offset + info.nbytes]
    out = r.dequantize("t_f32")  # a fresh array, even for F32
    assert out.flags.writeable and not np.shares_memory(out, r.raw("t_f32"))
    with pytest.raises(KeyError, match="no_such"):
        r.raw("no_such")


# ------------------------------------------------------------------------------ malformed input


def _key_at(data: bytes, key: str) -> int:
    """Offset of a metadata key's length field."""
    k = key.encode()
    i = data.find(struct.pack("<Q", len(k)) + k)
    assert i > 0, key
    return i


def _value_at(data: bytes, key: str) -> int:
    """Offset of a metadata key's value-type field (the value follows it)."""
    return _key_at(data, key) + 8 + len(key.encode())


def _tensor_at(data: bytes, name: str) -> dict[str, int]:
    """Offsets of the fields of a tensor info (n_dims, first dim, type, offset)."""
    i = _key_at(data, name) + 8 + len(name.encode())
    (n_dims,) = struct.unpack_from("<I", data, i)
    return {"n_dims": i, "dim0": i + 4, "type": i + 4 + 8 * n_dims, "offset": i + 8 + 8 * n_dims}


def _put(fmt: str, where: Callable[[bytes], int], value) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, where(data), value(data) if callable(value) else value)
        return bytes(out)

    return mutate


def _tensor_field(name: str, field: str) -> Callable[[bytes], int]:
    return lambda d: _tensor_at(d, name)[field]


def _tensor_offset(name: str) -> Callable[[bytes], int]:
    return lambda d: struct.unpack_from("<Q", d, _tensor_at(d, name)["offset"])[0]


def _rename(old: str, new: str) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        i = _key_at(data, old) + 8
        return data[:i] + new.encode() + data[i + len(new.encode()) :]

    return mutate


def _end_of(name: str) -> Callable[[bytes], bytes]:
    """Cut the file one byte before the end of a tensor's data."""

    def mutate(data: bytes) -> bytes:
        start = struct.unpack_from("<Q", data, _tensor_at(data, name)["offset"])[0]
        data_offset = -(-(_tensor_at(data, "t_q6k")["offset"] + 8) // 32) * 32
        return data[: data_offset + start + 210 - 1]

    return mutate


BAD_FILES = {
    # id: (mutation of the small valid file, words the error message must contain)
    "empty": (lambda d: b"", ["truncated"]),
    "wrong_magic": (lambda d: b"GGUX" + d[4:], ["not a GGUF file"]),
    "version_1": (_put("<I", lambda d: 4, 1), ["unsupported GGUF version 1"]),
    "version_99": (_put("<I", lambda d: 4, 99), ["unsupported GGUF version 99"]),
    "big_endian": (_put(">I", lambda d: 4, 3), ["big-endian"]),
    "truncated_in_counts": (lambda d: d[:20], ["truncated", "count"]),
    "truncated_early": (lambda d: d[: _value_at(d, "t.u32") + 2], ["cannot fit"]),
    "truncated_in_metadata": (
        lambda d: d[: _value_at(d, "t.nested") + 6],
        ["truncated", "'t.nested'"],
    ),
    "truncated_in_tensor_infos": (
        lambda d: d[: _tensor_at(d, "t_q6k")["dim0"] + 3],
        ["truncated", "'t_q6k'"],
    ),
    "truncated_tensor_data": (_end_of("t_q6k"), ["'t_q6k'", "past the end"]),
    "absurd_kv_count": (_put("<Q", lambda d: 16, 2**60), ["key/value count", "cannot fit"]),
    "absurd_tensor_count": (_put("<Q", lambda d: 8, 2**62), ["tensor count", "cannot fit"]),
    "key_length_past_eof": (_put("<Q", lambda d: 24, lambda d: len(d)), ["key", "truncated"]),
    "string_length_past_eof": (
        _put("<Q", lambda d: _value_at(d, "general.name") + 4, 2**63),
        ["'general.name'", "truncated"],
    ),
    "array_length_absurd": (
        _put("<Q", lambda d: _value_at(d, "t.strs") + 8, 2**59),
        ["'t.strs'", "array length", "cannot fit"],
    ),
    "unknown_value_type": (
        _put("<I", lambda d: _value_at(d, "t.u16"), 13),
        ["'t.u16'", "unknown value type 13"],
    ),
    "unknown_array_type": (
        _put("<I", lambda d: _value_at(d, "t.strs") + 4, 99),
        ["'t.strs'", "unknown value type 99"],
    ),
    "invalid_utf8": (
        lambda d: d.replace("ünï".encode(), b"\xff\xfe\xfd\xfc\xfb"),
        ["'general.name'", "UTF-8"],
    ),
    "duplicate_key": (_rename("t.i8", "t.u8"), ["'t.u8'", "duplicate key"]),
    "alignment_not_power_of_two": (
        _put("<I", lambda d: _value_at(d, "general.alignment") + 4, 48),
        ["'general.alignment'", "power of two"],
    ),
    "unknown_tensor_type": (
        _put("<I", _tensor_field("t_q40", "type"), 4),
        ["'t_q40'", "unknown GGML tensor type 4"],
    ),
    "duplicate_tensor_name": (_rename("t_q41", "t_q40"), ["'t_q40'", "duplicate tensor name"]),
    "misaligned_offset": (
        _put("<Q", _tensor_field("t_q41", "offset"), lambda d: _tensor_offset("t_q41")(d) + 1),
        ["'t_q41'", "not a multiple of the alignment"],
    ),
    "offset_past_eof": (
        _put("<Q", _tensor_field("t_q41", "offset"), 2**40),
        ["'t_q41'", "past the end"],
    ),
    "offset_near_u64_max": (
        _put("<Q", _tensor_field("t_q41", "offset"), 2**64 - 32),
        ["'t_q41'", "past the end"],
    ),
    "overlapping_tensors": (
        _put("<Q", _tensor_field("t_q41", "offset"), _tensor_offset("t_q40")),
        ["'t_q4", "overlaps"],
    ),
    "too_many_dims": (_put("<I", _tensor_field("t_q40", "n_dims"), 5), ["'t_q40'", "n_dims 5"]),
    "zero_dim": (_put("<Q", _tensor_field("t_q40", "dim0"), 0), ["'t_q40'", "dim 0 = 0"]),
    "huge_dim": (_put("<Q", _tensor_field("t_q40", "dim0"), 2**63), ["'t_q40'", "dim 0"]),
    "row_not_whole_blocks": (
        _put("<Q", _tensor_field("t_q40", "dim0"), 16),
        ["'t_q40'", "not a multiple of the Q4_0 block"],
    ),
    "tensor_bigger_than_file": (
        _put("<Q", _tensor_field("t_f32", "dim0"), 2**40),
        ["'t_f32'", "past the end"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_malformed_file_raises_format_error(case, small_bytes, tmp_path):
    mutate, words = BAD_FILES[case]
    path = tmp_path / f"bad_{case}.gguf"
    path.write_bytes(mutate(small_bytes))
    with pytest.raises(FormatError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert str(path) in msg
    for word in words:
        assert word in msg, (case, msg)


def test_version_2_is_accepted(small_bytes, tmp_path):
    path = tmp_path / "v2.gguf"
    path.write_bytes(_put("<I", lambda d: 4, 2)(small_bytes))
    r = read_gguf(path)
    assert r.version == 2 and r.dequantize("t_q4k").shape == (2, 256)


def test_supported_but_undecodable_type_fails_at_dequantize(small_bytes, tmp_path):
    path = tmp_path / "mxfp4.gguf"  # MXFP4's 2 blocks (34 B) fit in Q4_0's aligned 36 B slot
    path.write_bytes(_put("<I", _tensor_field("t_q40", "type"), int(GGMLType.MXFP4))(small_bytes))
    r = read_gguf(path)
    assert r.tensors["t_q40"].ggml_type == GGMLType.MXFP4
    assert r.raw("t_q40").size == 34
    with pytest.raises(FormatError, match=r"mxfp4\.gguf.*'t_q40'.*MXFP4"):
        r.dequantize("t_q40")


def _handmade(kv: bytes, n_kv: int = 1) -> bytes:
    """A GGUF v3 file with no tensors and the given encoded metadata."""
    return b"GGUF" + struct.pack("<IQQ", 3, 0, n_kv) + kv


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_handmade_edge_cases(tmp_path):
    path = tmp_path / "edge.gguf"
    # no tensors, no padding after the header: valid
    path.write_bytes(_handmade(_key("a") + struct.pack("<IB", int(V.UINT8), 7)))
    r = read_gguf(path)
    assert r.metadata == {"a": 7} and r.tensors == {}
    # empty nested arrays
    empty = struct.pack("<IQ", int(V.ARRAY), 2) + struct.pack("<IQ", int(V.INT32), 0) * 2
    path.write_bytes(_handmade(_key("e") + struct.pack("<I", int(V.ARRAY)) + empty))
    assert read_gguf(path).metadata == {"e": [[], []]}
    # arrays nested 100 deep: refused, not a RecursionError
    deep = struct.pack("<IQ", int(V.ARRAY), 1) * 100 + struct.pack("<IQ", int(V.UINT8), 0)
    path.write_bytes(_handmade(_key("deep") + struct.pack("<I", int(V.ARRAY)) + deep))
    with pytest.raises(FormatError, match="'deep'.*nested"):
        read_gguf(path)
    # alignment of the wrong type
    path.write_bytes(_handmade(_key("general.alignment") + struct.pack("<IQ", int(V.UINT64), 32)))
    with pytest.raises(FormatError, match="UINT32"):
        read_gguf(path)


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        GGUFReader(tmp_path / "missing.gguf")


# ------------------------------------------------------------------------------ fuzz

_WORDS = [0, 1, 3, 5, 31, 255, 2**16, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1]
_files = itertools.count()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@st.composite
def _mutations(draw, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        # mostly the header (the first 1.4 kB), sometimes anywhere
        pos = draw(st.one_of(st.integers(0, 1500), st.integers(0, len(out))))
        kind = draw(st.sampled_from(["truncate", "byte", "word"]))
        if kind == "truncate":
            del out[pos:]
        elif kind == "byte" and pos < len(out):
            out[pos] = draw(st.integers(0, 255))
        elif kind == "word":
            size = draw(st.sampled_from([4, 8]))
            value = draw(st.sampled_from(_WORDS + [len(out)])) % (1 << (8 * size))
            pos = min(pos, len(out) - size)
            if pos >= 0:
                struct.pack_into("<I" if size == 4 else "<Q", out, pos, value)
    return bytes(out)


@settings(max_examples=max(200, settings().max_examples), deadline=timedelta(seconds=10))
@given(data=st.data())
def test_fuzzed_files_parse_or_raise_format_error(small_bytes, fuzz_dir, data):
    """Random truncations, byte flips and absurd integers: success or FormatError, nothing
    else (no crash, hang, giant allocation or other exception)."""
    path = fuzz_dir / f"{next(_files)}.gguf"
    path.write_bytes(data.draw(_mutations(small_bytes)))
    try:
        r = read_gguf(path)
        for name, info in r.tensors.items():
            assert info.offset + info.nbytes <= path.stat().st_size
            assert r.dequantize(name).shape == info.shape
        event("parsed")
    except FormatError as e:
        assert str(path) in str(e)
        event("FormatError")
    finally:
        path.unlink()
