"""One quantized linear layer in Hugging Face's GPTQ and compressed-tensors formats, both ways.

A qjax ``Int`` kernel (Flax ``(in, out)`` = ``(K, N)``, blocks of ``g`` inputs or whole columns)
maps onto both formats with the same codes: unsigned ``c`` in ``[0, 2^b)``, dequantized as
``(c - z)·s`` with ``z = 2^(b-1)`` when symmetric. Both formats pack codes into int32 words as
a **little-endian bitstream**: element ``i`` of a packed row occupies bits ``[i·b, (i+1)·b)``,
word ``w`` holding bits ``[32w, 32w + 32)`` (:func:`pack_int32`). For 2, 4 and 8 bits that is
``32/b`` codes per word, lowest first; 3-bit codes straddle words (AutoGPTQ's 10-1-10-1-10
layout of 32 codes in 3 words is exactly this bitstream).

**GPTQ** (AutoGPTQ / GPTQModel, PyTorch ``(out, in)`` weights, REFERENCE §5)::

    qweight  int32 [K·b/32, N]   codes packed along the input dim, original input order
    qzeros   int32 [G, N·b/32]   zero points packed along the output dim
    scales   fp16  [G, N]
    g_idx    int32 [K]           group of each input; i // g unless act-order (desc_act)
    W[n, i] = scales[g_idx[i], n] · (code[i, n] - zero[g_idx[i], n])

Bits 2, 3, 4 and 8 (every qjax ``Int`` width); ``K`` and ``N`` must fill whole words
(multiples of ``32 / gcd(32, b)``: 16, 32, 8, 4), else :class:`~qjax.errors.ShapeError`.
``checkpoint_format = "gptq"`` (v1) stores ``zero - 1`` (the AutoGPTQ quirk; AutoGPTQ's kernels
add 1 to the unpacked field, GPTQModel adds ``0x11111111`` to the packed word, so a zero point
of 0 — a field of ``-1`` — comes back wrong in both: :class:`FormatError`, use ``"gptq_v2"``,
which stores zeros as they are; asymmetric low-bit groups hit this often).
Symmetric kernels have ``zero = 2^(b-1)``. A group size that does not divide ``K`` gives a ragged
last group, as in qjax. With GPTQ act-order *without* static groups, a qjax QArray keeps its
codes in the permuted order (``aux["perm"]``, groups are consecutive there); the export writes
them back in the original order with ``g_idx[i] = argsort(perm)[i] // g``, and the import takes
``perm = argsort(g_idx)`` (stable). That perm may order the inputs *inside* a group differently
from the original one, which changes neither the codes in original order nor the dequantized
values. Scales are written as float16, rounded to nearest: a bfloat16 scale in float16's normal
range ``[2^-14, 65504]`` is exact (8 significant bits fit in 11); others (float32 scales) get a
relative error of at most ``2^-11`` (absolute ``2^-25`` below ``2^-14``); a scale that would
overflow or round to zero is a :class:`FormatError`.

**compressed-tensors** ``pack-quantized`` (``compressed_tensors`` 0.20,
``compressors/pack_quantized``)::

    weight_packed      int32 [N, ceil(K·b/32)]  codes (signed value + 2^(b-1)) packed along input
    weight_scale       [N, G] (group) or [N, 1] (channel), any float dtype
    weight_zero_point  int32 [ceil(N·b/32), G]  asymmetric only: packed along the output dim
    weight_shape       int64 [2] = (N, K)

Its rows are padded to whole words with zero codes (the same bitstream). The library needs ``K``
divisible by the group size (no ragged group) and stores no ``g_idx`` (no act-order without static
groups): both are :class:`~qjax.errors.ShapeError` / :class:`~qjax.errors.SpecError`. Scales
keep the qjax scale dtype (lossless) unless another is asked for.

Asymmetric qjax zero points are floats; both formats need integers, so a zero point that is not an
integer in ``[0, 2^b)`` (HQQ's optimized zeros) is a :class:`FormatError` naming the param.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qjax.errors import FormatError, ShapeError, SpecError
from qjax.formats import layout
from qjax.formats.uniform import Int
from qjax.qarray import QArray

__all__ = [
    "GPTQ_VERSIONS",
    "ct_args",
    "ct_tensors",
    "gptq_args",
    "gptq_tensors",
    "pack_int32",
    "qarray_from_ct",
    "qarray_from_gptq",
    "unpack_int32",
]

#: ``checkpoint_format`` -> whether stored zeros are ``zero - 1`` (v1).
GPTQ_VERSIONS = {"gptq": True, "gptq_v2": False}

#: Scale dtypes compressed-tensors checkpoints may hold (as safetensors can store them).
_CT_SCALE_DTYPES = ("float16", "bfloat16", "float32")


# ------------------------------------------------------------------------------ int32 packing


def pack_int32(codes: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Packs unsigned ``bits``-bit codes along ``axis`` into int32 words (LSB-first bitstream).

    The axis of length ``n`` becomes ``ceil(n·bits/32)`` words; the last word is padded with zero
    bits.
    """
    if not 1 <= bits <= 8:
        raise SpecError(f"cannot pack {bits}-bit codes into int32 words (1 to 8 bits)")
    codes = np.moveaxis(np.asarray(codes, np.uint8), axis, -1)
    n = codes.shape[-1]
    words = -(-n * bits // 32)
    stream = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (..., n, bits)
    stream = stream.reshape(*codes.shape[:-1], n * bits)
    stream = np.pad(stream, [(0, 0)] * (stream.ndim - 1) + [(0, words * 32 - n * bits)])
    packed = np.packbits(stream, axis=-1, bitorder="little").view("<u4").view(np.int32)
    return np.ascontiguousarray(np.moveaxis(packed, -1, axis))


def unpack_int32(words: np.ndarray, bits: int, n: int, axis: int = 0) -> np.ndarray:
    """Inverse of :func:`pack_int32`: ``n`` uint8 codes along ``axis``."""
    if not 1 <= bits <= 8:
        raise SpecError(f"cannot unpack {bits}-bit codes from int32 words (1 to 8 bits)")
    words = np.ascontiguousarray(np.moveaxis(np.asarray(words), axis, -1).astype("<i4"))
    if words.shape[-1] * 32 < n * bits:
        raise ShapeError(f"{words.shape[-1]} int32 words hold fewer than {n} {bits}-bit codes")
    stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")[..., : n * bits]
    stream = stream.reshape(*words.shape[:-1], n, bits)
    codes = np.sum(stream << np.arange(bits, dtype=np.uint8), axis=-1, dtype=np.uint8)
    return np.ascontiguousarray(np.moveaxis(codes, -1, axis))


# -------------------------------------------------------------------------- QArray <-> codes


def _int_spec(q: Any, where: str) -> Int:
    """The ``Int`` spec of an exportable 2-D kernel QArray (else a SpecError naming it)."""
    spec = getattr(q, "spec", None)
    if not isinstance(spec, Int):
        label = spec.label() if spec is not None else type(q).__name__
        raise SpecError(f"{where}: only qjax.Int kernels can be exported, got {label}")
    if len(q.shape) != 2 or spec.axis != 0:
        raise SpecError(
            f"{where}: needs a 2-D (in, out) kernel quantized along axis 0, "
            f"got shape {q.shape}, axis {spec.axis}"
        )
    if spec.group != "channel" and not isinstance(spec.group, int):
        raise SpecError(
            f"{where}: group {spec.group!r} has no Hugging Face equivalent "
            "(a group size along the input or 'channel')"
        )
    return spec


def _group_size(spec: Int, k: int) -> int:
    return k if spec.group == "channel" else int(spec.group)


def _codes(q: QArray, where: str) -> dict[str, Any]:
    """Codes in the *original* input order ``(K, N)``, per-group scales/zeros ``(G, N)``, perm."""
    spec = _int_spec(q, where)
    if q.layout != "canonical":
        from qjax.kernels.repack import unrepack

        q = unrepack(q)
    k, n = q.shape
    block = spec.block_for(q.shape, where)
    codes = np.asarray(layout.unblocked(spec.unpacked_codes(q), q.shape, block))
    perm = q.aux.get("perm")
    if perm is not None:  # stored[j] = original[perm[j]]
        perm = np.asarray(perm, np.int64)
        if sorted(perm.tolist()) != list(range(k)):
            raise FormatError(f"{where}: aux['perm'] is not a permutation of {k} inputs")
        codes = codes[np.argsort(perm)]
    scales = np.asarray(q.scales)
    zeros = None
    if not spec.symmetric:
        zf = np.asarray(q.zeros, np.float64)
        zi = np.rint(zf)
        bad = (zi != zf) | (zi < 0) | (zi > spec.qmax) | ~np.isfinite(zf)
        if bad.any():
            g, col = np.argwhere(bad)[0]
            raise FormatError(
                f"{where}: {int(bad.sum())} asymmetric zero point(s) are not integers in "
                f"[0, {spec.qmax}] (e.g. group {g}, output {col}: {float(zf[g, col])}); GPTQ and "
                "compressed-tensors store integer zero points (HQQ's real-valued zeros cannot "
                "be exported)"
            )
        zeros = zi.astype(np.uint8)
    return {"spec": spec, "codes": codes, "scales": scales, "zeros": zeros, "perm": perm}


def _from_codes(
    spec: Int,
    codes: np.ndarray,
    scales: np.ndarray,
    zeros: np.ndarray | None,
    perm: np.ndarray | None,
    dtype: Any,
) -> QArray:
    """The canonical QArray of codes ``(K, N)`` in stored order; padding codes = zero point."""
    k, n = codes.shape
    g = _group_size(spec, k)
    n_groups = -(-k // g)
    zero = zeros if zeros is not None else np.full((n_groups, n), 1 << (spec.bits - 1), np.uint8)
    pad = n_groups * g - k
    if pad:  # pad the ragged last group with its zero point, as quantizing a zero would
        codes = np.concatenate([codes, np.broadcast_to(zero[-1], (pad, n))], axis=0)
    blocked = np.asarray(codes).reshape(n_groups, g, n).transpose(0, 2, 1)  # (G, N, g)
    aux = {} if perm is None else {"perm": jnp.asarray(perm, jnp.int32)}
    q = spec.from_codes(
        jnp.asarray(blocked),
        jnp.asarray(scales),
        None if zeros is None else jnp.asarray(zeros.astype(scales.dtype)),
        (k, n),
        dtype,
    )
    return q.replace(aux=aux)


def _checked_scales(scales: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """``scales`` rounded to nearest in ``dtype``; overflow or underflow to 0 is a FormatError."""
    with np.errstate(over="ignore"):
        out = np.asarray(scales, np.float32).astype(dtype)
    bad = ~np.isfinite(out.astype(np.float32)) | (out.astype(np.float32) <= 0)
    if bad.any():
        g, col = np.argwhere(bad)[0]
        raise FormatError(
            f"{where}: scale {float(np.asarray(scales, np.float32)[g, col])!r} (group {g}, "
            f"output {col}) is not representable as a positive finite {np.dtype(dtype).name}"
        )
    return out


# ------------------------------------------------------------------------------------ GPTQ


def gptq_args(q: QArray, where: str = "kernel") -> dict[str, Any]:
    """The layer's GPTQ ``quantization_config`` fields: bits, group_size, sym, desc_act."""
    spec = _int_spec(q, where)
    return {
        "bits": spec.bits,
        "group_size": -1 if spec.group == "channel" else int(spec.group),
        "sym": spec.symmetric,
        "desc_act": "perm" in q.aux,
    }


def gptq_tensors(
    q: QArray, checkpoint_format: str = "gptq", where: str = "kernel"
) -> dict[str, np.ndarray]:
    """``{qweight, qzeros, scales, g_idx}`` of a kernel QArray (see the module docstring)."""
    if checkpoint_format not in GPTQ_VERSIONS:
        raise SpecError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}")
    c = _codes(q, where)
    spec, codes = c["spec"], c["codes"]
    k, n = codes.shape
    bits, unit = spec.bits, 32 // math.gcd(32, spec.bits)
    if k % unit or n % unit:
        raise ShapeError(
            f"{where}: GPTQ packs {bits}-bit codes into whole int32 words along both axes; "
            f"shape (in={k}, out={n}) needs both divisible by {unit}"
        )
    g = _group_size(spec, k)
    n_groups = -(-k // g)
    zeros = c["zeros"] if c["zeros"] is not None else np.full((n_groups, n), 1 << (bits - 1))
    zeros = zeros.astype(np.int64)
    if GPTQ_VERSIONS[checkpoint_format]:
        if (zeros == 0).any():
            raise FormatError(
                f"{where}: GPTQ v1 stores zero - 1 and cannot hold a zero point of 0 "
                f"({int((zeros == 0).sum())} groups have one); use checkpoint_format='gptq_v2'"
            )
        zeros = zeros - 1
    if c["perm"] is None:
        g_idx = np.arange(k) // g
    else:
        g_idx = np.argsort(c["perm"]) // g
    return {
        "qweight": pack_int32(codes, bits, axis=0),
        "qzeros": pack_int32(zeros.astype(np.uint8), bits, axis=1),
        "scales": _checked_scales(c["scales"], np.dtype(np.float16), where),
        "g_idx": g_idx.astype(np.int32),
    }


def qarray_from_gptq(
    tensors: dict[str, np.ndarray],
    *,
    bits: int,
    group_size: int,
    sym: bool,
    checkpoint_format: str = "gptq",
    dtype: Any = jnp.float32,
    where: str = "kernel",
) -> QArray:
    """The kernel QArray ``(K, N)`` of one GPTQ layer; inverse of :func:`gptq_tensors`.

    Scales stay float16; asymmetric zero points are stored as float16 (integers, exact).
    ``g_idx`` must describe qjax's layout: ``i // group_size``, or a permutation of it (act-order),
    i.e. every group but the last holds ``group_size`` inputs.
    """
    if checkpoint_format not in GPTQ_VERSIONS:
        raise FormatError(f"{where}: unknown GPTQ checkpoint_format {checkpoint_format!r}")
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        if name not in tensors:
            raise FormatError(f"{where}: GPTQ tensor {name!r} is missing")
    scales = np.asarray(tensors["scales"])
    g_idx = np.asarray(tensors["g_idx"]).astype(np.int64)
    if scales.ndim != 2 or g_idx.ndim != 1:
        raise FormatError(f"{where}: scales {scales.shape} / g_idx {g_idx.shape} are not 2-D / 1-D")
    (k,), (n_groups, n) = g_idx.shape, scales.shape
    group = k if group_size == -1 else group_size
    shapes = {
        "qweight": (-(-k * bits // 32), n),
        "qzeros": (n_groups, -(-n * bits // 32)),
    }
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape or np.dtype(tensors[name].dtype) != np.int32:
            raise FormatError(
                f"{where}: {name} is {tensors[name].dtype}{list(tensors[name].shape)}, "
                f"expected int32{list(shape)} for {k} inputs, {n} outputs, {bits} bits"
            )
    if n_groups != -(-k // group):
        raise FormatError(f"{where}: {n_groups} scale groups for {k} inputs at group {group}")
    codes = unpack_int32(tensors["qweight"], bits, k, axis=0)
    zeros = unpack_int32(tensors["qzeros"], bits, n, axis=1).astype(np.int64)
    if GPTQ_VERSIONS[checkpoint_format]:
        zeros = (zeros + 1) & ((1 << bits) - 1)
    layout_groups = np.arange(k) // group
    perm = None
    if not np.array_equal(g_idx, layout_groups):
        perm = np.argsort(g_idx, kind="stable")
        if not np.array_equal(g_idx[perm], layout_groups):
            raise FormatError(
                f"{where}: g_idx does not group the inputs in blocks of {group} "
                "(not a qjax layout, nor a permutation of one)"
            )
        codes = codes[perm]
    spec = Int(bits, group="channel" if group_size == -1 else group, symmetric=sym,
               scale_dtype="float16")  # fmt: skip
    if sym:
        if (zeros != 1 << (bits - 1)).any():
            raise FormatError(f"{where}: sym=true but zero points other than {1 << (bits - 1)}")
        zeros = None
    scales = scales.astype(np.float16)
    return _from_codes(spec, codes, scales, None if zeros is None else zeros.astype(np.uint8),
                       perm, dtype)  # fmt: skip


# ---------------------------------------------------------------------- compressed-tensors


def ct_args(q: QArray, where: str = "kernel") -> dict[str, Any]:
    """The layer's compressed-tensors ``weights`` quantization args."""
    spec = _int_spec(q, where)
    channel = spec.group == "channel"
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "group_size": None if channel else int(spec.group),
        "strategy": "channel" if channel else "group",
        "dynamic": False,
    }


def ct_tensors(
    q: QArray, scale_dtype: str | None = None, where: str = "kernel"
) -> dict[str, np.ndarray]:
    """``{weight_packed, weight_scale, weight_shape[, weight_zero_point]}`` of a kernel QArray.

    ``scale_dtype``: ``None`` keeps the QArray's (float32 if not float16/bfloat16/float32),
    else scales are rounded to nearest into it.
    """
    c = _codes(q, where)
    spec, codes = c["spec"], c["codes"]
    k, n = codes.shape
    if c["perm"] is not None:
        raise SpecError(
            f"{where}: act-order without static groups (aux['perm']) needs a g_idx, which "
            "compressed-tensors does not store; quantize with static_groups=True or export GPTQ"
        )
    if spec.group != "channel" and k % spec.group:
        raise ShapeError(
            f"{where}: compressed-tensors needs the input dim {k} divisible by the group size "
            f"{spec.group} (no ragged last group)"
        )
    if scale_dtype is None:
        scale_dtype = spec.scale_dtype if spec.scale_dtype in _CT_SCALE_DTYPES else "float32"
    if scale_dtype not in _CT_SCALE_DTYPES:
        raise SpecError(f"scale_dtype must be one of {_CT_SCALE_DTYPES}, got {scale_dtype!r}")
    dt = np.dtype(ml_dtypes.bfloat16) if scale_dtype == "bfloat16" else np.dtype(scale_dtype)
    out = {
        "weight_packed": pack_int32(codes.T, spec.bits, axis=1),
        "weight_scale": np.ascontiguousarray(_checked_scales(c["scales"], dt, where).T),
        "weight_shape": np.array([n, k], np.int64),
    }
    if c["zeros"] is not None:
        out["weight_zero_point"] = pack_int32(c["zeros"].T, spec.bits, axis=0)
    return out


def qarray_from_ct(
    tensors: dict[str, np.ndarray],
    args: dict[str, Any],
    *,
    dtype: Any = jnp.float32,
    where: str = "kernel",
) -> QArray:
    """The kernel QArray ``(K, N)`` of one ``pack-quantized`` layer; inverse of :func:`ct_tensors`.

    ``args`` is the scheme's ``weights`` dict (num_bits, type, symmetric, strategy, group_size).
    """
    bits, sym = int(args.get("num_bits", 0)), bool(args.get("symmetric", True))
    strategy, group_size = args.get("strategy"), args.get("group_size")
    if args.get("type", "int") != "int" or bits not in (2, 3, 4, 8):
        raise FormatError(f"{where}: unsupported weights args {args} (int with 2, 3, 4, 8 bits)")
    static_order = args.get("actorder") in (None, "weight", "static")  # groups in input order
    if strategy not in ("group", "channel") or not static_order:
        raise FormatError(
            f"{where}: unsupported strategy {strategy!r} / actorder {args.get('actorder')!r}"
        )
    for name in ("weight_packed", "weight_scale", "weight_shape"):
        if name not in tensors:
            raise FormatError(f"{where}: compressed-tensors tensor {name!r} is missing")
    n, k = (int(d) for d in np.asarray(tensors["weight_shape"]).reshape(-1))
    group = k if strategy == "channel" else int(group_size)
    n_groups = k // group
    scales = np.asarray(tensors["weight_scale"])
    packed = np.asarray(tensors["weight_packed"])
    if k % group or scales.shape != (n, n_groups):
        raise FormatError(f"{where}: weight_scale {scales.shape} does not fit {n}x{k} at {group}")
    if packed.dtype != np.int32 or packed.shape != (n, -(-k * bits // 32)):
        raise FormatError(f"{where}: weight_packed {packed.dtype}{list(packed.shape)} mismatch")
    codes = unpack_int32(packed, bits, k, axis=1).T
    zeros = None
    if not sym:
        if "weight_zero_point" not in tensors:
            raise FormatError(f"{where}: asymmetric but no weight_zero_point")
        zp = np.asarray(tensors["weight_zero_point"])
        if zp.dtype != np.int32 or zp.shape != (-(-n * bits // 32), n_groups):
            raise FormatError(f"{where}: weight_zero_point {zp.dtype}{list(zp.shape)} mismatch")
        zeros = np.ascontiguousarray(unpack_int32(zp, bits, n, axis=0).T)
    name = "bfloat16" if scales.dtype == ml_dtypes.bfloat16 else scales.dtype.name
    if name not in _CT_SCALE_DTYPES:
        raise FormatError(f"{where}: weight_scale dtype {name} unsupported")
    spec = Int(bits, group="channel" if strategy == "channel" else group, symmetric=sym,
               scale_dtype=name)  # fmt: skip
    return _from_codes(spec, codes, np.ascontiguousarray(scales.T), zeros, None, dtype)
