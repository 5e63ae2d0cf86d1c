"""What ``ptxas`` says about the Mosaic GPU kernel: registers, spills and its performance
warnings (e.g. ``wgmma`` serialization) for the table config at each M, per format.

Sets Mosaic GPU's dump flags (``MOSAIC_GPU_DUMP_PTXAS``, ``MOSAIC_GPU_DUMP_PTX``,
``MOSAIC_GPU_DUMP_TO``) before jax loads, compiles one call per case (8192 × 8192), and writes
the ``ptxas`` lines (registers, and any "Potential Performance Loss" such as serialized
``wgmma``) and counts of some PTX instructions to ``OUT/ptxas_report.json``.

    python -m experiments.ptxas_report --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import glob
import json
import os

PTX_OPS = (
    "wgmma.mma_async",
    "wgmma.fence",
    "wgmma.commit_group",
    "wgmma.wait_group",
    "prmt.b32",
    "lop3.b32",
    "mul.rn.bf16x2",
    "fma.rn.bf16x2",
)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t", "nf4t", "w8cht"])
    ap.add_argument("--ms", nargs="*", type=int, default=[16, 64, 128])
    ap.add_argument("--dump", default="/tmp/qjax_ptxas", help="where the dumps go (large)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ.update(
        MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=args.dump
    )
    import jax  # after the flags: Mosaic GPU reads them when it compiles

    from experiments import kernel_bench as kb
    from qjax.kernels.gpu import mgpu_matmul as mg

    report: dict = {}
    for fmt in args.fmts:
        for m in args.ms:
            before = set(glob.glob(f"{args.dump}/*"))
            spec, layout = kb.FORMATS[fmt]
            w, x, _ = kb.check_case(spec, layout, m, 8192, 8192, seed=0)
            cfg = mg.table_config(w, m)
            jax.block_until_ready(mg.matmul(x, w, config=cfg))
            new = sorted(set(glob.glob(f"{args.dump}/*")) - before)
            ptxas = "".join(open(f).read() for f in new if f.endswith(".ptxas"))
            ptx = "".join(open(f).read() for f in new if f.endswith(".ptx"))
            row = {"config": str(cfg), "ptxas": [ln.strip() for ln in ptxas.splitlines()
                                                 if ln.strip()][:40],
                   "ptx_counts": {op: ptx.count(op) for op in PTX_OPS}}  # fmt: skip
            report[f"{fmt} M={m}"] = row
            print(fmt, m, json.dumps(row, indent=1), flush=True)
    with open(os.path.join(args.out, "ptxas_report.json"), "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
