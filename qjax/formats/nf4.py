"""NF4: 4-bit NormalFloat with blockwise absmax (QLoRA, Dettmers et al. 2023, arXiv:2305.14314).

The 16 levels are quantiles of a standard normal, built as in bitsandbytes' ``create_normal_map``:
8 positive quantiles at probabilities ``linspace(δ, 1/2, 9)[:-1]`` and 7 negative ones at
``linspace(δ, 1/2, 8)[:-1]`` with ``δ = 0.9677083``, plus an exact zero, normalized so the
extremes are ±1. (The asymmetric split gives an exact zero with 8 positive and 7 negative levels.)

Each block of ``block`` weights (64 by default) stores ``absmax = max|x|`` and 4-bit indices of the
nearest level of ``x / absmax``. With ``double_quant`` the fp32 absmaxes are quantized again
(QLoRA §3): subtract their mean, then blockwise 8-bit quantization in blocks of 256 with
bitsandbytes' signed dynamic map (:func:`dynamic_map`) and one fp32 scale per block:
``4 + 8/64 + 32/(64·256) ≈ 4.127`` bits per weight.
"""

from __future__ import annotations

import dataclasses
import functools
from statistics import NormalDist

import jax.numpy as jnp
import numpy as np

from qjax.errors import SpecError
from qjax.formats.base import BlockFormat, register_format
from qjax.qarray import QArray

NF4_OFFSET = 0.9677083
DOUBLE_QUANT_BLOCK = 256


def _linspace_f32(start: float, stop: float, n: int) -> np.ndarray:
    """``linspace`` evaluated in float32 arithmetic the way torch does it (half from each end)."""
    start, stop = np.float32(start), np.float32(stop)
    step = np.float32((stop - start) / np.float32(n - 1))
    return np.array(
        [
            start + step * np.float32(i) if i < n // 2 else stop - step * np.float32(n - 1 - i)
            for i in range(n)
        ],
        np.float32,
    )


@functools.cache
def nf4_levels() -> np.ndarray:
    """The 16 NF4 levels in increasing order (float32), built from normal quantiles.

    Probabilities are evaluated in float32 as bitsandbytes does, the quantiles in float64, then
    rounded to float32 and normalized in float32; this reproduces bitsandbytes' table exactly.
    """
    ppf = NormalDist().inv_cdf
    pos = [ppf(float(p)) for p in _linspace_f32(NF4_OFFSET, 0.5, 9)[:-1]]
    neg = [-ppf(float(p)) for p in _linspace_f32(NF4_OFFSET, 0.5, 8)[:-1]]
    levels = np.sort(np.asarray(pos + [0.0] + neg, dtype=np.float32))
    return (levels / levels.max()).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015, arXiv:1511.04561), 256 sorted values.

    For exponent ``i = 0..6`` it holds ``±10^(i-6)`` times the ``2^i`` midpoints of
    ``linspace(0.1, 1, 2^i + 1)``; plus 0 and 1.
    """
    values = [0.0, 1.0]
    for i in range(7):
        bounds = np.linspace(0.1, 1.0, 2**i + 1, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += list(10.0 ** (i - 6) * means) + list(-(10.0 ** (i - 6)) * means)
    return np.sort(np.asarray(values, dtype=np.float32))


def nearest_index(x: jnp.ndarray, table: np.ndarray) -> jnp.ndarray:
    """Index of the nearest entry of the sorted ``table`` (ties go to the upper entry)."""
    mids = jnp.asarray((table[1:] + table[:-1]) / 2.0)
    return jnp.searchsorted(mids, x, side="right").astype(jnp.uint8)


@register_format
@dataclasses.dataclass(frozen=True)
class NF4(BlockFormat):
    """NF4 with one absmax per ``block`` weights along ``axis``, optionally double-quantized."""

    name = "nf4"
    block: int = 64
    double_quant: bool = False
    axis: int = 0

    def __post_init__(self):
        if not isinstance(self.block, int) or self.block <= 0 or self.block % 2:
            raise SpecError(f"NF4 block must be a positive even int, got {self.block!r}")
        super().__post_init__()

    @property
    def group(self) -> int:
        return self.block

    @property
    def code_bits(self) -> int:
        return 4

    def label(self) -> str:
        return f"nf4 b{self.block}" + (" dq" if self.double_quant else "")

    def encode_blocks(self, xb):
        absmax = jnp.max(jnp.abs(xb), axis=-1)
        safe = jnp.where(absmax > 0, absmax, 1.0)
        codes = nearest_index(xb / safe[..., None], nf4_levels())
        if not self.double_quant:
            return codes, absmax, None, {}
        flat = absmax.reshape(-1)
        offset = jnp.mean(flat)
        centered = flat - offset
        pad = -flat.shape[0] % DOUBLE_QUANT_BLOCK
        blocks = jnp.pad(centered, (0, pad)).reshape(-1, DOUBLE_QUANT_BLOCK)
        scale2 = jnp.max(jnp.abs(blocks), axis=-1)
        scale2 = jnp.where(scale2 > 0, scale2, 1.0)
        qabs = nearest_index(blocks / scale2[:, None], dynamic_map())
        aux = {"absmax_scale": scale2, "absmax_offset": offset}
        return codes, qabs, None, aux

    def absmax(self, q: QArray) -> jnp.ndarray:
        """The per-block absmax, decoded from its double quantization when used."""
        if not self.double_quant:
            return q.scales.astype(jnp.float32)
        grid = q.codes.shape[:-1]
        values = jnp.asarray(dynamic_map())[q.scales] * q.aux["absmax_scale"][:, None]
        n = int(np.prod(grid))
        return (values.reshape(-1)[:n] + q.aux["absmax_offset"]).reshape(grid)

    def decode_blocks(self, codes, q: QArray):
        return jnp.asarray(nf4_levels())[codes] * self.absmax(q)[..., None]
