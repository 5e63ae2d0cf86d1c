"""Probe: the skinny kernel (:mod:`qjax.kernels.gpu.mgpu_skinny`) with its stream-K schedule
against whole 64-row weight tiles per CTA (``schedule`` patched to ``L = steps``: fewer CTAs, but
no tile split between CTAs), and how much of each call is the XLA pass that adds the partial sums
(:func:`qjax.kernels.gpu.mgpu_matmul.combine`), on two Llama-3-70B shapes; ``--more``: also two
CTAs per SM (larger K steps) and three stages (``STAGES`` patched). ``fewest``: the schedule
before it balanced the SMs' loads (the fewest steps per CTA in one wave).

Median device time per call with weights rotated over > 150 MB (``kernel_bench.device_time``),
and per kernel on one buffer (``kernel_bench.kernel_breakdown``).

    python -m experiments.skinny_whole_tiles_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import shape
from experiments.occupancy_probe import skinny
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", nargs="*", type=int, default=[1])
    ap.add_argument("--more", action="store_true", help="two CTAs per SM, three stages as well")
    ap.add_argument("--no-whole", action="store_true", help="stream-K schedules only")
    ap.add_argument("--shapes", nargs="*", default=["qkv", "o"])
    ap.add_argument("--fmts", nargs="*", default=["w8cht", "fp8t", "w4g128t"])
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    streamk = sk.schedule

    def whole(n_tiles, steps, per_sm):
        return steps

    def fewest(n_tiles, steps, per_sm):  # the schedule before it balanced the SMs' loads
        total, slots = n_tiles * steps, mg.NUM_SMS * per_sm
        return next(d for d in range(1, total + 1) if total % d == 0 and total // d <= slots)

    # label: (schedule, CTAs per SM, stages)
    variants = {"streamk": (streamk, 3, 2), "fewest": (fewest, 3, 2)}
    if not args.no_whole:
        variants["whole"] = (whole, 3, 2)
    if args.more:
        variants.update(whole_2sm=(whole, 2, 2), whole_2sm_st3=(whole, 2, 3),
                        streamk_2sm=(streamk, 2, 2))  # fmt: skip
    out = []
    try:
        for fmt in args.fmts:
            for name, m in [(name, m) for m in args.ms for name in args.shapes]:
                n, k = shape(name)
                x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
                w0 = kb.random_weight(fmt, k, n, 0)
                more = range(1, kb.n_buffers(w0.nbytes))
                bufs = [w0] + [kb.random_weight(fmt, k, n, i) for i in more]
                row = {"fmt": fmt, "N": n, "K": k, "M": m}
                for label, (schedule, per_sm, stages) in variants.items():
                    sk.schedule, sk.STAGES = schedule, stages
                    cfg = skinny(w0, m, ctas_per_sm=per_sm)
                    f = jax.jit(lambda x, w, cfg=cfg: mg.matmul(x, w, config=cfg))
                    us = kb.device_time(f, [(x, w) for w in bufs], 40)["us"]
                    row[label] = {"L": cfg.cta_steps, "bk": cfg.block_k, "per_sm": per_sm,
                                  "stages": stages, "us": round(us, 2),
                                  "kernels": kb.kernel_breakdown(f, (x, w0))}  # fmt: skip
                print(row, flush=True)
                out.append(row)
    finally:
        sk.schedule, sk.STAGES = streamk, 2
    with open(os.path.join(args.out, "skinny_whole_tiles_probe.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
