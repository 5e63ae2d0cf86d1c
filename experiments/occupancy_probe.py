"""Probe: several small CTAs per SM at decode sizes, against the table's one big CTA per SM.

The kernel of :mod:`qjax.kernels.gpu.mgpu_matmul` runs one CTA per SM: a memory warp group that
TMA-streams 128-row weight tiles ``stages`` K steps ahead and two compute warp groups (168
registers a thread, most of the shared memory). At M ≤ 16 it streams the int4 codes at 2.5 – 2.7
TB/s, while XLA's bf16 GEMV streams 3.1 – 3.2 TB/s, and neither a cheaper decoder nor more
compute warps in the same CTA closed the gap (`README.md`). This probe tries the other shape of
the same work: **one warp group per CTA** on a 64-row weight tile, the plain (not
warp-specialized) Pallas pipeline — the warp group issues its own TMA copies ``stages`` steps
ahead, then decodes and multiplies (``wgmma``, dequantized weights as the register operand,
``yᵀ = Ŵᵀ xᵀ``) — and the shared memory cut so that ``occupancy`` CTAs fit on an SM: each SM then
has several independent pipelines, whose waits on TMA and on ``wgmma`` overlap the others' work
(the way a GEMV keeps many loads in flight). Work is stream-K as in the kernel
(:func:`~qjax.kernels.gpu.mgpu_matmul.schedule`'s tiles end to end, one wave of
``132 · occupancy`` CTAs), partial sums to slots, one XLA pass adding them
(:func:`~qjax.kernels.gpu.mgpu_matmul.combine`). Scales multiply the weights (128-code groups) or
the sums (per channel: int8, FP8).

Correctness first (every format, small and ragged shapes, M 1 – 16), then per 70B shape and M the
median device time of each variant, of the table's kernel and of XLA's bf16 ``dot`` (weights
rotated over > 150 MB).

    python -m experiments.occupancy_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from experiments import kernel_bench as kb
from experiments.mgpu_probe_lib import jitted, probe_parser, shape, start, time_cases
from qjax.kernels.gpu import mgpu_matmul as mg

ROWS = 64  # weight rows per CTA: one warp group's wgmma M
SMEM_PER_SM = 228 * 1024  # H100: shared memory of an SM, of which each CTA reserves 1 KiB
FORMATS = ("w4g128t", "w8cht", "fp8t")


@dataclasses.dataclass(frozen=True)
class Small:
    block_k: int
    stages: int
    occupancy: int  # CTAs per SM the schedule fills (one wave of 132 · occupancy)
    scale_acc: bool = False  # group scales on float32 per-slice sums (as `mg.Config.scale_acc`)
    even: bool = False  # every CTA the same steps, a divisor of the total (fewer CTAs than slots)


def cta_smem(bm: int, bk: int, stages: int, bits: int) -> int:
    """Shared memory of one CTA: ``stages`` × (codes, x, one scale row per 128 codes) + the
    float32 output tile + barriers (a bound)."""
    per_stage = ROWS * bk * bits // 8 + bm * bk * 2 + (bk // mg.SLICE) * ROWS * 2
    return stages * per_stage + ROWS * bm * 4 + 512


def fits(cfg: Small, bm: int, bits: int) -> bool:
    return cta_smem(bm, cfg.block_k, cfg.stages, bits) <= SMEM_PER_SM // cfg.occupancy - 1024


def uneven(total: int, slots: int, even: bool = False) -> tuple[int, int, int]:
    """``(ctas, L, r)``: ``total`` K steps over ``min(slots, total)`` CTAs, the first ``r`` of
    them ``L + 1`` steps, the rest ``L`` (stream-K with no divisibility constraint); ``even``:
    ``L`` the smallest divisor of ``total`` with at most ``slots`` CTAs, ``r = 0``."""
    if even:
        length = next(d for d in range(1, total + 1) if total % d == 0 and total // d <= slots)
        return total // length, length, 0
    ctas = min(slots, total)
    return ctas, total // ctas, total % ctas


def first_cta(step, length: int, r: int, xp=np):
    """The CTA that takes step ``step`` (tiles end to end) when CTA ``c`` starts at step
    ``c·L + min(c, r)``; ``xp``: ``np``, or ``jnp`` for traced steps."""
    split = r * (length + 1)
    return xp.where(step < split, step // (length + 1), r + (step - split) // length)


def uneven_segments(n_tiles: int, steps: int, length: int, r: int) -> np.ndarray:
    """``(n_tiles, 2)``: first and last CTA on each weight tile."""
    starts = np.arange(n_tiles) * steps
    return np.stack([first_cta(starts, length, r), first_cta(starts + steps - 1, length, r)], 1)


def combine(parts, seg: np.ndarray):
    """Sums the ``(slots, N_p, M_p)`` partials over the slots each tile was written to."""
    if parts.shape[0] == 1:
        return parts[0]
    n_tiles = seg.shape[0]
    written = np.arange(parts.shape[0])[:, None] <= (seg[:, 1] - seg[:, 0])[None, :]
    mask = np.repeat(written, parts.shape[1] // n_tiles, axis=1)[:, :, None]
    return jnp.sum(jnp.where(mask, parts, 0.0), axis=0)


def schedule(n_p: int, k_p: int, cfg: Small):
    n_tiles, steps = n_p // ROWS, k_p // cfg.block_k
    ctas, length, r = uneven(n_tiles * steps, mg.NUM_SMS * cfg.occupancy, cfg.even)
    return ctas, length, r, uneven_segments(n_tiles, steps, length, r)


def _kernel(x2, codes, scales, cfg: Small, decode: str):
    """``(slots, N_p, M_p)`` float32 partial sums of ``Ŵᵀ xᵀ`` (scales on the weights, or with
    ``scale_acc`` on per-slice float32 sums, when given), one 64-row tile per warp group, one
    warp group per CTA, CTA ``c`` taking steps ``[start(c), start(c + 1))``."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from qjax.kernels.gpu import mgpu_decode as dec

    m_rows, k_p = x2.shape
    _, bm = mg.padded_rows(m_rows)
    n_p = codes.shape[0]
    bk, span = cfg.block_k, mg.SLICE
    steps = k_p // bk
    ctas, length, r, seg = schedule(n_p, k_p, cfg)
    slots = int(np.max(seg[:, 1] - seg[:, 0])) + 1
    per = bk // span
    bits = 4 if codes.dtype == jnp.int4 else 8
    scaled = scales is not None
    by_slice = scaled and cfg.scale_acc
    fp8_factor = 2.0 ** dec.FP8_SCALE_LOG2.get(decode, 0)

    def kernel(w_gmem, x_gmem, *rest, o_smem):
        o_gmem = rest[-1]
        ci = lax.axis_index("c")
        first = ci * length + jnp.minimum(ci, r)
        n_steps = jnp.where(ci < r, length + 1, length)

        def tile(kk):
            return (first + kk) // steps

        def k_step(kk):
            return (first + kk) % steps

        def scoped(accs):
            tot = accs[0]

            def body(idx, w_smem, x_smem, *s):
                (kk,) = idx

                def operand(j):
                    cols = pl.ds(j * span, span)
                    raw = plgpu.load(w_smem.at[:, cols], (), layout=dec.load_layout(bits))
                    a = dec.decode(decode, raw, None)
                    if decode in dec.FP8_SHIFT:
                        a = a * jnp.bfloat16(fp8_factor)
                    if scaled and not by_slice:
                        a = a * lax.broadcast_in_dim(s[0][j, :], (ROWS, span), (0,))
                    return a, x_smem.at[:, cols].T

                if not by_slice:
                    for j in range(per):
                        plgpu.wgmma(tot, *operand(j))
                    plgpu.wgmma_wait(0)
                else:
                    parts = accs[1:]

                    def fold(j, wait_n):
                        part = parts[j % 2]
                        p = plgpu.wgmma_accumulator_load(part, wait_n=wait_n)
                        sc = s[0][j, :].astype(jnp.float32)
                        t = plgpu.wgmma_accumulator_load(tot, wait_n=None)
                        tot[...] = t + p * lax.broadcast_in_dim(sc, (ROWS, bm), (0,))
                        part[...] = jnp.zeros((ROWS, bm), jnp.float32)

                    for j in range(per):
                        plgpu.wgmma(parts[j % 2], *operand(j))
                        if j:
                            fold(j - 1, wait_n=1)
                    fold(per - 1, wait_n=0)

                @pl.when((k_step(kk) == steps - 1) | (kk == n_steps - 1))
                def _():
                    t = tile(kk)
                    c0 = first_cta(t * steps, length, r, jnp)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    o_smem[...] = tot[...]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[ci - c0, pl.ds(t * ROWS, ROWS)])
                    tot[...] = jnp.zeros((ROWS, bm), jnp.float32)

            in_specs = [
                plgpu.BlockSpec(
                    (ROWS, bk),
                    lambda kk: (tile(kk), k_step(kk)),
                    transforms=mg._tiled(span, bits, "lhs"),
                ),
                plgpu.BlockSpec(
                    (bm, bk), lambda kk: (0, k_step(kk)), transforms=mg._tiled(span, 16, "rhs")
                ),
            ]
            if scaled:
                in_specs.append(plgpu.BlockSpec((per, ROWS), lambda kk: (k_step(kk), tile(kk))))
            pipeline = plgpu.emit_pipeline(
                body, grid=(n_steps,), in_specs=in_specs, max_concurrent_steps=cfg.stages
            )
            pipeline(w_gmem, x_gmem, *rest[:-1])
            plgpu.wait_smem_to_gmem(0)

        acc = plgpu.ACC((ROWS, bm), jnp.float32)
        pl.run_scoped(scoped, [acc] * (3 if by_slice else 1))

    args = [codes, x2] + ([scales] if scaled else [])
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((slots, n_p, bm), jnp.float32),
        grid=(ctas,),
        grid_names=("c",),
        scratch_types=dict(
            o_smem=plgpu.SMEM((ROWS, bm), jnp.float32, transforms=mg._tiled(bm, 32, "out"))
        ),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(*args)


