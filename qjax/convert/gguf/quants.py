"""GGML block formats in NumPy: dequantizers and the simple quantizers.

A quantized GGML row of ``K`` elements is ``K / B`` consecutive blocks of ``B`` elements each; a
block is a packed C struct (no padding, little-endian). Every format below is described by a NumPy
structured dtype with the same bytes, so ``raw.view(dtype)`` decodes the fields without copying.
All arithmetic is float32 and in the same order as ggml's reference C code, so results are
bit-identical to ggml / gguf-py. Notation: ``f16`` is IEEE half, ``d``/``dmin`` are block scales,
``q`` the unsigned integer code of an element, ``y`` the dequantized float32 value.

Plain types:

* ``F32``: 4-byte IEEE float, ``y = x``.
* ``F16``: 2-byte IEEE half, ``y = float32(x)`` (exact).
* ``BF16``: upper 16 bits of a float32, ``y = bits(x) << 16``.

32-element blocks (elements ``i = 0..31``):

* ``Q8_0`` (34 B): ``d: f16, qs: int8[32]``; ``y[i] = d * qs[i]``.
* ``Q4_0`` (18 B): ``d: f16, qs: u8[16]``; ``q[i] = qs[i] & 15`` and ``q[i+16] = qs[i] >> 4``
  for ``i < 16``; ``y = d * (q - 8)``.
* ``Q4_1`` (20 B): ``d: f16, m: f16, qs: u8[16]``; ``q`` as Q4_0; ``y = d * q + m``.
* ``Q5_0`` (22 B): ``d: f16, qh: u8[4], qs: u8[16]``; low 4 bits of ``q`` as Q4_0, bit 4 of
  ``q[i]`` is bit ``i`` of ``qh`` read as a little-endian uint32; ``y = d * (q - 16)``.
* ``Q5_1`` (24 B): ``d: f16, m: f16, qh: u8[4], qs: u8[16]``; ``q`` as Q5_0; ``y = d * q + m``.

256-element super-blocks (K-quants). Element ``e`` is written ``e = 128 h + 32 j + l`` (half ``h``,
quarter ``j = 0..3``, lane ``l = 0..31``) or ``e = 32 s + l`` (sub-block ``s = 0..7``):

* ``Q2_K`` (84 B): ``scales: u8[16], qs: u8[64], d: f16, dmin: f16``. 16 groups of 16 elements,
  group ``g = e // 16``: ``sc = scales[g] & 15``, ``mn = scales[g] >> 4``.
  ``q[e] = (qs[32 h + l] >> 2 j) & 3``; ``y = (d * sc) * q - (dmin * mn)``.
* ``Q3_K`` (110 B): ``hmask: u8[32], qs: u8[64], scales: u8[12], d: f16``. Low 2 bits of ``q`` as
  Q2_K; ``hbit = (hmask[l] >> (4 h + j)) & 1``; ``q3 = low - (0 if hbit else 4)`` (range -4..3).
  16 signed 6-bit scales ``sc[g] = (low4 | high2 << 4) - 32`` with ``low4 = scales[g] & 15``
  for ``g < 8``, ``scales[g - 8] >> 4`` otherwise, and
  ``high2 = (scales[8 + g % 4] >> 2 (g // 4)) & 3``; ``y = (d * sc[e // 16]) * q3``.
* ``Q4_K`` (144 B): ``d: f16, dmin: f16, scales: u8[12], qs: u8[128]``. 8 sub-blocks of 32 with
  6-bit scale ``sc[s]`` and min ``mn[s]``: for ``s < 4`` ``sc = b[s] & 63``, ``mn = b[s+4] & 63``;
  for ``s >= 4`` ``sc = (b[s+4] & 15) | (b[s-4] >> 6) << 4`` and
  ``mn = (b[s+4] >> 4) | (b[s] >> 6) << 4`` (``b`` = the 12 scale bytes).
  ``q = qs[32 (s // 2) + l] >> 4 (s % 2) & 15``; ``y = (d * sc[s]) * q - (dmin * mn[s])``.
* ``Q5_K`` (176 B): ``d: f16, dmin: f16, scales: u8[12], qh: u8[32], qs: u8[128]``. As Q4_K with
  a fifth bit ``(qh[l] >> s) & 1`` at bit 4 of ``q``.
* ``Q6_K`` (210 B): ``ql: u8[128], qh: u8[64], scales: int8[16], d: f16``. Low 4 bits of ``q[e]``
  are ``ql[64 h + 32 (j % 2) + l] >> 4 (j // 2) & 15``, high 2 bits ``(qh[32 h + l] >> 2 j) & 3``;
  ``y = (d * scales[e // 16]) * (q - 32)``.

Non-linear 32-element blocks:

* ``IQ4_NL`` (18 B): ``d: f16, qs: u8[16]``; ``q`` as Q4_0; ``y = d * T[q]`` with the fixed
  int8 table ``T = IQ4NL_VALUES`` (-127 .. 113).

Quantizers (``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``, plus ``F32``/``F16``/``BF16``) follow
ggml's reference round-to-nearest encoders (see :func:`quantize`) and produce the same bytes as
gguf-py's ``gguf.quants.quantize``. The K-quants (``Q2_K`` .. ``Q6_K``) and ``IQ4_NL`` encoders,
and the importance-matrix (``imatrix``) variants of ``Q4_0``/``Q4_1``/``Q5_0``/``Q5_1``, live in
:mod:`qjax.convert.gguf.kquants` and produce the same bytes as llama.cpp's
``ggml_quantize_chunk``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qjax.convert.gguf.constants import BLOCK_SIZES, GGMLType
from qjax.errors import FormatError, NonFiniteError, ShapeError, SpecError

__all__ = [
    "BLOCK_DTYPES",
    "DEQUANTIZABLE",
    "IQ4NL_VALUES",
    "QUANTIZABLE",
    "dequantize",
    "quantize",
    "row_bytes",
]

_F16 = "<f2"

BLOCK_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.Q8_0: np.dtype([("d", _F16), ("qs", "i1", 32)]),
    GGMLType.Q4_0: np.dtype([("d", _F16), ("qs", "u1", 16)]),
    GGMLType.Q4_1: np.dtype([("d", _F16), ("m", _F16), ("qs", "u1", 16)]),
    GGMLType.Q5_0: np.dtype([("d", _F16), ("qh", "u1", 4), ("qs", "u1", 16)]),
    GGMLType.Q5_1: np.dtype([("d", _F16), ("m", _F16), ("qh", "u1", 4), ("qs", "u1", 16)]),
    GGMLType.Q2_K: np.dtype([("scales", "u1", 16), ("qs", "u1", 64), ("d", _F16), ("dmin", _F16)]),
    GGMLType.Q3_K: np.dtype(
        [("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", _F16)]
    ),
    GGMLType.Q4_K: np.dtype([("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qs", "u1", 128)]),
    GGMLType.Q5_K: np.dtype(
        [("d", _F16), ("dmin", _F16), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)]
    ),
    GGMLType.Q6_K: np.dtype(
        [("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", _F16)]
    ),
    GGMLType.IQ4_NL: np.dtype([("d", _F16), ("qs", "u1", 16)]),
}

#: The 16 levels of IQ4_NL (ggml's ``kvalues_iq4nl``), as float32.
IQ4NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32
)

# Elements decoded per chunk: bounds the temporaries of a large tensor to a few MiB.
_CHUNK_ELEMENTS = 1 << 20


def row_bytes(ggml_type: GGMLType, n: int) -> int:
    """Bytes of a row of ``n`` elements of ``ggml_type`` (``n`` must be a multiple of the block)."""
    elems, nbytes = BLOCK_SIZES[GGMLType(ggml_type)]
    if n % elems:
        raise ShapeError(
            f"row of {n} elements is not a multiple of the {ggml_type.name} block "
            f"({elems} elements)"
        )
    return n // elems * nbytes


# ---------------------------------------------------------------------------------------------
# bit helpers


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) codes: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes = little-endian uint32 -> (n, 32) bits, bit i first."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _k_scale_min(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins packed in the 12 bytes of a Q4_K / Q5_K block."""
    lo, hi, mix = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = np.concatenate([lo & 63, (mix & 15) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 63, (mix >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc, mn


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """(n, 64) bytes of 2-bit codes -> (n, 256): element 128 h + 32 j + l = qs[32 h + l] >> 2 j."""
    n = qs.shape[0]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 256)


# ---------------------------------------------------------------------------------------------
# dequantizers: structured blocks (n,) -> float32 (n, block_elements)


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    """Q8_0, 34 B = d f16 | qs int8[32]: ``y = d * qs``."""
    return _f32(b["d"])[:, None] * _f32(b["qs"])


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    """Q4_0, 18 B = d f16 | qs u8[16] (nibbles): ``y = d * (q - 8)``."""
    q = _nibbles(b["qs"]).astype(np.int8) - np.int8(8)
    return _f32(b["d"])[:, None] * _f32(q)


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    """Q4_1, 20 B = d f16 | m f16 | qs u8[16] (nibbles): ``y = d * q + m``."""
    q = _f32(_nibbles(b["qs"]))
    return _f32(b["d"])[:, None] * q + _f32(b["m"])[:, None]


def _q5_codes(b: np.ndarray) -> np.ndarray:
    return _nibbles(b["qs"]) | (_bits32(b["qh"]) << 4)


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    """Q5_0, 22 B = d f16 | qh u8[4] (bit 4) | qs u8[16] (bits 0-3): ``y = d * (q - 16)``."""
    q = _q5_codes(b).astype(np.int8) - np.int8(16)
    return _f32(b["d"])[:, None] * _f32(q)


def _dq_q5_1(b: np.ndarray) -> np.ndarray:
    """Q5_1, 24 B = d f16 | m f16 | qh u8[4] | qs u8[16]: ``y = d * q + m``."""
    q = _f32(_q5_codes(b))
    return _f32(b["d"])[:, None] * q + _f32(b["m"])[:, None]


def _dq_q2_k(b: np.ndarray) -> np.ndarray:
    """Q2_K, 84 B = scales u8[16] (sc | mn << 4) | qs u8[64] | d | dmin."""
    n = b.shape[0]
    sc = b["scales"]
    dl = _f32(b["d"])[:, None] * _f32(sc & 15)
    ml = _f32(b["dmin"])[:, None] * _f32(sc >> 4)
    q = _f32(_crumbs(b["qs"])).reshape(n, 16, 16)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, 256)


def _q3_k_scales(b: np.ndarray) -> np.ndarray:
    low4 = np.concatenate([b[:, 0:8] & 15, b[:, 0:8] >> 4], axis=1)  # (n, 16)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    high2 = ((b[:, None, 8:12] >> shifts) & 3).reshape(-1, 16)  # g = 4 * (g // 4) + g % 4
    return (low4 | (high2 << 4)).astype(np.int8) - np.int8(32)


def _dq_q3_k(b: np.ndarray) -> np.ndarray:
    """Q3_K, 110 B = hmask u8[32] | qs u8[64] | scales u8[12] (6-bit, -32) | d."""
    n = b.shape[0]
    dl = _f32(b["d"])[:, None] * _f32(_q3_k_scales(b["scales"]))
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    hbit = ((b["hmask"].reshape(n, 1, 32) >> shifts) & 1).reshape(n, 256)
    q = _crumbs(b["qs"]).astype(np.int8) - ((hbit ^ 1) << 2).astype(np.int8)
    return (dl[:, :, None] * _f32(q).reshape(n, 16, 16)).reshape(n, 256)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 128) -> (n, 8, 32): sub-block s = qs[32 (s // 2) + l] >> 4 (s % 2) & 15."""
    n = qs.shape[0]
    shifts = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return ((qs.reshape(n, 4, 1, 32) >> shifts) & 15).reshape(n, 8, 32)


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    sc, mn = _k_scale_min(b["scales"])
    dl = _f32(b["d"])[:, None] * _f32(sc)
    ml = _f32(b["dmin"])[:, None] * _f32(mn)
    return (dl[:, :, None] * _f32(q) - ml[:, :, None]).reshape(n, 256)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    """Q4_K, 144 B = d | dmin | scales u8[12] (6-bit sc, mn) | qs u8[128] (nibbles)."""
    return _k_affine(b, _k_low_nibbles(b["qs"]))


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    """Q5_K, 176 B = d | dmin | scales u8[12] | qh u8[32] (bit 4) | qs u8[128]."""
    n = b.shape[0]
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (b["qh"].reshape(n, 1, 32) >> shifts) & 1
    return _k_affine(b, _k_low_nibbles(b["qs"]) | (high << 4))


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    """Q6_K, 210 B = ql u8[128] | qh u8[64] | scales int8[16] | d: ``y = d sc (q - 32)``."""
    n = b.shape[0]
    nib = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    low = ((b["ql"].reshape(n, 2, 1, 64) >> nib) & 15).reshape(n, 2, 4, 32)
    crumb = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (b["qh"].reshape(n, 2, 1, 32) >> crumb) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    dl = _f32(b["d"])[:, None] * _f32(b["scales"])
    return (dl[:, :, None] * _f32(q).reshape(n, 16, 16)).reshape(n, 256)


def _dq_iq4_nl(b: np.ndarray) -> np.ndarray:
    """IQ4_NL, 18 B = d f16 | qs u8[16] (nibbles as Q4_0): ``y = d * IQ4NL_VALUES[q]``."""
    return _f32(b["d"])[:, None] * IQ4NL_VALUES[_nibbles(b["qs"])]


_BLOCK_DEQUANT: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q8_0: _dq_q8_0,
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q4_1: _dq_q4_1,
    GGMLType.Q5_0: _dq_q5_0,
    GGMLType.Q5_1: _dq_q5_1,
    GGMLType.Q2_K: _dq_q2_k,
    GGMLType.Q3_K: _dq_q3_k,
    GGMLType.Q4_K: _dq_q4_k,
    GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
    GGMLType.IQ4_NL: _dq_iq4_nl,
}

_PLAIN = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)

