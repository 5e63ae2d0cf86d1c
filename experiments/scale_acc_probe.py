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

import jax
import jax.numpy as jnp

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import SHAPES, check_row, shape, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg


def with_scale_acc(w, m: int, on: bool) -> mg.Config:
    return dataclasses.replace(mg.table_config(w, m), scale_acc=on)


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


def check(fmts, results: list) -> None:
    for fmt in fmts:
        spec, layout = kb.FORMATS[fmt]
        for m, k, n in [(1, 8192, 1024), (16, 640, 384), (32, 1024, 512), (7, 300, 200)]:
            w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 17 + k)
            for on in (False, True):
                results.append(check_row(fmt, w, x, ref, with_scale_acc(w, m, on), scale_acc=on))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t", "w4g128ta", "nf4t", "w8cht"])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--budget-s", type=float, default=500)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "scale_acc_probe.json")
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": [], "breakdown": {}}
    check(args.fmts, out["checks"])
    cases = [(*shape(name), m) for name in args.shapes for m in args.ms]
    time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)
    for n, k, m in cases:  # where a call's time goes: the table's default, first format
        x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
        w = kb.random_weight(args.fmts[0], k, n, 0)
        per = kb.kernel_breakdown(jax.jit(mg.matmul), (x, w))
        out["breakdown"][f"{args.fmts[0]} {n}x{k} M={m}"] = per
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out["breakdown"], indent=1))


if __name__ == "__main__":
    main()
