"""Probe: W8A8 (int8 and e4m3) with the Mosaic GPU GEMM of :mod:`qjax.kernels.gpu.mgpu_w8a8`
(scales in its epilogue) against the path it would replace (the fused row quantization, XLA's
8-bit GEMM and an elementwise scaling pass) and XLA's bf16 ``dot``, same run.

Correctness first (``kernel_bench.run_check_w8a8_mgpu`` with the probe's configs: the kernel
against a float64 product of the same codes and scales, the whole path against the format's
reference, ragged M and N). Then per shape and M the median device time of each path (weights
rotated over > 150 MB, ``kernel_bench``'s method).

    python -m experiments.w8a8_mgpu_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import probe_parser, shape
from qjax.kernels.gpu import mgpu_w8a8 as k8
from qjax.kernels.gpu.w8a8_matmul import w8a8_matmul

CONFIGS = {
    "c128x128s3": k8.Config(128, 128, 3),
    "c128x128s4": k8.Config(128, 128, 4),
    "c64x256s4": k8.Config(64, 256, 4),
    "c128x128s4g16": k8.Config(128, 128, 4, group_m=16),
    "c64x256s3": k8.Config(64, 256, 3),
    "c64x256s4g4": k8.Config(64, 256, 4, group_m=4),
    "c64x256s4g16": k8.Config(64, 256, 4, group_m=16),
}


def main(argv=None) -> None:
    ap = probe_parser(["w8a8", "w8a8f8"], [4096, 8192], 420)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cfgs = {c: CONFIGS[c] for c in args.configs}
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": [],
                 "configs": {c: dataclasses.asdict(v) for c, v in cfgs.items()}}  # fmt: skip
    path = os.path.join(args.out, "w8a8_mgpu_probe.json")
    if not args.no_check:
        kb.run_check_w8a8_mgpu(out["checks"], cfgs)
        bad = [r for r in out["checks"] if not r.get("ok")]
        print(f"checks: {len(out['checks'])}, failed: {len(bad)}", flush=True)
    t0 = time.time()
    for name in args.shapes:
        n, k = shape(name)
        for m in args.ms:
            if time.time() - t0 > args.budget_s:
                break
            t_bf16 = kb.time_bf16(n, k, m)["us"]
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            for fmt in args.fmts:
                w0 = kb.random_weight(fmt, k, n, 0)
                more = range(1, kb.n_buffers(w0.nbytes))
                bufs = [w0] + [kb.random_weight(fmt, k, n, i) for i in more]
                row = {"fmt": fmt, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16, 2)}
                variants = {"xla": jax.jit(lambda x, w: w8a8_matmul(x, w, gemm="xla"))}
                for label, cfg in cfgs.items():
                    variants[label] = jax.jit(
                        lambda x, w, cfg=cfg: w8a8_matmul(x, w, gemm="mgpu", config=cfg)
                    )
                n_calls = kb.calls_for(t_bf16 / 1.5)
                for label, f in variants.items():
                    try:
                        r = kb.device_time(f, [(x, w) for w in bufs], n_calls)
                        row[f"{label}_us"] = round(r["us"], 2)
                        row[f"{label}_x_bf16"] = round(t_bf16 / r["us"], 3)
                    except Exception as e:  # noqa: BLE001
                        row[f"{label}_error"] = repr(e)[:300]
                print(row, flush=True)
                out["times"].append(row)
                del bufs
            with open(path, "w") as fh:
                json.dump(out, fh, indent=1)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
