"""Probe: the two compute warp groups taking turns on the tensor cores (``Config.pingpong``: a
warp group decodes its K step, waits for its turn, issues its ``wgmma``, waits for it and hands
the turn over — so one group's ``wgmma`` runs while the other decodes) against the free-running
groups, which reach the tensor cores together; at the sizes that do not scale the float32 sums
per slice (M ≥ 64).

Correctness first (the Mosaic GPU formats, M 64–300, both epilogues), then per 70B shape and M the
median device time of both and of XLA's bf16 ``dot`` (weights rotated over > 150 MB).

    python -m experiments.pingpong_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import SHAPES, check_row, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg

FORMATS = ("w4g128t", "w4g128ta", "w4cht", "w8cht", "nf4t", "fp8t")


def check(results: list) -> None:
    for fmt in FORMATS:
        spec, layout = kb.FORMATS[fmt]
        for m, k, n in [(64, 1024, 640), (128, 2048, 384), (100, 640, 200), (300, 1024, 384)]:
            w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 31 + k)
            for fused in (False, True):
                opts = dict(pingpong=True, fused=fused)
                cfg = mg.config_for(w, m, dataclasses.replace(mg.config_for(w, m), **opts))
                results.append(check_row(fmt, w, x, ref, cfg, **opts))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t", "nf4t"])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--ms", nargs="*", type=int, default=[64, 128])
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": []}
    if not args.no_check:
        check(out["checks"])
        bad = [r for r in out["checks"] if not r.get("ok")]
        print(f"checks: {len(out['checks'])}, failed: {len(bad)}", flush=True)

    def variants(w, m):
        base = mg.config_for(w, m)
        cfgs = {"free": base, "pingpong": dataclasses.replace(base, pingpong=True)}
        return {label: jax.jit(lambda x, w, cfg=cfg: mg.matmul(x, w, config=cfg))
                for label, cfg in cfgs.items()}  # fmt: skip

    cases = [(*SHAPES[name], m) for m in args.ms for name in args.shapes]
    path = os.path.join(args.out, "pingpong_probe.json")
    time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