DEQUANTIZABLE: frozenset[GGMLType] = frozenset(_PLAIN) | frozenset(_BLOCK_DEQUANT)


def _dequantize_plain(raw: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    if ggml_type == GGMLType.F32:
        return raw.view("<f4").astype(np.float32)
    if ggml_type == GGMLType.F16:
        return raw.view("<f2").astype(np.float32)
    return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)  # BF16


def dequantize(raw: np.ndarray, ggml_type: GGMLType | int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode the bytes of a tensor of ``ggml_type`` into a new float32 array of ``shape``.

    ``raw`` is a contiguous uint8 array (e.g. a view into a memory-mapped file) whose size is
    exactly what ``shape`` needs; ``shape`` is in NumPy order (rows last-axis contiguous). Large
    tensors are decoded in chunks, so temporaries stay small.
    """
    try:
        ggml_type = GGMLType(ggml_type)
    except ValueError:
        raise FormatError(f"unknown GGML tensor type id {ggml_type}") from None
    if ggml_type not in DEQUANTIZABLE:
        raise FormatError(
            f"dequantizing GGML type {ggml_type.name} is not supported "
            f"(supported: {', '.join(sorted(t.name for t in DEQUANTIZABLE))})"
        )
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
    elems, nbytes = BLOCK_SIZES[ggml_type]
    if numel % elems or (shape and shape[-1] % elems):
        raise ShapeError(f"shape {shape} does not fit {ggml_type.name} blocks of {elems}")
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size != numel // elems * nbytes:
        raise ShapeError(
            f"{ggml_type.name} tensor of shape {shape} needs "
            f"{numel // elems * nbytes} bytes, got {raw.size}"
        )
    with np.errstate(all="ignore"):  # garbage scales may give inf / nan, as in ggml
        if ggml_type in _PLAIN:
            return _dequantize_plain(raw, ggml_type).reshape(shape)
        blocks = raw.view(BLOCK_DTYPES[ggml_type])
        out = np.empty((blocks.shape[0], elems), dtype=np.float32)
        step = max(1, _CHUNK_ELEMENTS // elems)
        fn = _BLOCK_DEQUANT[ggml_type]
        for start in range(0, blocks.shape[0], step):
            out[start : start + step] = fn(blocks[start : start + step])
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------
# quantizers: float32 blocks (n, 32) -> structured blocks (n,)


def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C ``roundf``: round to nearest, ties away from zero (exact, no ``+ 0.5`` rounding slip)."""
    a = np.abs(x)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), x)


