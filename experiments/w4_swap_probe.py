"""Probe: int4 decode with the weight as the MMA's *left* operand ("swap A/B").

The decode kernel in :mod:`qjax.kernels.gpu.int_matmul` computes ``(M, K) @ (K, BN)`` tiles with the
unpacked weights as the right operand. With M ≤ 16 that MMA is mostly padding, and on Hopper the
right operand of a warpgroup MMA must sit in shared memory, so every unpacked plane takes a
register → shared → MMA round trip. Here the product is transposed, ``yᵀ = Ŵᵀ xᵀ``: the weight
tile ``(BN, 16)`` is the left operand (it may stay in registers), ``xᵀ`` the small right one.

Codes: ``codes_t = gpu_i4p codes transposed`` ``(N_p, K_p/8)`` (word ``[n, 16c + r]`` holds, in
nibble ``j``, the code of ``k = 128c + 16j + r``). One ``lop3`` per word and shift gives two bf16
``128 + c`` (planes ``j`` and ``j + 4``, bits ``4j`` and ``16 + 4j``), one ``fma.bf16x2`` subtracts
the symmetric zero point ``128 + 8`` exactly, so the MMA sees ``c − 8`` and the scale multiplies
the float32 accumulator once per group.

    python -m experiments.w4_swap_probe --out DIR          # on the GPU
    python -m experiments.w4_swap_probe --smoke            # CPU, interpret mode, correctness
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

from experiments.kernel_bench import kernel_breakdown
from qjax.kernels import calls
from qjax.kernels import repack as rp
from qjax.kernels.gpu.int_matmul import int_matmul


def unpack_planes(words):
    """int32 words → 8 bf16 planes ``c_j − 8`` (exact: ``128 + c`` by bit OR, minus 136)."""
    out = []
    for j in range(8):
        t = ((words >> (4 * j)) & 0xF) | 0x4300
        out.append(lax.bitcast_convert_type(t.astype(jnp.int16), jnp.bfloat16) - 136.0)
    return out


@dataclasses.dataclass(frozen=True)
class Probe:
    bn: int = 128
    split_k: int = 4
    num_warps: int = 4
    num_stages: int = 4
    transposed: bool = True  # codes stored (N_p, K_p/8); else gpu_i4p's (K_p/8, N_p), loaded + .T


def _kernel(x_ref, w_ref, s_ref, o_ref, *, m, bm, cps, transposed):
    rows = lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    mask = jnp.broadcast_to(rows < m, (bm, 16))
    c_first = pl.program_id(1) * cps

    def step(i, acc):
        c = c_first + i
        if transposed:
            words = w_ref[:, pl.ds(pl.multiple_of(c * 16, 16), 16)]  # (bn, 16) int32
        else:
            words = w_ref[pl.ds(pl.multiple_of(c * 16, 16), 16), :].T
        planes = unpack_planes(words)
        a = None
        for j in range(8):
            k0 = pl.multiple_of(c * rp.CHUNK + 16 * j, 16)
            xj = plgpu.load(x_ref.at[:, pl.ds(k0, 16)], mask=mask, other=0.0)  # (bm, 16)
            aj = jnp.dot(planes[j], xj.T, preferred_element_type=jnp.float32)  # (bn, bm)
            a = aj if a is None else a + aj
        if transposed:
            s = s_ref[:, pl.ds(c, 1)].astype(jnp.float32)  # (bn, 1), group 128 = one chunk
        else:
            s = s_ref[pl.ds(c, 1), :].astype(jnp.float32).T
        return acc + a * s

    bn = w_ref.shape[0] if transposed else w_ref.shape[1]
    acc = lax.fori_loop(0, cps, step, jnp.zeros((bn, bm), jnp.float32))
    o_ref[...] = acc.T


@functools.partial(jax.jit, static_argnames=("probe", "interpret"))
def swap_matmul(x2, codes_t, scales_t, probe: Probe, interpret: bool = False):
    m, k_p = x2.shape
    t = probe.transposed
    n_p = codes_t.shape[0] if t else codes_t.shape[1]
    bm = max(16, pl.next_power_of_2(m))
    chunks = k_p // rp.CHUNK
    split = calls.largest_divisor_at_most(chunks, probe.split_k)
    bn = probe.bn
    kernel = functools.partial(
        _kernel,
        m=m,
        bm=bm,
        cps=chunks // split,
        transposed=t,
    )
    if t:
        w_spec = pl.BlockSpec((bn, codes_t.shape[1]), lambda n, s: (n, 0))
        s_spec = pl.BlockSpec((bn, scales_t.shape[1]), lambda n, s: (n, 0))
    else:
        w_spec = pl.BlockSpec((codes_t.shape[0], bn), lambda n, s: (0, n))
        s_spec = pl.BlockSpec((scales_t.shape[0], bn), lambda n, s: (0, n))
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, bm, n_p), jnp.float32),
        grid=(n_p // bn, split),
        in_specs=[
            pl.BlockSpec((bm, k_p), lambda n, s: (0, 0)),
            w_spec,
            s_spec,
        ],
        out_specs=pl.BlockSpec((None, bm, bn), lambda n, s: (s, 0, n)),
        compiler_params=plgpu.CompilerParams(
            num_warps=probe.num_warps, num_stages=probe.num_stages
        ),
        interpret=interpret,
        name="qjax_w4_swap",
    )(jnp.pad(x2, [(0, bm - m), (0, 0)]) if bm > m else x2, codes_t, scales_t)
    return jnp.sum(y, axis=0)[:m].astype(x2.dtype)


def make_weight(k, n, seed):
    from experiments.kernel_bench import random_weight

    w = random_weight("w4g128", k, n, seed)
    return w, w.codes.T, w.scales.T


def check(k, n, m, probe, interpret):
    w, ct, st = make_weight(k, n, 0)
    if not probe.transposed:
        ct, st = w.codes, w.scales
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    ref = jnp.dot(x.astype(jnp.float32), rp.dequantize(w).astype(jnp.float32))
    y = swap_matmul(x, ct, st, probe, interpret).astype(jnp.float32)
    err = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
    return err


def w8a8_bf16_out(x, q):
    """W8A8 e4m3 with the GEMM writing bf16 (f32 accumulate inside), scales applied after."""
    spec = q.spec
    sx = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True) / spec.qmax
    sx = jnp.where(sx > 0, sx, 1.0)
    xq = spec._cast(x.astype(jnp.float32) / sx)
    acc = jnp.matmul(xq, q.codes[0].T, preferred_element_type=jnp.bfloat16)
    return (acc.astype(jnp.float32) * sx * q.scales[0]).astype(x.dtype)


def run_swap(rows, deadline):
    from experiments.kernel_bench import calls_for, device_time, n_buffers, roofline_us

    probes = [
        Probe(bn, split, warps, stages, t)
        for t in (True, False)
        for bn, split, warps, stages in [
            (128, 8, 4, 3),
            (128, 4, 4, 4),
            (64, 8, 4, 4),
            (256, 8, 8, 3),
        ]
    ]
    for pr in (probes[0], probes[4]):
        for m in (1, 16):
            print("check", m, pr, check(8192, 1024, m, pr, False), flush=True)
    for n, k in [(8192, 8192), (57344, 8192), (8192, 28672), (10240, 8192)]:
        for m in (1, 16):
            if time.time() > deadline:
                return
            wb = 2 * n * k
            bufs = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(2)]
            x = jax.random.normal(jax.random.key(9), (m, k), jnp.bfloat16)
            nc = calls_for(roofline_us(n, k, m, wb))
            t_bf16 = device_time(jax.jit(jnp.dot), [(x, b) for b in bufs], nc)["us"]
            del bufs
            w0, _, _ = make_weight(k, n, 0)
            ws = [make_weight(k, n, i) for i in range(n_buffers(w0.nbytes))]
            row = {"N": n, "K": k, "M": m, "bf16_us": t_bf16, "base": {}, "swap": {}}
            f = jax.jit(lambda x, w: int_matmul(x, w))
            row["base"]["table"] = device_time(f, [(x, w[0]) for w in ws], nc)["us"]
            for pr in probes:
                g = jax.jit(functools.partial(swap_matmul, probe=pr))
                args = [(x, w[1], w[2]) if pr.transposed else (x, w[0].codes, w[0].scales)
                        for w in ws]  # fmt: skip
                try:
                    row["swap"][str(pr)] = device_time(g, args, nc)["us"]
                except Exception as e:  # noqa: BLE001 — a probe records failures
                    print("fail", pr, type(e).__name__, str(e)[:300], flush=True)
            best = min(row["swap"].items(), key=lambda kv: kv[1]) if row["swap"] else None
            print(f"N={n} K={k} M={m} bf16 {t_bf16:.1f} base {row['base']['table']:.1f} "
                  f"best swap {best}", flush=True)  # fmt: skip
            rows.append(row)
            del ws


def run_w8a8(rows, deadline):
    from experiments.kernel_bench import random_weight

    for n, k in [(8192, 8192), (10240, 8192), (57344, 8192)]:
        for m in (4096, 8192):
            if time.time() > deadline:
                return
            x = jax.random.normal(jax.random.key(9), (m, k), jnp.bfloat16)
            wb = jax.random.normal(jax.random.key(1), (k, n), jnp.bfloat16)
            row = {"N": n, "K": k, "M": m, "bf16": kernel_breakdown(jax.jit(jnp.dot), (x, wb))}
            del wb
            for fmt in ("w8a8", "w8a8f8"):
                q = random_weight(fmt, k, n, 0)
                row[fmt] = kernel_breakdown(jax.jit(lambda x, q: q.spec.matmul(x, q)), (x, q))
                if fmt == "w8a8f8":
                    row["w8a8f8_bf16out"] = kernel_breakdown(jax.jit(w8a8_bf16_out), (x, q))
            print(json.dumps(row), flush=True)
            rows.append(row)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--budget-s", type=float, default=200)
    p.add_argument("--only", choices=["swap", "w8a8"])
    a = p.parse_args(argv)
    if a.smoke:
        for m in (1, 5, 16):
            for pr in (Probe(bn=64, split_k=2), Probe(bn=64, split_k=1, transposed=False)):
                print(m, pr, check(256, 128, m, pr, True))
        return
    deadline = time.time() + a.budget_s
    swap, w8 = [], []
    if a.only != "swap":
        run_w8a8(w8, deadline)
    if a.only != "w8a8":
        run_swap(swap, deadline)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "w4_swap_probe.json"), "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "swap": swap, "w8a8": w8}, fh,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
