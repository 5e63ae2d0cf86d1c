"""NF4 and FP8 weight-only matmul in Pallas (Triton lowering), bf16 activations, f32 accumulation.

Computes ``y = x @ Ŵ`` for bf16 ``x: (M, K)`` and a weight repacked by
:func:`qjax.kernels.repack.repack` into ``"gpu_nf4"`` (``Ŵ[k, n] = L[c[k, n]] · a[g(k), n]``, ``L``
the 16 NF4 levels of QLoRA, ``a`` the block absmax) or ``"gpu_f8"`` (``Ŵ[k, n] = f8(c[k, n]) ·
s[g(k), n]``), with ``g(k) = k // group``.

Codes are decoded in registers, 16 K-rows ("a plane") at a time, to unscaled bf16 table values
and fed to one ``K = 16`` tensor-core dot per plane; each group's scale then multiplies the
float32 accumulator once (per-channel scales: once per call):

* **NF4** — a nibble is mapped to its level by a 4-level select tree on its bits (15 selects),
  since Triton has no register-file table lookup;
* **FP8 e4m3** — the byte ``s eeee mmm`` becomes the float16 bit pattern ``s 0eeee mmm 0000000``
  (two masks, two shifts), which is exactly ``value · 2⁻⁸`` for normal *and* subnormal e4m3
  (float16's subnormals cover e4m3's), converted exactly to bf16, the ``256`` folded into the
  scale; **e5m2** is the high byte of a float16, ``value = f16(c << 8)``. No float8 type is
  needed in the kernel.

A split-K grid (float32 partials summed by XLA) keeps skinny-M calls spread over the SMs; from
``XLA_FROM_M`` rows on, the weight is dequantized by one fused XLA pass and multiplied by XLA's
bf16 ``dot`` (as the int kernels do at large M).

Measured on the H100 (``experiments/results/kernels/README.md``): at M ≤ 16 FP8 runs at
1.0–1.4× XLA's bf16 dot and NF4 at 0.45–0.6× (its select tree costs ~3× int4's unpack).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qjax.formats.nf4 import nf4_levels
from qjax.kernels import calls
from qjax.kernels import repack as rp
from qjax.qarray import QArray

CHUNK = rp.CHUNK
LAYOUTS = ("gpu_nf4", "gpu_f8")
XLA_FROM_M = 256  # rows of x from which dequantize + XLA dot is used


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes of one call: rows ``block_m``, columns ``block_n``, K split ``split_k``."""

    block_m: int = 16
    block_n: int = 64
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