@functools.partial(jax.jit, static_argnames=("cfg",))
def small_matmul(x, w, cfg: Small):
    """``x @ Ŵ`` for ``x`` of at most 128 rows by :func:`_kernel` (sym int, int8 / FP8 per
    channel)."""
    m = x.shape[0]
    if m > mg.TMA_ROWS and m % mg.TMA_ROWS:
        x = jnp.pad(x, [(0, -m % mg.TMA_ROWS), (0, 0)])
    per_channel = w.layout == "gpu_f8t" or w.spec.group == "channel"
    scales = None if per_channel else w.scales
    parts = _kernel(x, w.codes, scales, cfg, mg.decoder(w))
    n_p, k_p = w.codes.shape
    y = combine(parts, schedule(n_p, k_p, cfg)[3]).T[:m]
    if per_channel:
        y = y * w.scales[:1].astype(jnp.float32)
    return y.astype(x.dtype)[:, : w.shape[1]]


def candidates(m: int, bits: int) -> dict[str, Small]:
    """The variants timed: occupancy 2 and 3, 512-code steps (256 where 512 does not fit two
    stages), the deepest pipeline that fits the SM's share, every CTA's steps a divisor of the
    total (``even``) or not; int4 with and without scales on the float32 sums."""
    _, bm = mg.padded_rows(m)
    out = {}
    for occ in (2, 3):
        for bk in (512, 256):
            stages = max((s for s in range(1, 9) if fits(Small(bk, s, occ), bm, bits)), default=0)
            if stages >= 2:
                for even in (True, False):
                    name = f"o{occ}_bk{bk}_st{stages}" + ("_even" if even else "")
                    out[name] = Small(bk, stages, occ, even=even)
                    if bits == 4:
                        out[f"{name}_sacc"] = Small(bk, stages, occ, True, even)
                break
    return out


