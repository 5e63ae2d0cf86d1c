"""GGUF K-quant / IQ4_NL encoders: llama.cpp's bytes (golden file), round-trip properties, and a
slow comparison against the live llama.cpp (skipped where llama-cpp-python is not installed).

The golden file ``data/kquants_golden.npz`` (no pickles) holds 13 synthetic / adversarial rows of
512 and 4 real SmolLM2 rows of 1536, imatrices, and the bytes llama.cpp 0.3.36's
``ggml_quantize_chunk`` wrote for each type with (``_w_``) and without (``_ref_``) the imatrix;
made by ``python experiments/kquants_vs_llamacpp.py --write-golden <this npz>``.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from qjax.convert.gguf import QUANTIZABLE, GGMLType, dequantize, quantize, read_gguf, row_bytes
from qjax.convert.gguf.kquants import _nearest_int
from qjax.convert.gguf.quants import IQ4NL_VALUES
from qjax.errors import NonFiniteError, ShapeError

DATA = Path(__file__).parent / "data" / "kquants_golden.npz"
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
NEW_TYPES = [*K_TYPES, "IQ4_NL"]
LEGACY_WEIGHTED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(DATA, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_golden_file_is_complete(golden):
    assert DATA.stat().st_size < 300_000
    for part in ("synth", "real"):
        for t in NEW_TYPES:
            assert f"{t}_ref_{part}" in golden and f"{t}_w_{part}" in golden
        for t in LEGACY_WEIGHTED:
            assert f"{t}_w_{part}" in golden
    assert golden["x_synth"].shape == (13, 512) and golden["x_real"].shape == (4, 1536)


@pytest.mark.parametrize("part", ["synth", "real"])
@pytest.mark.parametrize("tname", [*NEW_TYPES, *LEGACY_WEIGHTED])
def test_byte_identical_to_llamacpp_golden(golden, tname, part):
    t = GGMLType[tname]
    x = golden[f"x_{part}"]
    for tag, qw in (("ref", None), ("w", golden[f"qw_{part}"])):
        key = f"{tname}_{tag}_{part}"
        if key not in golden:  # the legacy types' reference path is tested against gguf-py
            continue
        want = golden[key]
        got = quantize(x, t, imatrix=qw)
        assert got.shape == want.shape == (x.shape[0], row_bytes(t, x.shape[1]))
        bad = np.flatnonzero((got != want).any(axis=1))
        assert bad.size == 0, f"{key}: rows {bad} differ from llama.cpp"


def test_quantizable_lists_new_types():
    for t in NEW_TYPES:
        assert GGMLType[t] in QUANTIZABLE


def test_nearest_int_matches_ggml_float_trick():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 3.7, -3.7, 4194303.0], np.float32)
    np.testing.assert_array_equal(_nearest_int(v), np.rint(v).astype(np.int32))
    # beyond 2**22 ggml's trick wraps: 2**22 -> -2**22
    assert int(_nearest_int(np.array([4194304.0], np.float32))[0]) == -4194304
    rng = np.random.default_rng(0)
    r = (rng.standard_normal(10_000) * 1000).astype(np.float32)
    np.testing.assert_array_equal(_nearest_int(r), np.rint(r).astype(np.int32))


def test_iq4_nl_dequantize():
    blk = np.zeros(18, np.uint8)
    blk[:2] = np.frombuffer(np.float16(0.5).tobytes(), np.uint8)
    blk[2:] = np.arange(16, dtype=np.uint8) | (np.arange(16, dtype=np.uint8)[::-1] << 4)
    y = dequantize(blk, GGMLType.IQ4_NL, (32,))
    np.testing.assert_array_equal(y[:16], 0.5 * IQ4NL_VALUES)
    np.testing.assert_array_equal(y[16:], 0.5 * IQ4NL_VALUES[::-1])


def _rows(seed: int = 7, rows: int = 16, n: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)) * 10.0 ** rng.integers(-3, 3, (rows, 1))
    x[3] = np.abs(x[3])
    x[4] = -np.abs(x[4])
    return x.astype(np.float32)


# max |error| / (max - min) over each super-block (block of 32 for IQ4_NL), and the relative RMS
# error on Gaussian rows; measured maxima are about 2/3 of these bounds.
BOUNDS = {
    "Q2_K": (0.35, 0.33),
    "Q3_K": (0.30, 0.18),
    "Q4_K": (0.09, 0.08),
    "Q5_K": (0.045, 0.04),
    "Q6_K": (0.045, 0.022),
    "IQ4_NL": (0.15, 0.09),
}


@pytest.mark.parametrize("with_imatrix", [False, True])
@pytest.mark.parametrize("tname", NEW_TYPES)
def test_roundtrip_error_bounded(tname, with_imatrix):
    t = GGMLType[tname]
    x = _rows()
    qw = np.exp(np.random.default_rng(1).standard_normal(x.shape[1])).astype(np.float32)
    raw = quantize(x, t, imatrix=qw if with_imatrix else None)
    assert raw.dtype == np.uint8 and raw.shape == (x.shape[0], row_bytes(t, x.shape[1]))
    y = dequantize(raw, t, x.shape)
    blk = 32 if tname == "IQ4_NL" else 256
    xb, yb = x.reshape(-1, blk), y.reshape(-1, blk)
    max_rel, rms_rel = BOUNDS[tname]
    assert (np.abs(yb - xb).max(1) <= max_rel * (xb.max(1) - xb.min(1))).all()
    rel = np.sqrt(np.square(y - x).mean(1) / np.square(x).mean(1))
    assert rel.max() <= rms_rel


def test_more_bits_less_error():
    x = _rows(3)
    errs = [
        np.square(dequantize(quantize(x, GGMLType[t]), GGMLType[t], x.shape) - x).mean()
        for t in K_TYPES
    ]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))


@pytest.mark.parametrize("tname", [*NEW_TYPES, *LEGACY_WEIGHTED])
def test_deterministic_and_row_independent(tname):
    """Same bytes on repeat, for a 3-D input, and row by row (chunking does not matter)."""
    t = GGMLType[tname]
    x = _rows(11, rows=70, n=1536)  # > one 2**16-element chunk
    qw = np.random.default_rng(2).random(x.shape[1]).astype(np.float32)
    a = quantize(x, t, imatrix=qw)
    np.testing.assert_array_equal(a, quantize(x, t, imatrix=qw))
    np.testing.assert_array_equal(
        a.reshape(7, 10, -1), quantize(x.reshape(7, 10, -1), t, imatrix=qw)
    )
    one = np.concatenate([quantize(x[i : i + 1], t, imatrix=qw) for i in range(0, 70, 9)])
    np.testing.assert_array_equal(one, a[::9])


def test_zero_and_constant_blocks_decode_exactly():
    x = np.zeros((3, 256), np.float32)
    x[1] = -2.0  # constant negative: the affine formats store it in the min
    for tname in NEW_TYPES:
        t = GGMLType[tname]
        y = dequantize(quantize(x, t), t, x.shape)
        np.testing.assert_array_equal(y[0], 0.0)
        assert np.abs(y[1] + 2.0).max() <= 0.02 * 2.0, tname


def test_imatrix_errors():
    x = np.ones((2, 256), np.float32)
    with pytest.raises(ShapeError, match="imatrix"):
        quantize(x, GGMLType.Q4_K, imatrix=np.ones(128, np.float32))
    with pytest.raises(NonFiniteError, match="imatrix"):
        quantize(x, GGMLType.Q4_K, imatrix=np.full(256, np.nan, np.float32))
    with pytest.raises(ShapeError, match="Q4_K block"):
        quantize(np.ones((2, 288), np.float32), GGMLType.Q4_K)
    # Q8_0 and the plain types ignore the imatrix, as ggml does
    qw = np.random.default_rng(0).random(256).astype(np.float32)
    for t in (GGMLType.Q8_0, GGMLType.F16):
        np.testing.assert_array_equal(quantize(x, t, imatrix=qw), quantize(x, t))


def test_imatrix_changes_weighted_encoders():
    x = _rows(5, rows=6, n=512)
    qw = np.exp(3 * np.random.default_rng(4).standard_normal(512)).astype(np.float32)
    for tname in [*NEW_TYPES, *LEGACY_WEIGHTED]:
        t = GGMLType[tname]
        assert not np.array_equal(quantize(x, t, imatrix=qw), quantize(x, t)), tname


# ---------------------------------------------------------------------------------------------
# live llama.cpp (slow; needs llama-cpp-python, which CI does not install)


def _ggml_lib() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        pytest.skip("llama-cpp-python is not installed")
    path = Path(spec.origin).parent / "lib" / "libggml-base.so"
    if not path.exists():
        pytest.skip(f"{path} not found")
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.ggml_quantize_chunk.argtypes += [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    return lib


def _llamacpp(lib, x: np.ndarray, t: GGMLType, qw: np.ndarray | None) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], row_bytes(t, x.shape[1])), np.uint8)
    qw = None if qw is None else np.ascontiguousarray(qw, np.float32)
    ptr = None if qw is None else qw.ctypes.data
    assert lib.ggml_quantize_chunk(int(t), x.ctypes.data, out.ctypes.data, 0, *x.shape, ptr)
    return out


@pytest.mark.slow
def test_byte_identical_to_live_llamacpp_on_real_tensors(smollm2_gguf, gemma3_gguf):
    lib = _ggml_lib()
    tensors = [
        (smollm2_gguf, "blk.0.ffn_down.weight", NEW_TYPES),
        (smollm2_gguf, "blk.29.ffn_down.weight", NEW_TYPES),
        (smollm2_gguf, "blk.3.attn_v.weight", ["IQ4_NL", *LEGACY_WEIGHTED]),
        (gemma3_gguf, "blk.0.attn_output.weight", NEW_TYPES),
        (gemma3_gguf, "blk.17.ffn_down.weight", NEW_TYPES),
        (gemma3_gguf, "blk.5.attn_q.weight", ["IQ4_NL", *LEGACY_WEIGHTED]),
    ]
    rng = np.random.default_rng(0)
    for path, name, types in tensors:
        w = read_gguf(path).dequantize(name)
        qw = np.exp(rng.standard_normal(w.shape[1])).astype(np.float32)
        for tname in types:
            t = GGMLType[tname]
            variants = (qw,) if tname in LEGACY_WEIGHTED else (None, qw)
            for q in variants:
                got, want = quantize(w, t, imatrix=q), _llamacpp(lib, w, t, q)
                assert np.array_equal(got, want), f"{name} {tname} imatrix={q is not None}"
