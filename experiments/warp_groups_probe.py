"""Probe: four compute warp groups per CTA (``Config.warp_groups``, 256-row weight tiles) against
the table's two, at decode sizes.

Why: Nsight Compute on the M = 1 kernel (``ncu_profile``, int4 57344×8192) found the stream at
78.5 % of HBM peak with the compute warps busy most of each step — issuing 26 % of their loop
samples, waiting on ALU latency 22 %, not selected 14 %, waiting for TMA data only 14 % — yet a
decoder 10 % cheaper in instructions gained nothing: two compute warps per scheduler leave the
decode's dependency chains exposed. Four warp groups give each scheduler four compute warps
(≤ 112 registers each) and each K step twice the weight bytes per barrier; the price is shared
memory (fewer or smaller stages) and half as many tiles to spread over the SMs.

Mosaic GPU's warp-specialized pipeline splits the register file as if it held 512 registers per
lane of a warp group (``pipeline._compute_registers``: ``(512 − memory) / compute``, 112 for four
compute warp groups) but a CTA of 5 × 128 threads launches with 96 each (``ptxas``), and
``setmaxnreg.inc`` only takes what the memory warp group released: the 4-group kernel as
Mosaic GPU builds it waits forever (measured). The probe therefore patches that split to what
the launch allows (104 registers per compute thread) while it traces; ``ptxas`` still reports
serialized ``wgmma`` for lack of registers.

Correctness first (every format; shapes whose ``N_p`` is and is not a multiple of 256 — the
latter fall back to two warp groups), then per 70B shape and M the median device time of each
variant and of XLA's bf16 ``dot`` (weights rotated > 150 MB).

    python -m experiments.warp_groups_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import os

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import SHAPES, check_row, jitted, probe_parser, start, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg

CHECKS = [(1, 4096, 256), (16, 2048, 512), (64, 1024, 768), (16, 1024, 384), (37, 640, 512),
          (128, 1024, 512)]  # fmt: skip
BLOCK_KS = (512, 256, 128)  # K steps tried with four warp groups (stages: as many as fit)
REGISTERS = 64 * 1024  # per SM (and the most one CTA may launch with)


def patch_register_split() -> None:
    """Makes Mosaic GPU's compute warp groups ask ``setmaxnreg`` for no more registers than the
    CTA launched with minus what the memory warp group gives back (module docstring)."""
    from jax._src.pallas.mosaic_gpu import pipeline

    original = pipeline._compute_registers

    def split(memory_registers: int, num_compute_wgs: int) -> int:
        if num_compute_wgs <= 2:
            return original(memory_registers, num_compute_wgs)
        launch = REGISTERS // (128 * (num_compute_wgs + 1)) // 8 * 8
        spare = launch * (num_compute_wgs + 1) - memory_registers
        return min(256, spare // num_compute_wgs) // 8 * 8

    pipeline._compute_registers = split


def variants_of(w, m) -> dict:
    """``label: config``: the table's, and four warp groups at each K step in :data:`BLOCK_KS`
    with as many stages as shared memory holds (at most 5; `fit` cuts them; fewer than 2: not
    a pipeline, left out)."""
    table = mg.config_for(w, m)
    out = {"table": table}
    for bk in BLOCK_KS:
        cand = dataclasses.replace(table, warp_groups=4, block_k=bk, stages=5, cta_steps=None)
        cand = dataclasses.replace(cand, fused=None)
        cfg = mg.config_for(w, m, cand)
        if cfg.warp_groups == 4 and cfg.block_k == bk and cfg.stages >= 2:
            out[f"wg4_bk{bk}_st{cfg.stages}"] = cfg
    return out


def main(argv=None) -> None:
    ap = probe_parser(["w4g128t", "nf4t", "w8cht", "fp8t"], [1, 16, 64], 400)
    args = ap.parse_args(argv)
    patch_register_split()

    def check(results):
        for fmt in ("w4g128t", "w4g128ta", "w4cht", "w8cht", "fp8t", "nf4t"):
            spec, layout = kb.FORMATS[fmt]
            for m, k, n in CHECKS:
                w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 7 + k)
                for label, cfg in variants_of(w, m).items():
                    results.append(check_row(fmt, w, x, ref, cfg, config=label, resolved=str(cfg)))

    out = start(args, check)

    def variants(w, m):
        return jitted(variants_of(w, m))

    cases = [(*SHAPES[name], m) for m in args.ms for name in args.shapes]
    path = os.path.join(args.out, "warp_groups_probe.json")
    time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
