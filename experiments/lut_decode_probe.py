"""Probe: 4-bit codes (int4, NF4) decoded by a pair table in shared memory (``Config.lut``: one
``ld.shared`` per byte of codes — two bf16 values — from a ``(256, 32)``-word table with a copy
per lane, :mod:`qjax.kernels.gpu.mgpu_decode`) against the register decoders (int4: Mosaic GPU's
``prmt`` / ``lop3`` / ``sub.bf16x2``, 1.6 instructions per code; NF4: the ``prmt`` table, 2.6).

Correctness first (the 4-bit formats, small shapes, x of 1–200 rows, both epilogues), then per
70B shape and M the median device time of both decoders and of XLA's bf16 ``dot`` (weights
rotated over > 150 MB).

    python -m experiments.lut_decode_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import os

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

FORMATS = ("w4g128t", "w4g128ta", "w4cht", "nf4t")


def check(results: list) -> None:
    cases = [(16, 2048, 384), (1, 4096, 256), (64, 1024, 640), (7, 640, 200), (128, 1024, 256),
             (200, 1024, 384)]  # fmt: skip
    for fmt, w, x, ref in check_cases(FORMATS, cases):
        m = x.shape[0]
        base = main_config(w, m)
        for fused in (False, True):
            for sacc in (False, True) if fmt == "nf4t" else (base.scale_acc,):
                opts = dict(lut=True, fused=fused, scale_acc=sacc)
                cfg = mg.config_for(w, m, dataclasses.replace(base, **opts))
                results.append(check_row(fmt, w, x, ref, cfg, **opts))


def main(argv=None) -> None:
    ap = probe_parser(["w4g128t", "nf4t"], [1, 16, 64, 128], 400)
    ap.add_argument("--nf4-variants", action="store_true", help="NF4: scale_acc, 256-code steps")
    ap.add_argument("--regs-only", action="store_true", help="int4: the register decoder only")
    args = ap.parse_args(argv)
    out = start(args, check)

    def configs(w, m):
        base = mg.table_config(w, m)
        opts = {"regs": dict(lut=False), "lut": dict(lut=True)}
        if w.layout == "gpu_nf4t" and args.nf4_variants:
            opts["lut_sacc"] = dict(lut=True, scale_acc=True)
            opts["lut_bk256"] = dict(lut=True, block_k=256, stages=6)
        if args.regs_only and w.layout != "gpu_nf4t":
            opts = {"regs": opts["regs"]}
        return {k: mg.config_for(w, m, dataclasses.replace(base, **o)) for k, o in opts.items()}

    def variants(w, m):
        return jitted(configs(w, m))

    def extra(label, w, m):
        cfg = configs(w, m)[label]
        return {f"{label}_cfg": f"bk{cfg.block_k} st{cfg.stages} L{cfg.cta_steps}"}

    cases = [(*shape(name), m) for m in args.ms for name in args.shapes]
    path = os.path.join(args.out, "lut_decode_probe.json")
    time_cases(out, path, cases, args.fmts, variants, extra, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
