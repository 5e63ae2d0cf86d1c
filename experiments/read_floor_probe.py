"""Probe: the fastest plain read of a weight's bytes on this GPU, against XLA's bf16 ``dot``.

Any kernel for ``y = x @ Ŵ`` must read ``Ŵ``'s bytes (codes and scales) at least once, so on a
given device the time of the fastest kernel that only *reads* them bounds the speed-up any
weight-only kernel can reach over XLA's bf16 ``dot``: ``t_bf16 / t_read``. The stream floor
(``stream_floor_probe``) bounds *our design* (its TMA pipeline, schedule and epilogue, with the
decode and ``wgmma`` removed); this bounds *every* design, up to how good the readers are.

Readers, each over one contiguous buffer of the weight's byte count (``QArray.nbytes`` rounded up
to 1 KiB, as rows of 256 uint32 words), rotated over > 160 MB of buffers as in ``kernel_bench``:

* ``xla_rows`` — XLA's row reduction, ``jnp.sum(words, axis=1)`` (one uint32 written per KiB);
* ``xla_all`` — XLA's full reduction to one word;
* ``pallas_read`` — a Triton-lowered Pallas kernel: ``G`` programs, each summing its share of the
  rows in blocks of ``br`` rows (masked at the end), ``num_warps`` / ``num_stages`` as given;
  every config of :data:`READ_CONFIGS` on the first buffer, the :data:`KEEP` fastest of those on
  the others, the fastest kept with its config. Each is checked against ``jnp.sum`` (every word
  read exactly once) before it is timed.

In the same run: XLA's bf16 ``jnp.dot`` at each ``M`` and the dispatched kernel (``real``) for
each format, and — where the dispatch takes the skinny kernel — its stream floor (``tma_stream``,
``stream_floor_probe.ablated``).

    python -m experiments.read_floor_probe --out DIR        # on the GPU
"""

from __future__ import annotations

import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from experiments import kernel_bench as kb
from experiments import mgpu_probe_lib as lib
from experiments import stream_floor_probe as sf
from qjax.kernels.gpu import mgpu_matmul as mg

ROW_WORDS = 256  # uint32 words per row of the read buffer (1 KiB)
# (programs per SM, rows per block, num_warps, num_stages)
READ_CONFIGS = [(g, br, w, 3) for g in (2, 4, 8) for br in (8, 32) for w in (4, 8)]
KEEP = 3  # after the first case, only the fastest KEEP configs of that case are tried


