"""Probe: the Mosaic GPU kernel letting a K step's ``wgmma`` run on into the next step
(``Config.overlap``: the step's shared-memory stage is released one step later,
``BlockSpec(delay_release=1)``, and the step waits only for the previous step's MMAs) against
waiting for every MMA at the end of each step.

Correctness first (every Mosaic format, M 1–128, against ``dequantize`` + float32 dot), then per
70B shape and M the median device time of both (weights rotated over > 150 MB) and of XLA's bf16
``dot``. Paths with ``scale_acc`` (int formats up to 32 rows) wait within the step and do not
change.

    python -m experiments.overlap_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import kernel_bench as kb
from experiments.scale_acc_probe import SHAPES, time_variant
from qjax.kernels.gpu import mgpu_matmul as mg

CASES = {16: ["nf4t", "w8cht"], 64: ["w4g128t", "nf4t"], 128: ["w4g128t", "w4g128ta", "nf4t"]}


def check(results: list) -> None:
    for fmt in ("w4g128t", "w4g128ta", "w4cht", "w8cht", "nf4t", "fp8t"):
        spec, layout = kb.FORMATS[fmt]
        for m, k, n in [(1, 4096, 512), (16, 2048, 384), (64, 1024, 640), (128, 2048, 256)]:
            w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 31 + k)
            cfg = dataclasses.replace(mg.config_for(w, m), overlap=True)
            y = np.asarray(mg.matmul(x, w, config=cfg), np.float32)
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            row = {"fmt": fmt, "M": m, "K": k, "N": n, "rel_err": err,
                   "ok": bool(np.isfinite(y).all() and err < 1e-2)}  # fmt: skip
            print("check", row, flush=True)
            results.append(row)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": []}
    check(out["checks"])
    for n, k in SHAPES.values():
        for m, fmts in CASES.items():
            t_bf16 = kb.time_bf16(n, k, m)["us"]
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            for fmt in fmts:
                w = kb.random_weight(fmt, k, n, 0)
                row = {"fmt": fmt, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16, 2)}
                for on in (False, True):
                    cfg = dataclasses.replace(mg.config_for(w, m), overlap=on)
                    f = jax.jit(lambda x, w, cfg=cfg: mg.matmul(x, w, config=cfg))
                    us = time_variant(f, fmt, n, k, m, x)
                    row[f"overlap{int(on)}_us"] = round(us, 2)
                    row[f"overlap{int(on)}_x_bf16"] = round(t_bf16 / us, 3)
                print(row, flush=True)
                out["times"].append(row)
            with open(os.path.join(args.out, "overlap_probe.json"), "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
