"""W4A16 / W8A16 uniform-int matmul for TPU in Pallas (Mosaic TPU), float32 accumulation.

Computes ``y = x @ Ŵ`` for bf16 ``x: (M, K)`` and an :class:`~qjax.formats.Int` weight
repacked to ``"tpu_i4"`` / ``"tpu_i8"`` (:mod:`qjax.kernels.repack`),
``Ŵ[k, n] = (c[k, n] − z) · s[g(k), n]``.

Grid ``(M / bm, N / bn, K / bk)`` with the K axis innermost and sequential ("arbitrary"): each step
loads an ``(bm, bk)`` tile of ``x`` and the ``bk`` rows of codes of a ``(bk, bn)`` weight tile into
VMEM, unpacks them (int4: the low and high nibbles of a ``(bk/2, bn)`` byte tile are the two
contiguous halves of each 128-row chunk — a mask and a shift, no lane shuffles), applies
``(c − z) · s`` per scale group in float32, rounds to bf16 and accumulates one MXU ``dot`` into a
float32 VMEM scratch; the last K step writes the bf16 output. ``x`` rows are padded to ``bm`` and
``K`` to the repacked ``K_p``.

**No TPU was available**: the kernel is tested on CPU in Pallas interpret mode only
(``tests/kernels/test_tpu_int_matmul.py``); its block sizes are reasonable defaults, not tuned.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax.errors import ShapeError
from qjax.kernels import calls
from qjax.kernels import repack as rp
from qjax.qarray import QArray

CHUNK = rp.CHUNK
LAYOUTS = ("tpu_i4", "tpu_i8")


@dataclasses.dataclass(frozen=True)
class Config:
    """Tile sizes: rows ``block_m``, columns ``block_n`` (multiple of 128), K rows ``block_k``."""

    block_m: int = 128
    block_n: int = 256
    block_k: int = 512


def pick(m: int, k_p: int, n_p: int, group: int | str) -> Config:
    """Defaults: bf16 sublane-aligned rows, 128-multiple columns, K steps that nest with groups."""
    bm = min(256, max(16, pl.next_power_of_2(m)))
    bn = 256 if n_p % 256 == 0 else 128
    bk = max(d for d in (512, 256, 128) if k_p % d == 0)
    if isinstance(group, int) and group > CHUNK and group % bk:
        bk = CHUNK  # a group spans whole K steps or a K step whole groups
    return Config(bm, bn, bk)


def _kernel(x_ref, w_ref, s_ref, *rest, bits, sym, gk, bk, n_k):
    z_ref, o_ref, acc_ref = (None, *rest) if sym else rest
    kstep = pl.program_id(2)

    @pl.when(kstep == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    raw = w_ref[...].astype(jnp.int32)
    if bits == 4:  # (bk/2, bn) bytes -> (bk, bn) codes: per 128-row chunk, low half then high
        codes = rp.split_halves(raw)
        zero_sym = 8.0
    else:  # signed c - 128
        codes = raw + 128
        zero_sym = 128.0
    c = codes.astype(jnp.float32)
    s = s_ref[...].astype(jnp.float32)  # (bk/g, bn) or (1, bn)
    z = zero_sym if sym else z_ref[...].astype(jnp.float32)
    per = max(bk // gk, 1)  # scale groups in this K step
    bn = c.shape[-1]
    c = c.reshape(per, bk // per, bn)
    s = s.reshape(per, 1, bn)
    z = z if sym else z.reshape(per, 1, bn)
    w = ((c - z) * s).reshape(bk, bn).astype(jnp.bfloat16)
    acc_ref[...] += jnp.dot(x_ref[...], w, preferred_element_type=jnp.float32)

    @pl.when(kstep == n_k - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How one K-stepped TPU call tiles ``x2 (M_p, K_p) @ w (K_p, N_p)`` (shared by both kernels):
    ``gk`` rows per scale group, the code rows per K step, and the block specs."""

    gk: int
    rows_w: int
    x_spec: pl.BlockSpec
    w_spec: pl.BlockSpec
    s_spec: pl.BlockSpec  # scales (and zeros): per channel, groups in a K step, or steps in a group


