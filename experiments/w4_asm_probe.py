"""Probe: int4 swap kernel on a byte layout with a packed inline-asm nibble unpack.

The swap path of :mod:`qjax.kernels.gpu.int_matmul` spends ≈ 4 integer ops per nibble (shift,
mask, OR, truncation, each on a 32-bit lane holding one code). Here the codes are bytes
``(K_p/32, N_p, 16)``: byte ``[q, n, i]`` holds the code of ``k = 32q + i`` in its low nibble and of
``k = 32q + 16 + i`` in its high nibble, so a ``(BN, 16)`` byte tile gives two MMA planes. One
``elementwise_inline_asm`` with ``pack=4`` turns a 32-bit register of four bytes into four bf16
``128 + c`` (two ``prmt`` spread the bytes into half-words, two ``lop3`` mask and OR in the bf16
bits of 128): 4 ops per 4 low nibbles, 5 for the high ones (one more shift). The MMA sees
``128 + c`` and the group's correction ``s·(128 + z)·Σx`` is applied on the float32 accumulator.

    python -m experiments.w4_asm_probe --out DIR          # on the GPU
    python -m experiments.w4_asm_probe --smoke            # CPU, interpret mode (jnp unpack)
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

_SPREAD = ("0x4140", "0x4342")  # prmt selectors: bytes 0,1 (then 2,3) into half-word low bytes


def _asm(high: bool, sub: bool) -> str:
    """PTX: 4 bytes ($2) → 4 bf16 in $0, $1: ``128 + nibble``, or ``nibble − z`` when ``sub``
    (``fma.rn.bf16x2 d, 128 + c, 1, −(128 + z)`` with ``−(128 + z)`` pairs in $3, $4)."""
    lines = ["{", ".reg .b32 t, u, one;", "mov.b32 one, 0x3F803F80;"]
    src = "$2"
    if high:
        lines.append("shr.b32 u, $2, 4;")
        src = "u"
    for i, sel in enumerate(_SPREAD):
        lines.append(f"prmt.b32 t, {src}, 0, {sel};")
        if sub:
            lines.append("lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA;")
            lines.append(f"fma.rn.bf16x2 ${i}, t, one, ${3 + i};")
        else:
            lines.append(f"lop3.b32 ${i}, t, 0x000F000F, 0x43004300, 0xEA;")
    lines.append("}")
    return "\n".join(lines)


def unpack(b, high: bool, asm: bool, negz=None):
    """uint8 ``(BN, 16)`` → bf16 ``128 + nibble`` (exact); ``nibble − z`` with ``negz = −(128 + z)``
    (bf16, broadcastable to ``(BN, 16)``)."""
    if asm:
        args = [b]
        constraints = "=r,=r,r"
        if negz is not None:
            args.append(jnp.broadcast_to(negz, b.shape).astype(jnp.bfloat16))
            constraints += ",r,r"
        (out,) = plgpu.elementwise_inline_asm(
            _asm(high, negz is not None),
            args=args,
            constraints=constraints,
            pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(b.shape, jnp.bfloat16)],
        )
        return out
    n = (b >> 4) if high else b
    t = (n & 0xF).astype(jnp.int16) | 0x4300
    out = lax.bitcast_convert_type(t, jnp.bfloat16)
    return out if negz is None else out + negz


def to_bytes(w):
    """gpu_i4p QArray → codes ``(K_p/32, N_p, 16)`` uint8 (module docstring)."""
    c = rp.unpack_codes(w)  # (K_p, N_p)
    k_p, n_p = c.shape
    c = c.reshape(k_p // 32, 2, 16, n_p)
    b = c[:, 0] | (c[:, 1] << 4)  # (K_p/32, 16, N_p)
    return jnp.transpose(b, (0, 2, 1))


@dataclasses.dataclass(frozen=True)
class Probe:
    bn: int = 128
    split_k: int = 8
    num_warps: int = 4
    num_stages: int = 3
    asm: bool = True
    mode: str = "sub"  # "sub": c − z in the unpack; "xsum": 128 + c, Σx per group from XLA


def _kernel(x_ref, w_ref, s_ref, z_ref, xs_ref, o_ref, *, m, bm, gk, cps, asm, mode):
    rows = lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    mask = jnp.broadcast_to(rows < m, (bm, 16))
    c_first = pl.program_id(1) * cps
    sub = min(gk, rp.CHUNK)

    def step(i, acc):
        c = c_first + i
        for d in range(rp.CHUNK // sub):
            gi = c * (rp.CHUNK // gk) + d if gk <= rp.CHUNK else c // (gk // rp.CHUNK)
            s = s_ref[pl.ds(gi, 1), :].astype(jnp.float32).T  # (bn, 1)
            zero = z_ref[pl.ds(gi, 1), :].astype(jnp.float32).T + 128.0  # 128 + z
            negz = (-zero).astype(jnp.bfloat16) if mode == "sub" else None
            a = None
            for e in range(sub // 32):
                qb = c * 4 + d * (sub // 32) + e
                b = w_ref[qb]  # (bn, 16) uint8
                for h in range(2):
                    k0 = pl.multiple_of(qb * 32 + 16 * h, 16)
                    xt = plgpu.load(x_ref.at[:, pl.ds(k0, 16)], mask=mask, other=0.0).T
                    wt = unpack(b, h == 1, asm, negz)
                    aj = jnp.dot(wt, xt, preferred_element_type=jnp.float32)
                    a = aj if a is None else a + aj
            if mode == "sub":
                acc = acc + a * s
            else:
                xs = xs_ref[pl.ds(gi, 1), :]  # (1, bm) Σx over the group
                acc = acc + a * s - (s * zero) * xs
        return acc

    bn = w_ref.shape[1]
    acc = lax.fori_loop(0, cps, step, jnp.zeros((bn, bm), jnp.float32))
    o_ref[...] = acc.T


@functools.partial(jax.jit, static_argnames=("probe", "interpret"))
def byte_matmul(x2, codes, scales, zeros, probe: Probe, interpret: bool = False):
    m, k_p = x2.shape
    n_p = codes.shape[1]
    g_p = scales.shape[0]
    gk = k_p // g_p if g_p > 1 else k_p
    bm = max(16, pl.next_power_of_2(m))
    chunks = k_p // rp.CHUNK
    split = calls.largest_divisor_at_most(chunks, probe.split_k)
    bn = probe.bn
    if zeros is None:  # symmetric: z = 8 everywhere
        zeros = jnp.full(scales.shape, 8, jnp.uint8)
    xp = jnp.pad(x2, [(0, bm - m), (0, 0)]) if bm > m else x2
    xs = jnp.sum(xp.astype(jnp.float32).reshape(bm, -1, min(gk, k_p)), axis=2).T  # (G, bm)
    kernel = functools.partial(
        _kernel, m=m, bm=bm, gk=gk, cps=chunks // split, asm=probe.asm and not interpret,
        mode=probe.mode,
    )  # fmt: skip
    s_spec = pl.BlockSpec((g_p, bn), lambda n, s: (0, n))
    y = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((split, bm, n_p), jnp.float32),
        grid=(n_p // bn, split),
        in_specs=[
            pl.BlockSpec((bm, k_p), lambda n, s: (0, 0)),
            pl.BlockSpec((codes.shape[0], bn, 16), lambda n, s: (0, n, 0)),
            s_spec,
            s_spec,
            pl.BlockSpec((xs.shape[0], bm), lambda n, s: (0, 0)),
        ],
        out_specs=pl.BlockSpec((None, bm, bn), lambda n, s: (s, 0, n)),
        compiler_params=plgpu.CompilerParams(
            num_warps=probe.num_warps, num_stages=probe.num_stages
        ),
        interpret=interpret,
        name="qjax_w4_bytes",
    )(xp, codes, scales, zeros, xs)
    return jnp.sum(y, axis=0)[:m].astype(x2.dtype)


def make_weight(fmt, k, n, seed):
    from experiments.kernel_bench import random_weight

    w = random_weight(fmt, k, n, seed)
    return w, to_bytes(w)


def check(fmt, k, n, m, probe, interpret):
    w, b = make_weight(fmt, k, n, 0)
    x = jax.random.normal(jax.random.key(1), (m, w.codes.shape[0] * 8), jnp.bfloat16)
    ref = jnp.dot(x.astype(jnp.float32), rp.dequantize_bf16(w).astype(jnp.float32))
    y = byte_matmul(x, b, w.scales, w.zeros, probe, interpret).astype(jnp.float32)
    return float(jnp.max(jnp.abs(y - ref[:, : y.shape[1]])) / jnp.max(jnp.abs(ref)))


SHAPES = [(8192, 8192), (57344, 8192)]
PROBES = [
    Probe(128, 8, 4, 3),
    Probe(64, 8, 4, 4),
    Probe(128, 8, 4, 3, mode="xsum"),
    Probe(64, 8, 4, 4, mode="xsum"),
    Probe(128, 8, 4, 3, asm=False),
    Probe(64, 8, 4, 4, asm=False),
    Probe(64, 8, 4, 4, asm=False, mode="xsum"),
]


def run(rows, deadline, ms=(1, 16)):
    from experiments.kernel_bench import calls_for, device_time, n_buffers, roofline_us
    from qjax.kernels.gpu.int_matmul import int_matmul

    for fmt in ("w4g128", "w4g128a", "w4g32"):
        for m in (1, 16):
            for pr in (PROBES[0], PROBES[2], PROBES[4]):
                try:
                    print("check", fmt, m, pr, check(fmt, 8192, 1024, m, pr, False), flush=True)
                except Exception as e:  # noqa: BLE001 — a probe records failures
                    print("check fail", fmt, pr, type(e).__name__, str(e)[:2000], flush=True)
    for n, k in SHAPES:
        for m in ms:
            if time.time() > deadline:
                return
            wb = 2 * n * k
            bufs = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(2)]
            x = jax.random.normal(jax.random.key(9), (m, k), jnp.bfloat16)
            nc = calls_for(roofline_us(n, k, m, wb))
            t_bf16 = device_time(jax.jit(jnp.dot), [(x, b) for b in bufs], nc)["us"]
            del bufs
            w0, _ = make_weight("w4g128", k, n, 0)
            ws = [make_weight("w4g128", k, n, i) for i in range(n_buffers(w0.nbytes))]
            row = {"N": n, "K": k, "M": m, "bf16_us": t_bf16, "roofline_us": None, "bytes": {}}
            row["roofline_us"] = roofline_us(n, k, m, w0.nbytes)
            f = jax.jit(lambda x, w: int_matmul(x, w))
            row["table_us"] = device_time(f, [(x, w[0]) for w in ws], nc)["us"]
            for pr in PROBES:
                g = jax.jit(functools.partial(byte_matmul, probe=pr))
                try:
                    args = [(x, w[1], w[0].scales, None) for w in ws]
                    row["bytes"][str(pr)] = device_time(g, args, nc)["us"]
                except Exception as e:  # noqa: BLE001 — a probe records failures
                    print("fail", pr, type(e).__name__, str(e)[:300], flush=True)
            best = min(row["bytes"].items(), key=lambda kv: kv[1]) if row["bytes"] else None
            print(
                f"N={n} K={k} M={m} bf16 {t_bf16:.1f} table {row['table_us']:.1f} "
                f"roof {row['roofline_us']:.1f} best bytes {best}",
                flush=True,
            )
            rows.append(row)
            del ws


def main(argv=None):
    from experiments import kernel_bench

    kernel_bench.FORMATS.setdefault(
        "w4g128a", (kernel_bench.qjax.Int(4, group=128, symmetric=False), "gpu_i4p")
    )
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--budget-s", type=float, default=200)
    p.add_argument("--ms", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--sweep", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        for fmt in ("w4g128", "w4g128a", "w4g32"):
            for m in (1, 5, 16):
                for mode in ("sub", "xsum"):
                    pr = Probe(bn=64, split_k=2, mode=mode)
                    print(fmt, m, mode, check(fmt, 512, 128, m, pr, True))
        return
    rows: list = []
    (sweep if a.sweep else functools.partial(run, ms=a.ms))(rows, time.time() + a.budget_s)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "w4_asm_probe.json"), "w") as fh:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, fh, indent=1)


# -- GEMV with atomic split-K (CUDA cores), gpu_i4p words --------------------------------------
@dataclasses.dataclass(frozen=True)
class Gemv:
    bn: int = 128
    cpp: int = 2  # 128-row chunks per program
    num_warps: int = 4
    num_stages: int = 1
    evict: bool = True


def _gemv_kernel(x_ref, w_ref, s_ref, z_ref, acc_in, o_ref, *, bm, cpp, gk, evict):
    del acc_in
    pn, pk = pl.program_id(0), pl.program_id(1)
    bn = w_ref.shape[1]
    acc = jnp.zeros((bm, 16, bn), jnp.float32)
    ev = "evict_first" if evict else None
    for i in range(cpp):
        c = pk * cpp + i
        words = plgpu.load(w_ref.at[pl.ds(pl.multiple_of(c * 16, 16), 16), :], eviction_policy=ev)
        p = xs = None
        for j in range(8):
            sh = 19 - 4 * j  # nibble j → mantissa bits 19..22 of 16.0: exactly 16 + c
            t = words << sh if sh >= 0 else lax.shift_right_logical(words, -sh)
            f = lax.bitcast_convert_type((t & 0x780000) | 0x41800000, jnp.float32)
            xj = x_ref[:, pl.ds(pl.multiple_of(c * 128 + 16 * j, 16), 16)].astype(jnp.float32)
            term = f[None] * xj[:, :, None]  # (bm, 16, bn)
            p = term if p is None else p + term
            xs = xj if xs is None else xs + xj
        gi = c if gk <= 128 else c // (gk // 128)
        s = s_ref[pl.ds(gi, 1), :].astype(jnp.float32)[None]  # (1, 1, bn)
        z = z_ref[pl.ds(gi, 1), :].astype(jnp.float32)[None] + 16.0
        acc = acc + p * s - xs[:, :, None] * (z * s)
    y = jnp.sum(acc, axis=1)  # (bm, bn)
    cols = pn * bn + lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
    rows = lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
    plgpu.atomic_add(o_ref, (rows, cols), y)


@functools.partial(jax.jit, static_argnames=("probe", "interpret"))
def gemv_matmul(x2, words, scales, zeros, probe: Gemv, interpret: bool = False):
    m, k_p = x2.shape
    n_p = words.shape[1]
    g_p = scales.shape[0]
    gk = k_p // g_p if g_p > 1 else k_p
    assert gk >= 128, "probe: groups of >= 128 only"
    if zeros is None:
        zeros = jnp.full(scales.shape, 8, jnp.uint8)
    chunks = k_p // rp.CHUNK
    cpp = calls.largest_divisor_at_most(chunks, probe.cpp)
    bn = probe.bn
    kernel = functools.partial(_gemv_kernel, bm=m, cpp=cpp, gk=gk, evict=probe.evict)
    s_spec = pl.BlockSpec((g_p, bn), lambda n, k: (0, n))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n_p), jnp.float32),
        grid=(n_p // bn, chunks // cpp),
        in_specs=[
            pl.BlockSpec((m, k_p), lambda n, k: (0, 0)),
            pl.BlockSpec((words.shape[0], bn), lambda n, k: (0, n)),
            s_spec,
            s_spec,
            pl.BlockSpec(memory_space=pl.ANY),
        ],
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        input_output_aliases={4: 0},
        compiler_params=plgpu.CompilerParams(
            num_warps=probe.num_warps, num_stages=probe.num_stages
        ),
        interpret=interpret,
        name="qjax_w4_gemv_atomic",
    )(x2, words, scales, zeros, jnp.zeros((m, n_p), jnp.float32))
    return out.astype(x2.dtype)


def check_gemv(fmt, k, n, m, probe, interpret):
    from experiments.kernel_bench import random_weight

    w = random_weight(fmt, k, n, 0)
    x = jax.random.normal(jax.random.key(1), (m, w.codes.shape[0] * 8), jnp.bfloat16)
    ref = jnp.dot(x.astype(jnp.float32), rp.dequantize_bf16(w).astype(jnp.float32))
    y = gemv_matmul(x, w.codes, w.scales, w.zeros, probe, interpret).astype(jnp.float32)
    return float(jnp.max(jnp.abs(y - ref[:, : y.shape[1]])) / jnp.max(jnp.abs(ref)))


def sweep(rows, deadline):
    """GEMV-atomic configs at M = 1 and a wide swap-config sweep, vs XLA bf16 and the table."""
    from experiments.kernel_bench import (
        calls_for,
        device_time,
        n_buffers,
        random_weight,
        roofline_us,
    )
    from qjax.kernels.gpu import configs
    from qjax.kernels.gpu.int_matmul import int_matmul

    for fmt in ("w4g128", "w4g128a"):
        print("check gemv", fmt, check_gemv(fmt, 8192, 1024, 1, Gemv(), False), flush=True)
    gemvs = [
        Gemv(bn, cpp, w, s, ev)
        for bn, cpp, w, s, ev in [
            (128, 1, 4, 1, True), (128, 2, 4, 1, True), (128, 4, 4, 1, True),
            (256, 2, 4, 1, True), (256, 2, 8, 1, True), (64, 2, 2, 1, True),
            (64, 4, 2, 1, True), (128, 2, 4, 2, True), (128, 2, 4, 1, False),
            (512, 1, 8, 1, True), (256, 4, 8, 1, True), (128, 8, 4, 1, True),
        ]
    ]  # fmt: skip
    swaps = [
        configs.Config("swap", 16, bn, sk, w, st)
        for bn, sk, w, st in [
            (128, 8, 4, 3), (64, 8, 4, 3), (64, 16, 4, 3), (64, 16, 2, 3), (128, 16, 4, 3),
            (128, 4, 4, 3), (128, 8, 4, 5), (128, 8, 8, 3), (256, 8, 8, 3), (256, 16, 8, 3),
            (64, 8, 2, 4), (32, 16, 2, 3), (128, 32, 4, 3), (64, 32, 4, 3),
        ]
    ]  # fmt: skip
    cases = [(8192, 8192, 1), (8192, 28672, 1), (8192, 8192, 16), (57344, 8192, 16),
             (8192, 28672, 16), (8192, 8192, 64), (57344, 8192, 1)]  # fmt: skip
    for n, k, m in cases:
        if time.time() > deadline:
            return
        wb = 2 * n * k
        bufs = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(2)]
        x = jax.random.normal(jax.random.key(9), (m, k), jnp.bfloat16)
        nc = calls_for(roofline_us(n, k, m, wb))
        t_bf16 = device_time(jax.jit(jnp.dot), [(x, b) for b in bufs], nc)["us"]
        del bufs
        w0 = random_weight("w4g128", k, n, 0)
        ws = [w0] + [random_weight("w4g128", k, n, i) for i in range(1, n_buffers(w0.nbytes))]
        row = {"N": n, "K": k, "M": m, "bf16_us": t_bf16, "configs": {}}
        row["roofline_us"] = roofline_us(n, k, m, w0.nbytes)
        f = jax.jit(lambda x, w: int_matmul(x, w))
        row["table_us"] = device_time(f, [(x, w) for w in ws], nc)["us"]
        trials = [("swap", c) for c in swaps]
        if m == 1:
            trials = [("gemv", g) for g in gemvs] + trials
        for kind, c in trials:
            if time.time() > deadline:
                break
            if kind == "gemv":
                g = jax.jit(functools.partial(gemv_matmul, probe=c))
                args = [(x, w.codes, w.scales, None) for w in ws]
            else:
                c = dataclasses.replace(c, block_m=max(16, m))
                g = jax.jit(functools.partial(lambda x, w, c: int_matmul(x, w, config=c), c=c))
                args = [(x, w) for w in ws]
            try:
                row["configs"][f"{kind} {c}"] = device_time(g, args, nc)["us"]
            except Exception as e:  # noqa: BLE001 — a probe records failures
                print("fail", c, type(e).__name__, str(e)[:300], flush=True)
        best = sorted(row["configs"].items(), key=lambda kv: kv[1])[:3]
        print(f"N={n} K={k} M={m} bf16 {t_bf16:.1f} table {row['table_us']:.1f} "
              f"roof {row['roofline_us']:.1f} best {best}", flush=True)  # fmt: skip
        rows.append(row)
        del ws


if __name__ == "__main__":
    main()
