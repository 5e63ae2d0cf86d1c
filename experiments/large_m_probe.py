"""Probe: where the large-M path of the Mosaic GPU layouts spends its time (per XLA kernel).

8192×8192 weights, M = 2048, on the GPU. Per format: ``stored`` — dequantize as stored + permute
``x`` (as bf16 elements) + NT GEMM, with and without ``optimization_barrier``; ``logical`` — the
weight dequantized back to logical order + GEMM; the dequantization alone; then three ways to
permute ``x`` (element reshape, 32-bit pairs, gather). Prints and writes ``$OUT/large_m.json``;
results: ``experiments/results/kernels/large_m_probe.json`` (made with the mean per call of each
kernel; every kernel of these paths runs once per call, so it equals today's median).

    OUT=DIR python -m experiments.large_m_probe
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from experiments import kernel_bench as kb
from qjax.kernels import repack as rp
from qjax.kernels.gpu.mgpu_decode import stored_order, to_stored, x_to_stored

NT = (((1,), (1,)), ((), ()))


def paths(bits: int) -> dict:
    def stored(x, w):
        wd = jax.lax.optimization_barrier(rp.dequantize_stored(w))
        y = jax.lax.dot_general(to_stored(x, bits), wd, NT, preferred_element_type=jnp.float32)
        return y.astype(x.dtype)

    def stored_no_barrier(x, w):
        wd = rp.dequantize_stored(w)
        y = jax.lax.dot_general(to_stored(x, bits), wd, NT, preferred_element_type=jnp.float32)
        return y.astype(x.dtype)

    def logical(x, w):
        wd = jax.lax.optimization_barrier(rp.dequantize_bf16(w))
        return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)

    def dequantize_only(x, w):
        return rp.dequantize_stored(w)

    def committed(x, w):  # calls.dequantized_matmul
        wd = jax.lax.optimization_barrier(rp.dequantize_stored(w))
        return jax.lax.dot_general(x_to_stored(x, bits), wd, NT, preferred_element_type=x.dtype)

    return dict(stored=stored, stored_no_barrier=stored_no_barrier, logical=logical,
                dequantize_only=dequantize_only, committed=committed)  # fmt: skip


def main() -> None:
    out: dict = {}
    x = jax.random.normal(jax.random.key(1), (2048, 8192), jnp.bfloat16)
    for fmt in ("w4g128t", "w8cht"):
        w = kb.random_weight(fmt, 8192, 8192, 0)
        for name, f in paths(rp.LAYOUTS[w.layout]).items():
            per = kb.kernel_breakdown(jax.jit(f), (x, w))
            out[f"{fmt}/{name}"] = per
            print(fmt, name, round(sum(per.values()), 1), {k: round(v, 1) for k, v in per.items()})
    for bits in (4, 8):
        ways = {
            "elements": lambda x, b=bits: to_stored(x, b),
            "pairs_u32": lambda x, b=bits: x_to_stored(x, b),
            "gather": lambda x, b=bits: jnp.take(x, jnp.asarray(stored_order(x.shape[1], b)), 1),
        }
        for name, f in ways.items():
            per = kb.kernel_breakdown(jax.jit(f), (x,))
            out[f"x_permute_{bits}bit/{name}"] = per
            print(bits, name, {k: round(v, 1) for k, v in per.items()})
    os.makedirs(os.environ["OUT"], exist_ok=True)
    with open(os.path.join(os.environ["OUT"], "large_m.json"), "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
