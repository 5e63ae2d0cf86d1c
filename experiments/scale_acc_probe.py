"""Probe: the Mosaic GPU kernel with its scales on the float32 sums (``Config.scale_acc``) against
scales on the dequantized weights, at decode sizes, and where a call's device time goes.

``scale_acc`` multiplies each 128- (NF4: 64-) code slice's float32 product by its scale row
(two accumulators alternate, so one slice's ``wgmma`` runs while the previous one is scaled);
per-channel int weights are scaled once, on the result. Per case: a correctness check against
``dequantize`` + float32 dot (both ways), the median device time of ``mgpu_matmul.matmul`` each
way and of XLA's bf16 ``dot`` (weights rotated over > 150 MB), and the per-kernel breakdown of
the table's default (pad of ``x``, the kernel, the split-K epilogue).

    python -m experiments.scale_acc_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import kernel_bench as kb
from qjax.kernels.gpu import mgpu_matmul as mg

SHAPES = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}


def with_scale_acc(w, m: int, on: bool) -> mg.Config:
    return dataclasses.replace(mg.config_for(w, m), scale_acc=on)


def variants(w, m: int) -> dict:
    """``base``: the table's config; ``padded``: ``x`` padded by XLA to ``padded_rows(m)`` rows
    first, as before TMA's out-of-bounds fill did it (16 rows when the committed results were
    measured at a94fb7f, 8 now); ``scale_acc``: scales on the float32 sums."""
    base, on = with_scale_acc(w, m, False), with_scale_acc(w, m, True)
    m_p, _ = mg.padded_rows(m)

    def padded(x, w):
        return mg.matmul(jnp.pad(x, [(0, m_p - m), (0, 0)]), w, config=base)[:m]

    return {
        "base": jax.jit(lambda x, w: mg.matmul(x, w, config=base)),
        "padded": jax.jit(padded),
        "scale_acc": jax.jit(lambda x, w: mg.matmul(x, w, config=on)),
    }


def time_variant(f, fmt: str, n: int, k: int, m: int, x) -> float:
    w0 = kb.random_weight(fmt, k, n, 0)
    bufs = [w0] + [kb.random_weight(fmt, k, n, i) for i in range(1, kb.n_buffers(w0.nbytes))]
    us = kb.device_time(f, [(x, w) for w in bufs], 40)["us"]
    del bufs
    return us


def check(fmts, results: list) -> None:
    for fmt in fmts:
        spec, layout = kb.FORMATS[fmt]
        for m, k, n in [(1, 8192, 1024), (16, 640, 384), (32, 1024, 512), (7, 300, 200)]:
            w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 17 + k)
            for on in (False, True):
                cfg = with_scale_acc(w, m, on)
                try:
                    y = np.asarray(mg.matmul(x, w, config=cfg), np.float32)
                    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    row = {"fmt": fmt, "M": m, "K": k, "N": n, "scale_acc": on, "rel_err": err,
                           "ok": bool(np.isfinite(y).all() and err < 1e-2)}  # fmt: skip
                except Exception as e:  # noqa: BLE001 - a probe records the failure, goes on
                    row = {"fmt": fmt, "M": m, "scale_acc": on, "error": repr(e)[:2000]}
                print("check", row, flush=True)
                results.append(row)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t", "w4g128ta", "nf4t", "w8cht"])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--budget-s", type=float, default=500)
    args = ap.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": [], "breakdown": {}}
    check(args.fmts, out["checks"])
    for name in args.shapes:
        n, k = SHAPES[name]
        for m in args.ms:
            t_bf16 = kb.time_bf16(n, k, m)["us"]
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            for fmt in args.fmts:
                if time.time() - t0 > args.budget_s:
                    break
                w = kb.random_weight(fmt, k, n, 0)
                if fmt == args.fmts[0]:
                    per = kb.kernel_breakdown(jax.jit(mg.matmul), (x, w))
                    out["breakdown"][f"{fmt} {n}x{k} M={m}"] = per
                row = {"fmt": fmt, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16, 2)}
                for name, f in variants(w, m).items():
                    us = time_variant(f, fmt, n, k, m, x)
                    row[f"{name}_us"] = round(us, 2)
                    row[f"{name}_x_bf16"] = round(t_bf16 / us, 3)
                print(row, flush=True)
                out["times"].append(row)
            with open(os.path.join(args.out, "scale_acc_probe.json"), "w") as f:
                json.dump(out, f, indent=1)
    print(json.dumps(out["breakdown"], indent=1))


if __name__ == "__main__":
    main()
