"""QArray → GGUF: write a quantized tensor as the GGML type that holds it *exactly*, if one does.

======================================  ======  ===============================================
qjax spec (groups of 32 along rows)      GGML    exact when
======================================  ======  ===============================================
``Int(8, group=32, symmetric=True)``    Q8_0    every scale is a float16 value
``Int(4, group=32, symmetric=True)``    Q4_0    every scale is a float16 value
``Int(4, group=32, symmetric=False)``   Q4_1    ``d = s``, ``m = f16(-z·s)`` reproduce our
                                                float32 values bit for bit
======================================  ======  ===============================================

Why these are exact: qjax stores symmetric codes offset by ``2^(b-1)`` and decodes
``(c - 2^(b-1))·s`` in float32. GGML's ``Q8_0`` decodes ``d·qs`` with ``qs = c - 128`` (int8) and
``Q4_0`` decodes ``d·(q - 8)`` with the nibble ``q = c`` — the same product of the same two
float32 numbers once ``d = s`` (a float16 scale; a bfloat16 scale in float16's range is one too).
``Q4_1`` decodes ``d·q + m``; ours is ``(q - z)·s`` with a float zero point ``z``: equal as reals
when ``m = -z·s``, but two float32 roundings apart, so the export checks the tensor's values
bit for bit. When they differ (``-z·s`` is not a float16, or it is and the roundings differ, as
for a Q4_1 tensor imported natively by :func:`~qjax.convert.gguf.load.native_qarray`, whose
``z = -m/d`` is rounded), the tensor is still written as ``Q4_1`` with *its own codes* and
``d = s``, ``m = f16(-z·s)`` — the closest GGML holds, far closer than any requantization — and a
warning names it with the largest deviation (``near_exact=False`` requantizes instead). A
natively imported Q4_1 tensor comes back with the file's own bytes that way.

Layout: GGUF stores a matrix as ``(rows, row_length)`` (NumPy order), blocks running along the
row, which is the reduction axis. A Flax kernel ``(K, N)`` with groups along ``K`` (``axis=0``)
is written transposed (``transpose=True``, rows = the ``N`` output channels); an embedding
``(V, D)`` with groups along ``D`` (``axis=1``) is written as it is. The per-block arrays are
arranged as ``(rows, blocks, 32)``, so a row permutation (llama's Q/K
:func:`~qjax.convert.gguf.writer.permute_qk`, which permutes output channels only) applies to
them unchanged — whole blocks move, their bytes do not change.

Anything else (another group size, NF4, FP8, MXFP4, asymmetric int8, an act-order permutation,
a ragged last group, a scale outside float16's range) has no exact GGML type: it is dequantized
and re-encoded as the requested ``fallback`` type, with a warning logged once per
``(spec, type)`` naming the first tensor concerned.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from qjax.convert.gguf import quants
from qjax.convert.gguf.constants import BLOCK_SIZES, GGMLType
from qjax.errors import FormatError, QjaxError
from qjax.qarray import QArray, is_qarray

__all__ = [
    "TensorPlan",
    "exact_type",
    "plan_tensor",
    "qarray_blocks",
    "reset_warnings",
]

log = logging.getLogger(__name__)

RowTransform = Callable[[np.ndarray], np.ndarray]

#: (bits, symmetric) of an ``Int(group=32)`` -> the GGML type that stores it.
_EXACT = {(8, True): GGMLType.Q8_0, (4, True): GGMLType.Q4_0, (4, False): GGMLType.Q4_1}
_GROUP = 32

_warned: set[tuple[str, str]] = set()


def reset_warnings() -> None:
    """Forget which ``(spec, type)`` pairs were warned about (for tests)."""
    _warned.clear()


def _warn_once(spec_label: str, ggml_type: GGMLType, msg: str) -> None:
    key = (spec_label, ggml_type.name)
    if key in _warned:
        log.debug(msg)
        return
    _warned.add(key)
    log.warning(msg + " (further tensors of this spec and type: no more warnings)")


@dataclasses.dataclass
class TensorPlan:
    """How one tensor is written: its GGML type, NumPy-order GGUF shape and a data callable.

    ``how`` is ``"exact"`` (the QArray's own codes and scales, bit-exact), ``"near-exact"``
    (Q4_1 with the QArray's codes and scales, zero point rounded to float16), ``"requantized"``
    (a QArray with no exact type, re-encoded from its dequantized values), ``"quantized"`` (a
    float array encoded as ``ggml_type``) or ``"copied"``. ``data()`` returns the tensor's bytes
    (or a float array of the plain type) when the writer asks for them; after it ran,
    ``max_abs_error`` holds the largest deviation from the QArray's values for ``near-exact``.
    """

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    how: str
    data: Callable[[], Any]
    max_abs_error: float | None = None


# ------------------------------------------------------------------------------- exact types


def _f16_exact(x: np.ndarray) -> bool:
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore"):
        y = x.astype(np.float16).astype(np.float32)
    return bool(np.isfinite(x).all() and np.array_equal(x, y))


def exact_type(q: QArray, *, transpose: bool) -> tuple[GGMLType | None, str]:
    """``(GGML type, "")`` if ``q`` maps onto one exactly (module docstring), else ``(None, why)``.

    ``transpose`` says the GGUF matrix is ``q`` transposed (a Flax kernel), so the GGUF rows run
    along ``q``'s axis 0; otherwise along its last axis. For ``Q4_1`` only the structure and the
    scales are checked here: whether the zero points round-trip bit for bit is known once the
    values are compared (see :class:`TensorPlan`'s ``how``).
    """
    from qjax.formats.uniform import Int

    spec = q.spec
    if not isinstance(spec, Int):
        return None, f"{spec.label() if spec is not None else '?'} is not an Int format"
    t = _EXACT.get((spec.bits, spec.symmetric))
    if t is None:
        return None, f"no GGML type holds {spec.label()}"
    if spec.group != _GROUP:
        return None, f"GGML's {t.name} has groups of 32, not {spec.group}"
    if len(q.shape) != 2:
        return None, f"{len(q.shape)}-D tensor (GGML blocks here need a matrix)"
    row_axis = 0 if transpose else 1
    if spec.axis % 2 != row_axis:
        return None, f"groups run along axis {spec.axis}, the GGUF rows along axis {row_axis}"
    if q.shape[row_axis] % _GROUP:
        return None, f"ragged last group (length {q.shape[row_axis]} is not a multiple of 32)"
    if "perm" in q.aux:
        return None, "act-order permutation of the input axis"
    if set(q.aux) - {"perm"}:
        return None, f"extra stored arrays {sorted(q.aux)}"
    if not _f16_exact(np.asarray(q.scales, np.float32)):
        return None, "a scale is not a (finite) float16 value"
    if not spec.symmetric:
        with np.errstate(over="ignore", invalid="ignore"):
            m = -np.asarray(q.zeros, np.float64) * np.asarray(q.scales, np.float64)
            if not np.isfinite(m.astype(np.float16)).all():
                return None, "a block minimum -z·s overflows float16"
    return t, ""


def _canonical(q: QArray) -> QArray:
    if q.layout != "canonical":
        from qjax.kernels.repack import unrepack

        return unrepack(q)
    return q


def _unpack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Packed ``(..., 32·bits/8)`` uint8 (qjax packing) -> ``(..., 32)`` codes."""
    if bits == 8:
        return codes
    lo, hi = codes & 15, codes >> 4  # element 2i in the low nibble
    return np.stack([lo, hi], axis=-1).reshape(*codes.shape[:-1], -1)


def _rows(a: np.ndarray, transpose: bool, row_transform: RowTransform | None) -> np.ndarray:
    """A per-block array ``(*grid, ...)`` -> GGUF row order ``(rows, blocks, ...)``."""
    if transpose:  # kernel grid (K/32, N) -> (N, K/32)
        a = np.swapaxes(a, 0, 1)
    if row_transform is not None:
        a = row_transform(a)
    return np.ascontiguousarray(a)


def qarray_blocks(
    q: QArray,
    ggml_type: GGMLType,
    *,
    transpose: bool,
    row_transform: RowTransform | None = None,
) -> tuple[np.ndarray, float]:
    """The GGML blocks of ``q`` as uint8 ``(rows, row_bytes)`` and the largest deviation.

    ``ggml_type`` must be what :func:`exact_type` returned. The deviation is ``max |GGUF value -
    q's float32 value|`` over the tensor: 0.0 for Q8_0 / Q4_0 (exact by construction) and for an
    exact Q4_1; for Q4_1 it is computed by decoding both.
    """
    import jax

    q = _canonical(q)
    spec = q.spec
    codes = _rows(_unpack(np.asarray(jax.device_get(q.codes)), spec.bits), transpose, row_transform)
    scales = _rows(np.asarray(jax.device_get(q.scales), np.float32), transpose, row_transform)
    rows, nblocks = scales.shape
    out = np.empty((rows, nblocks), quants.BLOCK_DTYPES[ggml_type])
    out["d"] = scales.astype(np.float16)
    err = 0.0
    if ggml_type == GGMLType.Q8_0:
        out["qs"] = (codes ^ np.uint8(0x80)).view(np.int8)  # c - 128 in two's complement
    elif ggml_type in (GGMLType.Q4_0, GGMLType.Q4_1):
        out["qs"] = (codes[..., :16] & 15) | (codes[..., 16:] << 4)  # GGML: 0-15 low, 16-31 high
    else:
        raise FormatError(f"{ggml_type.name} is not an exact QArray type")
    if ggml_type == GGMLType.Q4_1:
        zeros = _rows(np.asarray(jax.device_get(q.zeros), np.float32), transpose, row_transform)
        with np.errstate(over="ignore"):
            out["m"] = (-zeros.astype(np.float64) * scales.astype(np.float64)).astype(np.float16)
        # our values, computed exactly as Int.decode does (float32), vs GGML's d·q + m; in
        # chunks of rows so the float32 temporaries stay small
        step = max(1, (1 << 20) // max(1, nblocks * _GROUP))
        for r in range(0, rows, step):
            c = codes[r : r + step].astype(np.float32)
            ours = (c - zeros[r : r + step, :, None]) * scales[r : r + step, :, None]
            d = out["d"][r : r + step].astype(np.float32)[..., None]
            theirs = d * c + out["m"][r : r + step].astype(np.float32)[..., None]
            if not np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)):
                diff = float(np.max(np.abs(ours - theirs)))
                err = max(err, diff if diff > 0 else float(np.finfo(np.float32).tiny))
    return out.view(np.uint8).reshape(rows, -1), err


# ------------------------------------------------------------------------------- plans


def _as_float(w: Any) -> np.ndarray:
    import jax

    if is_qarray(w):
        w = w.dequantize()
    return np.asarray(jax.device_get(w), dtype=np.float32)


def _fits(ggml_type: GGMLType, row: int) -> bool:
    return row % BLOCK_SIZES[ggml_type][0] == 0


def _encode(w: np.ndarray, ggml_type: GGMLType, name: str) -> Any:
    if ggml_type == GGMLType.F32:
        return np.ascontiguousarray(w, dtype=np.float32)  # no copy of a float32 array
    try:
        return quants.quantize(w, ggml_type)
    except QjaxError as e:
        raise type(e)(f"tensor {name!r}: {e}") from None


def plan_tensor(
    name: str,
    value: Any,
    *,
    transpose: bool,
    ggml_type: GGMLType | int,
    row_transform: RowTransform | None = None,
    value_transform: RowTransform | None = None,
    near_exact: bool = True,
    exact: bool = True,
) -> TensorPlan:
    """How to write param ``value`` (a float array or a QArray) as GGUF tensor ``name``.

    Args:
      transpose: the GGUF tensor is ``value`` transposed (a Flax ``(in, out)`` kernel).
      ggml_type: the type of a float matrix, and the fallback of a QArray with no exact type
        (F16 if its rows are not whole blocks of it). 1-D tensors are always F32.
      row_transform: a permutation of the GGUF rows (llama's Q/K :func:`permute_qk`).
      value_transform: an elementwise map of float values (Gemma's ``1 + w`` norms); a QArray
        with one is requantized.
      near_exact: write an asymmetric int4 g32 QArray as Q4_1 with its own codes even when the
        rounded zero points do not reproduce its values bit for bit (else requantize).
      exact: look for an exact type at all (False: always requantize QArrays).
    """
    ggml_type = GGMLType(int(ggml_type))
    shape = tuple(int(s) for s in value.shape)
    gshape = tuple(reversed(shape)) if transpose else shape
    if len(gshape) == 1:
        ggml_type = GGMLType.F32
    elif not _fits(ggml_type, gshape[-1]):
        ggml_type = GGMLType.F16

    if is_qarray(value) and exact and value_transform is None:
        t, why = exact_type(value, transpose=transpose)
        if t is not None:
            plan = TensorPlan(name, t, gshape, "exact", lambda: None)

            def data() -> np.ndarray:
                raw, err = qarray_blocks(value, t, transpose=transpose, row_transform=row_transform)
                plan.max_abs_error = err
                if err:
                    plan.how = "near-exact"
                    _warn_once(
                        value.spec.label(),
                        t,
                        f"tensor {name!r}: {value.spec.label()} written as Q4_1 with its own "
                        f"codes and scales, but the zero points rounded to float16 move values "
                        f"by up to {err:.3g} (not bit-exact)",
                    )
                return raw

            if t == GGMLType.Q4_1 and not near_exact:
                _, err = qarray_blocks(value, t, transpose=transpose, row_transform=row_transform)
                if err:
                    why = f"float16 zero points are not bit-exact (max deviation {err:.3g})"
                    t = None
            if t is not None:
                plan.data = data
                return plan
    elif is_qarray(value):
        why = "exact export disabled" if not exact else "a value transform applies"

    def dense() -> Any:
        w = _as_float(value)
        if transpose:
            w = np.ascontiguousarray(w.T)
        if value_transform is not None:
            w = value_transform(w)
        if row_transform is not None:
            w = row_transform(w)
        return _encode(w, ggml_type, name)

    if is_qarray(value):
        label = value.spec.label() if value.spec is not None else "?"
        _warn_once(
            label,
            ggml_type,
            f"tensor {name!r}: {label} has no exact GGML type ({why}); requantizing its "
            f"dequantized values to {ggml_type.name}",
        )
        return TensorPlan(name, ggml_type, gshape, "requantized", dense)
    return TensorPlan(name, ggml_type, gshape, "quantized", dense)


def tensor_bytes(plan: TensorPlan) -> int:
    """Bytes of the tensor in the file."""
    elems, nbytes = BLOCK_SIZES[plan.ggml_type]
    return math.prod(plan.shape) // elems * nbytes
