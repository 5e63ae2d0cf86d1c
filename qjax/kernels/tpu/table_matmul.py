"""NF4 / FP8 weight-only matmul for TPU in Pallas (Mosaic TPU), bf16 activations, f32 accumulation.

Computes ``y = x @ Ŵ`` for bf16 ``x: (M, K)`` and a weight repacked by
:func:`qjax.kernels.repack.repack` into ``"tpu_nf4"`` (``Ŵ[k, n] = L[c[k, n]] · a[g(k), n]``, ``L``
the 16 NF4 levels, ``a`` the float32 block absmax, double quantization decoded at repack time) or
``"tpu_f8"`` (``Ŵ[k, n] = f8(c[k, n]) · s[g(k), n]``, e4m3 or e5m2), ``g(k) = k // group``.

Same grid and tiling as the int kernel (:mod:`qjax.kernels.tpu.int_matmul`, whose ``Config`` and
``pick`` are reused): ``(M / bm, N / bn, K / bk)``, the K axis innermost and sequential
("arbitrary"), a float32 ``(bm, bn)`` VMEM accumulator, bf16 output written at the last K step.
Each step decodes its ``(bk, bn)`` weight tile in VMEM with the GPU kernel's decoders
(:mod:`qjax.kernels.gpu.table_matmul`): NF4 nibbles (unpacked from the ``"tpu_i4"`` half-split
bytes with a mask and a shift) go through :func:`nf4_select`, a select tree on the code's bits (no
table gather on the VPU); FP8 bytes through :func:`f8_to_f16`, the exact float16 bit pattern of
``f8(c) · 2⁻⁸`` (e4m3) or ``f8(c)`` (e5m2), the factor :func:`f8_unit` folded into the scale.

**Scaling — per element for groups, on the accumulator per channel.** With group scales (NF4
blocks of 32 / 64 / 128 / …, FP8 groups) the decoded values are multiplied by their group's scale
in float32, rounded to bf16, and the tile goes to the MXU as *one* ``dot`` of depth ``bk``, as the
int kernel does. Scaling the accumulator per group instead (the GPU kernel's choice) would cut
each K step into ``bk / group`` dots of depth 32–128, underfilling the 128- / 256-deep MXU, and
add a ``(bm, bn)`` float32 multiply-add per group; the per-element multiply is one VPU op next to
the 15 selects of the NF4 decode, and the tile is rounded as ``repack.dequantize_bf16`` rounds
it. With a single scale row (FP8 ``group="channel"``, or one group covering all of K) the MXU gets
the unscaled values (fp8 values are exact in bf16) and the accumulator is scaled once, at the last
K step: no per-element multiply, no rounding of the product.

``x`` rows are padded to ``bm`` and ``K`` to the repacked ``K_p``; padded weight rows and columns
have code 0 and scale 0.

**No TPU was available**: the kernel is tested on CPU in Pallas interpret mode only
(``tests/kernels/test_tpu_table_matmul.py``); its block sizes are the int kernel's untuned defaults,
and whether Mosaic lowers every op of the decoders (the FP8 path goes through int16 / float16) on a
given TPU generation is unverified.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from qjax.errors import ShapeError
from qjax.kernels import calls
from qjax.kernels import repack as rp
from qjax.kernels.gpu.table_matmul import f8_to_f16, f8_unit, nf4_select
from qjax.kernels.tpu.int_matmul import Config, pick
from qjax.qarray import QArray

LAYOUTS = ("tpu_nf4", "tpu_f8")


def _kernel(x_ref, w_ref, s_ref, o_ref, acc_ref, *, fmt, gk, bk, n_k, per_call):
    kstep = pl.program_id(2)

    @pl.when(kstep == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    raw = w_ref[...].astype(jnp.int32)
    if fmt == "nf4":  # (bk/2, bn) bytes -> (bk, bn) levels
        v = nf4_select(rp.split_halves(raw), jnp.float32)
    else:  # (bk, bn) fp8 bytes -> values / unit, exact
        v = f8_to_f16(raw, fmt).astype(jnp.float32)
    unit = 1.0 if fmt == "nf4" else f8_unit(fmt)
    if per_call:  # exact unscaled values; the one scale row multiplies the accumulator at the end
        w = v.astype(jnp.bfloat16)
    else:
        s = s_ref[...].astype(jnp.float32) * unit  # (bk/g, bn) or (1, bn)
        per = max(bk // gk, 1)  # scale groups in this K step
        bn = v.shape[-1]
        w = (v.reshape(per, bk // per, bn) * s.reshape(per, 1, bn)).reshape(bk, bn)
        w = w.astype(jnp.bfloat16)
    acc_ref[...] += jnp.dot(x_ref[...], w, preferred_element_type=jnp.float32)

    @pl.when(kstep == n_k - 1)
    def _():
        acc = acc_ref[...]
        if per_call:
            acc = acc * (s_ref[...].astype(jnp.float32) * unit)
        o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _pallas_matmul(x2, w: QArray, cfg: Config, interpret: bool):
    m_p, k_p = x2.shape
    n_p = w.scales.shape[1]
    g = w.spec.group
    gk = k_p if g == "channel" else g
    fmt = "nf4" if w.layout == "tpu_nf4" else w.spec.fmt
    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    if m_p % bm or n_p % bn or k_p % bk or not (bk % gk == 0 or gk % bk == 0):
        raise ShapeError(f"tpu table_matmul: {cfg} does not tile ({m_p}, {k_p}) x ({k_p}, {n_p})")
    rows_w = bk // 2 if fmt == "nf4" else bk
    if gk == k_p:  # per channel: one scale row
        s_spec = pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
    elif gk <= bk:
        s_spec = pl.BlockSpec((bk // gk, bn), lambda i, j, k: (k, j))
    else:  # one group spans gk / bk K steps: block of one row, its index is the group
        s_spec = pl.BlockSpec((1, bn), lambda i, j, k: (k * bk // gk, j))
    kernel = functools.partial(_kernel, fmt=fmt, gk=gk, bk=bk, n_k=k_p // bk, per_call=gk == k_p)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_p, n_p), x2.dtype),
        grid=(m_p // bm, n_p // bn, k_p // bk),
        in_specs=[
            pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((rows_w, bn), lambda i, j, k: (k, j)),
            s_spec,
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name=f"qjax_tpu_{fmt}",
    )(x2, w.codes, w.scales)


def supports(x: jax.Array, w: QArray) -> bool:
    """Registry predicate: bf16 activations and a weight in ``tpu_nf4`` / ``tpu_f8``."""
    return calls.supports(x, w, LAYOUTS)


def table_matmul(
    x: jax.Array, w: QArray, *, config: Config | None = None, interpret: bool = False
) -> jax.Array:
    """``x @ dequantize(w)`` for bf16 ``x: (..., K)`` and a ``tpu_nf4`` / ``tpu_f8`` weight."""
    calls.check("tpu table_matmul", x, w, LAYOUTS)
    k, n = w.shape
    lead = x.shape[:-1]
    k_p = w.codes.shape[0] * (2 if w.layout == "tpu_nf4" else 1)
    x2 = calls.as_rows(x, k_p)
    m = x2.shape[0]
    cfg = config or pick(m, k_p, w.scales.shape[1], w.spec.group)
    m_p = -(-m // cfg.block_m) * cfg.block_m
    x2 = jnp.pad(x2, [(0, m_p - m), (0, 0)])
    y = _pallas_matmul(x2, w, cfg, interpret)
    return y[:m, :n].reshape(*lead, n)


__all__ = ["LAYOUTS", "Config", "pick", "supports", "table_matmul"]
