"""Probe: small weights (SmolLM2-135M's layers) with their split tiles' sums added inside the
kernel — clusters holding whole tiles, or whole tiles per CTA — against the dispatch's one K
step per CTA and an XLA pass adding the slots; same run, against XLA's bf16 ``dot``.

On SmolLM2's layers (``K_p`` = 640 or 1536) every CTA the dispatch launches takes a single K step
(``cta_steps`` = 1: the stream-K cost model sees one wave either way and takes the most CTAs), so
every product is a kernel of one-step CTAs plus the pass that adds a tile's 3 – 12 slots — two
kernels, where XLA's bf16 ``dot`` is one. The variants (each where it fits):

* skinny kernel (M ≤ 16), ``cl{C}_k{BK}``: ``L`` = 1, clusters of ``C`` = the tile's K steps
  (up to 8; 5 on the 640-code layers): a tile's CTAs add their sums in its first CTA's shared
  memory, which writes ``y``; ``whole_k{BK}``: ``L`` = steps, ``C`` = 1: each CTA a whole tile;
* main kernel (M > 16), ``whole_k{BK}``: whole 128-row tiles per CTA, ``y`` written by the kernel.

Checks first (unless ``--no-check``): every variant's config on each format at one M per kernel,
against the float32 reference, run twice for identical bits.

Result (stop 31, ``experiments/results/kernels/README.md``): at M = 1 the clusters took 0.84 –
0.91× the dispatch's time on three layers of four, but in the model (``decode_bench`` at batch 1)
the decode step took 1.09× its time with them — the pass costs less there than alone — so the
dispatch keeps the pass.

    python -m experiments.small_layers_probe --out DIR        # on the GPU
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp

from experiments import kernel_bench as kb
from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk

FORMATS = ["w4g128t", "nf4t", "w8cht", "fp8t"]  # checked; timed by default: the first three
SHAPES = ["smol_qo", "smol_kv", "smol_up", "smol_down"]


def variants(w, m: int) -> dict:
    """``label: Config`` for ``m`` rows of ``x`` times ``w``: ``"dispatch"`` and the variants
    of the module docstring that pass the kernels' own checks."""
    n_p, k_p = w.codes.shape
    base = mg.config_for(w, m)
    out = {"dispatch": base}
    x2 = jax.ShapeDtypeStruct((m, k_p), jnp.bfloat16)
    for bk in (128, 256, 512):
        if k_p % bk:
            continue
        steps = k_p // bk
        if m <= sk.MAX_ROWS:
            skinny = dataclasses.replace(base, path="skinny", block_k=bk, stages=sk.STAGES)
            cands = {f"whole_k{bk}": dataclasses.replace(skinny, cta_steps=steps, cluster=1)}
            if steps <= sk.MAX_CLUSTER:
                cands[f"cl{steps}_k{bk}"] = dataclasses.replace(skinny, cta_steps=1, cluster=steps)
            check = sk.check_config
        else:
            table = mg.table_config(w, m)
            whole = dataclasses.replace(table, block_k=bk, cta_steps=steps, fused=None)
            whole = mg.fit(whole, m, k_p, n_p, mg.code_bits(w), mg.slice_codes(w))
            cands = {f"whole_k{bk}": whole} if whole.block_k == bk else {}
            check = mg.check_config
        for label, cfg in cands.items():
            try:
                check(x2, w, cfg)
            except Exception as e:  # noqa: BLE001 (a variant that does not fit is left out)
                print("skip", label, m, k_p, n_p, repr(e)[:200], flush=True)
                continue
            if cfg != base:
                out[label] = cfg
    return out


def describe(cfg: mg.Config) -> dict:
    """The config's fields a row records."""
    return {"path": cfg.path, "bk": cfg.block_k, "L": cfg.cta_steps, "cluster": cfg.cluster,
            "fused": cfg.fused, "stages": cfg.stages}  # fmt: skip


def check(rows: list, ms=(5, 64), shapes=("smol_qo", "smol_down")) -> None:
    """Every variant but the dispatch's (checked by every earlier probe) of each format, at one
    M per kernel, on one shape per ``K_p`` (640, 1536)."""
    cases = [(m, k, n) for m in ms for s in shapes for n, k in [lib.shape(s)]]
    for fmt, w, x, ref in lib.check_cases(FORMATS, cases):
        for label, cfg in variants(w, x.shape[0]).items():
            if label == "dispatch":
                continue
            rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, variant=label, **describe(cfg)))


def main(argv=None) -> None:
    ap = lib.probe_parser(FORMATS[:3], [16, 1, 64, 128], 420)
    ap.set_defaults(shapes=SHAPES)
    args = ap.parse_args(argv)
    out = lib.start(args, check)
    path = os.path.join(args.out, "small_layers_probe.json")
    t0 = time.time()
    for m in args.ms:
        for s in args.shapes:
            n, k = lib.shape(s)
            t_bf16 = kb.time_bf16(n, k, m)["us"]
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            for fmt in args.fmts:
                if time.time() - t0 > args.budget_s:
                    break
                w0 = kb.random_weight(fmt, k, n, 0)  # buffers rotated as `kernel_bench` does
                bufs = [w0] + [
                    kb.random_weight(fmt, k, n, i) for i in range(1, kb.n_buffers(w0.nbytes))
                ]
                row = {"fmt": fmt, "shape": s, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16, 2)}
                for label, cfg in variants(bufs[0], m).items():
                    f = jax.jit(lambda x, w, cfg=cfg: mg.matmul(x, w, config=cfg))
                    try:
                        us = kb.device_time(f, [(x, w) for w in bufs], 40)["us"]
                    except kb.FAILURES as e:
                        row[label] = {**describe(cfg), "error": repr(e)[:300]}
                        continue
                    row[label] = {**describe(cfg), "us": round(us, 2),
                                  "x_bf16": round(t_bf16 / us, 3)}  # fmt: skip
                print(row, flush=True)
                out["times"].append(row)
                del bufs
            with open(path, "w") as fh:
                json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
