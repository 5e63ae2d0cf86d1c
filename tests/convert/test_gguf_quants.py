"""GGML block (de)quantizers against gguf-py on synthetic data, plus their error handling."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qjax.convert.gguf import (
    BLOCK_SIZES,
    DEQUANTIZABLE,
    QUANTIZABLE,
    GGMLType,
    GGUFValueType,
    dequantize,
    quantize,
)
from qjax.convert.gguf.quants import BLOCK_DTYPES
from qjax.errors import FormatError, NonFiniteError, ShapeError, SpecError

REF = gguf.GGMLQuantizationType

# gguf-py quantizes only these; the K-quants and IQ4_NL are checked against llama.cpp's bytes in
# test_gguf_kquants.py.
GGUF_PY_QUANTIZABLE = sorted(
    QUANTIZABLE
    - {GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_NL},
    key=int,
)


def _ref_quantize(x: np.ndarray, t: GGMLType) -> np.ndarray:
    with np.errstate(all="ignore"):  # gguf-py warns when a scale overflows float16
        out = gguf.quants.quantize(x, REF[t.name])
    return np.ascontiguousarray(out).view(np.uint8).reshape(*x.shape[:-1], -1)


def _bits(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def test_type_tables_match_gguf_py():
    assert {t.name: int(t) for t in GGMLType} == {t.name: int(t) for t in REF}
    assert {t.name: BLOCK_SIZES[t] for t in GGMLType} == {
        t.name: gguf.GGML_QUANT_SIZES[t] for t in REF
    }
    assert {t.name: int(t) for t in GGUFValueType} == {t.name: int(t) for t in gguf.GGUFValueType}
    for t, dt in BLOCK_DTYPES.items():
        assert dt.itemsize == BLOCK_SIZES[t][1], t.name


@pytest.mark.parametrize("qtype", sorted(DEQUANTIZABLE, key=int), ids=lambda t: t.name)
def test_dequantize_random_blocks_bit_identical(qtype, make_random_blocks):
    rng = np.random.default_rng(int(qtype))
    elems, nbytes = BLOCK_SIZES[qtype]
    shape = (3, 4 * 256)
    n = shape[0] * shape[1] // elems
    if qtype in BLOCK_DTYPES:
        raw = make_random_blocks(rng, qtype, n)
    else:  # plain float types: random bit patterns of finite values
        x = (rng.standard_normal(shape[0] * shape[1]) * 10.0 ** rng.integers(-8, 8)).astype(
            np.float32
        )
        raw = quantize(x.reshape(shape), qtype).reshape(-1)
    got = dequantize(raw, qtype, shape)
    want = gguf.quants.dequantize(raw.reshape(shape[0], -1), REF[qtype.name])
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_array_equal(_bits(got), _bits(want))


def test_dequantize_is_chunk_invariant(make_random_blocks):
    """Tensors larger than one decode chunk (2^20 elements) decode identically."""
    rng = np.random.default_rng(7)
    raw = make_random_blocks(rng, GGMLType.Q4_K, 5000)  # 1.28M elements
    got = dequantize(raw, GGMLType.Q4_K, (5000, 256))
    want = np.concatenate(
        [
            dequantize(raw[i * 144 * 1000 : (i + 1) * 144 * 1000], GGMLType.Q4_K, (1000, 256))
            for i in range(5)
        ]
    )
    np.testing.assert_array_equal(_bits(got), _bits(want))


def _awkward(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Normal data with outliers, all-zero / constant / two-valued blocks and ties."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[rng.random(x.shape) < 0.02] *= 50.0
    x[0, :32] = 0.0
    x[1, :32] = -2.5
    x[1, 32:64] = np.where(np.arange(32) % 2, 3.0, -3.0)  # ties for the signed absmax
    x[2, :64] = rng.integers(-16, 16, 64) * 0.125  # values on the grids: exact .5 ties
    x[3, :32] = np.float32(1e-20)
    x[3, 32:64] = np.float32(1e20) * rng.standard_normal(32).astype(np.float32)
    return x


@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZABLE, ids=lambda t: t.name)
def test_quantize_byte_identical_on_awkward_data(qtype):
    x = _awkward(np.random.default_rng(int(qtype)), 48, 512)
    got = quantize(x, qtype)
    assert got.dtype == np.uint8 and got.shape == (
        48,
        512 // BLOCK_SIZES[qtype][0] * BLOCK_SIZES[qtype][1],
    )
    np.testing.assert_array_equal(got, _ref_quantize(x, qtype))


@given(
    qtype=st.sampled_from(GGUF_PY_QUANTIZABLE),
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 5),
    blocks=st.integers(1, 4),
    scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]),
    outlier=st.sampled_from([1.0, 30.0, 1e4]),
)
def test_quantize_byte_identical_property(qtype, seed, rows, blocks, scale, outlier):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, 32 * blocks)) * scale
    x[rng.random(x.shape) < 0.05] *= outlier
    x = x.astype(np.float32)
    np.testing.assert_array_equal(quantize(x, qtype), _ref_quantize(x, qtype))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantize_roundtrip_error_bound(qtype):
    """Round-to-nearest error <= half a step (a full step where the symmetric grids clip the
    positive side), plus the f16 rounding of the scales."""
    t = GGMLType[qtype]
    x = _awkward(np.random.default_rng(3), 8, 256)[4:]  # the plain-normal rows
    y = dequantize(quantize(x, t), t, x.shape)
    blocks = x.reshape(-1, 32)
    amax, span = np.abs(blocks).max(1), blocks.max(1) - blocks.min(1)
    bound = {
        "Q8_0": 0.5 * amax / 127,
        "Q4_0": amax / 8,
        "Q5_0": amax / 16,
        "Q4_1": 0.5 * span / 15,
        "Q5_1": 0.5 * span / 31,
    }[qtype]
    err = np.abs(y.reshape(-1, 32) - blocks).max(1)
    assert (err <= 1.15 * bound).all()


def test_quantize_errors():
    x = np.ones((2, 64), np.float32)
    with pytest.raises(NonFiniteError):
        quantize(np.where(np.arange(64) == 5, np.nan, x), GGMLType.Q4_0)
    with pytest.raises(NonFiniteError):
        quantize(np.where(np.arange(64) == 5, np.inf, x), GGMLType.F16)
    with pytest.raises(ShapeError, match="not a multiple"):
        quantize(np.ones((2, 48), np.float32), GGMLType.Q8_0)
    with pytest.raises(ShapeError):
        quantize(np.float32(1.0), GGMLType.F32)
    with pytest.raises(SpecError, match="IQ4_XS"):
        quantize(x, GGMLType.IQ4_XS)
    with pytest.raises(SpecError, match="unknown"):
        quantize(x, 4)


def test_dequantize_errors():
    raw = np.zeros(2 * 18, np.uint8)
    with pytest.raises(FormatError, match="IQ4_XS"):
        dequantize(raw, GGMLType.IQ4_XS, (64,))
    with pytest.raises(FormatError, match="unknown"):
        dequantize(raw, 5, (64,))
    with pytest.raises(ShapeError, match="needs 36 bytes"):
        dequantize(raw[:-1], GGMLType.Q4_0, (64,))
    with pytest.raises(ShapeError):
        dequantize(raw, GGMLType.Q4_0, (2, 32 + 16))
    assert dequantize(raw, GGMLType.Q4_0, (2, 32)).shape == (2, 32)
