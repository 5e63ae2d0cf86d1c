"""Our GGUF writer: round trips through our reader, gguf-py's reader as the independent oracle,
byte-identical re-export of the real files, streaming, and atomic failure."""

from __future__ import annotations

import hashlib
import tracemalloc

import gguf
import numpy as np
import pytest
from _testing import gguf_py_value

from qjax.convert.gguf import (
    GGMLType,
    GGUFValueType,
    dequantize,
    quantize,
    read_gguf,
    row_bytes,
)
from qjax.convert.gguf.writer import copy_gguf, infer_value_types, write_gguf
from qjax.errors import FormatError

V = GGUFValueType


def _sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _assert_same_file_contents(a, b):
    """Equal metadata (values and types, in order) and tensors (infos and bytes) via our reader."""
    assert list(a.metadata) == list(b.metadata)
    assert a.value_types == b.value_types
    for key, value in a.metadata.items():
        assert gguf_py_value(b.metadata[key]) == gguf_py_value(value), key
    assert list(a.tensors) == list(b.tensors)
    for name, info in a.tensors.items():
        other = b.tensors[name]
        assert (other.ggml_type, other.shape, other.nbytes) == (
            info.ggml_type,
            info.shape,
            info.nbytes,
        ), name
        assert np.array_equal(a.raw(name), b.raw(name)), name


# --------------------------------------------------------------------------- re-export


@pytest.mark.parametrize("asset", ["smollm2", "gemma3"])
def test_copy_real_file_is_byte_identical(asset, request, tmp_path):
    src = request.getfixturevalue(f"{asset}_gguf")
    dst = copy_gguf(src, tmp_path / "copy.gguf")
    _assert_same_file_contents(read_gguf(src), read_gguf(dst))
    # llama.cpp's layout (keys and tensors in order, each tensor padded to the alignment, the
    # last one too) is exactly what we write, so the whole file is identical.
    assert _sha256(dst) == _sha256(src)
    assert [p.name for p in tmp_path.iterdir()] == ["copy.gguf"]  # no temp files left


def test_copy_gguf_py_file_is_byte_identical(small_gguf, tmp_path):
    dst = copy_gguf(small_gguf, tmp_path / "copy.gguf")
    assert dst.read_bytes() == small_gguf.read_bytes()


def test_copy_onto_itself_is_refused(small_gguf):
    with pytest.raises(FormatError, match="itself"):
        copy_gguf(small_gguf, small_gguf)


# --------------------------------------------------------------------------- our own files

_META = {
    "general.architecture": "llama",
    "general.name": "tiny ünïcödé",
    "t.u8": 200,
    "t.i8": -100,
    "t.u16": 60000,
    "t.i16": -30000,
    "t.u32": 4_000_000_000,
    "t.i32": -2_000_000_000,
    "t.f32": 0.1,
    "t.u64": 2**63 + 5,
    "t.i64": -(2**62),
    "t.f64": 0.1,
    "t.bool": True,
    "t.strs": ["a", "", "ß"],
    "t.short_ints": [1, -2, 3],
    "t.long_floats": np.arange(100, dtype=np.float32) / 8,
    "t.bools": [True, False, True],
    "t.nested": [[1, 2], [3]],
    "t.empty": [],
}
_TYPES = {
    "t.u8": (V.UINT8,),
    "t.i8": (V.INT8,),
    "t.u16": (V.UINT16,),
    "t.i16": (V.INT16,),
    "t.u32": (V.UINT32,),
    "t.f64": (V.FLOAT64,),
    "t.empty": (V.ARRAY, V.UINT8),
}


def _tensors(rng, make_random_blocks, calls=None):
    """A generator of (name, type, data, shape) of several kinds of data."""
    x = rng.standard_normal((4, 64)).astype(np.float32)
    yield "f32", GGMLType.F32, x, x.shape
    yield "f16", GGMLType.F16, x[:2].astype(np.float16), (2, 64)
    yield "q8_0", GGMLType.Q8_0, quantize(x, GGMLType.Q8_0), x.shape
    yield "q4_0.bytes", GGMLType.Q4_0, quantize(x, GGMLType.Q4_0).tobytes(), x.shape
    yield "q4_k.3d", GGMLType.Q4_K, make_random_blocks(rng, GGMLType.Q4_K, 6), (3, 2, 256)
    yield "i32.1d", GGMLType.I32, np.arange(7, dtype=np.int32), (7,)

    def late():
        if calls is not None:
            calls.append("late")
        return quantize(x[:1], GGMLType.Q5_1)

    yield "lazy", GGMLType.Q5_1, late, (1, 64)