def check(results: list) -> None:
    for fmt in FORMATS:
        spec, layout = kb.FORMATS[fmt]
        bits = 4 if fmt.startswith("w4") else 8
        for m, k, n in [(1, 4096, 256), (16, 2048, 384), (7, 1024, 200), (13, 8192, 1024)]:
            w, x, ref = kb.check_case(spec, layout, m, k, n, seed=m * 31 + k)
            for label, cfg in candidates(m, bits).items():
                if w.codes.shape[1] % cfg.block_k:
                    continue
                row = {"fmt": fmt, "M": m, "K": k, "N": n, "variant": label}
                try:
                    y = np.asarray(small_matmul(x, w, cfg), np.float32)
                    err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                    row.update(rel_err=err, ok=bool(np.isfinite(y).all() and err < 1e-2))
                except Exception as e:  # noqa: BLE001
                    row.update(ok=False, error=repr(e)[:2000])
                print("check", row, flush=True)
                results.append(row)


def ptxas_registers(args) -> None:
    """Compiles each candidate once (8192 × 8192) and prints ``ptxas``'s register and spill
    lines from ``$MOSAIC_GPU_DUMP_TO`` (run with ``MOSAIC_GPU_DUMP_PTXAS=1`` set): the
    registers decide how many of these CTAs an SM can hold."""
    import glob

    dump = os.environ["MOSAIC_GPU_DUMP_TO"]
    report = {}
    for fmt in args.fmts:
        spec, layout = kb.FORMATS[fmt]
        for m in args.ms:
            w, x, _ = kb.check_case(spec, layout, m, 8192, 8192, seed=0)
            bits = 4 if w.codes.dtype == jnp.int4 else 8
            for label, cfg in candidates(m, bits).items():
                before = set(glob.glob(f"{dump}/*"))
                jax.block_until_ready(small_matmul(x, w, cfg))
                new = sorted(set(glob.glob(f"{dump}/*")) - before)
                text = "".join(open(f).read() for f in new if f.endswith(".ptxas"))
                keep = ("registers", "spill")
                lines = [ln.strip() for ln in text.splitlines() if any(s in ln for s in keep)]
                report[f"{fmt} M={m} {label}"] = lines
                print(fmt, m, label, lines, flush=True)
    with open(os.path.join(args.out, "occupancy_probe_ptxas.json"), "w") as fh:
        json.dump(report, fh, indent=1)


def main(argv=None) -> None:
    ap = probe_parser(list(FORMATS), [1, 16], 450)
    ap.add_argument("--ptxas", action="store_true", help="registers per candidate, no timing")
    ap.add_argument("--variants", nargs="*", help="time only these candidates (and the table)")
    args = ap.parse_args(argv)
    if args.ptxas:
        os.makedirs(args.out, exist_ok=True)
        return ptxas_registers(args)
    out = start(args, check)

    def variants(w, m):
        bits = 4 if w.codes.dtype == jnp.int4 else 8
        fs = jitted({"table": mg.config_for(w, m)})
        for label, cfg in candidates(m, bits).items():
            if args.variants is None or label in args.variants:
                fs[label] = jax.jit(functools.partial(small_matmul, cfg=cfg))
        return fs

    cases = [(*shape(name), m) for m in args.ms for name in args.shapes]
    path = os.path.join(args.out, "occupancy_probe.json")
    time_cases(out, path, cases, args.fmts, variants, budget_s=args.budget_s)


if __name__ == "__main__":
    main()
