"""Probe: the skinny kernel (:mod:`qjax.kernels.gpu.mgpu_skinny`: one warp group per CTA on a
64-row weight tile, two or three CTAs per SM) against the main kernel's table config
(:func:`qjax.kernels.gpu.mgpu_matmul.table_config`: one CTA per SM, a memory warp group feeding
two compute warp groups) at decode sizes.

Correctness first (every format the skinny kernel takes, small and ragged shapes, M 1 – 16,
scales on the weights and on the float32 sums), then per shape and M the median device time of
the main kernel, of the skinny kernel's config and of its variants, and of XLA's bf16 ``dot``
(weights rotated over > 150 MB).

The runs before the kernel moved to ``qjax`` (``occupancy_probe_first.json``,
``occupancy_probe_uneven.json``, ``occupancy_probe.json``, ``occupancy_probe_8b_smol.json``)
used this probe's own copy of it, with CTAs of unequal step counts filling every SM slot
(``uneven``, dropped: slower) and ``ptxas``'s register counts: ``git show
ded7d90:experiments/occupancy_probe.py``.

    python -m experiments.occupancy_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import (
    check_cases,
    check_row,
    jitted,
    probe_parser,
    shape,
    start,
    time_cases,
)
from qjax.kernels.gpu import mgpu_matmul as mg

FORMATS = ("w4g128t", "w4cht", "w8cht", "fp8t", "nf4t")


def skinny(w, m, **fields) -> mg.Config:
    """The skinny kernel's config for ``w`` and ``m`` rows (``fields`` replaced), fitted."""
    fields = {"path": "skinny", "block_k": 512, "ctas_per_sm": 3, **fields}
    base = dataclasses.replace(mg.table_config(w, m), **fields)
    return mg.config_for(w, m, base)


def check(results: list) -> None:
    cases = [(1, 4096, 256), (16, 2048, 384), (7, 1024, 200), (13, 8192, 1024), (16, 640, 576),
             (1, 576, 192)]  # fmt: skip
    for fmt, w, x, ref in check_cases(FORMATS, cases):
        (m, k), n = x.shape, ref.shape[1]
        for sacc in (False, True):
            cfg = skinny(w, m, scale_acc=sacc)
            results.append(check_row(fmt, w, x, ref, cfg, scale_acc=sacc, L=cfg.cta_steps))
        picked = mg.config_for(w, m)
        y = np.asarray(mg.matmul(x, w), np.float32)  # the dispatch, whichever it took
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        ok = bool(np.isfinite(y).all() and err < 1e-2)
        row = {"fmt": fmt, "M": m, "K": k, "N": n, "dispatch": picked.path, "rel_err": err}
        results.append({**row, "ok": ok})


def main(argv=None) -> None:
    ap = probe_parser(list(FORMATS), [1, 16], 450)
    ap.add_argument("--two-per-sm", action="store_true", help="8-bit, NF4: two CTAs per SM as well")
    args = ap.parse_args(argv)
    out = start(args, check)

    def configs(w, m):
        cfgs = {"main": mg.table_config(w, m), "skinny": skinny(w, m)}
        if w.layout == "gpu_i4t":
            cfgs["skinny_sacc"] = skinny(w, m, scale_acc=not cfgs["skinny"].scale_acc)
        elif args.two_per_sm:  # larger K steps (or the pair table) fit two CTAs per SM
            cfgs["skinny_2sm"] = skinny(w, m, ctas_per_sm=2)
        if w.layout == "gpu_nf4t":  # NF4 by the register decoder: no table, 512-code steps
            cfgs["skinny_regs"] = skinny(w, m, lut=False)
        return cfgs

    def variants(w, m):
        return jitted(configs(w, m))

    def extra(label, w, m):
        label_cfg = kb.config_label(dataclasses.asdict(configs(w, m)[label]))
        return {f"{label}_cfg": label_cfg, "picked": mg.config_for(w, m).path}

    cases = [(*shape(name), m) for m in args.ms for name in args.shapes]
    path = os.path.join(args.out, "occupancy_probe.json")
    time_cases(out, path, cases, args.fmts, variants, extra, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
