"""Probe: int4 g128 on the skinny kernel with 256-code tile rows, decodes and ``wgmma``
(``loads256``, :data:`qjax.kernels.gpu.mgpu_skinny.INT4_LOAD_CODES` = 256: 128-byte TMA rows,
swizzle 128, each decoded slice scaled per 128-code group by
:func:`~qjax.kernels.gpu.mgpu_decode.times_column_blocks`) against the dispatch (``dispatch``:
128-code slices, scales on the float32 slice sums) and the dispatch with its scales on the
weights (``weights128``: what ``loads256`` changes apart from the width) — same run, the
dispatched schedule, against XLA's bf16 ``dot``.

NF4 went from 64- to 128-code rows (32 → 64 bytes) and became 3.6 – 10.5 % faster
(``nf4_wide_probe.json``); this asks whether int4's 64-byte rows hold its stream back too, where
W4 misses 3.3× at M ≤ 16 (10240×8192, 8192²).

Checks first (unless ``--no-check``): ``loads256`` at M = 1 and 16 against the float32
reference, int4 g128 on an 8192² weight (clusters) and a 4096 × 6144 one (the XLA pass), run
twice for identical bits.

    python -m experiments.int4_wide_probe --out DIR        # on the GPU
"""

from __future__ import annotations

import dataclasses
import os
from unittest import mock

from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk

VARIANTS = {"dispatch": (128, None), "weights128": (128, False), "loads256": (256, False)}
CHECKS = [(m, k, n) for m in (1, 16) for k, n in ((8192, 8192), (4096, 6144))]


def int4_loads(codes: int):
    """:data:`~qjax.kernels.gpu.mgpu_skinny.INT4_LOAD_CODES` set while kernels are traced."""
    return lib.retraced(mock.patch.object(sk, "INT4_LOAD_CODES", codes))


def config(w, m: int, scale_acc: bool | None) -> mg.Config:
    """The dispatched config, with ``scale_acc`` replaced unless None."""
    cfg = mg.config_for(w, m)
    return cfg if scale_acc is None else dataclasses.replace(cfg, scale_acc=scale_acc)


def check(rows: list) -> None:
    with int4_loads(256):
        for fmt, w, x, ref in lib.check_cases(["w4g128t"], CHECKS):
            cfg = config(w, x.shape[0], False)
            rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, int4_loads="loads256"))


def main(argv=None) -> None:
    ap = lib.probe_parser(["w4g128t"], [1, 16], 240)
    ap.set_defaults(shapes=["qkv", "o", "down"])  # the shapes the skinny kernel takes
    args = ap.parse_args(argv)
    out = lib.start(args, check)

    def variants(w, m):
        return {label: lib.compiled_under(int4_loads(codes), w, m, config(w, m, sacc))
                for label, (codes, sacc) in VARIANTS.items()}  # fmt: skip

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "int4_wide_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
