"""Probe: the skinny kernel's K step and pipeline depth — smaller steps, more of them in flight —
against the dispatch's config, same run, XLA's bf16 ``dot`` as the baseline.

``stream_cost_probe`` found the decode and ``wgmma`` of int4 g128 at M ≤ 16 not hidden behind
the weight stream: the real kernel takes 1.6 – 2.4 µs more than the same kernel with neither.
A CTA decodes and multiplies a step only once all of it has landed, so its last step's work
(512 codes × 64 rows: ≈ 0.5 µs of issue with two or three CTAs per SM) follows the stream's end.
Halving the step halves that tail, and a third or fourth stage in the space the smaller step
frees keeps as many bytes in flight. The costs: twice the barriers and TMA issues per byte.

The hand-off of a tile's two partial sums in its cluster costs 0.4 – 0.8 µs more
(``stream_cost_probe``): both CTAs end together, and the first waits for the second's sum.
With ``Config.lead`` the first takes ``lead`` more K steps and the second as many fewer, so
the sum lands while the first still streams.

Variants (``Config`` fields replaced in the dispatch's skinny config, then fitted; the depth and
the lead are set after fitting; a variant that fits no differently from another is dropped):
``bk256`` / ``bk256_st3`` / ``bk256_st4`` / ``bk128_st4``, ``lead1`` / ``lead2``,
``bk256_st4_lead2`` / ``bk256_st4_lead4``.

Checks first (unless ``--no-check``): each ``lead`` variant's config for an ``N × K`` = 8192 × 8192
weight (clusters of two on one tile each) at M = 1 and 16 against the float32 reference, run
twice for identical bits.

    python -m experiments.skinny_step_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from experiments import kernel_bench as kb
from experiments import mgpu_probe_lib as lib
from qjax.errors import QjaxError
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk

VARIANTS = {  # label -> (block_k, stages, lead); None: the dispatch's
    "bk256": (256, None, 0),
    "bk256_st3": (256, 3, 0),
    "bk256_st4": (256, 4, 0),
    "bk128_st4": (128, 4, 0),
    "lead1": (None, None, 1),
    "lead2": (None, None, 2),
    "bk256_st4_lead2": (256, 4, 2),
    "bk256_st4_lead4": (256, 4, 4),
}
CHECKS = [(m, 8192, 8192) for m in (1, 16)]  # (m, K, N): clusters of two on one tile each


def configs(w, m: int) -> dict:
    """``dispatch`` and each variant's config for ``w`` at ``m`` rows (none where the dispatch
    takes the main kernel); duplicates of an earlier label and configs that do not fit (a
    ``lead`` without clusters of two on one tile each, stages over the SM) dropped."""
    base = mg.config_for(w, m)
    if base.path != "skinny":
        return {}
    cfgs = {"dispatch": base}
    for label, (bk, stages, lead) in VARIANTS.items():
        cfg = mg.config_for(w, m, dataclasses.replace(base, block_k=bk or base.block_k))
        cfg = dataclasses.replace(cfg, stages=stages or cfg.stages, lead=lead)
        if cfg in cfgs.values():
            continue
        try:
            sk.check_config(jax.ShapeDtypeStruct((m, w.shape[0]), jnp.bfloat16), w, cfg)
            cfgs[label] = cfg
        except QjaxError as e:
            print(label, "does not fit:", e, flush=True)
    return cfgs


def check(fmts):
    def run(rows: list) -> None:
        for fmt, w, x, ref in lib.check_cases(fmts, CHECKS):
            for label, cfg in configs(w, x.shape[0]).items():
                if "lead" in label:  # the new code path (the others: checked K steps, depths)
                    rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, variant=label))

    return run


def main(argv=None) -> None:
    ap = lib.probe_parser(["w4g128t", "nf4t"], [1, 16], 300)
    ap.set_defaults(shapes=["qkv", "o", "down"])
    args = ap.parse_args(argv)
    out = lib.start(args, check(args.fmts))

    def variants(w, m):
        return lib.jitted(configs(w, m))

    def extra(label, w, m):
        cfg = configs(w, m)[label]
        share = sk.config_smem(m, w, cfg) / sk.smem_share(cfg.ctas_per_sm)
        return {f"{label}_cfg": kb.config_label(dataclasses.asdict(cfg)),
                f"{label}_smem_share": round(share, 3)}  # fmt: skip

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "skinny_step_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, extra, args.budget_s)


if __name__ == "__main__":
    main()
