"""Probe: the Mosaic GPU kernel itself at prefill sizes (``M`` = 2048: 16 row blocks of 128 rows of
``x``, each weight tile decoded once per row block) against the large-M path the table takes there
(:func:`qjax.kernels.calls.dequantized_matmul`: one dequantization pass + XLA's bf16 GEMM), and
XLA's bf16 ``dot``; weights rotated over > 150 MB. One correctness row per config first.

    python -m experiments.large_m_mgpu_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import os

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import check_row, jitted, probe_parser, shape, start, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg

CONFIGS = {
    "mgpu_bk128": mg.Config("mgpu", 128, None, 4),
    "mgpu_bk128_minner": mg.Config("mgpu", 128, None, 4, m_inner=True),
    "mgpu_bm256": mg.Config("mgpu", 128, None, 2, m_inner=True, block_m=256, grouped=False),
    "mgpu_bm256_grouped": mg.Config("mgpu", 128, None, 2, m_inner=True, block_m=256, grouped=True),
}  # the committed runs: bk256 (st3) in large_m_mgpu_probe.json, then bk128 (± m_inner); then
#    256-row blocks of x (`_bm256`; its `_reg` column: NF4 by the register decoder, as `fit`
#    now does for 256 rows), at b7e6bee x TMA-multicast to CTA pairs (`_mc`), and at 38e1e4a
#    ping-pong of the compute warp groups (`_pp`, `pingpong_issue_probe_*.json`); then jobs
#    grouped by row blocks (`_grouped`)
CHECKS = [
    (2048, 1024, 512),
    (300, 2048, 384),
    (1000, 1280, 200),
    (512, 8192, 1024),
    (5000, 1024, 640),
]


def main(argv=None) -> None:
    ap = probe_parser(["w4g128t"], [2048], 200)
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = ap.parse_args(argv)

    def configs(w, m, labels):
        lut = w.layout == "gpu_nf4t"  # NF4: the pair table, as the table's configs
        return {k: mg.config_for(w, m, dataclasses.replace(CONFIGS[k], lut=lut)) for k in labels}

    def check(results):
        for fmt in args.fmts:
            spec, layout = kb.FORMATS[fmt]
            for m, k, n in CHECKS:
                w, x, ref = kb.check_case(spec, layout, m, k, n, seed=5 + m)
                for label, cfg in configs(w, m, args.configs).items():
                    results.append(check_row(fmt, w, x, ref, cfg, config=label, resolved=str(cfg)))
                results.append(check_row(fmt, w, x, ref, None, config="table"))

    out = start(args, check)

    def variants(w, m):  # xla: dequantize + GEMM
        return jitted({"xla": mg.Config("xla"), **configs(w, m, args.configs)})

    cases = [(*shape(name), m) for m in args.ms for name in args.shapes]
    path = os.path.join(args.out, "large_m_mgpu_probe.json")
    time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
