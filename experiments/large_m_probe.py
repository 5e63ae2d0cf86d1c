"""Probe: where the large-M path of the Mosaic GPU layouts spends its time (per XLA kernel).

8192×8192 weights, M = 2048, on the GPU: ``A`` dequantize as stored + permute ``x`` + NT GEMM
(with / without ``optimization_barrier``), ``B`` dequantize to logical order + GEMM, the
dequantization alone, and (second part) three ways to permute ``x``. Writes
``$OUT/large_m.json``; results: ``experiments/results/kernels/large_m_probe.json``.

    OUT=DIR python -m experiments.large_m_probe
"""

import json
import os
import tempfile

import jax
import jax.numpy as jnp

from experiments import kernel_bench as kb
from qjax.kernels import repack as rp
from qjax.kernels.gpu.mgpu_decode import to_stored


def events(fn, args, n=10):
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(n):
                y = fn(*args)
            jax.block_until_ready(y)
        ev = kb._kernel_events(tmp)
    per = {}
    for _, d, name in ev:
        per[name[:90]] = per.get(name[:90], 0) + d / 1e3 / n
    return per


out = {}
for fmt in ("w4g128t", "w8cht", "w4g128"):
    w = kb.random_weight(fmt, 8192, 8192, 0)
    x = jax.random.normal(jax.random.key(1), (2048, 8192), jnp.bfloat16)

    def A(x, w):
        wd = jax.lax.optimization_barrier(rp.dequantize_stored(w))
        xs = to_stored(x, rp.LAYOUTS[w.layout])
        return jax.lax.dot_general(
            xs, wd, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        ).astype(x.dtype)

    def Anb(x, w):
        wd = rp.dequantize_stored(w)
        xs = to_stored(x, rp.LAYOUTS[w.layout])
        return jax.lax.dot_general(
            xs, wd, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        ).astype(x.dtype)

    def B(x, w):
        wd = jax.lax.optimization_barrier(rp.dequantize_bf16(w))
        return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)

    def Bnb(x, w):
        wd = rp.dequantize_bf16(w)
        return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)

    def deq_only(x, w):
        return rp.dequantize_stored(w)

    def deq_i8(x, w):
        return w.codes.astype(jnp.int8)

    cands = (
        dict(A=A, Anb=Anb, B=B, Bnb=Bnb, deq_only=deq_only, deq_i8=deq_i8)
        if fmt != "w4g128"
        else dict(Bnb=Bnb, B=B)
    )
    for name, f in cands.items():
        try:
            per = events(jax.jit(f), (x, w))
            out[f"{fmt}/{name}"] = per
            print(
                fmt,
                name,
                round(sum(per.values()), 1),
                {k: round(v, 1) for k, v in per.items()},
                flush=True,
            )
        except Exception as e:
            print(fmt, name, "ERR", repr(e)[:300], flush=True)
os.makedirs(os.environ["OUT"], exist_ok=True)
json.dump(out, open(os.path.join(os.environ["OUT"], "large_m.json"), "w"), indent=1)
