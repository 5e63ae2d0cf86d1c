"""Tensor error metrics between a reference ``x`` and its reconstruction ``y`` (float64 math)."""

from __future__ import annotations

import numpy as np


def _pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(x, np.float64), np.asarray(y, np.float64)


def sqnr_db(x, y) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σx² / Σ(x-y)²)`` in dB (inf if exact)."""
    x, y = _pair(x, y)
    noise = np.sum((x - y) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(x**2) / noise))


def relative_frobenius_error(x, y) -> float:
    """``‖x - y‖_F / ‖x‖_F``."""
    x, y = _pair(x, y)
    return float(np.linalg.norm(x - y) / np.linalg.norm(x))


def max_abs_error(x, y) -> float:
    """``max |x - y|``."""
    x, y = _pair(x, y)
    return float(np.max(np.abs(x - y)))
