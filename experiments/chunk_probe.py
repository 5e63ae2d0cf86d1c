"""Probe: each warp group's slice decoded and multiplied chunk by chunk (``Config.chunk``), so
that one chunk's ``wgmma`` runs while the next chunk is decoded — against the table's configs,
which decode a whole 128-code slice before its first ``wgmma`` is issued.

Why: Nsight Compute on the M = 128 kernel (``ncu_profile`` on 8192², int4) put the tensor pipe
at 56 % of the elapsed cycles and the compute warps' stall samples at 29 % waiting for their own
``wgmma`` (``WARPGROUP.DEPBAR``) and ≈ 45 % in the decode (``PRMT`` / ``LOP3`` / ``HADD2`` /
``HMUL2``, latency-bound: "wait" and "short scoreboard" stalls), all 8 ``HGMMA`` issued after
the whole decode.

Correctness first (every format, M 1–2048, chunked and table configs), then per 70B shape and M
the median device time of each variant and of XLA's bf16 ``dot`` (weights rotated > 150 MB).

    python -m experiments.chunk_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import os

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import SHAPES, check_row, jitted, probe_parser, start, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg

CHUNKS = {4: (64,), 8: (32, 64)}  # codes per wgmma issue (w's shared-memory swizzle ≥ 32 bytes)
CHECKS = [(1, 4096, 256), (16, 2048, 384), (64, 1024, 640), (128, 1024, 256), (200, 1024, 384),
          (2048, 1024, 512), (37, 640, 200)]  # fmt: skip


ABLATIONS = ("rs_const", "ss_x")  # `Config.ablate`: timing only (the results are not y)


def variants_of(w, m, chunks=True, ablate=False, smem_a=False, sacc=False) -> dict:
    """``label: config``: the table's, the same with each chunk size of the format, with the
    decoded weights through shared memory (``smem_a``), and (timing only) without the decode: a
    constant register operand / ``x``'s rows from shared memory."""
    table = mg.config_for(w, m)
    out = {"table": table}
    if sacc and not table.scale_acc and m <= 64:  # three 64 × M float32 accumulators
        out["sacc"] = mg.config_for(w, m, dataclasses.replace(table, scale_acc=True))
    if smem_a:
        out["smem_a"] = mg.config_for(w, m, dataclasses.replace(table, smem_a=True))
    if ablate and not table.scale_acc:
        out.update({a: dataclasses.replace(table, ablate=a) for a in ABLATIONS})
    if chunks and mg.slice_codes(w) == mg.SLICE:
        for c in CHUNKS[mg.code_bits(w)]:
            out[f"chunk{c}"] = dataclasses.replace(table, chunk=c)
    return out


def main(argv=None) -> None:
    ap = probe_parser(["w4g128t", "w8cht", "fp8t"], [128, 64, 2048, 16], 400)
    ap.add_argument("--ablate", action="store_true", help="time the no-decode variants too")
    ap.add_argument("--no-chunks", action="store_true")
    ap.add_argument("--smem-a", action="store_true", help="decoded weights via shared memory")
    ap.add_argument("--sacc", action="store_true", help="scales on the float32 sums up to M = 64")
    args = ap.parse_args(argv)

    flags = (not args.no_chunks, args.ablate, args.smem_a, args.sacc)

    def check(results):
        for fmt in ("w4g128t", "w4g128ta", "w4cht", "w8cht", "fp8t", "nf4t"):
            spec, layout = kb.FORMATS[fmt]
            for m, k, n in CHECKS:
                w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 7 + k)
                for label, cfg in variants_of(w, m, flags[0], False, *flags[2:]).items():
                    results.append(check_row(fmt, w, x, ref, cfg, config=label, resolved=str(cfg)))

    out = start(args, check)

    def variants(w, m):
        return jitted(variants_of(w, m, *flags))

    cases = [(*SHAPES[name], m) for m in args.ms for name in args.shapes]
    path = os.path.join(args.out, "chunk_probe.json")
    time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
