"""Probe: stream-K scheduling of the Mosaic GPU kernel (``mgpu_matmul.schedule``: every CTA takes
the same number of K steps, across weight-tile boundaries) against the split-K grid it replaced
(each tile cut into 1, 2 or 4 aligned parts, whichever fills whole waves of the 132 SMs best).

Correctness first (every Mosaic format, small shapes, K steps per CTA that do and do not divide a
tile's steps, against ``dequantize`` + float32 dot), then per 70B shape and M the median device
time of both schedules and of XLA's bf16 ``dot`` (weights rotated over > 150 MB).

    python -m experiments.stream_k_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import SHAPES, check_row, jitted, shape, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg


def split_k_steps(n_tiles: int, steps: int, m_tiles: int) -> int:
    """The replaced split-K choice, as K steps per CTA: split in {1, 2, 4} dividing the steps
    whose CTAs fill whole waves best (ties: the smaller split)."""

    def fill(split: int) -> float:
        ctas = n_tiles * m_tiles * split
        return ctas / (-(-ctas // mg.NUM_SMS) * mg.NUM_SMS)

    split = max((s for s in (1, 2, 4) if steps % s == 0), key=lambda s: (fill(s), -s))
    return steps // split


def configs(w, m: int) -> dict:
    stream = mg.table_config(w, m)
    n_p, k_p = w.codes.shape
    m_p, bm = mg.padded_rows(m)
    length = split_k_steps(n_p // 128, k_p // stream.block_k, m_p // bm)
    return {"split_k": dataclasses.replace(stream, cta_steps=length), "stream_k": stream}


def check(results: list) -> None:
    for fmt in ("w4g128t", "w4g128ta", "w4cht", "w8cht", "nf4t", "fp8t"):
        spec, layout = kb.FORMATS[fmt]
        for m, k, n in [(16, 2048, 384), (1, 4096, 256), (64, 1024, 640), (7, 640, 200)]:
            w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 19 + k)
            base = mg.table_config(w, m)
            total = w.codes.shape[0] // 128 * (w.codes.shape[1] // base.block_k)
            for length in sorted({1, 3, 6, base.cta_steps, total}):
                if total % length:
                    continue
                cfg = dataclasses.replace(base, cta_steps=length)
                results.append(check_row(fmt, w, x, ref, cfg, cta_steps=length))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t"])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 16, 64, 128])
    ap.add_argument("--budget-s", type=float, default=500)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": []}
    check(out["checks"])

    def variants(w, m):
        return jitted(configs(w, m))

    def cta_steps(label, w, m):
        return {f"{label}_cta_steps": configs(w, m)[label].cta_steps}

    cases = [(*shape(name), m) for name in args.shapes for m in args.ms]
    path = os.path.join(args.out, "stream_k_probe.json")
    time_cases(out, path, cases, args.fmts, variants, cta_steps, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