def _inverse(d: np.ndarray) -> np.ndarray:
    """``1 / d`` in float32, and 0 where that is not finite (``d`` zero or tiny subnormal).

    ggml also uses 0 for ``d == 0``; for a subnormal ``d`` its ``1 / d`` is inf and the codes
    come from an undefined float-to-int cast. Using 0 there makes the codes the zero point; the
    block decodes the same either way, since such a ``d`` is 0 in float16.
    """
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.float32(1) / d
    return np.where(np.isfinite(inv), inv, np.float32(0))


def _absmax_signed(x: np.ndarray) -> np.ndarray:
    """Per row, the signed value of largest magnitude (the first one on ties)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)


def _trunc_codes(v: np.ndarray, top: int) -> np.ndarray:
    """ggml's ``MIN(top, (int8_t)(v))`` for ``v >= 0``: truncate, clamp to ``0..top``."""
    return np.clip(np.trunc(v), 0, top).astype(np.uint8)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16) bytes: element i in the low nibble, i + 16 in the high one."""
    return (q[:, :16] & 15) | (q[:, 16:] << 4)


def _q_q8_0(x: np.ndarray) -> np.ndarray:
    """``d = max|x| / 127``; ``qs = roundf(x / d)`` (via ``x * (1/d)``)."""
    d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    out = np.empty(x.shape[0], BLOCK_DTYPES[GGMLType.Q8_0])
    out["d"] = d[:, 0]
    out["qs"] = _round_half_away(x * _inverse(d)).astype(np.int8)
    return out


def _q_q4_0(x: np.ndarray) -> np.ndarray:
    """``d = v / -8`` (``v`` = signed absmax); ``q = min(15, trunc(x / d + 8.5))``."""
    d = _absmax_signed(x) / np.float32(-8)
    out = np.empty(x.shape[0], BLOCK_DTYPES[GGMLType.Q4_0])
    out["d"] = d[:, 0]
    out["qs"] = _pack_nibbles(_trunc_codes(x * _inverse(d) + np.float32(8.5), 15))
    return out


def _q_q4_1(x: np.ndarray) -> np.ndarray:
    """``d = (max - min) / 15``, ``m = min``; ``q = min(15, trunc((x - m) / d + 0.5))``."""
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / np.float32(15)
    out = np.empty(x.shape[0], BLOCK_DTYPES[GGMLType.Q4_1])
    out["d"], out["m"] = d[:, 0], lo[:, 0]
    out["qs"] = _pack_nibbles(_trunc_codes((x - lo) * _inverse(d) + np.float32(0.5), 15))
    return out


def _q_q5_0(x: np.ndarray) -> np.ndarray:
    """``d = v / -16`` (``v`` = signed absmax); ``q = min(31, trunc(x / d + 16.5))``."""
    d = _absmax_signed(x) / np.float32(-16)
    q = _trunc_codes(x * _inverse(d) + np.float32(16.5), 31)
    out = np.empty(x.shape[0], BLOCK_DTYPES[GGMLType.Q5_0])
    out["d"] = d[:, 0]
    out["qh"] = np.packbits(q >> 4, axis=1, bitorder="little")
    out["qs"] = _pack_nibbles(q)
    return out


def _q_q5_1(x: np.ndarray) -> np.ndarray:
    """``d = (max - min) / 31``, ``m = min``; ``q = min(31, trunc((x - m) / d + 0.5))``."""
    lo = x.min(axis=1, keepdims=True)
    d = (x.max(axis=1, keepdims=True) - lo) / np.float32(31)
    q = _trunc_codes((x - lo) * _inverse(d) + np.float32(0.5), 31)
    out = np.empty(x.shape[0], BLOCK_DTYPES[GGMLType.Q5_1])
    out["d"], out["m"] = d[:, 0], lo[:, 0]
    out["qh"] = np.packbits(q >> 4, axis=1, bitorder="little")
    out["qs"] = _pack_nibbles(q)
    return out


_BLOCK_QUANT: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q8_0: _q_q8_0,
    GGMLType.Q4_0: _q_q4_0,
    GGMLType.Q4_1: _q_q4_1,
    GGMLType.Q5_0: _q_q5_0,
    GGMLType.Q5_1: _q_q5_1,
}

# Encoded row by row in qjax.convert.gguf.kquants (imported lazily: it builds on this module).
_ROW_QUANT = frozenset(
    {GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.IQ4_NL}
)

QUANTIZABLE: frozenset[GGMLType] = frozenset(_PLAIN) | frozenset(_BLOCK_QUANT) | _ROW_QUANT


def _quantize_plain(x: np.ndarray, ggml_type: GGMLType) -> np.ndarray:
    if ggml_type == GGMLType.F32:
        return x.astype("<f4").view(np.uint8)
    if ggml_type == GGMLType.F16:
        return x.astype("<f2").view(np.uint8)
    # BF16: round to nearest even on the upper 16 bits (x is finite, so no overflow past 2^32).
    u = x.view(np.uint32)
    return ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype("<u2").view(np.uint8)


def _check_imatrix(imatrix: np.ndarray, n_per_row: int) -> np.ndarray:
    qw = np.ascontiguousarray(imatrix, dtype=np.float32)
    if qw.shape != (n_per_row,):
        raise ShapeError(
            f"imatrix must hold one weight per column ({n_per_row},), got shape {qw.shape}"
        )
    if not np.isfinite(qw).all():
        raise NonFiniteError("imatrix holds NaN or Inf")
    return qw


def quantize(
    data: np.ndarray, ggml_type: GGMLType | int, imatrix: np.ndarray | None = None
) -> np.ndarray:
    """Encode float data into GGML blocks, row-wise along the last axis.

    Returns uint8 of shape ``(*data.shape[:-1], row_bytes)``, the bytes llama.cpp's
    ``ggml_quantize_chunk(type, data, ..., n_per_row=data.shape[-1], imatrix)`` writes.

    * ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1`` without ``imatrix``: ggml's reference
      round-to-nearest encoders (``quantize_row_*_ref``), as in gguf-py; see each ``_q_*``
      docstring for the formula.
    * ``Q2_K`` .. ``Q6_K``, ``IQ4_NL``, and ``Q4_0``/``Q4_1``/``Q5_0``/``Q5_1`` with an
      ``imatrix``: the scale-searching encoders of :mod:`qjax.convert.gguf.kquants`.
    * ``imatrix`` (importance matrix: one non-negative float32 weight per column, length
      ``data.shape[-1]``, e.g. the mean squared activation of each input channel) selects
      llama.cpp's weighted encoders; it is ignored by ``Q8_0`` and the plain types, as in ggml.

    All arithmetic is float32, scales are written as float16. Raises
    :class:`~qjax.errors.NonFiniteError` on NaN/Inf, :class:`~qjax.errors.ShapeError` if the last
    axis is not a multiple of the block (256 for the K-quants), :class:`~qjax.errors.SpecError`
    for other types.

    Values or scales beyond the float16 range become +-inf, as in ggml and gguf-py. In Q4_0..Q8_0
    blocks whose scale ``d`` is so small that ``1 / d`` overflows (``|d| < 2**-126``), every code
    is the zero point; ggml and gguf-py leave those codes to an undefined float-to-int cast (the
    block decodes to the same values either way).
    """
    try:
        ggml_type = GGMLType(ggml_type)
    except ValueError:
        raise SpecError(f"unknown GGML tensor type id {ggml_type}") from None
    if ggml_type not in QUANTIZABLE:
        raise SpecError(
            f"quantizing to {ggml_type.name} is not supported "
            f"(supported: {', '.join(sorted(t.name for t in QUANTIZABLE))})"
        )
    x = np.asarray(data)
    if x.ndim == 0:
        raise ShapeError("cannot quantize a 0-d array: the last axis holds the rows")
    x = np.ascontiguousarray(x, dtype=np.float32)
    nb = row_bytes(ggml_type, x.shape[-1])
    if not np.isfinite(x).all():
        raise NonFiniteError(f"cannot quantize to {ggml_type.name}: data holds NaN or Inf")
    qw = None if imatrix is None else _check_imatrix(imatrix, x.shape[-1])
    out_shape = (*x.shape[:-1], nb)
    if ggml_type in _ROW_QUANT or (qw is not None and ggml_type in _BLOCK_QUANT):
        from qjax.convert.gguf import kquants

        fn = kquants.ROW_ENCODERS.get(ggml_type) or kquants.WEIGHTED_LEGACY.get(ggml_type)
        if fn is not None:
            return _quantize_rows(x, ggml_type, fn, qw).reshape(out_shape)
    with np.errstate(over="ignore", invalid="ignore"):  # f16 overflow -> inf, as in ggml
        if ggml_type in _PLAIN:
            return _quantize_plain(x, ggml_type).reshape(out_shape)
        elems = BLOCK_SIZES[ggml_type][0]
        blocks = x.reshape(-1, elems)
        out = np.empty(blocks.shape[0], dtype=BLOCK_DTYPES[ggml_type])
        step = max(1, _CHUNK_ELEMENTS // elems)
        fn = _BLOCK_QUANT[ggml_type]
        for start in range(0, blocks.shape[0], step):
            out[start : start + step] = fn(blocks[start : start + step])
    return out.view(np.uint8).reshape(out_shape)


# Rows per chunk of the scale-searching encoders: their temporaries are ~20 x the chunk.
_ROW_CHUNK_ELEMENTS = 1 << 16


def _quantize_rows(
    x: np.ndarray,
    ggml_type: GGMLType,
    fn: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
    qw: np.ndarray | None,
) -> np.ndarray:
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    elems = BLOCK_SIZES[ggml_type][0]
    per_row = n // elems
    out = np.empty(rows.shape[0] * per_row, dtype=BLOCK_DTYPES[ggml_type])
    step = max(1, _ROW_CHUNK_ELEMENTS // n)
    with np.errstate(all="ignore"):  # searches divide by zero in flat groups, as ggml does
        for r in range(0, rows.shape[0], step):
            out[r * per_row : (r + step) * per_row] = fn(rows[r : r + step], qw)
    return out.view(np.uint8)
