"""Probe: the Mosaic GPU kernel with codes stored in the WGMMA register order (no warp shuffles)
and its FP8 / NF4 decoders (:mod:`qjax.kernels.gpu.mgpu_decode`), against the current kernel.

Per weight shape and M: correctness on a small case against a float64 reference built from the
logical codes, then the median device time of the kernel (split-K sum + transpose included) and
of XLA's bf16 ``dot``, weights rotated over > 150 MB of buffers.

    python -m experiments.mgpu_decode_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from experiments.kernel_bench import device_time, n_buffers, time_bf16
from qjax.formats.nf4 import nf4_levels
from qjax.kernels.gpu import mgpu_decode as dec
from qjax.kernels.gpu import mgpu_matmul as mg

# name -> (decode, bits, slice, scaled in kernel). The "*_mosaic" rows of the committed
# results (mgpu_decode_probe.json) were measured at commit 733bf29, where the kernel could still
# load codes in logical order with Mosaic GPU's own relayout (two warp shuffles per 8 int4 codes).
VARIANTS = {
    "int4_perm": ("int", 4, 128, True),
    "int8_perm": ("int", 8, 128, True),
    "e4m3_perm": ("e4m3", 8, 128, False),
    "nf4_perm": ("nf4", 4, 64, True),
    # timing only (no check): the cost of 64-code slices vs the NF4 table lookup
    "int4_s64": ("int", 4, 64, True),
    "nf4_s128": ("nf4", 4, 128, True),
}
TIMING_ONLY = ("int4_s64", "nf4_s128")


def make(variant: str, n: int, k: int, seed: int):
    """``(stored codes, scales, epilogue scale or None, reference Ŵ (K, N) float64)``."""
    decode, bits, sl, scaled = VARIANTS[variant]
    rng = np.random.default_rng(seed)
    if decode == "e4m3":
        b = rng.integers(0, 0x7F, (n, k)) | (128 * rng.integers(0, 2, (n, k)))
        codes = b.astype(np.uint8)
        vals = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
        s = (0.01 * (1 + rng.random((1, n)))).astype(np.float32)
        w = vals.T * s.astype(np.float64)
        stored = codes[:, dec.stored_order(k, 8)]
        return jnp.asarray(stored), None, jnp.asarray(s), w
    levels = 1 << bits
    c = rng.integers(0, levels, (n, k))
    s = (0.01 * (1 + rng.random((k // sl, n)))).astype(ml_dtypes.bfloat16)
    s_k = np.repeat(s.astype(np.float64), sl, axis=0)  # (K, N)
    if decode == "nf4":
        lv = np.asarray(nf4_levels(), np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
        w = (lv[c].T * s_k).astype(ml_dtypes.bfloat16).astype(np.float64)
    else:
        w = ((c.T - levels // 2) * s_k).astype(ml_dtypes.bfloat16).astype(np.float64)
    signed = (c - levels // 2)[:, dec.stored_order(k, bits)]
    dtype = jnp.int4 if bits == 4 else jnp.int8
    return jnp.asarray(signed, jnp.int32).astype(dtype), jnp.asarray(s), None, w


def call(variant: str, cfg):
    decode, _, sl, _ = VARIANTS[variant]

    @jax.jit
    def f(x, codes, scales, post):
        m = x.shape[0]
        m_p, _ = mg.padded_rows(m)
        xp = jnp.pad(x, [(0, m_p - m), (0, 0)])
        y = mg.product(xp, codes, scales, None, cfg, decode, sl).T[:m]
        if post is not None:
            y = y * post
        return y.astype(x.dtype)

    return f


def config(variant: str, m: int, k: int, n: int):
    _, bits, _, _ = VARIANTS[variant]
    return mg.pick(m, k, n, bits)


def check(variant: str, results: list) -> None:
    for n, k, m in [(256, 1024, 16), (384, 2048, 5), (256, 1024, 64), (256, 512, 128)]:
        codes, s, post, w = make(variant, n, k, 7)
        x = np.random.default_rng(3).standard_normal((m, k)).astype(ml_dtypes.bfloat16)
        ref = x.astype(np.float64) @ w
        try:
            y = call(variant, config(variant, m, k, n))(jnp.asarray(x), codes, s, post)
            err = float(np.max(np.abs(np.asarray(y, np.float64) - ref)) / np.max(np.abs(ref)))
            row = {"variant": variant, "n": n, "k": k, "m": m, "rel_err": err, "ok": err < 1e-2}
        except Exception as e:  # noqa: BLE001 - a probe records the failure and goes on
            row = {"variant": variant, "n": n, "k": k, "m": m, "error": repr(e)[:2000]}
        print(row, flush=True)
        results.append(row)


def random_stored(variant: str, n: int, k: int, seed: int):
    """Random stored codes and scales of the right dtypes, made on the device (timing only)."""
    _, bits, sl, scaled = VARIANTS[variant]
    key = jax.random.key(seed)
    if bits == 4:
        codes = jax.random.randint(key, (n, k), -8, 8, jnp.int32).astype(jnp.int4)
    elif variant.startswith("e4m3"):
        codes = jax.random.randint(key, (n, k), 0, 0x7F, jnp.int32).astype(jnp.uint8)
    else:
        codes = jax.random.randint(key, (n, k), -128, 128, jnp.int32).astype(jnp.int8)
    s = jnp.full((k // sl, n), 0.01, jnp.bfloat16) if scaled else None
    post = None if scaled else jnp.full((1, n), 0.01, jnp.float32)
    return codes, s, post


def bench(variant: str, n: int, k: int, m: int, t_bf16: float) -> dict:
    codes, s, post = random_stored(variant, n, k, 0)
    nbytes = codes.nbytes + (s.nbytes if s is not None else 0)
    bufs = [(codes, s)] + [random_stored(variant, n, k, i)[:2] for i in range(1, n_buffers(nbytes))]
    x = jax.random.normal(jax.random.key(9), (m, k), jnp.bfloat16)
    cfg = config(variant, m, k, n)
    f = call(variant, cfg)
    r = device_time(f, [(x, c, sc, post) for c, sc in bufs], 40)
    del bufs
    return {
        "variant": variant, "n": n, "k": k, "m": m, "us": round(r["us"], 2),
        "bf16_us": round(t_bf16, 2), "speedup_vs_bf16": round(t_bf16 / r["us"], 3),
        "tb_s": round((nbytes + 2 * m * k + 2 * m * n) / r["us"] / 1e6, 3),
        "config": str(cfg),
    }  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--shapes", nargs="*", default=["8192x8192", "57344x8192", "8192x28672"])
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 16, 64, 128])
    ap.add_argument("--budget-s", type=float, default=480)
    args = ap.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    results: list = []
    for v in args.variants:
        if v not in TIMING_ONLY:
            check(v, results)
    for shape in args.shapes:
        n, k = map(int, shape.split("x"))
        for m in args.ms:
            t_bf16 = time_bf16(n, k, m)["us"]
            for v in args.variants:
                if time.time() - t0 > args.budget_s:
                    break
                if v.startswith(("int8", "e4m3")) and m > 16:
                    continue
                try:
                    row = bench(v, n, k, m, t_bf16)
                except Exception as e:  # noqa: BLE001
                    row = {"variant": v, "n": n, "k": k, "m": m, "error": repr(e)[:2000]}
                print(row, flush=True)
                results.append(row)
            with open(os.path.join(args.out, "mgpu_decode_probe.json"), "w") as f:
                json.dump({"device": str(jax.devices()[0]), "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
