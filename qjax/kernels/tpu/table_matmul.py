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

from qjax.kernels import calls
from qjax.kernels import repack as rp
from qjax.kernels.gpu.table_matmul import f8_to_f16, f8_unit, nf4_select
from qjax.kernels.tpu.int_matmul import Config, k_stepped_call, padded_call, pick, tiling
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
    t = tiling("tpu table_matmul", x2, w, cfg)
    k_p = x2.shape[1]
    fmt = "nf4" if w.layout == "tpu_nf4" else w.spec.fmt
    bk = cfg.block_k
    kernel = functools.partial(
        _kernel, fmt=fmt, gk=t.gk, bk=bk, n_k=k_p // bk, per_call=t.gk == k_p
    )
    in_specs = [t.x_spec, t.w_spec, t.s_spec]
    args = (x2, w.codes, w.scales)
    n_p = w.scales.shape[1]
    return k_stepped_call(kernel, x2, n_p, cfg, in_specs, args, f"qjax_tpu_{fmt}", interpret)


def supports(x: jax.Array, w: QArray) -> bool:
    """Registry predicate: bf16 activations and a weight in ``tpu_nf4`` / ``tpu_f8``."""
    return calls.supports(x, w, LAYOUTS)


def table_matmul(
    x: jax.Array, w: QArray, *, config: Config | None = None, interpret: bool = False
) -> jax.Array:
    """``x @ dequantize(w)`` for bf16 ``x: (..., K)`` and a ``tpu_nf4`` / ``tpu_f8`` weight."""
    calls.check("tpu table_matmul", x, w, LAYOUTS)
    return padded_call(_pallas_matmul, x, w, config, interpret)


__all__ = ["LAYOUTS", "Config", "pick", "supports", "table_matmul"]
