"""Probe: variants of the int4 swap kernel's inner step (sym, group 128, ``gpu_i4p`` words).

* ``fused``: the chunk's 8 planes are unpacked as one ``(BN, 8, 16)`` shift, reshaped to
  ``(BN, 128)`` and multiplied in one K = 128 MMA (instead of 8 K = 16 MMAs);
* ``xt``: ``xᵀ`` is transposed once by XLA and loaded as ``(16|128, BM)`` tiles (no in-kernel
  transpose of ``x`` per plane);
* ``wt``: the words are stored transposed, ``(N_p, K_p/8)`` (no in-kernel transpose).

    python -m experiments.w4_swap2_probe --out DIR      # on the GPU
    python -m experiments.w4_swap2_probe --smoke        # CPU, interpret mode
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qjax.kernels import calls
from qjax.kernels import repack as rp


@dataclasses.dataclass(frozen=True)
class V:
    bn: int = 64
    split_k: int = 16
    num_warps: int = 2
    num_stages: int = 3
    fused: bool = False
    xt: bool = False
    wt: bool = False


def _kernel(x_ref, w_ref, s_ref, o_ref, *, m, bm, cps, v: V):
    rows = lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    c_first = pl.program_id(1) * cps

    def x_tile(k0, kk):  # (kk, bm) bf16
        if v.xt:
            return x_ref[pl.ds(k0, kk), :]
        mask = jnp.broadcast_to(rows < m, (bm, kk))
        return plgpu.load(x_ref.at[:, pl.ds(k0, kk)], mask=mask, other=0.0).T

    def step(i, acc):
        c = c_first + i
        if v.wt:
            words = w_ref[:, pl.ds(pl.multiple_of(c * 16, 16), 16)]
        else:
            words = w_ref[pl.ds(pl.multiple_of(c * 16, 16), 16), :].T  # (bn, 16)
        k0 = pl.multiple_of(c * 128, 128)
        if v.fused:
            sh = 4 * lax.broadcasted_iota(jnp.int32, (1, 8, 1), 1)
            t = ((words[:, None, :] >> sh) & 0xF) | 0x4300
            wt = lax.bitcast_convert_type(t.reshape(words.shape[0], 128).astype(jnp.int16),
                                          jnp.bfloat16) - 136.0  # fmt: skip
            a = jnp.dot(wt, x_tile(k0, 128), preferred_element_type=jnp.float32)
        else:
            a = None
            for j in range(8):
                t = ((words >> (4 * j)) & 0xF) | 0x4300
                wt = lax.bitcast_convert_type(t.astype(jnp.int16), jnp.bfloat16) - 136.0
                aj = jnp.dot(wt, x_tile(pl.multiple_of(k0 + 16 * j, 16), 16),
                             preferred_element_type=jnp.float32)  # fmt: skip
                a = aj if a is None else a + aj
        s = s_ref[pl.ds(c, 1), :].astype(jnp.float32).T  # (bn, 1)
        return acc + a * s

    bn = w_ref.shape[0] if v.wt else w_ref.shape[1]
    acc = lax.fori_loop(0, cps, step, jnp.zeros((bn, bm), jnp.float32))
    o_ref[...] = acc.T


@functools.partial(jax.jit, static_argnames=("v", "interpret"))
def swap2(x2, words, scales, v: V, interpret=False):
    m, k_p = x2.shape
    n_p = words.shape[0] if v.wt else words.shape[1]
    bm = max(16, pl.next_power_of_2(m))
    m_tiles = 1
    if m > 64:
        bm, m_tiles = 64, pl.cdiv(m, 64)
    mp = bm * m_tiles
    xp = jnp.pad(x2, [(0, mp - m), (0, 0)]) if mp > m else x2
    chunks = k_p // 128
    split = calls.largest_divisor_at_most(chunks, v.split_k)
    bn = v.bn
    if v.xt:
        xp = xp.T
        x_spec = pl.BlockSpec((k_p, bm), lambda n, s, mi: (0, mi))
    else:
        x_spec = pl.BlockSpec((bm, k_p), lambda n, s, mi: (mi, 0))
    if v.wt:
        w_spec = pl.BlockSpec((bn, words.shape[1]), lambda n, s, mi: (n, 0))
    else:
        w_spec = pl.BlockSpec((words.shape[0], bn), lambda n, s, mi: (0, n))
    y = pl.pallas_call(
        functools.partial(_kernel, m=mp, bm=bm, cps=chunks // split, v=v),
        out_shape=jax.ShapeDtypeStruct((split, mp, n_p), jnp.float32),
        grid=(n_p // bn, split, m_tiles),
        in_specs=[x_spec, w_spec, pl.BlockSpec((scales.shape[0], bn), lambda n, s, mi: (0, n))],
        out_specs=pl.BlockSpec((None, bm, bn), lambda n, s, mi: (s, mi, n)),
        compiler_params=plgpu.CompilerParams(num_warps=v.num_warps, num_stages=v.num_stages),
        interpret=interpret,
        name="qjax_w4_swap2",
    )(xp, words, scales)
    return calls.sum_splits(y, x2.dtype)[:m]


def weights(k, n, seed, wt):
    from experiments.kernel_bench import random_weight

    w = random_weight("w4g128", k, n, seed)
    return w, (w.codes.T if wt else w.codes)


def check(k, n, m, v, interpret):
    w, words = weights(k, n, 0, v.wt)
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    ref = jnp.dot(x.astype(jnp.float32), rp.dequantize_bf16(w).astype(jnp.float32))
    y = swap2(x, words, w.scales, v, interpret).astype(jnp.float32)
    return float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))


VARIANTS = [
    V(),
    V(fused=True),
    V(xt=True),
    V(fused=True, xt=True),
    V(wt=True, xt=True),
    V(fused=True, xt=True, wt=True),
    V(128, 8, 4, 3, fused=True, xt=True),
    V(128, 8, 4, 3, xt=True),
    V(64, 8, 2, 4, fused=True, xt=True),
    V(128, 16, 4, 3, fused=True, xt=True, wt=True),
    V(64, 16, 4, 3, fused=True, xt=True),
    V(32, 16, 1, 3, fused=True, xt=True),
]


def run(rows, deadline, cases):
    from experiments.kernel_bench import calls_for, device_time, n_buffers, roofline_us
    from qjax.kernels.gpu.int_matmul import int_matmul

    for v in (V(), V(fused=True, xt=True, wt=True)):
        for m in (1, 16, 128):
            print("check", m, v, check(8192, 1024, m, v, False), flush=True)
    for n, k, m in cases:
        if time.time() > deadline:
            return
        bufs = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(2)]
        x = jax.random.normal(jax.random.key(9), (m, k), jnp.bfloat16)
        nc = calls_for(roofline_us(n, k, m, 2 * n * k))
        row = {"N": n, "K": k, "M": m, "variants": {}}
        row["bf16_us"] = device_time(jax.jit(jnp.dot), [(x, b) for b in bufs], nc)["us"]
        del bufs
        w0, _ = weights(k, n, 0, False)
        ws = [w0] + [weights(k, n, i, False)[0] for i in range(1, n_buffers(w0.nbytes))]
        row["roofline_us"] = roofline_us(n, k, m, w0.nbytes)
        f = jax.jit(lambda x, w: int_matmul(x, w))
        row["table_us"] = device_time(f, [(x, w) for w in ws], nc)["us"]
        wts = [w.codes.T for w in ws]
        for v in VARIANTS:
            if time.time() > deadline:
                break
            g = jax.jit(functools.partial(swap2, v=v))
            args = [(x, wt if v.wt else w.codes, w.scales) for w, wt in zip(ws, wts, strict=True)]
            try:
                row["variants"][str(v)] = device_time(g, args, nc)["us"]
            except Exception as e:  # noqa: BLE001 — a probe records failures
                print("fail", v, type(e).__name__, str(e)[:300], flush=True)
        best = sorted(row["variants"].items(), key=lambda kv: kv[1])[:3]
        print(f"N={n} K={k} M={m} bf16 {row['bf16_us']:.1f} table {row['table_us']:.1f} "
              f"roof {row['roofline_us']:.1f} best {best}", flush=True)  # fmt: skip
        rows.append(row)
        del ws, wts


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--budget-s", type=float, default=200)
    a = p.parse_args(argv)
    if a.smoke:
        for m in (1, 5, 16, 100):
            for v in (V(bn=64, split_k=2), V(bn=64, split_k=2, fused=True, xt=True, wt=True)):
                print(m, v, check(256, 128, m, v, True))
        return
    cases = [(8192, 8192, 1), (8192, 8192, 16), (57344, 8192, 16), (8192, 28672, 1),
             (8192, 8192, 64), (8192, 8192, 128), (57344, 8192, 128)]  # fmt: skip
    rows: list = []
    run(rows, time.time() + a.budget_s, cases)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "w4_swap2_probe.json"), "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
