"""Offline repacking of canonical QArrays into the layouts the GPU / TPU kernels load fastest.

``repack(q, layout)`` runs once, when a model is prepared for serving, never per call. The result
is a QArray with the same ``spec``, logical ``shape`` and ``dtype`` and a new ``layout`` tag; the
kernels registered for ``(backend, format, layout)`` in :mod:`qjax.kernels` consume it.
``unrepack`` is the exact inverse (back to ``"canonical"``), and :func:`dequantize` reads either.

All layouts pad the ``(K, N)`` weight to ``(K_p, N_p)``: ``K_p`` is the canonical padded length
``G·g`` (``G = ceil(K / g)`` groups; ``K`` for ``group="channel"``) rounded up to a multiple of 128,
``N_p = ceil(N / 64)·64`` (128 for the ``tpu_*`` and the Mosaic GPU ``gpu_*t`` layouts). The
canonical padding codes are kept (so ``unrepack`` is bit-exact), new padding is code 0; the kernels
drop padded output columns and zero-pad ``x`` along ``K`` (the Mosaic GPU ones read the columns past
``K`` as zeros instead where ``K`` is whole tiles,
:func:`~qjax.kernels.gpu.mgpu_matmul.kernel_rows`). Scales and zeros ``(G, N)`` are zero-padded to
``(G_p, N_p)`` with ``G_p = K_p / g`` for ``g ≤ 128``, ``G`` for larger groups and 1 for
``"channel"`` (``gpu_i4t`` / ``gpu_i8t`` / ``gpu_nf4t``: one row per 128 / 64 codes, see below).

================  ===============================================================================
layout            codes
================  ===============================================================================
``"gpu_i4p"``     int4 as ``int32`` words ``(K_p/8, N_p)``. K is cut into chunks of 128; in chunk
                  ``c`` the word at row ``16c + r`` holds, in nibble ``j`` (bits ``4j..4j+3``), the
                  code of ``k = 128c + 16j + r``. Shifting a ``(16, BN)`` tile of words by ``4j``
                  gives the 16 consecutive rows ``k = 128c + 16j + [0, 16)`` ("plane" ``j``), so the
                  kernel unpacks with one shift and one mask per code and stacks planes in order.
``"gpu_i4t"``     int4 for the Mosaic GPU kernel: signed ``c − 8`` as ``jnp.int4 (N_p, K_p)`` (the
                  weight transposed, two codes per byte), K permuted within blocks of 32 into the
                  kernel's register order (:func:`qjax.kernels.gpu.mgpu_decode.stored_order`),
                  ``N_p`` a multiple of 128; scales and zeros expanded to one row per 128 codes
                  along K, ``(K_p/128, N_p)``, so every 128-code slice the kernel multiplies has
                  one scale row. Groups must be multiples of 128 or ``"channel"``.
``"gpu_i8t"``     int8 for the Mosaic GPU kernel: ``c − 128`` as ``int8 (N_p, K_p)`` (K permuted
                  within blocks of 16), scales and zeros as for ``"gpu_i4t"``; each 64-row ×
                  128-code block's 8 KiB stored **fragment-major**: in the order a warp group
                  loads it into the registers of its ``wgmma`` operand, 16 bytes per thread and
                  load (:func:`qjax.kernels.gpu.mgpu_decode.to_fragments`), blocks in (row tile,
                  K) order — a 64-row stripe keeps its codes, but its rows are not the weight's.
``"gpu_nf4t"``    NF4 for the Mosaic GPU kernel: ``c − 8`` as ``jnp.int4`` like ``"gpu_i4t"``; the
                  block absmax (double quantization decoded) rounded to bf16, one row per 64 codes,
                  ``(K_p/64, N_p)``. Blocks must be multiples of 64. The kernel and
                  :func:`dequantize_bf16` use the bf16-rounded levels: ``x̂ = bf16(L[c]·a)`` with
                  ``L`` and ``a`` in bf16, as bitsandbytes' bf16 4-bit kernels compute it.
``"gpu_f8t"``     FP8 for the Mosaic GPU kernel: the bit patterns as ``uint8 (N_p, K_p)``,
                  stored as for ``"gpu_i8t"`` (K permuted, blocks fragment-major); per-channel
                  float32 scales ``(1, N_p)``, which the kernel applies to its float32 result.
``"gpu_i8"``      int8 ``(K_p, N_p)``, the unsigned code minus 128 (so symmetric codes are the plain
                  signed values ``q`` with ``x̂ = q·s``).
``"gpu_nf4"``     NF4 level indices in the ``"gpu_i4p"`` word layout; scales are the per-block
                  absmax as float32 (a double-quantized NF4 is decoded once here: the repacked
                  QArray is plain NF4 with the same dequantized values).
``"gpu_f8"``      FP8 bit patterns (e4m3 or e5m2) as ``uint8 (K_p, N_p)``; float32 scales.
``"tpu_i4"``      int4 as ``uint8 (K_p/2, N_p)`` for the TPU kernels: in chunk ``c`` of 128 K rows,
                  byte row ``64c + r`` holds the code of ``k = 128c + r`` in its low nibble and of
                  ``k = 128c + 64 + r`` in its high nibble, so a ``(64, BN)`` tile unpacks with a
                  mask and a shift into two contiguous 64-row halves (no lane shuffles). ``N_p``
                  is a multiple of 128 (TPU lanes).
``"tpu_i8"``      as ``"gpu_i8"`` (signed ``c − 128``), with ``N_p`` a multiple of 128.
``"tpu_nf4"``     NF4 level indices in the ``"tpu_i4"`` byte layout; scales as for ``"gpu_nf4"``
                  (float32 block absmax, double quantization decoded here).
``"tpu_f8"``      as ``"gpu_f8"``, with ``N_p`` a multiple of 128.
================  ===============================================================================

Scales and zeros keep their stored dtype (``scale_dtype``); zeros keep code units (asymmetric:
``x̂ = (c - z)·s`` with ``c`` the unsigned code).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.errors import FormatError, ShapeError
from qjax.formats import layout as blk
from qjax.formats import packing
from qjax.formats.fp8 import FP8, fp8_dtype
from qjax.formats.nf4 import NF4, nf4_levels
from qjax.formats.uniform import Int
from qjax.kernels.gpu.mgpu_decode import from_fragments, to_fragments, to_logical, to_stored
from qjax.qarray import QArray

CHUNK = 128  # K rows per chunk of the int4 layout
N_ALIGN = 64  # N is padded to a multiple of this
LAYOUTS = {  # layout -> bits per code
    "gpu_i4p": 4,
    "gpu_i4t": 4,
    "gpu_i8t": 8,
    "gpu_nf4t": 4,
    "gpu_f8t": 8,
    "gpu_i8": 8,
    "gpu_nf4": 4,
    "gpu_f8": 8,
    "tpu_i4": 4,
    "tpu_i8": 8,
    "tpu_nf4": 4,
    "tpu_f8": 8,
}
FORMATS = {  # layout -> spec type
    "gpu_i4p": Int,
    "gpu_i4t": Int,
    "gpu_i8t": Int,
    "gpu_nf4t": NF4,
    "gpu_f8t": FP8,
    "gpu_i8": Int,
    "gpu_nf4": NF4,
    "gpu_f8": FP8,
    "tpu_i4": Int,
    "tpu_i8": Int,
    "tpu_nf4": NF4,
    "tpu_f8": FP8,
}
_NIBBLES = ("gpu_i4p", "gpu_nf4")  # layouts with the interleaved int32 nibble words
_HALVES = ("tpu_i4", "tpu_nf4")  # layouts with the half-split uint8 nibble bytes
_F8 = ("gpu_f8", "tpu_f8")  # fp8 bit patterns as uint8
# the Mosaic GPU kernel's layouts: transposed codes in its register order, scale rows per slice
_SLICED = ("gpu_i4t", "gpu_i8t", "gpu_nf4t", "gpu_f8t")
SLICED_DTYPES = {
    "gpu_i4t": jnp.int4,
    "gpu_i8t": jnp.int8,
    "gpu_nf4t": jnp.int4,
    "gpu_f8t": jnp.uint8,
}
SLICE_CODES = {"gpu_i4t": CHUNK, "gpu_i8t": CHUNK, "gpu_nf4t": 64}  # codes per scale row
_TRITON_LAYOUT = {  # the same bits for the Triton kernels, any group
    "gpu_i4t": "gpu_i4p",
    "gpu_i8t": "gpu_i8",
    "gpu_nf4t": "gpu_nf4",
    "gpu_f8t": "gpu_f8",
}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def split_halves(b: jnp.ndarray) -> jnp.ndarray:
    """``(K/2, N)`` bytes of the half-split layouts (``"tpu_i4"``, ``"tpu_nf4"``; any integer
    dtype) → ``(K, N)`` codes: per 128-row chunk the low nibbles, then the high ones. A mask, a
    shift and a sublane concatenation — also what the TPU kernels run on a ``(bk/2, bn)`` tile."""
    n = b.shape[-1]
    b = b.reshape(b.shape[0] // (CHUNK // 2), CHUNK // 2, n)
    return jnp.concatenate([b & 0xF, (b >> 4) & 0xF], axis=1).reshape(-1, n)


def group_size(q: QArray) -> int | str:
    """The group size along K of an ``Int`` QArray: an int, or ``"channel"``."""
    return q.spec.group


def check_repackable(q: QArray, layout: str) -> None:
    """Raises a :class:`~qjax.QjaxError` naming why ``q`` cannot take ``layout``."""
    if layout not in LAYOUTS:
        raise FormatError(f"unknown kernel layout {layout!r}; known: {sorted(LAYOUTS)}")
    spec = q.spec
    if not isinstance(spec, FORMATS[layout]):
        raise FormatError(
            f"layout {layout!r} holds {FORMATS[layout].__name__} weights, got {spec.label()}"
        )
    if isinstance(spec, Int) and spec.bits != LAYOUTS[layout]:
        raise FormatError(f"layout {layout!r} holds int{LAYOUTS[layout]}, got {spec.label()}")
    if len(q.shape) != 2 or spec.axis % 2 != 0:
        raise ShapeError(f"{layout}: needs a (K, N) weight with reduction axis 0, got {q!r}")
    g = spec.group
    if g != "channel" and not (isinstance(g, int) and (CHUNK % g == 0 or g % CHUNK == 0)):
        raise ShapeError(
            f"{layout}: group {g!r} must divide 128, be a multiple of 128, or be 'channel'"
        )
    if isinstance(g, int) and g < 16:
        raise ShapeError(f"{layout}: group {g} is smaller than the kernels' 16-row MMA step")
    if layout == "gpu_f8t" and g != "channel":
        raise ShapeError(f"{layout}: takes per-channel scales, got group {g!r}; use 'gpu_f8'")
    span = SLICE_CODES.get(layout)
    if span and isinstance(g, int) and g % span:
        raise ShapeError(
            f"{layout}: group {g} must be a multiple of {span} or 'channel' (one scale row per "
            f"{span} codes); use {_TRITON_LAYOUT[layout]!r} for smaller groups"
        )


def _canonical_rows(q: QArray) -> int:
    """``G·g``: the K length of the canonical blocked codes, ragged-group padding included."""
    block = q.spec.block_for(q.shape)
    return blk.grid_shape(q.shape, block)[0] * block[0]


def padded_dims(q: QArray, layout: str = "gpu_i4p") -> tuple[int, int, int]:
    """``(K_p, N_p, G_p)`` of the repacked arrays (see the module docstring)."""
    k, n = q.shape
    rows = _canonical_rows(q)
    lanes = 128 if layout.startswith("tpu") or layout in _SLICED else N_ALIGN
    k_p, n_p = _round_up(rows, CHUNK), _round_up(n, lanes)
    g = q.spec.group
    if layout in _SLICED:
        return k_p, n_p, (k_p // SLICE_CODES[layout] if layout in SLICE_CODES else 1)
    g_p = 1 if g == "channel" else (k_p // g if g <= CHUNK else rows // g)
    return k_p, n_p, g_p


def _codes_kn(q: QArray) -> jnp.ndarray:
    """Canonical QArray → unsigned codes ``(G·g, N)`` uint8, padding codes kept."""
    block = q.spec.block_for(q.shape)
    shape = (_canonical_rows(q), q.shape[1])
    codes = q.spec.unpacked_codes(q)
    if isinstance(q.spec, FP8):  # the fp8 bit patterns
        codes = jax.lax.bitcast_convert_type(codes, jnp.uint8)
    return blk.unblocked(codes, shape, block)


def _kernel_scales(q: QArray) -> jnp.ndarray:
    """The ``(G, N)`` scales a kernel multiplies by (NF4: decoded absmax, float32)."""
    return q.spec.absmax(q) if isinstance(q.spec, NF4) else q.scales


def _slice_rows(a, k_p: int, group: int | str, span: int = CHUNK):
    """Per-group rows ``(G, N)`` → one row per ``span`` codes, ``(K_p/span, N)`` (rows past the
    last group repeat it)."""
    if a is None:
        return None
    starts = jnp.arange(k_p // span) * span
    if group == "channel":
        return a[jnp.zeros_like(starts)]
    return a[jnp.minimum(starts // group, a.shape[0] - 1)]


def _pad2(a, rows: int, cols: int):
    if a is None:
        return None
    return jnp.pad(a, [(0, rows - a.shape[0]), (0, cols - a.shape[1])])


def repack(q: QArray, layout: str) -> QArray:
    """Canonical QArray → the same weight in a kernel ``layout`` (module docstring)."""
    if q.layout == layout:
        return q
    if q.layout != "canonical":
        q = unrepack(q)
    check_repackable(q, layout)
    k_p, n_p, g_p = padded_dims(q, layout)
    codes = _pad2(_codes_kn(q), k_p, n_p).astype(jnp.uint32)
    if layout in _HALVES:
        halves = codes.reshape(k_p // CHUNK, 2, CHUNK // 2, n_p)
        packed = (halves[:, 0] | (halves[:, 1] << 4)).reshape(k_p // 2, n_p).astype(jnp.uint8)
    elif layout in _NIBBLES:
        planes = codes.reshape(k_p // CHUNK, 8, 16, n_p)  # [c, j, r, n]: k = 128c + 16j + r
        shifts = (4 * jnp.arange(8, dtype=jnp.uint32)).reshape(1, 8, 1, 1)
        words = jnp.sum(planes << shifts, axis=1, dtype=jnp.uint32)  # disjoint bits: sum == or
        packed = words.reshape(k_p // 8, n_p).view(jnp.int32)
    elif layout in _SLICED:
        bits = LAYOUTS[layout]
        signed = codes.astype(jnp.int32) - (0 if layout == "gpu_f8t" else 1 << (bits - 1))
        packed = to_stored(signed.T, bits).astype(SLICED_DTYPES[layout])
        if bits == 8:
            packed = to_fragments(packed)
    elif layout in _F8:
        packed = codes.astype(jnp.uint8)
    else:  # gpu_i8, tpu_i8
        packed = (codes.astype(jnp.int32) - 128).astype(jnp.int8)
    spec, aux = q.spec, q.aux
    if isinstance(spec, NF4) and spec.double_quant:  # the kernel reads float32 absmaxes
        spec, aux = dataclasses.replace(spec, double_quant=False), {}
    if layout == "gpu_f8t":
        scales, zeros = _pad2(q.scales, g_p, n_p), None
    elif layout in _SLICED:
        span = SLICE_CODES[layout]
        scales = _slice_rows(_kernel_scales(q), k_p, spec.group, span)
        if layout == "gpu_nf4t":  # the kernel multiplies in bf16
            scales = scales.astype(jnp.bfloat16)
        scales = _pad2(scales, g_p, n_p)
        zeros = _pad2(_slice_rows(q.zeros, k_p, spec.group, span), g_p, n_p)
    else:
        scales = _pad2(_kernel_scales(q), g_p, n_p)
        zeros = _pad2(q.zeros, g_p, n_p)
    return q.replace(codes=packed, scales=scales, zeros=zeros, aux=aux, spec=spec, layout=layout)


def unpack_codes(q: QArray) -> jnp.ndarray:
    """Unsigned codes ``(K_p, N_p)`` uint8 of a repacked QArray (padding included)."""
    if q.layout in _NIBBLES:
        words = q.codes.view(jnp.uint32)
        k_p, n_p = words.shape[0] * 8, words.shape[1]
        words = words.reshape(k_p // CHUNK, 1, 16, n_p)
        shifts = (4 * jnp.arange(8, dtype=jnp.uint32)).reshape(1, 8, 1, 1)
        codes = ((words >> shifts) & 0xF).reshape(k_p, n_p)
    elif q.layout in _HALVES:
        codes = split_halves(q.codes)
    elif q.layout in _SLICED:
        bits = LAYOUTS[q.layout]
        wide = q.codes.astype(jnp.int8) if bits == 4 else q.codes  # XLA permutes bytes faster
        logical = to_logical(stored_codes(wide, bits), bits).astype(jnp.int32)
        codes = (logical + (0 if q.layout == "gpu_f8t" else 1 << (bits - 1))).T
    elif q.layout in ("gpu_i8", "tpu_i8"):
        codes = q.codes.astype(jnp.int32) + 128
    elif q.layout in _F8:
        codes = q.codes
    else:
        raise FormatError(f"unpack_codes: unknown kernel layout {q.layout!r}")
    return codes.astype(jnp.uint8)


def stored_codes(codes, bits: int):
    """A Mosaic GPU layout's ``(N_p, K_p)`` codes in K's
    :func:`~qjax.kernels.gpu.mgpu_decode.stored_order`: 8-bit codes are stored fragment-major
    (:func:`~qjax.kernels.gpu.mgpu_decode.to_fragments`), 4-bit codes as they are."""
    return from_fragments(codes) if bits == 8 else codes


def unrepack(q: QArray) -> QArray:
    """Inverse of :func:`repack`: the canonical QArray (bit-exact codes, scales and zeros)."""
    if q.layout == "canonical":
        return q
    n = q.shape[1]
    spec = q.spec
    block = spec.block_for(q.shape)
    g_real = blk.grid_shape(q.shape, block)[0]
    codes_kn = unpack_codes(q)[: _canonical_rows(q), :n]
    codes = blk.blocked(codes_kn, block)
    if isinstance(spec, FP8):
        codes = jax.lax.bitcast_convert_type(codes, fp8_dtype(spec.fmt))
    else:
        codes = packing.pack(codes, spec.code_bits)
    scales, zeros = q.scales, q.zeros
    if q.layout in SLICE_CODES:  # one row per slice → the first row of each group
        step = 1 if spec.group == "channel" else spec.group // SLICE_CODES[q.layout]
        scales = scales[::step]
        zeros = None if zeros is None else zeros[::step]
    if q.layout == "gpu_nf4t":  # canonical NF4 keeps float32 absmaxes
        scales = scales.astype(jnp.float32)
    scales = scales[:g_real, :n]
    zeros = None if zeros is None else zeros[:g_real, :n]
    return q.replace(codes=codes, scales=scales, zeros=zeros, layout="canonical")


def dequantize(q: QArray) -> jnp.ndarray:
    """``q.dequantize()`` for a QArray in any layout (canonical or a kernel layout)."""
    return unrepack(q).dequantize()


def dequantize_stored(q: QArray) -> jnp.ndarray:
    """A Mosaic GPU layout (``gpu_i4t``, ``gpu_i8t``, ``gpu_nf4t``, ``gpu_f8t``) dequantized as
    stored: ``(N_p, K_p)`` bf16 with K in the kernel's register order — elementwise, no transpose
    or permutation of the weight (the large-M path permutes ``x`` instead)."""
    if q.layout not in _SLICED:
        raise FormatError(f"dequantize_stored: {q.layout!r} is not a Mosaic GPU layout")
    c = stored_codes(q.codes, LAYOUTS[q.layout])
    k_p = c.shape[1]
    span = k_p // q.scales.shape[0]  # codes per scale row (all of K for per-channel FP8)

    def per_k(a):  # (G_p, N_p) -> (N_p, K_p)
        return jnp.repeat(a.astype(jnp.float32).T, span, axis=1, total_repeat_length=k_p)

    if q.layout == "gpu_nf4t":  # the kernel's bf16 levels
        levels = jnp.asarray(nf4_levels()).astype(jnp.bfloat16).astype(jnp.float32)
        values = levels[c.astype(jnp.int32) + 8]
    elif q.layout == "gpu_f8t":
        values = jax.lax.bitcast_convert_type(c, fp8_dtype(q.spec.fmt)).astype(jnp.float32)
    elif q.spec.symmetric:  # stored c − h is the value
        values = c.astype(jnp.float32)
    else:
        values = c.astype(jnp.float32) + 2.0 ** (q.spec.bits - 1) - per_k(q.zeros)
    return (values * per_k(q.scales)).astype(jnp.bfloat16)


def dequantize_bf16(q: QArray) -> jnp.ndarray:
    """Dequantizes a repacked QArray straight from its kernel layout, padded ``(K_p, N_p)`` bf16.

    One elementwise pass that XLA fuses (``x̂ = (c - z)·s``, NF4 ``level[c]·absmax``, FP8
    ``float(c)·s``); the large-M path runs XLA's bf16 ``dot`` on its result.
    """
    if q.layout not in LAYOUTS:
        raise FormatError(f"dequantize_bf16: unknown kernel layout {q.layout!r}")
    if q.layout in _SLICED:
        return to_logical(dequantize_stored(q), LAYOUTS[q.layout]).T
    c = unpack_codes(q)
    k_p = c.shape[0]
    reps = k_p // q.scales.shape[0]  # K rows per scale group

    def per_k(a):  # (G_p, N_p) -> (K_p, N_p)
        return jnp.repeat(a.astype(jnp.float32), reps, axis=0, total_repeat_length=k_p)

    if isinstance(q.spec, NF4):
        values = jnp.asarray(nf4_levels())[c]
    elif isinstance(q.spec, FP8):
        values = jax.lax.bitcast_convert_type(c, fp8_dtype(q.spec.fmt)).astype(jnp.float32)
    elif q.spec.symmetric:
        values = c.astype(jnp.float32) - 2.0 ** (q.spec.bits - 1)
    else:
        values = c.astype(jnp.float32) - per_k(q.zeros)
    return (values * per_k(q.scales)).astype(jnp.bfloat16)
