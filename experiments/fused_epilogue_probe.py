"""Probe: stream-K partial sums added *in* the Mosaic GPU kernel (``Config.fused``: a weight
tile's later CTAs hand their float32 sums to its first CTA through a workspace and a semaphore;
the first adds them, scales per channel, casts and writes ``y`` transposed) against the kernel
writing every partial sum and one XLA pass adding, transposing and casting them (``fused=False``).
The committed ``fused_epilogue_probe.json`` also times both with ``x`` TMA-multicast to clusters
of two CTAs that take the same K steps (``_mc``; the option, code at 5ba92fc, was removed: within
±2 %, so the kernel is not bound by L2 → shared memory traffic of ``x``); its checks ran with it.

Correctness first (every Mosaic format, small shapes, K steps per CTA that do and do not divide a
tile's steps, x of 1–200 rows; each case run twice: the semaphores live across calls and must
come back to zero, and the result must not change), then per 70B shape and M the median device
time of both epilogues and of XLA's bf16 ``dot`` (weights rotated over > 150 MB).

    python -m experiments.fused_epilogue_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from experiments.mgpu_probe_lib import (
    check_cases,
    check_row,
    jitted,
    main_config,
    probe_parser,
    shape,
    start,
    time_cases,
)
from qjax.kernels.gpu import mgpu_matmul as mg

FORMATS = ("w4g128t", "w4g128ta", "w4cht", "w8cht", "nf4t", "fp8t")


def check(results: list) -> None:
    cases = [(16, 2048, 384), (1, 4096, 256), (64, 1024, 640), (7, 640, 200), (100, 1024, 256),
             (200, 1024, 384)]  # fmt: skip
    for fmt, w, x, ref in check_cases(FORMATS, cases):
        m = x.shape[0]
        base = main_config(w, m)
        total = w.codes.shape[0] // 128 * (w.codes.shape[1] // base.block_k)
        for length in sorted({1, 3, 6, base.cta_steps, total}):
            if total % length:
                continue
            cfg = dataclasses.replace(base, cta_steps=length, fused=True)
            row = check_row(fmt, w, x, ref, cfg, cta_steps=length)
            if row.get("ok"):  # the second call: same bits (semaphores back at zero)
                y1 = np.asarray(mg.matmul(x, w, config=cfg))
                y2 = np.asarray(mg.matmul(x, w, config=cfg))
                row["repeat_identical"] = bool(np.array_equal(y1, y2))
                row["ok"] = row["repeat_identical"]
            results.append(row)


def main(argv=None) -> None:
    ap = probe_parser(["w4g128t", "w8cht", "fp8t"], [1, 16, 64, 128], 400)
    args = ap.parse_args(argv)
    out = start(args, check)

    def variants(w, m):
        base = mg.table_config(w, m)
        return jitted({"combine": dataclasses.replace(base, fused=False),
                       "fused": dataclasses.replace(base, fused=True)})  # fmt: skip

    cases = [(*shape(name), m) for name in args.shapes for m in args.ms]
    path = os.path.join(args.out, "fused_epilogue_probe.json")
    time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
