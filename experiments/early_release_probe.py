"""Probe: the skinny kernel with each K step's codes read into registers and their slot refilled
**before** the step's decode and ``wgmma`` (``early``, ``Config.early_release``) against the
dispatched kernel (``dispatch``), which refills a slot only once the step's ``wgmma`` is done —
same run, against XLA's bf16 ``dot``.

With its two stages, the dispatched kernel has one K step of codes in flight while it decodes
and multiplies the other; the stream alone (``stream_floor_probe``: no decode, no ``wgmma``)
keeps two. The decode and ``wgmma`` the stream does not hide cost 1.6 – 2.7 µs on the small
Llama-3-70B shapes (``stream_cost_probe.json``), spread over the steps, not a tail
(``skinny_step_probe.json``). ``early`` keeps two steps of codes in flight throughout, in the
same shared memory (``x`` and the scale rows are still released after the ``wgmma``).
``early_pass``: the same without clusters, an XLA pass adding the split tiles' sums (on
10240 × 8192 its schedule holds two CTAs per SM where the clustered one has 56 SMs with three).

Checks first (unless ``--no-check``): ``early`` against the float32 reference for every format
the skinny kernel takes, at M = 1 / 16, clustered and with the XLA pass, each run twice for
identical bits.

    python -m experiments.early_release_probe --out DIR        # on the GPU
"""

from __future__ import annotations

import dataclasses
import os

from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_matmul as mg

FORMATS = ["w4g128t", "nf4t", "w8cht", "fp8t"]
CHECKS = [(1, 8192, 8192), (16, 8192, 10240), (5, 4096, 6144), (16, 1536, 576)]
SHAPES = ["qkv", "o", "down"]  # the skinny kernel's Llama-3-70B shapes at M ≤ 16


def early(cfg: mg.Config) -> mg.Config:
    """``cfg`` (the skinny kernel's) with ``early_release``."""
    assert cfg.path == "skinny", cfg
    return dataclasses.replace(cfg, early_release=True)


def check(rows: list) -> None:
    for fmt, w, x, ref in lib.check_cases(FORMATS, CHECKS):
        cfg = early(mg.config_for(w, x.shape[0]))
        rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, cluster=cfg.cluster))
        if cfg.cluster:  # the same with the XLA pass
            cfg = early(mg.config_for(w, x.shape[0], dataclasses.replace(cfg, cluster=0)))
            rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, cluster=cfg.cluster))


def main(argv=None) -> None:
    ap = lib.probe_parser(FORMATS, [1, 16], 300)
    ap.set_defaults(shapes=SHAPES)
    args = ap.parse_args(argv)
    out = lib.start(args, check)

    def variants(w, m):
        cfg = mg.config_for(w, m)
        cfgs = {"dispatch": cfg, "early": early(cfg)}
        if cfg.cluster:  # the schedule without clusters (10240 × 8192: two CTAs per SM)
            cfgs["early_pass"] = early(mg.config_for(w, m, dataclasses.replace(cfg, cluster=0)))
        return lib.jitted(cfgs)

    def config(label, w, m):
        cfg = mg.config_for(w, m)
        return {"config": f"bk{cfg.block_k} L{cfg.cta_steps} {cfg.ctas_per_sm}/SM cl{cfg.cluster}"}

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "early_release_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, extra=config, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