def tiling(name: str, x2, w: QArray, cfg: Config) -> Tiling:
    m_p, k_p = x2.shape
    n_p = w.scales.shape[1]
    g = w.spec.group
    gk = k_p if g == "channel" else g
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if m_p % bm or n_p % bn or k_p % bk or not (bk % gk == 0 or gk % bk == 0):
        raise ShapeError(f"{name}: {cfg} does not tile ({m_p}, {k_p}) x ({k_p}, {n_p})")
    if gk == k_p:  # per channel: one scale row
        s_spec = pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
    elif gk <= bk:
        s_spec = pl.BlockSpec((bk // gk, bn), lambda i, j, k: (k, j))
    else:  # one group spans gk / bk K steps: block of one row, its index is the group
        s_spec = pl.BlockSpec((1, bn), lambda i, j, k: (k * bk // gk, j))
    rows_w = bk * rp.LAYOUTS[w.layout] // 8
    return Tiling(
        gk,
        rows_w,
        pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
        pl.BlockSpec((rows_w, bn), lambda i, j, k: (k, j)),
        s_spec,
    )


def k_stepped_call(kernel, x2, n_p: int, cfg: Config, in_specs, args, name: str, interpret: bool):
    """The ``pallas_call`` of both TPU kernels: grid ``(M/bm, N/bn, K/bk)``, K last and sequential,
    a float32 VMEM accumulator, bf16 ``(bm, bn)`` output blocks."""
    m_p, k_p = x2.shape
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_p, n_p), x2.dtype),
        grid=(m_p // bm, n_p // bn, k_p // bk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name=name,
    )(*args)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _pallas_matmul(x2, w: QArray, cfg: Config, interpret: bool):
    t = tiling("tpu int_matmul", x2, w, cfg)
    bits = rp.LAYOUTS[w.layout]
    sym = w.spec.symmetric
    in_specs = [t.x_spec, t.w_spec, t.s_spec]
    args = [x2, w.codes, w.scales]
    if not sym:
        in_specs.append(t.s_spec)
        args.append(w.zeros)
    k_p = x2.shape[1]
    kernel = functools.partial(
        _kernel, bits=bits, sym=sym, gk=t.gk, bk=cfg.block_k, n_k=k_p // cfg.block_k
    )
    n_p = w.scales.shape[1]
    return k_stepped_call(kernel, x2, n_p, cfg, in_specs, args, f"qjax_tpu_w{bits}", interpret)


def supports(x: jax.Array, w: QArray) -> bool:
    """Registry predicate: bf16 activations and a weight in ``tpu_i4`` / ``tpu_i8``."""
    return calls.supports(x, w, LAYOUTS)


def padded_call(pallas_matmul, x: jax.Array, w: QArray, config: Config | None, interpret: bool):
    """``x (..., K)`` → rows padded to ``K_p`` and to a multiple of ``block_m``, the kernel's
    ``pallas_matmul(x2, w, cfg, interpret)``, then the padding dropped (both TPU kernels)."""
    k, n = w.shape
    lead = x.shape[:-1]
    k_p = w.codes.shape[0] * (8 // rp.LAYOUTS[w.layout])  # nibble layouts pack 2 rows a byte
    x2 = calls.as_rows(x, k_p)
    m = x2.shape[0]
    cfg = config or pick(m, k_p, w.scales.shape[1], w.spec.group)
    m_p = -(-m // cfg.block_m) * cfg.block_m
    x2 = jnp.pad(x2, [(0, m_p - m), (0, 0)])
    y = pallas_matmul(x2, w, cfg, interpret)
    return y[:m, :n].reshape(*lead, n)


def int_matmul(
    x: jax.Array, w: QArray, *, config: Config | None = None, interpret: bool = False
) -> jax.Array:
    """``x @ dequantize(w)`` for bf16 ``x: (..., K)`` and a ``tpu_i4`` / ``tpu_i8`` weight."""
    calls.check("tpu int_matmul", x, w, LAYOUTS)
    return padded_call(_pallas_matmul, x, w, config, interpret)


__all__ = ["LAYOUTS", "Config", "int_matmul", "pick", "supports"]
