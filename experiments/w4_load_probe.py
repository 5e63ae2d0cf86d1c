"""Probe: the bandwidth ceiling of streaming int4 weights — a kernel that only loads them.

A Pallas (Triton) kernel with the swap kernel's grid, tiles and K loop XORs the ``gpu_i4p`` words
of a 70B-shape weight (no unpack, no MMA), next to XLA's own XOR-reduction of the same array;
both time the bytes alone, so ``t(bf16 GEMV) / t(load)`` is the most any int4 kernel can gain.

    python -m experiments.w4_load_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from experiments.kernel_bench import device_time, n_buffers, random_weight


def _kernel(w_ref, o_ref, *, cps, rows, ev):
    c0 = pl.program_id(1) * cps

    def step(i, acc):
        at = pl.ds(pl.multiple_of((c0 + i) * rows, rows), rows)
        return acc ^ plgpu.load(w_ref.at[at, :], eviction_policy=ev)

    o_ref[...] = lax.fori_loop(0, cps, step, jnp.zeros((rows, w_ref.shape[1]), jnp.int32))


@functools.partial(jax.jit, static_argnames=("bn", "split", "warps", "stages", "rows", "ev"))
def load_only(words, bn, split, warps, stages, rows=16, ev=None):
    kw, n = words.shape
    return pl.pallas_call(
        functools.partial(_kernel, cps=kw // rows // split, rows=rows, ev=ev),
        out_shape=jax.ShapeDtypeStruct((split * rows, n), jnp.int32),
        grid=(n // bn, split),
        in_specs=[pl.BlockSpec((kw, bn), lambda i, s: (0, i))],
        out_specs=pl.BlockSpec((rows, bn), lambda i, s: (s, i)),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages),
    )(words)


CONFIGS = [  # (bn, split, warps, stages, rows, eviction policy)
    (128, 8, 4, 3, 16, None), (64, 16, 2, 3, 16, None), (128, 8, 4, 1, 16, None),
    (128, 8, 4, 3, 16, "evict_first"), (256, 8, 4, 3, 16, None), (128, 16, 4, 4, 16, None),
    (128, 8, 4, 3, 32, None), (64, 8, 4, 3, 64, None), (128, 4, 4, 3, 64, None),
    (256, 16, 8, 3, 16, None), (512, 8, 8, 3, 16, None),
]  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    a = p.parse_args(argv)
    out = {}  # case -> (µs, TB/s)
    for n, k in [(8192, 8192), (57344, 8192)]:
        w0 = random_weight("w4g128", k, n, 0)
        ws = [w0.codes] + [
            random_weight("w4g128", k, n, i).codes for i in range(1, n_buffers(w0.nbytes))
        ]
        nbytes = ws[0].size * 4

        def xor_all(w):
            return jnp.bitwise_xor.reduce(w.reshape(-1, 16, w.shape[1]), axis=0)

        t = device_time(jax.jit(xor_all), [(w,) for w in ws], 40)["us"]
        out[f"{n}x{k} xla_xor_reduce"] = (t, nbytes / t / 1e6)
        for bn, split, warps, stages, rows, ev in CONFIGS:
            f = functools.partial(
                load_only, bn=bn, split=split, warps=warps, stages=stages, rows=rows, ev=ev
            )
            t = device_time(f, [(w,) for w in ws], 40)["us"]
            key = f"{n}x{k} bn{bn} s{split} w{warps} st{stages} rows{rows} {ev}"
            out[key] = (t, nbytes / t / 1e6)
            print(key, round(t, 1), "us", round(nbytes / t / 1e6, 2), "TB/s", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "w4_load_probe.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
