"""Probe: the Mosaic GPU kernels reading ``x`` as it is (``unpadded``,
:func:`qjax.kernels.gpu.mgpu_matmul.kernel_rows`: TMA fills the columns past ``K`` with zeros)
against ``x`` padded along ``K`` to the repacked ``K_p`` first (``padded``, as before: one XLA pad
kernel before every call) — same run, against XLA's bf16 ``dot``.

SmolLM2-135M's 576-wide layers are repacked to ``K_p`` = 640, so every q / k / v / gate / up
product padded ``x`` first (``loop_pad_fusion`` in ``decode_bench_gaps.md``: 0.07 ms per decode
step at batch 16, and idle gaps around it). The Llama-3-70B shapes have no padding: nothing
changes there (``smol_down``, ``K`` = 1536, is the control).

Checks first (unless ``--no-check``): ``unpadded`` against the float32 reference for every
Mosaic GPU layout, skinny (M ≤ 16) and main kernel (M = 17 – 300), ``K`` = 576 and 320, and a
``K`` of 1000 (not a multiple of the tiles' 64 columns: padded as before), each run twice for
identical bits.

    python -m experiments.x_pad_probe --out DIR        # on the GPU
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

from experiments import mgpu_probe_lib as lib
from qjax.kernels import calls
from qjax.kernels.gpu import mgpu_matmul as mg

FORMATS = ["w4g128t", "nf4t", "w8cht", "fp8t", "w4g128ta"]
CHECKS = [(1, 576, 576), (16, 576, 1536), (17, 576, 192), (64, 576, 576), (300, 576, 1536),
          (5, 320, 256), (5, 1000, 384)]  # fmt: skip
SHAPES = ["smol_qo", "smol_kv", "smol_up", "smol_down"]


def padded():
    """``x`` padded along ``K`` before the kernels, as before (:func:`lib.retraced` patch)."""
    return lib.retraced(mock.patch.object(mg, "kernel_rows", calls.as_rows))


def check(rows: list) -> None:
    for fmt, w, x, ref in lib.check_cases(FORMATS, CHECKS):
        cfg = mg.config_for(w, x.shape[0])
        rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, path=cfg.path, K_p=w.codes.shape[1]))


def main(argv=None) -> None:
    ap = lib.probe_parser(FORMATS[:4], [1, 16, 64], 300)
    ap.set_defaults(shapes=SHAPES)
    args = ap.parse_args(argv)
    out = lib.start(args, check)

    def variants(w, m):
        return {
            "padded": lib.compiled_under(padded(), w, m),
            "unpadded": lib.compiled_under(contextlib.nullcontext(), w, m),
        }

    def config(label, w, m):
        cfg = mg.config_for(w, m)
        return {"path": cfg.path, "K_p": w.codes.shape[1]}

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "x_pad_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, extra=config, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
