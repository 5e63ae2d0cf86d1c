"""Probe: the main kernel's split tiles added **by whichever of their two CTAs finishes last**
(``Config.last_adds``: each CTA writes its float32 sum to the workspace and draws a ticket from
an atomic counter per tile; the one that draws the second adds the other's sum to its own and
writes ``y``) against the table's config, which adds them in an XLA pass after the kernel where
a tile's two CTAs end together (8192² and 8192×28672 from 17 rows of ``x``: 2.0 – 3.7 µs at
M = 64, 3.1 – 5.1 µs at 128, ``skinny_rows_probe_breakdown.json``), or by the tile's first CTA
waiting for the other where hand-offs come early (57344×8192).

Two sums add to the same bits in either order, so the result does not depend on which CTA
finishes last; the checks run each case twice and compare bits. Only schedules whose tiles lie
in at most two CTAs' runs take ``last_adds`` (:func:`~qjax.kernels.gpu.mgpu_matmul.fit`).

    python -m experiments.last_adds_probe --out DIR      # on the GPU
    python -m experiments.last_adds_probe --out DIR --no-check --breakdown --ms 64 128
"""

from __future__ import annotations

import dataclasses
import os

import jax

from experiments import kernel_bench as kb
from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_matmul as mg

CHECKS = [(64, 8192, 8192), (128, 8192, 8192), (37, 8192, 8192), (32, 28672, 8192),
          (100, 28672, 8192), (16, 8192, 57344), (1, 8192, 8192)]  # fmt: skip


def configs(w, m: int) -> dict:
    """``main``: the table's config (the dispatch's above 16 rows); ``last``: the same with
    ``last_adds``, where :func:`~qjax.kernels.gpu.mgpu_matmul.fit` keeps it."""
    main = mg.table_config(w, m)
    last = mg.config_for(w, m, dataclasses.replace(main, last_adds=True))
    return {"main": main, **({"last": last} if last.last_adds else {})}


def check(rows: list, fmts) -> None:
    for fmt, w, x, ref in lib.check_cases(fmts, CHECKS):
        cfg = configs(w, x.shape[0]).get("last")
        if cfg is not None:
            rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, L=cfg.cta_steps,
                                            bk=cfg.block_k))  # fmt: skip


def main(argv=None) -> None:
    ap = lib.probe_parser(["w4g128t"], [32, 64, 128], 300)
    ap.set_defaults(shapes=["o", "down", "gate_up"])
    ap.add_argument("--check-fmts", nargs="*",
                    default=["w4g128t", "w4g128ta", "w8cht", "nf4t", "fp8t"])  # fmt: skip
    ap.add_argument("--breakdown", action="store_true", help="record each call's kernels (µs)")
    args = ap.parse_args(argv)
    out = lib.start(args, lambda rows: check(rows, args.check_fmts))

    def extra(label, w, m):
        cfg = configs(w, m)[label]
        row = {f"{label}_cfg": kb.config_label(dataclasses.asdict(cfg))}
        if args.breakdown:
            f = jax.jit(lambda x, w: mg.matmul(x, w, config=cfg))
            x = jax.random.normal(jax.random.key(m), (m, w.shape[0]), jax.numpy.bfloat16)
            row[f"{label}_kernels"] = kb.kernel_breakdown(f, (x, w))
        return row

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "last_adds_probe.json")
    lib.time_cases(out, path, cases, args.fmts, lambda w, m: lib.jitted(configs(w, m)), extra,
                   args.budget_s)  # fmt: skip
    print("devices", jax.devices())


if __name__ == "__main__":
    main()
