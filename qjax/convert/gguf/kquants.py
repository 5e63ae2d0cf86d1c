"""GGML K-quant and IQ4_NL encoders in NumPy, byte-identical to llama.cpp.

The encoders reproduce ``quantize_q2_K`` .. ``quantize_q6_K`` and ``quantize_iq4_nl`` of
llama.cpp's ``ggml/src/ggml-quants.c`` (the K-quants of llama.cpp PR #1684, the importance-matrix
variants that followed, and IQ4_NL of PR #5590), i.e. what ``ggml_quantize_chunk`` writes:

* without an importance matrix, the K-quants follow the reference encoders
  (``quantize_row_qX_K_ref``) and IQ4_NL ``quantize_iq4_nl`` with ``x**2`` weights;
* with one (``imatrix``: a float32 weight per column of the row), the weighted encoders
  (``quantize_row_qX_K_impl``, ``quantize_row_iq4_nl_impl``, and for Q4_0/Q4_1/Q5_0/Q5_1
  ``quantize_row_q4_0_impl`` etc.).

Everything is vectorised over blocks: the searches loop in Python over the search steps (and, for
the two greedy refinements, over the 8-16 elements of a group), never over blocks. Byte identity
rests on three points, each reproduced exactly:

1. ggml's ``nearest_int(v)`` adds ``1.5 * 2**23`` in float32 and reads the low mantissa bits: it
   rounds half to even (``np.rint``), and wraps for ``|v| >= 2**22`` (see :func:`_nearest_int`).
2. Sums are float32 and sequential, left to right (one vectorised add per element position,
   never NumPy's pairwise ``sum``); each product is evaluated in the C order, e.g.
   ``(w * l) * x``, with no fused multiply-add.
3. Scales stored as float16 are rounded to nearest even, and later steps use the rounded value.

Point 2 assumes llama.cpp was compiled without floating-point contraction, as its x86-64 builds
of ``ggml-base`` are (no FMA in the baseline ISA); a build that fuses ``a * b + c`` (GCC's default
on e.g. aarch64) can differ from these bytes, and from its own x86-64 output, in rare blocks.

Notation (one group of ``n`` values ``x_i`` with weights ``w_i``, integer codes ``l_i``):
``S_w = sum w``, ``S_x = sum w x``, ``S_l = sum w l``, ``S_ll = sum w l^2``, ``S_xl = sum w l x``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qjax.convert.gguf.constants import GGMLType
from qjax.convert.gguf.quants import (
    BLOCK_DTYPES,
    IQ4NL_VALUES,
    _k_scale_min,
    _pack_nibbles,
    _q3_k_scales,
)

__all__ = ["ROW_ENCODERS", "WEIGHTED_LEGACY"]

_F = np.float32
_QK = 256
_EPS = _F(1e-15)  # ggml's GROUP_MAX_EPS: a group with max |x| below this is all zero
_MAGIC = _F(12582912.0)  # 1.5 * 2**23


# ---------------------------------------------------------------------------------------------
# exact float32 helpers


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml ``nearest_int``: ``bits(float32(v + 1.5 * 2**23)) & (2**23 - 1) - 2**22`` (int32).

    For ``|v| < 2**22`` this is round-half-to-even; beyond that (and for inf / NaN) it wraps the
    same way the C code does.
    """
    s = np.asarray(v, dtype=_F) + _MAGIC
    return (s.view(np.int32) & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def _ssum(a: np.ndarray) -> np.ndarray:
    """Sequential float32 sum over the last axis (``s = 0; for v in a: s += v``).

    One vectorised add per element position (faster than ``np.add.accumulate`` along a short
    last axis, and the same order).
    """
    s = a[..., 0].astype(_F)
    for i in range(1, a.shape[-1]):
        s += a[..., i]
    return s


def _f16(v: np.ndarray) -> np.ndarray:
    """float32 -> float16 (round to nearest even) -> float32: a scale as ggml stores it."""
    return np.asarray(v, dtype=_F).astype(np.float16).astype(_F)


def _col(v: np.ndarray) -> np.ndarray:
    return v[..., None]


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The value of largest magnitude per row (the first one on ties, as ``if (ax > amax)``)."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]


def _pack_crumbs(q: np.ndarray) -> np.ndarray:
    """(m, 256) 2-bit codes -> (m, 64) bytes: ``qs[32 h + l] = sum_j q[128 h + 32 j + l] << 2j``."""
    q = q.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 scales and 8 mins (uint8, normally 6-bit) -> the 12 scale bytes of Q4_K / Q5_K.

    Bytes 0-3: ``sc[0:4] | (sc[4:8] >> 4) << 6``; 4-7: ``mn[0:4] | (mn[4:8] >> 4) << 6``;
    8-11: ``sc[4:8] & 15 | (mn[4:8] & 15) << 4`` (each truncated to a byte, as in C).
    """
    ls = ls.astype(np.int32)
    lm = lm.astype(np.int32)
    b = np.concatenate(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4),
        ],
        axis=1,
    )
    return (b & 0xFF).astype(np.uint8)


def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """16 six-bit codes (0..63) -> the 12 scale bytes of Q3_K.

    ``b[j] = l[j] & 15 | (l[j + 8] & 15) << 4`` for ``j < 8``;
    ``b[8 + k] = sum_q (l[4 q + k] >> 4) << 2 q`` for ``k < 4``.
    """
    l6 = l6.astype(np.int32)
    low = (l6[:, :8] & 15) | ((l6[:, 8:] & 15) << 4)
    hi = (l6 >> 4).reshape(-1, 4, 4)  # [q, k] = l[4 q + k] >> 4
    high = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    return (np.concatenate([low, high], axis=1) & 0xFF).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# scale searches (each over a batch of groups: x, w of shape (m, n))


def _make_qkx(
    x: np.ndarray,
    w: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine fit ``x ~ scale * l - the_min``, ``l in 0..nmax`` (ggml ``make_qkx2/3_quants``).

    Start from ``min = min(min x, 0)``, ``l = clip(nearest_int(nmax (x - min) / (max - min)))``
    and its weighted error ``E = sum w |e|`` (``use_mad``) or ``sum w e^2``,
    ``e = scale l + min - x``. Then for ``k = 0..nstep`` re-round with
    ``iscale = (rmin + rdelta k + nmax) / (max - min)`` (``min`` being the best one so far), and
    solve weighted least squares for ``(scale, min)``: with ``D = S_w S_ll - S_l^2 > 0``,
    ``scale = (S_w S_xl - S_x S_l) / D``, ``min = (S_ll S_x - S_l S_xl) / D`` (or ``min = 0``,
    ``scale = S_xl / S_ll`` if that ``min`` is positive); keep the candidate if its error is lower.
    A group with ``max == min`` gives ``scale = 0``, ``l = 0``. Returns ``(scale, -min, l)``.
    """
    xmin = x.min(axis=-1)
    xmax = x.max(axis=-1)
    sum_w = _ssum(w)
    sum_x = _ssum(w * x)
    xmin = np.where(xmin > 0, _F(0), xmin)
    flat = xmax == xmin
    fn = np.abs if use_mad else np.square

    iscale = _F(nmax) / (xmax - xmin)
    scale = _F(1) / iscale
    L = np.clip(_nearest_int(_col(iscale) * (x - _col(xmin))), 0, nmax)
    best = _ssum(w * fn(_col(scale) * L.astype(_F) + _col(xmin) - x))
    for k in range(nstep + 1):
        step = _F(rmin) + _F(rdelta) * _F(k) + _F(nmax)
        iscale = step / (xmax - xmin)
        la = np.clip(_nearest_int(_col(iscale) * (x - _col(xmin))), 0, nmax)
        lf = la.astype(_F)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _ssum(wl), _ssum(wl * lf), _ssum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = this_min > 0
        this_min = np.where(pos, _F(0), this_min)
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        err = _ssum(w * fn(_col(this_scale) * lf + _col(this_min) - x))
        take = (det > 0) & (err < best) & ~flat
        L = np.where(_col(take), la, L)
        best = np.where(take, err, best)
        scale = np.where(take, this_scale, scale)
        xmin = np.where(take, this_min, xmin)
    scale = np.where(flat, _F(0), scale)
    L = np.where(_col(flat), 0, L)
    return scale, -xmin, L


def _make_qx(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fit ``x ~ scale * l``, ``l in -nmax..nmax-1`` (ggml ``make_qx_quants``, rmse 1).

    With ``v`` the signed value of largest magnitude, try ``iscale = -(nmax + 0.1 k) / v`` for
    ``k = 0, -9..9``: ``l = clip(nearest_int(iscale x))``, least-squares ``scale = S_xl / S_ll``,
    and keep the candidate maximising ``S_xl^2 / S_ll`` (strictly better only). Groups with
    ``max |x| < 1e-15`` give ``scale = 0``, codes 0. Returns ``(scale, l + nmax)``.
    """
    vmax = _signed_absmax(x)
    zero = np.abs(vmax) < _EPS

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        li = np.clip(_nearest_int(_col(iscale) * x), -nmax, nmax - 1)
        lf = li.astype(_F)
        return li, _ssum(w * x * lf), _ssum(w * lf * lf)

    li, sumlx, suml2 = fit(_F(-nmax) / vmax)
    L = li + nmax
    scale = np.where(suml2 != 0, sumlx / suml2, _F(0))
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        li, sumlx, suml2 = fit(-(_F(nmax) + _F(0.1) * _F(k)) / vmax)
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(_col(take), li + nmax, L)
        scale = np.where(take, sumlx / suml2, scale)
        best = np.where(take, scale * sumlx, best)
    return np.where(zero, _F(0), scale), np.where(_col(zero), 0, L)


def _refine(
    x: np.ndarray,
    w: np.ndarray,
    L: np.ndarray,
    sumlx: np.ndarray,
    suml2: np.ndarray,
    lo: int | None,
    hi: int,
    need_sl2: bool,
    wrap: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy coordinate refinement of ``l`` maximising ``S_xl^2 / S_ll`` (up to 5 sweeps).

    For each element in turn: remove its term, re-round ``l_i = nearest_int(x_i S_ll' / S_xl')``
    (``S'`` without element ``i``), clamp it, and accept it if ``S_xl^2 / S_ll`` grows. ``L``
    holds the codes as ggml stores them; ``wrap`` stores accepted codes modulo 256 (a C
    ``uint8_t``).
    """
    L = L.copy()
    wx = w * x
    for _ in range(5):
        changed = False
        for i in range(x.shape[-1]):
            li = L[:, i]
            lf = li.astype(_F)
            wi = w[:, i]
            slx = sumlx - wx[:, i] * lf
            sl2 = suml2 - wi * lf * lf
            ok = (slx > 0) & (sl2 > 0) if need_sl2 else slx > 0
            new = _nearest_int(x[:, i] * sl2 / slx)
            new = np.minimum(hi, new) if lo is None else np.clip(new, lo, hi)
            nf = new.astype(_F)
            slx = slx + wx[:, i] * nf
            sl2 = sl2 + wi * nf * nf
            take = ok & (new != li) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            if not need_sl2:
                take &= sl2 > 0
            if take.any():
                changed = True
                L[:, i] = np.where(take, (new & 0xFF) if wrap else new, li)
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        if not changed:  # a sweep without a change leaves the state as it was: done
            break
    return L, sumlx, suml2


def _make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fit for Q3_K's reference encoder (ggml ``make_q3_quants`` with rmse).

    ``l = clip(nearest_int(-nmax x / v), -nmax, nmax - 1)`` (``v`` the signed absmax), weights
    ``x^2``, then :func:`_refine`; ``scale = S_xl / S_ll``. Returns ``(scale, l + nmax)``.
    """
    vmax = _signed_absmax(x)
    zero = np.abs(vmax) < _EPS
    w = x * x
    L = np.clip(_nearest_int(_col(_F(-nmax) / vmax) * x), -nmax, nmax - 1)
    lf = L.astype(_F)
    L, sumlx, suml2 = _refine(
        x, w, L, _ssum(w * x * lf), _ssum(w * lf * lf), -nmax, nmax - 1, need_sl2=False
    )
    scale = np.where(suml2 > 0, sumlx / suml2, _F(0))
    return np.where(zero, _F(0), scale), np.where(_col(zero), 0, L + nmax)


def _make_qp(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Fit of non-negative values ``x ~ scale * l``, ``l <= nmax`` (ggml ``make_qp_quants``).

    Used for the super-block scales and mins of the weighted K-quant encoders. ``max = max(x, 0)``;
    pick ``iscale`` among ``(nmax + 0.1 k) / max``, ``k = 0, -4..4``, minimising
    ``sum w (x - l / iscale)^2``; re-round, then :func:`_refine` and ``scale = S_xl / S_ll``.
    Returns ``(scale, l)`` with ``l`` as the bytes ggml stores.
    """
    vmax = np.maximum(x.max(axis=-1), _F(0))
    zero = vmax < _EPS
    iscale = _F(nmax) / vmax
    L0 = (_nearest_int(_col(iscale) * x) & 0xFF).astype(_F)
    d = x - _col(_F(1) / iscale) * L0
    best = _ssum(w * d * d)
    for k in range(-4, 5):
        if k == 0:
            continue
        is_k = (_F(0.1) * _F(k) + _F(nmax)) / vmax
        li = np.minimum(nmax, _nearest_int(_col(is_k) * x)).astype(_F)
        d = x - _col(_F(1) / is_k) * li
        mse = _ssum(w * d * d)
        take = mse < best
        best = np.where(take, mse, best)
        iscale = np.where(take, is_k, iscale)
    li = np.minimum(nmax, _nearest_int(_col(iscale) * x))
    lf = li.astype(_F)
    sumlx, suml2 = _ssum(w * x * lf), _ssum(w * lf * lf)
    L, sumlx, suml2 = _refine(x, w, li & 0xFF, sumlx, suml2, None, nmax, need_sl2=True, wrap=True)
    scale = np.where(suml2 > 0, sumlx / suml2, _F(0))
    return np.where(zero, _F(0), scale), np.where(_col(zero), 0, L & 0xFF)


# ---------------------------------------------------------------------------------------------
# K-quant encoders: x of shape (rows, n_per_row), qw (n_per_row,) or None -> structured blocks


def _superblocks(x: np.ndarray, qw: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, n) -> (rows * n / 256, 256) super-blocks, and the imatrix broadcast to them."""
    rows, n = x.shape
    xb = x.reshape(-1, _QK)
    if qw is None:
        return xb, None
    return xb, np.broadcast_to(qw.reshape(1, n // _QK, _QK), (rows, n // _QK, _QK)).reshape(-1, _QK)


def _sigma2(xb: np.ndarray, factor: int) -> np.ndarray:
    """``factor * sum(x^2) / 256`` over each super-block, sequential float32."""
    return _F(factor) * _ssum(xb * xb) / _F(_QK)


def _requant_affine(
    xg: np.ndarray, L: np.ndarray, d: np.ndarray, dm: np.ndarray, nmax: int
) -> np.ndarray:
    """Codes ``clip(nearest_int((x + dm) / d), 0, nmax)``; groups with ``d == 0`` keep ``L``."""
    keep = d == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_nearest_int((xg + dm[..., None]) / d[..., None]), 0, nmax)
    return np.where(keep[..., None], L, q)


def _requant_sym(xg: np.ndarray, L: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Final codes ``clip(nearest_int(x / d), lo, hi) - lo``; groups with ``d == 0`` keep ``L``."""
    keep = d == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(_nearest_int(xg / d[..., None]), lo, hi) - lo
    return np.where(keep[..., None], L, q)


def _enc_q2_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Q2_K: 16 groups of 16, ``y = d sc q - dmin mn`` with 4-bit ``sc``, ``mn`` and ``q in 0..3``.

    Reference (no imatrix): per group an affine fit with weights ``|x|`` (``nmax = 3``,
    ``rmin = -0.5``, ``rdelta = 0.1``, 16 steps, absolute error); ``d = max(scale) / 15``,
    ``sc = nearest_int(15 scale / max(scale))`` (likewise ``dmin``, ``mn``). Weighted:
    ``sigma2 = sum(x^2) / 256``, weights ``qw sqrt(sigma2 + x^2)``, the affine fit with
    ``rmin = -0.9``, ``rdelta = 0.05``, 37 steps, squared error, then the group scales and mins are
    themselves fitted by :func:`_make_qp` (``nmax = 15``, weighted by each group's weight sum).
    Either way the codes are re-rounded with the stored (float16) scales.
    """
    xb, qwb = _superblocks(x, qw)
    m = xb.shape[0]
    xg = xb.reshape(m, 16, 16)
    if qwb is None:
        sc, mn, L = _make_qkx(
            xg.reshape(-1, 16), np.abs(xg).reshape(-1, 16), 3, -0.5, 0.1, 15, True
        )
        sc, mn = sc.reshape(m, 16), mn.reshape(m, 16)
        max_sc = np.maximum(sc.max(axis=1), _F(0))
        max_mn = np.maximum(mn.max(axis=1), _F(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = _nearest_int(_col(_F(15) / max_sc) * sc)
            lm = _nearest_int(_col(_F(15) / max_mn) * mn)
        ls = np.where(_col(max_sc > 0), ls, 0)
        lm = np.where(_col(max_mn > 0), lm, 0)
        scales = ((ls & 0xFF) | (lm << 4)) & 0xFF
        d = np.where(max_sc > 0, max_sc / _F(15), _F(0))
        dmin = np.where(max_mn > 0, max_mn / _F(15), _F(0))
    else:
        sigma2 = _sigma2(xb, 1)
        wg = (qwb * np.sqrt(_col(sigma2) + xb * xb)).reshape(m, 16, 16)
        sw = _ssum(wg)
        sc, mn, L = _make_qkx(xg.reshape(-1, 16), wg.reshape(-1, 16), 3, -0.9, 0.05, 36, False)
        d, ls = _make_qp(sc.reshape(m, 16), sw, 15)
        dmin, lm = _make_qp(mn.reshape(m, 16), sw, 15)
        scales = (ls | (lm << 4)) & 0xFF
    out = np.empty(m, BLOCK_DTYPES[GGMLType.Q2_K])
    out["d"], out["dmin"], out["scales"] = d, dmin, scales
    df = _col(_f16(d)) * (scales & 15).astype(_F)
    dmf = _col(_f16(dmin)) * (scales >> 4).astype(_F)
    q = _requant_affine(xg, L.reshape(m, 16, 16), df, dmf, 3)
    out["qs"] = _pack_crumbs(q.reshape(m, 256))
    return out


def _enc_q3_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Q3_K: 16 groups of 16, ``y = d sc q`` with signed 6-bit ``sc`` and ``q in -4..3``.

    Reference: per group :func:`_make_q3` (weights ``x^2``, greedy refinement); with ``v`` the
    group scale of largest magnitude, ``sc = clip(nearest_int(-32 scale / v), -32, 31)`` and
    ``d = float16(v / -32)``. Weighted: ``sigma2 = 2 sum(x^2) / 256``, weights
    ``qw sqrt(sigma2 + x^2)``, per group :func:`_make_qx` (``nmax = 4``), then the 16 group scales
    are fitted by :func:`_make_qx` (``nmax = 32``, weighted by the group weight sums). Codes are
    re-rounded as ``clip(nearest_int(x / (d sc)), -4, 3)``.
    """
    xb, qwb = _superblocks(x, qw)
    m = xb.shape[0]
    xg = xb.reshape(m, 16, 16)
    if qwb is None:
        sc, L = _make_q3(xg.reshape(-1, 16), 4)
        sc = sc.reshape(m, 16)
        vmax = _signed_absmax(sc)
        nz = vmax != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = _F(-32) / vmax
            l8 = _nearest_int(_col(iscale) * sc).astype(np.int8).astype(np.int32)
            d = np.where(nz, _F(1) / iscale, _F(0))
        l6 = np.where(_col(nz), np.clip(l8, -32, 31) + 32, 0)
        scales = np.where(_col(nz), _pack_q3_scales(l6), np.uint8(0))
    else:
        sigma2 = _sigma2(xb, 2)
        wg = (qwb * np.sqrt(_col(sigma2) + xb * xb)).reshape(m, 16, 16)
        sw = _ssum(wg)
        sc, L = _make_qx(xg.reshape(-1, 16), wg.reshape(-1, 16), 4)
        d, l6 = _make_qx(sc.reshape(m, 16), sw, 32)
        scales = _pack_q3_scales(l6)
    out = np.empty(m, BLOCK_DTYPES[GGMLType.Q3_K])
    out["d"], out["scales"] = d, scales
    dl = _col(_f16(d)) * _q3_k_scales(scales).astype(_F)
    q = _requant_sym(xg, L.reshape(m, 16, 16), dl, -4, 3).reshape(m, 256)
    hbit = (q > 3).astype(np.uint8).reshape(m, 8, 32)  # element 32 k + l -> bit k of hmask[l]
    out["hmask"] = np.bitwise_or.reduce(hbit << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
    out["qs"] = _pack_crumbs(q & 3)
    return out


def _k_affine_scales(
    xb: np.ndarray, qwb: np.ndarray | None, nmax: int, ref_search: tuple[float, float, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Shared part of Q4_K / Q5_K: 8 sub-blocks of 32, ``y = d sc q - dmin mn``, 6-bit sc, mn.

    Reference: sub-block weights ``sqrt(mean(x^2)) + |x|`` (mean over the sub-block), affine
    fit with ``(rmin, rdelta, nstep) = ref_search``; ``d = max(scale) / 63``,
    ``sc = min(63, nearest_int(63 scale / max(scale)))`` (likewise ``dmin``, ``mn``). Weighted:
    ``sigma2 = 2 sum(x^2) / 256``, weights ``qw sqrt(sigma2 + x^2)``, affine fit with
    ``(-0.9, 0.05, 36)``, then :func:`_make_qp` (``nmax = 63``) on the scales and mins.
    Returns ``(d, dmin, scale_bytes[12], codes)`` before the final re-rounding.
    """
    m = xb.shape[0]
    xs = xb.reshape(-1, 32)
    if qwb is None:
        av = np.sqrt(_ssum(xs * xs) / _F(32))
        w = _col(av) + np.abs(xs)
        rmin, rdelta, nstep = ref_search
        sc, mn, L = _make_qkx(xs, w, nmax, rmin, rdelta, nstep, False)
        sc, mn = sc.reshape(m, 8), mn.reshape(m, 8)
        max_sc = np.maximum(sc.max(axis=1), _F(0))
        max_mn = np.maximum(mn.max(axis=1), _F(0))
        with np.errstate(divide="ignore"):
            inv_sc = np.where(max_sc > 0, _F(63) / max_sc, _F(0))
            inv_mn = np.where(max_mn > 0, _F(63) / max_mn, _F(0))
        ls = np.minimum(63, _nearest_int(_col(inv_sc) * sc) & 0xFF)
        lm = np.minimum(63, _nearest_int(_col(inv_mn) * mn) & 0xFF)
        d, dmin = max_sc / _F(63), max_mn / _F(63)
    else:
        sigma2 = _sigma2(xb, 2)
        w = qwb * np.sqrt(_col(sigma2) + xb * xb)
        sw = _ssum(w.reshape(m, 8, 32))
        sc, mn, L = _make_qkx(xs, w.reshape(-1, 32), nmax, -0.9, 0.05, 36, False)
        d, ls = _make_qp(sc.reshape(m, 8), sw, 63)
        dmin, lm = _make_qp(mn.reshape(m, 8), sw, 63)
        if nmax == 31:  # quantize_row_q5_K_impl clamps, the Q4_K one does not
            ls, lm = np.minimum(63, ls), np.minimum(63, lm)
    return d, dmin, _pack_k_scales(ls, lm), L.reshape(m, 8, 32)


def _k_requant(
    xb: np.ndarray, d: np.ndarray, dmin: np.ndarray, scales: np.ndarray, L: np.ndarray, nmax: int
) -> np.ndarray:
    sc, mn = _k_scale_min(scales)
    dl = _col(_f16(d)) * sc.astype(_F)
    ml = _col(_f16(dmin)) * mn.astype(_F)
    return _requant_affine(xb.reshape(-1, 8, 32), L, dl, ml, nmax)


def _enc_q4_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Q4_K: 8 sub-blocks of 32, ``y = d sc q - dmin mn``, ``q in 0..15``.

    Scales as :func:`_k_affine_scales` (reference search ``rmin = -1``, ``rdelta = 0.1``, 21
    steps); codes ``clip(nearest_int((x + dmin mn) / (d sc)), 0, 15)`` with the float16 ``d``,
    ``dmin``; sub-block ``2 k`` in the low nibbles of ``qs[32 k : 32 k + 32]``, ``2 k + 1`` high.
    """
    xb, qwb = _superblocks(x, qw)
    d, dmin, scales, L = _k_affine_scales(xb, qwb, 15, (-1.0, 0.1, 20))
    q = _k_requant(xb, d, dmin, scales, L, 15).astype(np.uint8)
    out = np.empty(xb.shape[0], BLOCK_DTYPES[GGMLType.Q4_K])
    out["d"], out["dmin"], out["scales"] = d, dmin, scales
    out["qs"] = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    return out


def _enc_q5_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Q5_K: as Q4_K with ``q in 0..31`` (reference search ``rmin = -0.5``, 16 steps).

    Bit 4 of sub-block ``s``'s code ``l`` goes to bit ``s`` of ``qh[l]``; the low 4 bits are
    packed as Q4_K.
    """
    xb, qwb = _superblocks(x, qw)
    d, dmin, scales, L = _k_affine_scales(xb, qwb, 31, (-0.5, 0.1, 15))
    q = _k_requant(xb, d, dmin, scales, L, 31).astype(np.uint8)
    out = np.empty(xb.shape[0], BLOCK_DTYPES[GGMLType.Q5_K])
    out["d"], out["dmin"], out["scales"] = d, dmin, scales
    lo = q & 15
    out["qs"] = (lo[:, 0::2] | (lo[:, 1::2] << 4)).reshape(-1, 128)
    hb = (q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]
    out["qh"] = np.bitwise_or.reduce(hb, axis=1)
    return out


def _enc_q6_k(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Q6_K: 16 groups of 16, ``y = d sc (q - 32)``, int8 ``sc``, ``q in 0..63``.

    Per group :func:`_make_qx` (``nmax = 32``) with weights ``x^2`` (reference) or the imatrix
    itself (weighted); with ``v`` the group scale of largest magnitude, ``d = float16(v / -128)``,
    ``sc = min(127, nearest_int(-128 scale / v))``; codes
    ``clip(nearest_int(x / (d sc)), -32, 31) + 32``. A super-block whose scales are all below
    1e-15 is written as zeros.
    """
    xb, qwb = _superblocks(x, qw)
    m = xb.shape[0]
    xg = xb.reshape(-1, 16)
    w = xg * xg if qwb is None else qwb.reshape(-1, 16)
    sc, L = _make_qx(xg, w, 32)
    sc = sc.reshape(m, 16)
    vmax = _signed_absmax(sc)
    zero = np.abs(vmax) < _EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F(-128) / vmax
        d = np.where(zero, _F(0), _F(1) / iscale)
        ls = np.minimum(127, _nearest_int(_col(iscale) * sc)).astype(np.int8)
    ls = np.where(_col(zero), np.int8(0), ls)
    dl = _col(_f16(d)) * ls.astype(_F)
    q = _requant_sym(xb.reshape(m, 16, 16), L.reshape(m, 16, 16), dl, -32, 31)
    q = np.where(_col(_col(zero)), 0, q).reshape(m, 2, 4, 32).astype(np.uint8)
    out = np.empty(m, BLOCK_DTYPES[GGMLType.Q6_K])
    out["d"], out["scales"] = d, ls
    lo = q & 15  # [h, j, l]: ql[64 h + 32 (j % 2) + l] holds j in the low nibble, j + 2 high
    out["ql"] = (lo[:, :, 0:2] | (lo[:, :, 2:4] << 4)).reshape(m, 128)
    hi = q >> 4
    out["qh"] = (
        hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    ).reshape(m, 64)
    return out


# ---------------------------------------------------------------------------------------------
# IQ4_NL


# For an integer k in [-127, 113]: the number of IQ4_NL levels <= k. The levels are integers, so
# for any v in [k, k + 1) it is also the number of levels <= v (a binary search's upper index).
_IQ4NL_UPPER = np.searchsorted(IQ4NL_VALUES, np.arange(-127, 114, dtype=np.float32), side="right")


def _best_index(v: np.ndarray) -> np.ndarray:
    """Index of the nearest IQ4_NL level to ``v`` as ggml's ``best_index_int8``.

    With ``T[mu - 1] <= v < T[mu]``: ``mu - 1`` if ``v - T[mu - 1] < T[mu] - v`` (float32), else
    ``mu`` (ties go up); ``v <= T[0]`` gives 0, ``v >= T[15]`` (or NaN) gives 15.
    """
    vals = IQ4NL_VALUES
    k = np.floor(np.clip(np.nan_to_num(v, nan=0.0), -127, 113)).astype(np.int32) + 127
    mu = np.clip(_IQ4NL_UPPER[k], 1, 15)
    idx = mu - ((v - vals[mu - 1]) < (vals[mu] - v))
    idx = np.where(v <= vals[0], 0, idx)
    return np.where((v >= vals[15]) | np.isnan(v), 15, idx)


def _enc_iq4_nl(x: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """IQ4_NL: blocks of 32, ``y = d * T[q]`` with the fixed 16-level table ``T`` (int8).

    As ``quantize_iq4_nl``: weights ``x^2`` (no imatrix) or ``qw sqrt(sigma2 + x^2)`` with
    ``sigma2 = 2 sum(x^2) / 32`` per block; with ``v`` the signed absmax, try
    ``d = v / 127`` and the inverse scales ``(k - 127) / v``, ``k = -7..7``: codes = nearest
    level of ``x / d``, least-squares ``d = S_qx / S_qq``, keep the largest ``S_qx^2 / S_qq``.
    The stored ``d`` is float16; codes are re-chosen with the float32 ``d``.
    """
    rows, n = x.shape
    xb = x.reshape(-1, 32)
    x2 = xb * xb
    if qw is None:
        w = x2
    else:
        sigma2 = _ssum(x2) * _F(2.0 / 32)
        qwb = np.broadcast_to(qw.reshape(1, n // 32, 32), (rows, n // 32, 32)).reshape(-1, 32)
        w = qwb * np.sqrt(_col(sigma2) + x2)
    vmax = _signed_absmax(xb)
    zero = np.abs(vmax) < _EPS
    vals = IQ4NL_VALUES

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = vals[_best_index(_col(iscale) * xb)]
        wq = w * q
        return _ssum(wq * xb), _ssum(wq * q)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d0 = -vmax / _F(-127)
        sumqx, sumq2 = fit(_F(1) / d0)
        d = np.where(sumq2 > 0, sumqx / sumq2, _F(0))
        best = d * sumqx
        for k in range(-7, 8):
            sumqx, sumq2 = fit(_F(k - 127) / vmax)
            take = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(take, sumqx / sumq2, d)
            best = np.where(take, d * sumqx, best)
        d = np.where(zero, _F(0), d)
        inv = np.where(d != 0, _F(1) / d, _F(0))
    q = _best_index(_col(inv) * xb).astype(np.uint8)
    out = np.empty(xb.shape[0], BLOCK_DTYPES[GGMLType.IQ4_NL])
    out["d"] = d
    out["qs"] = _pack_nibbles(q)
    return out


# ---------------------------------------------------------------------------------------------
# weighted (imatrix) versions of the 32-element legacy formats


def _legacy_weights(x: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of 32 and weights ``qw sqrt(sigma2 + x^2)``, ``sigma2 = sum(x^2) / n_per_row``."""
    rows, n = x.shape
    sigma2 = _ssum(x * x) / _F(n)
    w = qw[None, :] * np.sqrt(_col(sigma2) + x * x)
    return x.reshape(-1, 32), w.reshape(-1, 32)


def _enc_q4_0_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Q4_0 with an imatrix (``quantize_row_q4_0_impl``): :func:`_make_qx`, ``nmax = 8``."""
    xb, w = _legacy_weights(x, qw)
    d, L = _make_qx(xb, w, 8)
    out = np.empty(xb.shape[0], BLOCK_DTYPES[GGMLType.Q4_0])
    out["d"], out["qs"] = d, _pack_nibbles(L.astype(np.uint8))
    return out


def _enc_q5_0_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Q5_0 with an imatrix (``quantize_row_q5_0_impl``): :func:`_make_qx`, ``nmax = 16``."""
    xb, w = _legacy_weights(x, qw)
    d, L = _make_qx(xb, w, 16)
    q = L.astype(np.uint8)
    out = np.empty(xb.shape[0], BLOCK_DTYPES[GGMLType.Q5_0])
    out["d"], out["qs"] = d, _pack_nibbles(q)
    out["qh"] = np.packbits(q >> 4, axis=1, bitorder="little")
    return out


def _enc_qx_1_w(x: np.ndarray, qw: np.ndarray, ggml_type: GGMLType, nmax: int) -> np.ndarray:
    xb, w = _legacy_weights(x, qw)
    d, the_min, L = _make_qkx(xb, w, nmax, -0.9, 0.05, 36, False)
    q = L.astype(np.uint8)
    out = np.empty(xb.shape[0], BLOCK_DTYPES[ggml_type])
    out["d"], out["m"], out["qs"] = d, -the_min, _pack_nibbles(q)
    if nmax == 31:
        out["qh"] = np.packbits(q >> 4, axis=1, bitorder="little")
    return out


def _enc_q4_1_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Q4_1 with an imatrix (``quantize_row_q4_1_impl``): affine fit, ``nmax = 15``."""
    return _enc_qx_1_w(x, qw, GGMLType.Q4_1, 15)


def _enc_q5_1_w(x: np.ndarray, qw: np.ndarray) -> np.ndarray:
    """Q5_1 with an imatrix (``quantize_row_q5_1_impl``): affine fit, ``nmax = 31``."""
    return _enc_qx_1_w(x, qw, GGMLType.Q5_1, 31)


RowEncoder = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]

#: Row encoders ``(x (rows, n_per_row) float32, imatrix (n_per_row,) or None) -> blocks``.
ROW_ENCODERS: dict[GGMLType, RowEncoder] = {
    GGMLType.Q2_K: _enc_q2_k,
    GGMLType.Q3_K: _enc_q3_k,
    GGMLType.Q4_K: _enc_q4_k,
    GGMLType.Q5_K: _enc_q5_k,
    GGMLType.Q6_K: _enc_q6_k,
    GGMLType.IQ4_NL: _enc_iq4_nl,
}

#: imatrix-weighted encoders of the legacy 32-element formats (Q8_0 has none in ggml).
WEIGHTED_LEGACY: dict[GGMLType, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    GGMLType.Q4_0: _enc_q4_0_w,
    GGMLType.Q4_1: _enc_q4_1_w,
    GGMLType.Q5_0: _enc_q5_0_w,
    GGMLType.Q5_1: _enc_q5_1_w,
}
