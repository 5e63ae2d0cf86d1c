"""Probe: where the skinny kernel waits for NF4's pair table — before its pipeline issues the
first weight copies (``before``, the old code) or at the first K step, once they are in flight
(``in_pipeline``, :data:`qjax.kernels.gpu.mgpu_skinny.TABLE_WAIT_IN_PIPELINE`) — same run, the
dispatched config, against XLA's bf16 ``dot``; int4 g128 (no table: the same kernel either way)
as the control.

``stream_cost_probe`` found NF4's kernel with a constant ``wgmma`` operand 2 – 6 µs slower than
int4's, on 1.03× the bytes. One suspect: waiting for the 32 KiB table copy before the pipeline
starts holds back every CTA's weight stream.

Checks first (unless ``--no-check``): ``in_pipeline`` at M = 1 and 16 against the float32
reference, NF4 on an 8192² weight (clusters) and a 4096 × 6144 one (the XLA pass), run twice
for identical bits.

    python -m experiments.table_wait_probe --out DIR        # on the GPU
"""

from __future__ import annotations

import os
from unittest import mock

import jax
import jax.numpy as jnp

from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk

WAITS = {"before": False, "in_pipeline": True}  # label -> TABLE_WAIT_IN_PIPELINE
CHECKS = [(m, k, n) for m in (1, 16) for k, n in ((8192, 8192), (4096, 6144))]


def table_wait(in_pipeline: bool):
    """:data:`~qjax.kernels.gpu.mgpu_skinny.TABLE_WAIT_IN_PIPELINE` set while kernels are
    traced (:func:`~experiments.mgpu_probe_lib.retraced`)."""
    return lib.retraced(mock.patch.object(sk, "TABLE_WAIT_IN_PIPELINE", in_pipeline))


def compiled(w, m: int, in_pipeline: bool):
    """The dispatched ``mg.matmul`` for ``(m, K)`` x and ``w``, compiled with the given wait."""
    x = jax.ShapeDtypeStruct((m, w.shape[0]), jnp.bfloat16)
    with table_wait(in_pipeline):
        return jax.jit(lambda x, w: mg.matmul(x, w)).lower(x, w).compile()


def check(rows: list) -> None:
    with table_wait(True):
        for fmt, w, x, ref in lib.check_cases(["nf4t"], CHECKS):
            rows.append(lib.check_row_twice(fmt, w, x, ref, table_wait="in_pipeline"))


def main(argv=None) -> None:
    ap = lib.probe_parser(["nf4t", "w4g128t"], [1, 16], 200)
    args = ap.parse_args(argv)
    out = lib.start(args, check)

    def variants(w, m):
        return {label: compiled(w, m, flag) for label, flag in WAITS.items()}

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "table_wait_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
