"""Probe: NF4 on the skinny kernel with 128-code tile rows, decodes and ``wgmma`` (``loads128``,
:data:`qjax.kernels.gpu.mgpu_skinny.NF4_LOAD_CODES` = 128: each decoded slice spans two scale
blocks, scaled per block by :func:`~qjax.kernels.gpu.mgpu_decode.times_column_blocks`) against
the dispatch's 64-code ones (``slices64``) — same run, the dispatched config, against XLA's bf16
``dot``; int4 g128 (128-code slices already, the same kernel either way) as the control.

``stream_cost_probe`` found NF4's kernel with a constant ``wgmma`` operand 2 – 6 µs slower than
int4's, on 1.03× the bytes. Two suspects this tests at once: NF4's 64-code tiles make every TMA
row of codes 32 bytes (int4's: 64), and each K step twice the ``wgmma`` groups and waits.

Checks first (unless ``--no-check``): ``loads128`` at M = 1 and 16 against the float32
reference, NF4 on an 8192² weight (clusters) and a 4096 × 6144 one (the XLA pass), run twice
for identical bits.

    python -m experiments.nf4_wide_probe --out DIR        # on the GPU
"""

from __future__ import annotations

import os
from unittest import mock

from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_skinny as sk

LOADS = {"slices64": 64, "loads128": 128}  # label -> NF4_LOAD_CODES
CHECKS = [(m, k, n) for m in (1, 16) for k, n in ((8192, 8192), (4096, 6144))]


def nf4_loads(codes: int):
    """:data:`~qjax.kernels.gpu.mgpu_skinny.NF4_LOAD_CODES` set while kernels are traced
    (:func:`~experiments.mgpu_probe_lib.retraced`)."""
    return lib.retraced(mock.patch.object(sk, "NF4_LOAD_CODES", codes))


def check(rows: list) -> None:
    with nf4_loads(128):
        for fmt, w, x, ref in lib.check_cases(["nf4t"], CHECKS):
            rows.append(lib.check_row_twice(fmt, w, x, ref, nf4_loads="loads128"))


def main(argv=None) -> None:
    ap = lib.probe_parser(["nf4t", "w4g128t"], [1, 16], 200)
    ap.set_defaults(shapes=["qkv", "o", "down"])  # the skinny kernel's NF4 shapes
    args = ap.parse_args(argv)
    out = lib.start(args, check)

    def variants(w, m):
        return {label: lib.compiled_under(nf4_loads(c), w, m) for label, c in LOADS.items()}

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "nf4_wide_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
