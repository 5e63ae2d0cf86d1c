"""Probe: the Mosaic GPU kernels' last wait for their TMA stores — for the writes themselves
(``full``, the default) or only until shared memory has been read (``read``,
:data:`qjax.kernels.gpu.mgpu_matmul.TAIL_WAIT_READ_ONLY`) — same run, the dispatched config of
every target case, against XLA's bf16 ``dot``.

``read_floor_probe`` found the skinny kernel's stream ≈ 1.15 µs dearer per call than a plain
read of the same bytes, and ``fixed_cost_probe`` found a Mosaic GPU launch plus one TMA round
trip as cheap as XLA's: the extra cost is in the kernel's own start or end. Waiting for the
writes of ``y`` adds one global-memory round trip to the last CTA's tail.

Checks first (unless ``--no-check``): with ``read``, each format at M = 1 and 64 against the
float32 reference, run twice for identical bits.

    python -m experiments.tail_wait_probe --out DIR        # on the GPU
"""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp

from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_matmul as mg

WAITS = {"full": False, "read": True}  # label -> TAIL_WAIT_READ_ONLY
CHECKS = [(m, 4096, 6144) for m in (1, 64)]


@contextlib.contextmanager
def tail_wait(read_only: bool):
    """:data:`~qjax.kernels.gpu.mgpu_matmul.TAIL_WAIT_READ_ONLY` set while kernels are traced."""
    saved = mg.TAIL_WAIT_READ_ONLY
    jax.clear_caches()
    mg.TAIL_WAIT_READ_ONLY = read_only
    try:
        yield
    finally:
        mg.TAIL_WAIT_READ_ONLY = saved
        jax.clear_caches()


def compiled(w, m: int, read_only: bool):
    """The dispatched ``mg.matmul`` for ``(m, K)`` x and ``w``, compiled with the given wait."""
    x = jax.ShapeDtypeStruct((m, w.shape[0]), jnp.bfloat16)
    with tail_wait(read_only):
        return jax.jit(lambda x, w: mg.matmul(x, w)).lower(x, w).compile()


def check(rows: list) -> None:
    with tail_wait(True):
        for fmt, w, x, ref in lib.check_cases(["w4g128t", "w8cht", "fp8t", "nf4t"], CHECKS):
            rows.append(lib.check_row_twice(fmt, w, x, ref, tail_wait="read"))


def main(argv=None) -> None:
    ap = lib.probe_parser(["w4g128t", "nf4t", "w8cht", "fp8t"], [1, 16, 64, 128], 300)
    ap.add_argument("--w4-only-from", type=int, default=64, help="M from which only int4 runs")
    args = ap.parse_args(argv)
    out = lib.start(args, check)

    def variants(w, m):
        if m >= args.w4_only_from and w.layout != "gpu_i4t":
            return {}
        return {label: compiled(w, m, ro) for label, ro in WAITS.items()}

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "tail_wait_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