@pytest.mark.parametrize("alignment", [None, 64])
def test_written_file_matches_under_gguf_py(alignment, make_random_blocks, tmp_path):
    rng = np.random.default_rng(0)
    path = write_gguf(
        tmp_path / "ours.gguf",
        _META,
        _tensors(rng, make_random_blocks),
        alignment=alignment,
        value_types=_TYPES,
    )
    expected = list(_tensors(np.random.default_rng(0), make_random_blocks))

    ref = gguf.GGUFReader(path)
    assert int(ref.fields["GGUF.version"].contents()) == 3
    assert ref.alignment == (alignment or 32)
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    keys = list(_META) + (["general.alignment"] if alignment else [])
    assert list(fields) == keys
    for key, value in _META.items():
        types = _TYPES.get(key) or infer_value_types(value)
        got_types = tuple(GGUFValueType(int(t)) for t in fields[key].types)
        # gguf-py records no element type for an empty array; ours checks it below.
        assert got_types == (types[:1] if key == "t.empty" else types), key
        got, want = fields[key].contents(), gguf_py_value(value)
        if key == "t.f32":
            assert got == pytest.approx(want, rel=1e-7)
        else:
            assert got == want, key
    assert [t.name for t in ref.tensors] == [e[0] for e in expected]
    for t, (name, gtype, data, shape) in zip(ref.tensors, expected, strict=True):
        assert int(t.tensor_type) == gtype and tuple(reversed(t.shape.tolist())) == shape, name
        data = data() if callable(data) else data
        want = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), want), name
        assert t.data_offset % (alignment or 32) == 0

    ours = read_gguf(path)
    assert ours.value_types["t.empty"] == (V.ARRAY, V.UINT8) and ours.metadata["t.empty"] == []
    assert ours.value_types["t.nested"] == (V.ARRAY, V.ARRAY, V.INT32)
    np.testing.assert_array_equal(ours.dequantize("f32"), expected[0][2])
    # Re-exporting our own file reproduces it.
    assert copy_gguf(path, tmp_path / "again.gguf").read_bytes() == path.read_bytes()


def test_callable_data_is_fetched_only_in_the_final_pass(make_random_blocks, tmp_path):
    calls = []
    rng = np.random.default_rng(0)

    def tracked():
        for item in _tensors(rng, make_random_blocks, calls):
            calls.append(item[0])
            yield item

    write_gguf(tmp_path / "a.gguf", {}, tracked())
    assert calls[-2:] == ["lazy", "late"]


def test_infer_value_types():
    assert infer_value_types(True) == (V.BOOL,)
    assert infer_value_types(3) == (V.INT32,)
    assert infer_value_types(2**40) == (V.INT64,)
    assert infer_value_types(2**64 - 1) == (V.UINT64,)
    assert infer_value_types(1.5) == (V.FLOAT32,)
    assert infer_value_types("s") == (V.STRING,)
    assert infer_value_types(np.uint16(3)) == (V.UINT16,)
    assert infer_value_types(np.zeros(3, np.float64)) == (V.ARRAY, V.FLOAT64)
    assert infer_value_types([1, 2.5]) == (V.ARRAY, V.FLOAT32)
    assert infer_value_types([[["a"]]]) == (V.ARRAY, V.ARRAY, V.ARRAY, V.STRING)
    for bad in ([], [1, "a"], 2**64, {"a": 1}, None, [[1], ["a"]]):
        with pytest.raises(ValueError):
            infer_value_types(bad)


def test_streaming_holds_one_tensor_at_a_time(tmp_path):
    """Ten 2 MiB tensors from a generator: peak traced memory stays near one tensor."""
    size = 2 << 20

    def gen():
        for i in range(10):
            yield f"t{i}", GGMLType.F32, np.full(size // 4, i, np.float32), (size // 4,)

    tracemalloc.start()
    try:
        write_gguf(tmp_path / "big.gguf", {"general.architecture": "x"}, gen())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * size
    r = read_gguf(tmp_path / "big.gguf")
    assert r.dequantize("t7")[123] == 7 and len(r.tensors) == 10


# --------------------------------------------------------------------------- failures


def _bad_gen(bad):
    x = np.ones((2, 32), np.float32)
    yield "good", GGMLType.F32, x, x.shape
    yield bad


@pytest.mark.parametrize(
    "bad, match",
    [
        (("good", GGMLType.F32, np.ones(32, np.float32), (32,)), "'good': duplicate"),
        (("short", GGMLType.Q8_0, np.zeros(33, np.uint8), (1, 64)), "'short': data has 33"),
        (("long", GGMLType.Q4_0, b"\0" * 37, (2, 32)), "'long': data has 37 bytes, expected 36"),
        (("dtype", GGMLType.F16, np.ones(32, np.float32), (32,)), "'dtype': a float32 array"),
        (("rows", GGMLType.Q8_0, b"", (2, 33)), "'rows': row length 33"),
        (("kind", 4, b"", (4,)), "'kind': unknown GGML type"),
        (("dims", GGMLType.F32, b"", (1, 1, 1, 1, 1)), "'dims': 5 dims"),
        (("late", GGMLType.F32, lambda: b"\0" * 8, (3,)), "'late': data has 8 bytes"),
    ],
)
def test_bad_tensor_raises_and_leaves_nothing(bad, match, tmp_path):
    out = tmp_path / "out.gguf"
    with pytest.raises(FormatError, match=match):
        write_gguf(out, {"a": 1}, _bad_gen(bad))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "metadata, types, match",
    [
        ({"k": 300}, {"k": (V.UINT8,)}, "'k': 300 is out of range for UINT8"),
        ({"k": [1, -1]}, {"k": (V.ARRAY, V.UINT32)}, "'k': array values out of range"),
        ({"k": "s"}, {"k": (V.INT32,)}, "'k'"),
        ({"k": 1.5}, {"k": (V.BOOL,)}, "'k'"),
        ({"k": None}, None, "'k': unsupported value type"),
        ({"general.alignment": 48}, None, "not a positive power of two"),
        ({"general.alignment": 32}, {"general.alignment": (V.UINT64,)}, "must be a UINT32"),
    ],
)
def test_bad_metadata_raises_and_leaves_nothing(metadata, types, match, tmp_path):
    with pytest.raises(FormatError, match=match):
        write_gguf(tmp_path / "out.gguf", metadata, [], value_types=types)
    assert list(tmp_path.iterdir()) == []


