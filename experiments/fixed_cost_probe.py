"""Probe: the fixed cost of a Mosaic GPU kernel launch on this GPU, against XLA's, same run.

``read_floor_probe`` found the skinny kernel's weight stream as fast per byte as XLA's best read
but ≈ 1.15 µs dearer per call. This times what every Mosaic GPU kernel pays before any work:

* ``mgpu_empty`` — ``C`` CTAs (one warp group each) that do nothing;
* ``mgpu_empty_cl2`` — the same in clusters of two (the skinny kernel's hand-off needs them);
* ``mgpu_tma`` / ``mgpu_tma_cl2`` — each CTA copies one ``(64, 64)``-word block (16 KiB) of a
  weight-like buffer to shared memory with TMA and waits for it: launch + one HBM round trip;
* ``xla_rows`` — XLA's row reduction over the same buffer (``C`` × 16 KiB);

for ``C`` = 256 and 320 (the skinny kernel's CTA counts on 8192² and 10240×8192), buffers rotated
over > 160 MB as in ``kernel_bench`` (median device time per call).

    python -m experiments.fixed_cost_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp

from experiments import kernel_bench as kb

BLOCK = (64, 64)  # uint32 words a CTA copies: 16 KiB, one skinny K step of int8 codes
CTAS = (256, 320)


@functools.cache
def mgpu_kernel(ctas: int, cluster: int, tma: bool):
    """``words: (ctas·64, 64) uint32 ↦`` 8 floats never written; see the module docstring."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    from jax import lax

    def body(w_gmem, o_gmem, *scratch):
        if tma:
            smem, bar = scratch
            c = lax.axis_index("c")
            c = c * cluster + lax.axis_index("cl") if cluster > 1 else c
            plgpu.copy_gmem_to_smem(w_gmem.at[pl.ds(c * BLOCK[0], BLOCK[0])], smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])

    mesh = dict(grid=(ctas,), grid_names=("c",))
    if cluster > 1:
        mesh = dict(grid=(ctas // cluster,), grid_names=("c",), cluster=(cluster,),
                    cluster_names=("cl",))  # fmt: skip
    scratch = (
        (plgpu.SMEM(BLOCK, jnp.uint32), plgpu.Barrier(num_arrivals=1, num_barriers=1))
        if tma
        else ()
    )
    return jax.jit(
        plgpu.kernel(
            body,
            out_type=jax.ShapeDtypeStruct((8,), jnp.float32),
            scratch_types=scratch,
            **mesh,
        )
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for ctas in CTAS:
        shape = (ctas * BLOCK[0], BLOCK[1])
        nbytes = 4 * shape[0] * shape[1]
        bufs = [jax.random.bits(jax.random.key(i), shape, jnp.uint32)
                for i in range(kb.n_buffers(nbytes))]  # fmt: skip
        fns = {"xla_rows": jax.jit(lambda w: jnp.sum(w, axis=1, dtype=jnp.uint32))}
        for tma in (False, True):
            for cl in (1, 2):
                label = "mgpu_" + ("tma" if tma else "empty") + ("_cl2" if cl > 1 else "")
                fns[label] = mgpu_kernel(ctas, cl, tma)
        row = {"ctas": ctas, "bytes": nbytes}
        for label, f in fns.items():
            row[f"{label}_us"] = round(kb.device_time(f, [(b,) for b in bufs], 60)["us"], 2)
        print(row, flush=True)
        rows.append(row)
        del bufs
    with open(os.path.join(args.out, "fixed_cost_probe.json"), "w") as fh:
        json.dump({"device": str(jax.devices()[0]), "times": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
