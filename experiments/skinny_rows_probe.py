"""Probe: the skinny kernel (:mod:`qjax.kernels.gpu.mgpu_skinny`: one warp group per CTA on a
64-row weight tile, two or three CTAs per SM, partial sums added by an XLA pass or by clusters
of two) **above 16 rows of x** — 32, 64 and 128, where the dispatch takes the main kernel
(one CTA per SM, a memory warp group feeding two compute warp groups) and W4's M = 64 / 128
targets are missed. The question: do independent CTAs, whose decode and ``wgmma`` interleave
on an SM without a shared stage barrier, hide more of the decode than the main kernel's two
compute warp groups (which run in phase, README "ncu")? Against it: a 64-row weight tile reads
the step's ``x`` from L2 for 64 weight rows instead of 128.

The skinny kernel is refused above :data:`~qjax.kernels.gpu.mgpu_skinny.MAX_ROWS` rows (where
it was measured); this probe lifts that bound for its own process only (``--max-rows``).

Also at M ≤ 16 for the weights the dispatch keeps on the main kernel there (NF4 on the
Llama-3-70B shapes: its 32 KB pair table leaves the skinny kernel 256-code steps at three CTAs
per SM; two per SM leave 512, and clusters of two drop the XLA pass).

Device checks first (M 1 – 128 incl. ragged, every variant), then per shape and M the median
device time of the main kernel's table config (``main``) and of each skinny variant
``bk{K step}_{CTAs per SM}sm_cl{cluster}``, and XLA's bf16 ``dot`` (weights rotated > 150 MB).

    python -m experiments.skinny_rows_probe --out DIR      # on the GPU
    python -m experiments.skinny_rows_probe --out DIR --fmts nf4t --ms 1 16 --shapes qkv o down
    python -m experiments.skinny_rows_probe --out DIR --fmts nf4t --dispatch-checks

At 42d0aa8 it also timed ``main_cl2``: the main kernel with each weight tile's two CTAs in one
cluster, the later storing its float32 sums into the first's shared memory (no XLA pass;
``main_pair_cluster_probe.json``, not adopted).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from experiments import kernel_bench as kb
from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk

VARIANTS = {  # rows of x -> (K step before fitting, CTAs per SM, most CTAs per cluster)
    16: [(512, 3, 0), (512, 3, 2), (512, 2, 0), (512, 2, 2)],  # for NF4 (`--fmts nf4t`)
    32: [(512, 3, 0), (512, 3, 2), (512, 2, 0), (512, 2, 2)],
    64: [(256, 2, 0), (256, 2, 2), (128, 3, 0), (128, 3, 2), (128, 2, 0)],
    128: [(128, 2, 0), (128, 2, 2)],
}
CHECKS = [(64, 8192, 10240), (128, 4096, 6144), (50, 2048, 1536), (100, 4096, 4096),
          (24, 14336, 4096), (1, 8192, 8192), (16, 4096, 6144), (7, 2048, 1536)]  # fmt: skip


DISPATCH_ROWS = sk.MAX_ROWS  # rows up to which the dispatch takes the skinny kernel (before
#                             `main` lifts the bound for this process)


def bucket(m: int) -> int:
    return next(b for b in sorted(VARIANTS) if m <= b)


def configs(w, m: int, only=None) -> dict:
    """``main`` (the table's config), ``dispatch`` (``qjax.matmul``'s, where it differs) and the
    skinny variants for ``m`` rows, fitted (the scales placed as the table places them) and run
    in one wave; variants that fit to the same config are timed once."""
    main = mg.table_config(w, m)
    out = {"main": main}
    picked = mg.config_for(w, m)  # the dispatch's own (skinny, at M ≤ 16)
    if m <= DISPATCH_ROWS and picked != main:
        out["dispatch"] = picked
    for bk, per_sm, most in VARIANTS[bucket(m)]:
        cfg = dataclasses.replace(
            main, path="skinny", block_k=bk, ctas_per_sm=per_sm, cluster=most, fused=None
        )
        cfg = mg.config_for(w, m, cfg)
        n_p, k_p = w.codes.shape
        ctas = n_p // sk.ROWS * (k_p // cfg.block_k) // cfg.cta_steps
        if cfg not in out.values() and ctas <= mg.NUM_SMS * per_sm:  # one wave (clusters of
            #                                                          two may not give one)
            out[f"bk{cfg.block_k}_{per_sm}sm_cl{cfg.cluster}"] = cfg
    return {k: v for k, v in out.items() if not only or k in only}


def check(rows: list, fmts, only=None) -> None:
    for fmt, w, x, ref in lib.check_cases(fmts, CHECKS):
        for label, cfg in configs(w, x.shape[0], only).items():
            rows.append(lib.check_row(fmt, w, x, ref, cfg, variant=label, L=cfg.cta_steps,
                                      bk=cfg.block_k, cluster=cfg.cluster))  # fmt: skip


DISPATCH_CHECKS = [(1, 8192, 10240), (16, 8192, 10240), (5, 8192, 10240), (1, 8192, 8192),
                   (16, 8192, 8192), (9, 8192, 8192), (1, 28672, 8192), (16, 28672, 8192),
                   (13, 28672, 8192), (3, 4096, 6144)]  # fmt: skip


def check_dispatch(rows: list, fmts) -> None:
    """``qjax.matmul``'s own config (no ``config``) on the 70B shapes at decode sizes, each case
    run twice (clustered partial sums are added in slot order: the same bits)."""
    for fmt, w, x, ref in lib.check_cases(fmts, DISPATCH_CHECKS):
        config = str(mg.config_for(w, x.shape[0]))
        rows.append(lib.check_row_twice(fmt, w, x, ref, None, dispatch=True, config=config))


def main(argv=None) -> None:
    ap = lib.probe_parser(["w4g128t"], [64, 128], 480)
    ap.add_argument(
        "--max-rows", type=int, default=128, help="rows of x the skinny kernel may take here"
    )
    ap.add_argument("--dispatch-checks", action="store_true", help="check qjax.matmul's pick")
    ap.add_argument("--breakdown", action="store_true", help="record each call's kernels (µs)")
    ap.add_argument("--only", nargs="*", help="time (and check) only these variants")
    args = ap.parse_args(argv)
    if args.dispatch_checks:  # before the bound is lifted: the dispatch as it is
        out = lib.start(args, lambda rows: check_dispatch(rows, args.fmts))
        with open(os.path.join(args.out, "dispatch_checks.json"), "w") as fh:
            json.dump(out, fh, indent=1)
        return
    sk.MAX_ROWS = args.max_rows  # this process only: the bound the dispatch keeps is 16
    out = lib.start(args, lambda rows: check(rows, args.fmts, args.only))

    def variants(w, m):
        return lib.jitted(configs(w, m, args.only))

    def extra(label, w, m):
        cfg = configs(w, m, args.only)[label]
        row = {f"{label}_cfg": kb.config_label(dataclasses.asdict(cfg))}
        if args.breakdown:  # the kernels of one call (the main kernel's XLA pass, if any)
            f = jax.jit(lambda x, w: mg.matmul(x, w, config=cfg))
            x = jax.random.normal(jax.random.key(m), (m, w.shape[0]), jax.numpy.bfloat16)
            row[f"{label}_kernels"] = kb.kernel_breakdown(f, (x, w))
        return row

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "skinny_rows_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, extra, args.budget_s)
    print("devices", jax.devices())


if __name__ == "__main__":
    main()
