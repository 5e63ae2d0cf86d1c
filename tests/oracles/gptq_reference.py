"""A float64 NumPy GPTQ written from the paper (Frantar et al. 2023, Algorithm 1), as test oracle.

No lazy batching, no JAX: column by column, ``W[:, j:] -= err ⊗ U[j, j:]`` with ``U`` the upper
Cholesky factor of the damped inverse Hessian. Grids follow qjax's Int convention.
"""

import ml_dtypes
import numpy as np


def bf16_up(x):
    """Rounds positive float64 values up to the next bfloat16 (scales are stored that way)."""
    y = x.astype(ml_dtypes.bfloat16)
    y = np.where(y.astype(np.float64) < x, np.nextafter(y, np.array(np.inf, y.dtype)), y)
    return y.astype(np.float64)


def grid(x, bits, sym):
    """(scale, zero) per row of x (last axis): scale rounded up into bfloat16, float64 math."""
    qmax = 2**bits - 1
    if sym:
        half = 2 ** (bits - 1)
        amax = np.abs(x).max(-1)
        s = bf16_up(np.where(amax > 0, amax / (half - 0.5), 1.0))
        return s, np.full(s.shape, float(half))
    lo, hi = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    s = bf16_up(np.where(hi > lo, (hi - lo) / qmax, 1.0))
    return s, np.clip(np.round(-lo / s), 0, qmax)


def gptq_reference(w, h, bits, group, sym, damp=0.01, act_order=False, static_groups=False):
    w, h = np.array(w, np.float64), np.array(h, np.float64)
    n, k = w.shape
    qmax = 2**bits - 1
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    g = k if group == "channel" else group
    orig = w.copy()
    w, h = w[:, perm], h[perm][:, perm]
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    codes = np.zeros((n, k), np.int64)
    scales = np.zeros((n, -(-k // g)))
    s = z = None
    for j in range(k):
        if group == "channel":
            if j == 0:
                s, z = grid(orig, bits, sym)
        elif act_order and static_groups:
            gi = perm[j] // g
            s, z = grid(orig[:, gi * g : (gi + 1) * g], bits, sym)
        elif j % g == 0:
            s, z = grid(w[:, j : j + g], bits, sym)
        gi = 0 if group == "channel" else (perm[j] if static_groups else j) // g
        scales[:, gi] = s
        c = np.clip(np.round(w[:, j] / s) + z, 0, qmax)
        err = (w[:, j] - (c - z) * s) / u[j, j]
        w[:, j:] -= np.outer(err, u[j, j:])
        codes[:, j] = c
    inv = np.argsort(perm)
    if group == "channel" or static_groups or not act_order:
        codes = codes[:, inv]
    return codes, perm, scales
