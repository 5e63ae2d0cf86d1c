"""Block-size tables for the GPU int kernels (tuned on an H100 SXM: experiments/kernel_bench.py).

A :class:`Config` names the code path and its tile sizes; :func:`pick` looks a case up by weight
bits, M bucket and, when present, the exact ``(K, N)`` shape. The kernel code reads sizes only
from here.

Paths:

* ``"decode"`` — skinny M: per scale group, ``a = x_g · (128 + c)`` on the tensor cores with the raw
  codes, then ``acc += s·a − s·(128 + z)·Σx_g`` (two FMAs per output per group, no per-weight
  scaling); optional split-K over ``split_k`` programs, summed by XLA in float32.
* ``"swap"`` — skinny M, transposed: ``yᵀ = Ŵᵀ xᵀ`` with the dequantized ``(block_n, 16)`` plane
  as the MMA's left operand (``c − z`` exact in bf16), the scale on the accumulator per group.
* ``"gemv"`` — M ≤ 16 on the CUDA cores: ``16 + c`` built in float32 bits, one FMA per weight and
  row, scales per group on the accumulator; split-K as above.
* ``"tiled"`` — prefill: each ``(128, block_n)`` weight tile (or 16-row plane, ``planes``) is
  dequantized to bf16 in registers, ``(c − z)·s``, and fed to the MMA; L2-friendly grouped
  ordering of the output tiles.
* ``"xla"`` — large M (≥ 256 on H100): one fused XLA pass dequantizes the weight to bf16, then
  XLA's ``dot`` (cuBLAS).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    path: str  # "gemv" | "decode" | "swap" | "tiled" | "xla"
    block_m: int = 16
    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8  # output tiles are visited in groups of group_m row-tiles (L2 reuse)
    planes: bool = True  # int4: one K=16 MMA per 16-row plane (else one 3-D unpack + reshape)


M_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def m_bucket(m: int) -> int:
    """The smallest bucket ``>= m`` (the last bucket for larger ``m``)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def _c(path, bm, bn, split, warps, stages) -> Config:
    return Config(path, bm, bn, split, warps, stages)


# (bits, m_bucket) -> Config; (bits, m_bucket, K, N) entries override for a tuned shape.
# Winners of `kernel_bench --autotune` on an H100 SXM (experiments/results/kernels/README.md):
# int4: swap up to M = 128 (faster than decode by 3-17 % at M <= 16, 15-27 % at M = 32, 1-62 %
# at M = 64, and than tiled by 34-50 % at M = 128); int8: decode / tiled (swap's in-kernel
# transpose of int8 tiles costs more than it saves). XLA's dequantize + bf16 dot from M = 256
# (our tiled kernel is 2-2.5x slower than cuBLAS there).
TABLE: dict[tuple, Config] = {}
for _b in (1, 2, 4, 8, 16):
    TABLE[(4, _b)] = _c("swap", 16, 128, 8, 4, 3)
    TABLE[(8, _b)] = _c("decode", 16, 128, 2, 4, 4)
TABLE[(4, 32)] = _c("swap", 32, 128, 8, 4, 3)
TABLE[(8, 32)] = _c("decode", 32, 128, 2, 4, 4)
TABLE[(4, 64)] = _c("swap", 64, 128, 4, 4, 3)
TABLE[(8, 64)] = dataclasses.replace(_c("decode", 64, 64, 1, 4, 3), planes=False)
TABLE[(4, 128)] = _c("swap", 64, 128, 2, 4, 3)
TABLE[(8, 128)] = dataclasses.replace(_c("tiled", 64, 64, 1, 4, 4), planes=False)
for _bits in (4, 8):
    for _b in M_BUCKETS[M_BUCKETS.index(256) :]:
        TABLE[(_bits, _b)] = Config("xla")


def pick(bits: int, m: int, k: int, n: int) -> Config:
    """The table's config for an ``(m, k) @ (k, n)`` product with ``bits``-bit weights."""
    b = m_bucket(m)
    return TABLE.get((bits, b, k, n)) or TABLE[(bits, b)]
