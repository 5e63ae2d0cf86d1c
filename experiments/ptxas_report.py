"""What ``ptxas`` says about the Mosaic GPU kernel: registers, spills and its performance
warnings (e.g. ``wgmma`` serialization) for the table config at each M, per format.

Sets Mosaic GPU's dump flags (``MOSAIC_GPU_DUMP_PTXAS``, ``MOSAIC_GPU_DUMP_SASS``,
``MOSAIC_GPU_DUMP_TO``) before jax loads, compiles one call per case, and writes the ``ptxas``
lines and a count of some SASS instructions (``HGMMA``, ``WARPGROUP.DEPBAR`` / ``ARRIVE``, the
decoders' ``PRMT`` / ``LOP3``) to ``OUT/ptxas_report.json``.

    python -m experiments.ptxas_report --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

SASS_OPS = ("HGMMA", "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "PRMT", "LOP3", "HFMA2", "HMUL2")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t", "nf4t", "w8cht"])
    ap.add_argument("--ms", nargs="*", type=int, default=[16, 64, 128])
    ap.add_argument("--dump", default="/tmp/qjax_ptxas", help="where the dumps go (large)")
    args = ap.parse_args(argv)
    report: dict = {}
    for fmt in args.fmts:
        for m in args.ms:
            dump = os.path.join(args.dump, f"{fmt}_m{m}")
            os.makedirs(dump, exist_ok=True)
            os.environ.update(MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_DUMP_SASS="1",
                              MOSAIC_GPU_DUMP_TO=dump)  # fmt: skip
            import jax

            from experiments import kernel_bench as kb
            from qjax.kernels.gpu import mgpu_matmul as mg

            spec, layout = kb.FORMATS[fmt]
            w, x, _ = kb.check_case(spec, layout, m, 8192, 8192, seed=0)
            cfg = mg.config_for(w, m)
            jax.block_until_ready(mg.matmul(x, w, config=cfg))
            text = "\n".join(
                open(f, errors="replace").read() for f in sorted(glob.glob(f"{dump}/*"))
            )
            lines = [ln.strip() for ln in text.splitlines() if "ptxas" in ln]
            sass = {op: len(re.findall(op, text)) for op in SASS_OPS}
            report[f"{fmt} M={m}"] = {"config": str(cfg), "ptxas": lines[:40], "sass_counts": sass,
                                      "files": sorted(os.listdir(dump))}  # fmt: skip
            print(fmt, m, cfg, *lines[:12], sass, sep="\n  ", flush=True)
    with open(os.path.join(args.out, "ptxas_report.json"), "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
