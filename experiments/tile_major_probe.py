"""Probe: the Mosaic GPU kernel reading its int4 / int8 codes tile-major (each CTA's
``(128, BK)`` K step contiguous in HBM) against the row-major ``(N_p, K_p)`` layout, where a
step's tile is 128 separate runs of ``BK/2`` bytes (256 B at BK = 512).

Per 70B shape and M: both layouts give bit-identical results (checked), then the median device
time of each (weights rotated over > 150 MB) and of XLA's bf16 ``dot``.

    python -m experiments.tile_major_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from experiments import kernel_bench as kb
from experiments.scale_acc_probe import SHAPES
from qjax.kernels.gpu import mgpu_matmul as mg


def tile_major(codes, bk: int):
    n_p, k_p = codes.shape
    t = codes.reshape(n_p // 128, 128, k_p // bk, bk).transpose(0, 2, 1, 3)
    return t.reshape(-1, bk)


def fn(w, m: int, tiled: bool):
    cfg = mg.config_for(w, m)

    @jax.jit
    def f(x, codes, sc, zeros):
        y = mg.product(x, codes, sc, zeros, cfg, mg.decoder(w), mg.slice_codes(w), tiled)
        return y.T[: x.shape[0]].astype(x.dtype)

    return f, cfg


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=["w4g128t", "w4g128ta", "w8cht"])
    ap.add_argument("--ms", nargs="*", type=int, default=[1, 16, 64])
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "rows": []}
    for n, k in SHAPES.values():
        for m in args.ms:
            t_bf16 = kb.time_bf16(n, k, m)["us"]
            x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
            for fmt in args.fmts:
                row = {"fmt": fmt, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16, 2)}
                w0 = kb.random_weight(fmt, k, n, 0)
                bufs = [w0] + [
                    kb.random_weight(fmt, k, n, i) for i in range(1, kb.n_buffers(w0.nbytes))
                ]
                got = {}
                for tiled in (False, True):
                    f, cfg = fn(w0, m, tiled)
                    args_ = []
                    for w in bufs:
                        c = tile_major(w.codes, cfg.block_k) if tiled else w.codes
                        sc = None if (w.spec.group == "channel" and cfg.scale_acc) else w.scales
                        args_.append((x, c, sc, w.zeros))
                    got[tiled] = np.asarray(f(*args_[0]))
                    us = kb.device_time(f, args_, 40)["us"]
                    row[f"{'tiled' if tiled else 'rows'}_us"] = round(us, 2)
                    row[f"{'tiled' if tiled else 'rows'}_x_bf16"] = round(t_bf16 / us, 3)
                row["identical"] = bool(np.array_equal(got[False], got[True]))
                del bufs, args_
                print(row, flush=True)
                out["rows"].append(row)
            with open(os.path.join(args.out, "tile_major_probe.json"), "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