def pick(m: int, k: int, n: int, layout: str = "gpu_f8") -> Config:
    """Block sizes: 16-row tiles for decode, 64 columns for NF4 (its select tree is register
    heavy) and 128 for FP8, and the smallest split of the K chunks that gives ≥ 2 waves of 132
    SMs (H100 autotune, ``experiments/results/kernels/README.md``)."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    bn = 64 if layout == "gpu_nf4" or n < 4096 else 128
    tiles = -(-m // bm) * -(-n // bn)
    chunks = max(1, k // CHUNK)
    want = -(-264 // tiles)
    divisors = [d for d in range(1, chunks + 1) if chunks % d == 0]
    split = min([d for d in divisors if d >= want] or [divisors[-1]])
    return Config(bm, bn, split)


def nf4_select(c: jax.Array, dtype=jnp.float32) -> jax.Array:
    """NF4 level of each 4-bit code ``c`` (int32) as ``dtype``: a select tree on its bits."""
    vals = [jnp.asarray(float(v), dtype) for v in nf4_levels()]
    for bit in range(4):
        b = ((c >> bit) & 1) == 1
        vals = [jnp.where(b, vals[2 * i + 1], vals[2 * i]) for i in range(len(vals) // 2)]
    return vals[0]


def f8_to_f16(c: jax.Array, fmt: str) -> jax.Array:
    """float16 ``f8(c) · 2^-8`` (e4m3) or ``f8(c)`` (e5m2), exact, of bit patterns ``c`` (int32).

    e4m3 ``s eeee mmm`` becomes float16 ``s 0eeee mmm 0000000``: normal and subnormal e4m3 values
    land on float16 values ``2^-8`` times as large (float16's subnormals cover e4m3's)."""
    if fmt == "e5m2":
        h = c << 8
    else:
        h = ((c & 0x7F) << 7) | ((c & 0x80) << 8)
    return lax.bitcast_convert_type(h.astype(jnp.int16), jnp.float16)


def f8_unit(fmt: str) -> float:
    """The factor :func:`f8_to_f16` leaves out: value = f16 · unit."""
    return 256.0 if fmt == "e4m3" else 1.0


def f8_to_f32(c: jax.Array, fmt: str) -> jax.Array:
    """Exact float32 value of fp8 bit patterns ``c`` (int32 holding 0..255), no float8 type."""
    return f8_to_f16(c, fmt).astype(jnp.float32) * f8_unit(fmt)


def _kernel(x_ref, w_ref, s_ref, o_ref, *, fmt, gk, m, bm, cps, k_p):
    """Per scale group ``G``: ``acc += s_G · Σ_{k∈G} x_k · v(c_k)`` — the MMAs see the unscaled
    table values ``v`` (NF4 levels in bf16, FP8 values ``· 2^-8`` exactly in bf16), the scale
    multiplies the float32 accumulator once per group (per call for per-channel scales)."""
    rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    row_ok = rows < m
    mask = jnp.broadcast_to(row_ok, (bm, 16))
    c_first = pl.program_id(2) * cps
    bn = o_ref.shape[-1]
    unit = 1.0 if fmt == "nf4" else f8_unit(fmt)
    per_call = gk >= k_p  # one scale row (per-channel): applied after the loop
    planes_per_group = 8 if gk >= CHUNK else gk // 16

    def scale(gi):
        return s_ref[pl.ds(gi, 1), :].astype(jnp.float32) * unit

    def step(i, acc):
        c = c_first + i
        if fmt == "nf4":
            words = w_ref[pl.ds(pl.multiple_of(c * 16, 16), 16), :]
        a = None
        for j in range(8):
            k0 = pl.multiple_of(c * CHUNK + 16 * j, 16)
            if fmt == "nf4":
                wt = nf4_select((words >> (4 * j)) & 0xF, jnp.bfloat16)
            else:
                c8 = w_ref[pl.ds(k0, 16), :].astype(jnp.int32)
                wt = f8_to_f16(c8, fmt).astype(jnp.bfloat16)  # exact: 3 mantissa bits
            xj = plgpu.load(x_ref.at[:, pl.ds(k0, 16)], mask=mask, other=0.0)
            aj = jnp.dot(xj, wt, preferred_element_type=jnp.float32)
            a = aj if a is None else a + aj
            if (j + 1) % planes_per_group == 0:
                acc = acc + (a if per_call else a * scale((c * CHUNK + 16 * j) // gk))
                a = None
        return acc

    acc = lax.fori_loop(0, cps, step, jnp.zeros((bm, bn), jnp.float32))
    if per_call:
        acc = acc * scale(0)
    plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=jnp.broadcast_to(row_ok, (bm, bn)))


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _pallas_matmul(x2, w: QArray, cfg: Config, interpret: bool):
    m, k_p = x2.shape
    n_p = w.scales.shape[1]
    g = w.spec.group
    gk = k_p if g == "channel" else g
    fmt = "nf4" if w.layout == "gpu_nf4" else w.spec.fmt
    bm, bn = cfg.block_m, cfg.block_n
    while n_p % bn:
        bn //= 2
    chunks = k_p // CHUNK
    split = calls.largest_divisor_at_most(chunks, cfg.split_k)
    grid = (pl.cdiv(m, bm), n_p // bn, split)
    in_specs = [
        pl.BlockSpec((bm, k_p), lambda i, j, s: (i, 0)),
        pl.BlockSpec((w.codes.shape[0], bn), lambda i, j, s: (0, j)),
        pl.BlockSpec((w.scales.shape[0], bn), lambda i, j, s: (0, j)),
    ]
    out_shape, out_spec = calls.split_k_output(
        split, m, n_p, bm, bn, x2.dtype, lambda i, j, s: (i, j), lambda i, j, s: s
    )
    kernel = functools.partial(_kernel, fmt=fmt, gk=gk, m=m, bm=bm, cps=chunks // split, k_p=k_p)
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"qjax_{fmt}_matmul",
    )(x2, w.codes, w.scales)
    return calls.sum_splits(y, x2.dtype)


def supports(x: jax.Array, w: QArray) -> bool:
    """Registry predicate: bf16 activations and a weight in ``gpu_nf4`` / ``gpu_f8``."""
    return calls.supports(x, w, LAYOUTS)


def table_matmul(
    x: jax.Array, w: QArray, *, config: Config | None = None, interpret: bool = False
) -> jax.Array:
    """``x @ dequantize(w)`` for bf16 ``x: (..., K)`` and a repacked NF4 / FP8 weight ``(K, N)``.

    ``config`` forces the Pallas kernel with those block sizes (any M); ``interpret=True`` runs
    it in interpret mode (any backend, used by the CPU tests).
    """
    calls.check("table_matmul", x, w, LAYOUTS)
    k, n = w.shape
    lead = x.shape[:-1]
    x2 = calls.as_rows(x, w.codes.shape[0] * (8 if w.layout == "gpu_nf4" else 1))
    if config is None and x2.shape[0] >= XLA_FROM_M:
        y = calls.dequantized_matmul(x2, w)
    else:
        cfg = config or pick(x2.shape[0], x2.shape[1], n, w.layout)
        y = _pallas_matmul(x2, w, cfg, interpret)
    return y[:, :n].reshape(*lead, n)


__all__ = [
    "LAYOUTS",
    "Config",
    "f8_to_f16",
    "f8_to_f32",
    "nf4_select",
    "pick",
    "supports",
    "table_matmul",
]
