"""Probe: NF4 on the **main** kernel with 128-code tile rows, decodes and ``wgmma``
(``loads128``, :data:`qjax.kernels.gpu.mgpu_matmul.NF4_LOAD_CODES` = 128: each decoded slice
spans two 64-code scale blocks, scaled per block by
:func:`~qjax.kernels.gpu.mgpu_decode.times_column_blocks`) against 64-code ones (``slices64``)
— same run, the dispatched config, against XLA's bf16 ``dot``.

The skinny kernel made the same change and NF4 got 3.6 – 10.5 % faster at M ≤ 16
(``nf4_wide_probe.json``). The main kernel runs NF4 at M ≤ 16 on 57344 × 8192 (where NF4 is
1.11 – 1.13× int4's time) and at every M from 17 to 8192: its 64-code slices give 32-byte TMA
rows and twice int4's ``wgmma`` groups. The skinny kernel's shapes at M ≤ 16 are not timed (the
constant does not touch it).

Checks first (unless ``--no-check``): ``loads128`` on the main kernel against the float32
reference, 128-row blocks of ``x`` with the pair-table decoder (the table's configs, fused and
with the XLA pass) and 256-row blocks with the register decoder, run twice for identical bits.

    python -m experiments.nf4_main_wide_probe --out DIR        # on the GPU
"""

from __future__ import annotations

import os
from unittest import mock

from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_matmul as mg

LOADS = {"slices64": 64, "loads128": 128}  # label -> NF4_LOAD_CODES
CHECKS = [(1, 8192, 8192), (64, 8192, 8192), (128, 4096, 6144), (300, 4096, 6144),
          (2048, 8192, 8192)]  # fmt: skip
CHECKS_256 = [(700, 4096, 6144), (2048, 8192, 8192)]  # 256-row blocks, register decoder
# (shape, M): gate_up is the main kernel's at M ≤ 16; every shape from 64 rows
CASES = [("gate_up", 1), ("gate_up", 16)] + [(s, m) for m in (64, 128) for s in lib.SHAPES] + [
    ("o", 2048), ("gate_up", 2048)]  # fmt: skip


def nf4_loads(codes: int):
    """:data:`~qjax.kernels.gpu.mgpu_matmul.NF4_LOAD_CODES` set while kernels are traced
    (:func:`~experiments.mgpu_probe_lib.retraced`)."""
    return lib.retraced(mock.patch.object(mg, "NF4_LOAD_CODES", codes))


def check(rows: list) -> None:
    with nf4_loads(128):
        for fmt, w, x, ref in lib.check_cases(["nf4t"], CHECKS):
            cfg = lib.main_config(w, x.shape[0])
            rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, nf4_loads="loads128"))
        for fmt, w, x, ref in lib.check_cases(["nf4t"], CHECKS_256):
            cfg = mg.config_for(w, x.shape[0], mg.TABLE[mg.MAX_ROWS][1])
            assert cfg.block_m == 256 and not cfg.lut
            rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, nf4_loads="loads128", bm=256))


def main(argv=None) -> None:
    ap = lib.probe_parser(["nf4t"], [], 240)
    args = ap.parse_args(argv)
    out = lib.start(args, check)

    def variants(w, m):
        return {label: lib.compiled_under(nf4_loads(c), w, m) for label, c in LOADS.items()}

    cases = [(*lib.shape(s), m) for s, m in CASES]
    if args.ms:
        cases = [c for c in cases if c[2] in args.ms]
    path = os.path.join(args.out, "nf4_main_wide_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
