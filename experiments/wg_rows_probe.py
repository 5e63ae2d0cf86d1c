"""Probe: 128 weight rows per compute warp group (``Config.wg_rows``: two 64-row ``wgmma``
accumulators, 256-row CTAs) against 64, for the Mosaic GPU int4 kernel.

A CTA re-reads its ``(BM, BK)`` tile of ``x`` from L2 at every K step; at M = 128 that is four
times the weight bytes of a 128-row CTA, so L2, not HBM, may bound the kernel. Twice the rows per
CTA halve that traffic per weight byte (at twice the accumulator registers).

Correctness first (int4 sym / asym, NF4, int8, FP8; small shapes; against ``dequantize`` +
float32 dot), then per 70B shape and M the median device time of each variant and of XLA's
bf16 ``dot`` (weights rotated over > 150 MB).

    python -m experiments.wg_rows_probe --out DIR      # on the GPU
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
from experiments.scale_acc_probe import SHAPES, time_variant
from qjax.kernels.gpu import mgpu_matmul as mg


def variants(w, m: int) -> dict:
    table = mg.config_for(w, m)
    out = {"table": table}
    for bk, st in [(512, 2), (256, 4), (128, 5)] if m <= 32 else [(256, 3), (128, 5)]:
        cfg = mg.Config("mgpu", bk, None, st, wg_rows=128)
        out[f"wg128_bk{bk}"] = mg.config_for(w, m, cfg)
    return out


def check(results: list) -> None:
    for fmt in ("w4g128t", "w4g128ta", "nf4t", "w8cht", "fp8t"):
        spec, layout = kb.FORMATS[fmt]
        for m, k, n in [(128, 1024, 512), (64, 2048, 768), (16, 4096, 256), (37, 640, 300)]:
            w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 23 + k)
            for length in (None, 3):
                cfg = mg.Config("mgpu", 128, length, 2, wg_rows=128)
                cfg = mg.config_for(w, m, cfg)
                try:
                    y = np.asarray(mg.matmul(x, w, config=cfg), np.float32)
                    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    ok = bool(np.isfinite(y).all() and err < 1e-2)
                    row = {"fmt": fmt, "M": m, "K": k, "N": n, "config": str(cfg),
                           "rel_err": err, "ok": ok}  # fmt: skip
                except Exception as e:  # noqa: BLE001 - a probe records the failure, goes on
                    row = {"fmt": fmt, "M": m, "config": str(cfg), "error": repr(e)[:2000]}
                print("check", row, flush=True)
                results.append(row)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t"])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--ms", nargs="*", type=int, default=[16, 64, 128])
    ap.add_argument("--budget-s", type=float, default=500)
    args = ap.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": []}
    check(out["checks"])
    for name in args.shapes:
        n, k = SHAPES[name]
        for m in args.ms:
            t_bf16 = kb.time_bf16(n, k, m)["us"]
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            for fmt in args.fmts:
                if time.time() - t0 > args.budget_s:
                    break
                w = kb.random_weight(fmt, k, n, 0)
                row = {"fmt": fmt, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16, 2)}
                for label, cfg in variants(w, m).items():
                    f = jax.jit(lambda x, w, cfg=cfg: mg.matmul(x, w, config=cfg))
                    try:
                        us = time_variant(f, fmt, n, k, m, x)
                    except Exception as e:  # noqa: BLE001
                        row[f"{label}_error"] = repr(e)[:500]
                        continue
                    row[f"{label}_us"] = round(us, 2)
                    row[f"{label}_x_bf16"] = round(t_bf16 / us, 3)
                    row[f"{label}_config"] = dataclasses.asdict(cfg)
                print({k: v for k, v in row.items() if not k.endswith("config")}, flush=True)
                out["times"].append(row)
            with open(os.path.join(args.out, "wg_rows_probe.json"), "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