def test_any_error_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")

    def gen():
        yield "a", GGMLType.F32, np.ones(8, np.float32), (8,)
        raise RuntimeError("producer failed")

    with pytest.raises(RuntimeError, match="producer failed"):
        write_gguf(out, {}, gen())
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.gguf"]
    write_gguf(out, {}, [("a", GGMLType.F32, np.ones(8, np.float32), (8,))])
    assert read_gguf(out).dequantize("a").tolist() == [1.0] * 8
    assert row_bytes(GGMLType.F32, 8) == read_gguf(out).tensors["a"].nbytes


# --------------------------------------------------------------------------- llama export


@pytest.fixture(scope="module")
def smollm2_model(smollm2_gguf):
    from qjax.convert.gguf.load import load_gguf_model

    return load_gguf_model(smollm2_gguf)[1]


def _flat_params(model) -> dict[str, np.ndarray]:
    import jax
    from flax import nnx

    from qjax.rules import path_str

    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {path_str(k): np.asarray(v) for k, v in leaves}


@pytest.mark.parametrize("qtype", [GGMLType.F32, GGMLType.Q8_0], ids=["F32", "Q8_0"])
def test_export_llama_round_trips(qtype, smollm2_model, smollm2_gguf, tmp_path):
    """SmolLM2 (9 heads, 3 KV heads: a K permuted with 9 heads would not round-trip)."""
    from qjax.convert.gguf import export_llama_params
    from qjax.convert.gguf.load import load_gguf_model

    src = read_gguf(smollm2_gguf)
    out = export_llama_params(tmp_path / "out.gguf", smollm2_model, src, qtype)
    ours = read_gguf(out)
    assert ours.metadata["general.file_type"] == {GGMLType.F32: 0, GGMLType.Q8_0: 7}[qtype]
    for key, value in src.metadata.items():  # tokenizer and hparams carried over
        assert ours.value_types[key] == src.value_types[key], key
        if key != "general.file_type":
            assert gguf_py_value(ours.metadata[key]) == gguf_py_value(value), key
    assert list(ours.tensors) == list(src.tensors)
    for name, info in src.tensors.items():
        assert ours.tensors[name].shape == info.shape, name
        w = src.dequantize(name)  # the model holds exactly the source's dequantized weights
        if qtype == GGMLType.F32 or w.ndim == 1:
            np.testing.assert_array_equal(ours.dequantize(name), w, err_msg=name)
        else:  # Q/K row permutation commutes with row-wise quantization
            np.testing.assert_array_equal(ours.raw(name), quantize(w, qtype).reshape(-1), name)

    before = _flat_params(smollm2_model)
    after = _flat_params(load_gguf_model(out)[1])
    assert list(after) == list(before)
    for param, w in before.items():
        if qtype == GGMLType.F32 or w.ndim == 1:
            expected = w
        else:  # encode + decode along GGUF rows: the input axis of a kernel
            rows = w.T if param.endswith("/kernel") else w
            expected = dequantize(quantize(rows, qtype), qtype, rows.shape)
            expected = expected.T if param.endswith("/kernel") else expected
        np.testing.assert_array_equal(after[param], expected, err_msg=param)


def test_permute_qk_inverts_unpermute_qk_per_head_count():
    from qjax.convert.gguf.load import unpermute_qk
    from qjax.convert.gguf.writer import permute_qk

    w = np.arange(12 * 8 * 5, dtype=np.float32).reshape(12 * 8, 5)  # 12 heads of 8 rows
    for heads in (12, 4, 1):
        np.testing.assert_array_equal(unpermute_qk(permute_qk(w, heads), heads), w)
    assert not np.array_equal(unpermute_qk(permute_qk(w, 12), 4), w)  # the GQA bug
    assert permute_qk(w, 12)[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]  # rows 0 4 1 5 ...


def test_export_llama_rejects_other_sources(smollm2_model, gemma3_gguf, tmp_path):
    from qjax.convert.gguf import export_llama_params

    with pytest.raises(FormatError, match="llama source"):
        export_llama_params(tmp_path / "out.gguf", smollm2_model, gemma3_gguf)
    assert list(tmp_path.iterdir()) == []