def read_rows(nbytes: int) -> int:
    """Rows of :data:`ROW_WORDS` words that hold ``nbytes`` bytes (rounded up to 1 KiB)."""
    return -(-nbytes // (4 * ROW_WORDS))


def _read_kernel(w_ref, o_ref, *, rows: int, per_prog: int, br: int):
    start = pl.program_id(0) * per_prog

    def body(i, acc):
        r0 = start + i * br
        ok = r0 + lax.broadcasted_iota(jnp.int32, (br, ROW_WORDS), 0) < rows
        return acc + pltr.load(w_ref.at[pl.ds(r0, br), :], mask=ok, other=0)

    acc = lax.fori_loop(0, per_prog // br, body, jnp.zeros((br, ROW_WORDS), jnp.uint32))
    o_ref[...] = jnp.sum(acc, axis=0)


@functools.cache
def pallas_read(rows: int, programs: int, br: int, warps: int, stages: int, interpret=False):
    """``words: (rows, 256) uint32 ↦ (programs, 256)`` partial column sums: program ``g`` reads
    rows ``[g·P, (g + 1)·P)``, ``P = ⌈rows / programs⌉`` rounded up to ``br``, ``br`` at a time."""
    per_prog = -(-rows // programs // br) * br
    kernel = functools.partial(_read_kernel, rows=rows, per_prog=per_prog, br=br)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((programs * ROW_WORDS,), jnp.uint32),
        grid=(programs,),
        in_specs=[pl.BlockSpec((rows, ROW_WORDS), lambda g: (0, 0))],
        out_specs=pl.BlockSpec((ROW_WORDS,), lambda g: (g,)),
        compiler_params=pltr.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
    )
    return jax.jit(call)


def xla_readers() -> dict:
    return {
        "xla_rows": jax.jit(lambda w: jnp.sum(w, axis=1, dtype=jnp.uint32)),
        "xla_all": jax.jit(lambda w: jnp.sum(w, dtype=jnp.uint32)),
    }


def read_sum_ok(f, words) -> bool:
    """Whether the reader's output sums (mod 2³²) to the sum of every word of ``words``."""
    got = np.asarray(f(words)).astype(np.uint64).sum() % (1 << 32)
    want = np.asarray(words).astype(np.uint64).sum() % (1 << 32)
    return bool(got == want)


def time_reader(f, nbytes: int) -> float:
    """Median device µs of ``f`` over fresh random buffers of ``nbytes`` (rotated > 160 MB)."""
    rows = read_rows(nbytes)
    bufs = [jax.random.bits(jax.random.key(i), (rows, ROW_WORDS), jnp.uint32)
            for i in range(kb.n_buffers(nbytes))]  # fmt: skip
    us = kb.device_time(f, [(b,) for b in bufs], 40)["us"]
    del bufs
    return us


def best_pallas_read(nbytes: int, row: dict, tried: list) -> None:
    """Times the readers of :data:`READ_CONFIGS` that read correctly (the first call: all of
    them, recorded in ``tried`` as ``(µs, config)``; later calls: the :data:`KEEP` fastest of
    ``tried``); the fastest into ``row``."""
    rows = read_rows(nbytes)
    probe = jax.random.bits(jax.random.key(7), (rows, ROW_WORDS), jnp.uint32)
    best = (math.inf, None)
    first = not tried
    for g, br, warps, stages in READ_CONFIGS if first else [c for _, c in sorted(tried)[:KEEP]]:
        f = pallas_read(rows, g * mg.NUM_SMS, br, warps, stages)
        try:
            if not read_sum_ok(f, probe):
                print("pallas_read wrong sum", (g, br, warps, stages), flush=True)
                continue
            us = time_reader(f, nbytes)
        except kb.FAILURES as e:
            print("pallas_read failed", (g, br, warps, stages), repr(e)[:300], flush=True)
            continue
        best = min(best, (us, (g, br, warps, stages)))
        if first:
            tried.append((us, (g, br, warps, stages)))
    if best[1] is not None:
        names = ("programs_per_sm", "br", "warps", "stages")
        row["pallas_read_us"] = round(best[0], 2)
        row["pallas_read_cfg"] = dict(zip(names, best[1], strict=True))


def main(argv=None) -> None:
    ap = lib.probe_parser(["w4g128t", "w8cht"], [1, 16], 420)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "times": []}
    path = os.path.join(args.out, "read_floor_probe.json")
    t0, tried = time.time(), []
    for name in args.shapes:
        n, k = lib.shape(name)
        t_bf16 = {m: kb.time_bf16(n, k, m)["us"] for m in args.ms}
        for fmt in args.fmts:
            if time.time() - t0 > args.budget_s:
                break
            w = kb.random_weight(fmt, k, n, 0)
            row = {"fmt": fmt, "N": n, "K": k, "bytes": int(w.nbytes)}
            for label, f in xla_readers().items():
                row[f"{label}_us"] = round(time_reader(f, w.nbytes), 2)
            best_pallas_read(w.nbytes, row, tried)
            for m in args.ms:
                x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
                row[f"m{m}_bf16_us"] = round(t_bf16[m], 2)
                real = jax.jit(lambda x, w: mg.matmul(x, w))
                row[f"m{m}_real_us"] = round(lib.time_variant(real, fmt, n, k, m, x), 2)
                cfg = mg.config_for(w, m)
                if cfg.path == "skinny":
                    f = sf.compiled(cfg, w, m, ablate=True)
                    row[f"m{m}_tma_stream_us"] = round(lib.time_variant(f, fmt, n, k, m, x), 2)
                for label in ("real", "tma_stream", "xla_rows", "xla_all", "pallas_read"):
                    us = row.get(f"m{m}_{label}_us", row.get(f"{label}_us"))
                    if us:
                        row[f"m{m}_{label}_x_bf16"] = round(t_bf16[m] / us, 3)
            print(row, flush=True)
            out["times"].append(row)
            with open(path, "w") as fh:
                json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
