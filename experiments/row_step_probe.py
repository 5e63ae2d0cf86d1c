"""Probe: ``wgmma`` with N = 8 rows of ``x`` (``mgpu_matmul.ROW_STEP``) against x padded to 16 rows,
at M = 1 and 8, Mosaic GPU int4 / NF4 / int8 / FP8 kernel.

At decode sizes the kernel is partly bound by its tensor-core and decode work, not only by HBM:
padding one row of ``x`` to 16 doubles the ``wgmma`` work against padding it to 8. Correctness
first (every Mosaic format at M = 1, 3, 8, 24 against ``dequantize`` + float32 dot), then per
70B shape the median device time of both (weights rotated over > 150 MB) and of XLA's bf16 ``dot``.

    python -m experiments.row_step_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import SHAPES, check_row, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg


def padded_to_16(x, w):
    m = x.shape[0]
    return mg.matmul(jnp.pad(x, [(0, 16 - m), (0, 0)]), w)[:m]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t", "nf4t", "w8cht", "fp8t"])
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": []}
    for fmt in ("w4g128t", "w4g128ta", "w4cht", "w8cht", "nf4t", "fp8t"):
        spec, layout = kb.FORMATS[fmt]
        for m, k, n in [(1, 4096, 512), (3, 640, 384), (8, 2048, 256), (24, 1024, 300)]:
            w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 29 + k)
            out["checks"].append(check_row(fmt, w, x, ref))
    cases = [(n, k, m) for n, k in SHAPES.values() for m in (1, 8)]
    variants = {"rows8": jax.jit(mg.matmul), "rows16": jax.jit(padded_to_16)}
    path = os.path.join(args.out, "row_step_probe.json")
    time_cases(out, path, cases, args.fmts, lambda w, m: variants)


if __name__ == "__main__":
    main()
