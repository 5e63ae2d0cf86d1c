"""Probe: the Mosaic GPU kernel itself at prefill sizes (``M`` = 2048: 16 row blocks of 128 rows of
``x``, each weight tile decoded once per row block) against the large-M path the table takes there
(:func:`qjax.kernels.calls.dequantized_matmul`: one dequantization pass + XLA's bf16 GEMM), and
XLA's bf16 ``dot``; weights rotated over > 150 MB. One correctness row per config first.

    python -m experiments.large_m_mgpu_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import SHAPES, check_row, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg

CONFIGS = {
    "mgpu_bk128": mg.Config("mgpu", 128, None, 4),
    "mgpu_bk128_minner": mg.Config("mgpu", 128, None, 4, m_inner=True),
}  # the committed runs: bk256 (st3) in large_m_mgpu_probe.json, then these two


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t"])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--ms", nargs="*", type=int, default=[2048])
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": []}

    def configs(w, m, labels):
        lut = w.layout == "gpu_nf4t"  # NF4: the pair table, as the table's configs
        return {k: mg.config_for(w, m, dataclasses.replace(CONFIGS[k], lut=lut)) for k in labels}

    for fmt in [] if args.no_check else args.fmts:
        spec, layout = kb.FORMATS[fmt]
        w, x, ref = kb.check_case(spec, layout, 2048, 1024, 512, seed=5)
        for label, cfg in configs(w, 2048, CONFIGS).items():
            out["checks"].append(check_row(fmt, w, x, ref, cfg, config=label))

    def variants(w, m):
        cfgs = {"xla": mg.Config("xla"), **configs(w, m, args.configs)}  # xla: dequantize + GEMM
        return {label: jax.jit(lambda x, w, cfg=cfg: mg.matmul(x, w, config=cfg))
                for label, cfg in cfgs.items()}  # fmt: skip

    cases = [(*SHAPES[name], m) for m in args.ms for name in args.shapes]
    path = os.path.join(args.out, "large_m_mgpu_probe.json")
    time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
