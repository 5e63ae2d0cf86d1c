"""Probe: 64-row weight tiles (``Config.tile_rows=64``: both compute warp groups on the same 64
rows, each decoding half of every K step; their sums meet in shared memory at the tile's end)
against the table's 128-row tiles (a 64-row half per warp group), at decode sizes.

With 64-row tiles the Llama-3-70B shapes other than 10240×8192 give every CTA whole tiles in one
wave (8192² and 8192×28672: one tile each, 57344×8192: seven), so no partial sum crosses CTAs.
Correctness first (every Mosaic format, both epilogues, K steps per CTA that do and do not
divide a tile's steps), then the median device time of each variant and of XLA's bf16 ``dot``
(weights rotated over > 150 MB).

    python -m experiments.tile_rows_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import SHAPES, check_row, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg

FORMATS = ("w4g128t", "w4g128ta", "w4cht", "w8cht", "nf4t", "fp8t")


def rows64(w, m: int, block_k: int) -> mg.Config:
    table = mg.config_for(w, m)
    cfg = dataclasses.replace(table, block_k=block_k, cta_steps=None, fused=None, tile_rows=64)
    return mg.config_for(w, m, cfg)


def check(results: list) -> None:
    for fmt in FORMATS:
        spec, layout = kb.FORMATS[fmt]
        for m, k, n in [(16, 4096, 384), (1, 2048, 256), (7, 1024, 200), (16, 3072, 640)]:
            w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 37 + k)
            base = rows64(w, m, 1024)
            total = w.codes.shape[0] // base.tile_rows * (w.codes.shape[1] // base.block_k)
            for length in sorted({1, base.cta_steps}):
                for fused in (False, True):
                    cfg = dataclasses.replace(base, cta_steps=length, fused=fused)
                    assert total % length == 0
                    results.append(check_row(fmt, w, x, ref, cfg, cta_steps=length, fused=fused,
                                             tile_rows=cfg.tile_rows))  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t", "w8cht", "fp8t", "nf4t"])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 16])
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": []}
    if not args.no_check:
        check(out["checks"])
        bad = [r for r in out["checks"] if not r.get("ok")]
        print(f"checks: {len(out['checks'])}, failed: {len(bad)}", flush=True)

    def configs(w, m):
        return {"table": mg.config_for(w, m), "rows64_bk1024": rows64(w, m, 1024),
                "rows64_bk512": rows64(w, m, 512)}  # fmt: skip

    def variants(w, m):
        return {label: jax.jit(lambda x, w, cfg=cfg: mg.matmul(x, w, config=cfg))
                for label, cfg in configs(w, m).items()}  # fmt: skip

    def label(name, w, m):
        return {f"{name}_config": kb.config_label(dataclasses.asdict(configs(w, m)[name]))}

    cases = [(*SHAPES[name], m) for name in args.shapes for m in args.ms]
    path = os.path.join(args.out, "tile_rows_probe.json")
    time_cases(out, path, cases, args.fmts, variants, label, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
