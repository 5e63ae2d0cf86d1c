"""The decode-size (M ≤ 16) variant of :mod:`qjax.kernels.gpu.mgpu_matmul`: **one warp group per
CTA**, several CTAs per SM.

Same product, layouts and decoders as the main kernel (``yᵀ = Ŵᵀ xᵀ``, the dequantized weights
as ``wgmma``'s register operand, Hopper TMA; symmetric int4 / int8 ``"gpu_i4t"`` / ``"gpu_i8t"``,
FP8 ``"gpu_f8t"``, NF4 ``"gpu_nf4t"`` by the shared-memory pair table), shaped differently: each
CTA is a single warp group on a 64-row weight tile that issues its own TMA copies :data:`STAGES`
K steps ahead (Pallas' plain pipeline, not the warp-specialized one) and decodes and multiplies
the step in front of it. Its shared memory (two stages of ``BK``-code steps: codes, ``x``, scale
rows; NF4's table) is cut to a share of the SM (``Config.ctas_per_sm``, 3 by default), so two or
three CTAs run on each SM: independent pipelines whose waits for TMA data and for their
``wgmma`` fill each other's gaps, where the main kernel's one CTA per SM (a memory warp group
feeding two compute warp groups) waits alone.

Work is stream-K over the 64-row tiles laid end to end (Osama et al. 2023), every CTA taking the
same number ``L`` of consecutive K steps (:func:`schedule`: one wave of at most
``ctas_per_sm · 132`` CTAs). Each CTA writes its float32 sum of a tile to the tile's slot
``c − first_cta(t)``, and one fused XLA pass adds, transposes, scales per channel and casts
(:func:`qjax.kernels.gpu.mgpu_matmul.combine`). Group scales (int4 g128) multiply the weights
or, with ``scale_acc``, the float32 per-slice sums, as in the main kernel.

Measured on the H100 (``experiments/results/kernels/occupancy_probe_skinny_*.json``; same run as
the main kernel's table config, M = 1 / 16): int4 g128 2–7 % faster on three of the Llama-3-70B
shapes (8192²: 16.45 vs 17.36 µs at M = 1), 5–9 % on Llama-3-8B's, 12–27 % on SmolLM2-135M's;
int8 / FP8 1–8 %, 6–15 %, 12–46 % — but 0.3–4 % slower where the main kernel adds its partial
sums inside itself over long CTA runs (57344×8192), and NF4 (its 32 KB table leaves room for
256-code steps only) 4–14 % slower on the 70B shapes but 5–36 % faster on the smaller ones. So
:func:`~qjax.kernels.gpu.mgpu_matmul.config_for` takes this kernel for the weights of
:func:`eligible` wherever :func:`beats` says.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.errors import ShapeError
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.qarray import QArray

ROWS = 64  # weight rows per CTA: one warp group's wgmma M
MAX_ROWS = 16  # rows of x it is chosen for (measured at M = 1 and 16)
CTAS_PER_SM = 3  # the default `Config.ctas_per_sm`: three CTAs' shared memory per SM
STAGES = 2  # K steps in flight per CTA (4 stages measured 4–10 % slower at M = 1)
SMEM_PER_SM = 228 * 1024  # H100: shared memory of an SM; each CTA reserves 1 KiB of it
LAYOUTS = ("gpu_i4t", "gpu_i8t", "gpu_f8t", "gpu_nf4t")


def smem_bytes(
    bm: int, bk: int, stages: int, bits: int, span: int = mg.SLICE, lut: bool = False
) -> int:
    """Shared memory of one CTA: ``stages`` × (codes, ``x``, a scale row per ``span`` codes) +
    the float32 output tile + barriers (a bound) + the NF4 pair table (``lut``)."""
    per_stage = ROWS * bk * bits // 8 + bm * bk * 2 + (bk // span) * ROWS * 2
    return stages * per_stage + ROWS * bm * 4 + 512 + (mg.LUT_SMEM if lut else 0)


def smem_share(ctas_per_sm: int) -> int:
    """Shared memory one CTA may take so that ``ctas_per_sm`` of them fit on an SM."""
    return SMEM_PER_SM // ctas_per_sm - 1024


def schedule(n_tiles: int, steps: int, ctas_per_sm: int) -> int:
    """``L``: K steps per CTA — a divisor of the ``n_tiles · steps`` steps that needs at most
    ``ctas_per_sm · 132`` CTAs (one wave; measured: CTAs of unequal step counts that fill every
    slot were slower, ``occupancy_probe_uneven.json``), the one whose busiest SM has the fewest
    steps, ``⌈CTAs / 132⌉ · L``, and of those the smallest (most CTAs). On 10240×8192: 256 CTAs
    of 10 steps (two per SM) instead of 320 of 8 (56 SMs holding three), int4 at M = 1 2 – 3 %
    faster, 8-bit ≤ 1 % (``skinny_schedule_probe.json``)."""
    total = n_tiles * steps
    slots = mg.NUM_SMS * ctas_per_sm
    fits = [d for d in range(1, total + 1) if total % d == 0 and total // d <= slots]
    return min(fits, key=lambda d: (-(-total // d // mg.NUM_SMS) * d, d))


def eligible(w: QArray, m: int) -> bool:
    """Whether ``w`` (layout, symmetric codes) and ``m`` rows of ``x`` suit this kernel."""
    return m <= MAX_ROWS and w.layout in LAYOUTS and w.zeros is None


MAIN_KEEPS_CODES = 16384  # K codes per CTA from which the main kernel, adding its partial sums
#                          in the kernel, stays faster (57344×8192: 56 steps of 512, by 0.3–4 %;
#                          Llama-3-8B's 28672×4096, 14 steps: this kernel 0.5–5 % faster)


NF4_MAX_CODES = 1 << 25  # NF4 up to this many codes (Llama-3-8B's attention projections,
#                          SmolLM2's layers: 5–36 % faster); above, the pair table's 32 KiB per CTA
#                          leaves room for 256-code steps only, which lose (8192² at M = 16: 14 %,
#                          8192×28672: 4–8 %, `occupancy_probe_skinny_nf4.json`)


def beats(main: mg.Config, w: QArray) -> bool:
    """Whether this kernel is expected to beat the main kernel's fitted config ``main`` for
    ``w`` (measured, ``occupancy_probe_skinny_*.json``): everywhere but where the main kernel
    adds its partial sums in the kernel (``fused``) over long CTA runs
    (:data:`MAIN_KEEPS_CODES`), and NF4 only up to :data:`NF4_MAX_CODES`."""
    if w.layout == "gpu_nf4t" and math.prod(w.codes.shape) > NF4_MAX_CODES:
        return False
    return not (main.fused and main.cta_steps * main.block_k >= MAIN_KEEPS_CODES)


def fit(cfg: mg.Config, m: int, k_p: int, n_p: int, bits: int, span: int = mg.SLICE) -> mg.Config:
    """``cfg`` (``path="skinny"``) made runnable: its K step halved until it divides ``K_p`` and
    :data:`STAGES` steps (and the pair table, ``cfg.lut``) fit the shared-memory share of
    ``cfg.ctas_per_sm`` CTAs, its ``L`` from :func:`schedule`."""
    _, bm = mg.padded_rows(m)
    bk, share = cfg.block_k, smem_share(cfg.ctas_per_sm)
    while bk > mg.SLICE and (k_p % bk or smem_bytes(bm, bk, STAGES, bits, span, cfg.lut) > share):
        bk //= 2
    steps = schedule(n_p // ROWS, k_p // bk, cfg.ctas_per_sm)
    return dataclasses.replace(cfg, block_k=bk, stages=STAGES, cta_steps=steps, fused=False)


def check_config(x2, w: QArray, cfg: mg.Config) -> None:
    """Raises a :class:`~qjax.QjaxError` naming what does not fit."""
    n_p, k_p = w.codes.shape
    if not eligible(w, x2.shape[0]):
        raise ShapeError(
            f"mgpu_matmul: the skinny kernel takes symmetric {LAYOUTS} weights and at most "
            f"{MAX_ROWS} rows of x, got layout {w.layout!r} (zeros: {w.zeros is not None}) "
            f"and {x2.shape[0]} rows"
        )
    if cfg.block_k % mg.SLICE or k_p % cfg.block_k:
        raise ShapeError(f"mgpu_matmul: block_k {cfg.block_k} must be a multiple of "
                         f"{mg.SLICE} dividing K_p = {k_p}")  # fmt: skip
    total = n_p // ROWS * (k_p // cfg.block_k)
    if cfg.cta_steps is None or total % cfg.cta_steps:
        raise ShapeError(f"mgpu_matmul: cta_steps {cfg.cta_steps} must divide the {total} K "
                         f"steps of the weight's 64-row tiles (use fit())")  # fmt: skip
    _, bm = mg.padded_rows(x2.shape[0])
    need = smem_bytes(bm, cfg.block_k, cfg.stages, mg.code_bits(w), mg.slice_codes(w), cfg.lut)
    if need > mg.SMEM_BYTES:
        raise ShapeError(f"mgpu_matmul: {cfg} needs {need} bytes of shared memory, more than "
                         f"{mg.SMEM_BYTES} (use fit())")  # fmt: skip


def _partials(x2, codes, scales, cfg: mg.Config, decode: str, span: int):
    """The kernel: ``(slots, N_p, M_p)`` float32 partial sums of ``Ŵᵀ xᵀ`` — CTA ``c`` takes K
    steps ``[c·L, (c+1)·L)`` of the 64-row tiles end to end and writes its sum of tile ``t`` to
    slot ``c − first_cta(t)`` (:func:`qjax.kernels.gpu.mgpu_matmul.segments`); ``scales``: one
    row per ``span`` codes on the weights (or, ``cfg.scale_acc``, on the float32 slice sums), or
    ``None`` (per-channel scales applied by the caller); ``cfg.lut``: 4-bit codes decoded by
    the pair table (:mod:`~qjax.kernels.gpu.mgpu_decode`), copied to shared memory first."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from qjax.kernels.gpu import mgpu_decode as dec

    m_rows, k_p = x2.shape
    _, bm = mg.padded_rows(m_rows)
    n_p = codes.shape[0]
    bk, length, lut = cfg.block_k, cfg.cta_steps, cfg.lut
    n_tiles, steps = n_p // ROWS, k_p // bk
    seg = mg.segments(n_tiles, steps, length)
    slots = int(np.max(seg[:, 1] - seg[:, 0])) + 1
    per = bk // span
    bits = 4 if codes.dtype == jnp.int4 else 8
    scaled = scales is not None
    by_slice = scaled and cfg.scale_acc
    fp8_factor = 2.0 ** dec.FP8_SCALE_LOG2.get(decode, 0)

    def kernel(w_gmem, x_gmem, *rest, o_smem, lut_smem=None, bar=None):
        *s_gmem, o_gmem = rest
        if lut:
            *s_gmem, lut_gmem = s_gmem
            plgpu.copy_gmem_to_smem(lut_gmem, lut_smem, bar.at[0])
            plgpu.barrier_wait(bar.at[0])
        ci = lax.axis_index("c")

        def tile(kk):
            return (ci * length + kk) // steps

        def k_step(kk):
            return (ci * length + kk) % steps

        def scoped(accs):
            tot = accs[0]

            def body(idx, w_smem, x_smem, *s_smem):
                (kk,) = idx

                def operands(j):
                    cols = pl.ds(j * span, span)
                    raw = plgpu.load(w_smem.at[:, cols], (), layout=dec.load_layout(bits))
                    a = dec.decode(decode, raw, lut_smem if lut else None)
                    if decode in dec.FP8_SHIFT:  # exact: a power of two
                        a = a * jnp.bfloat16(fp8_factor)
                    if scaled and not by_slice:
                        a = a * lax.broadcast_in_dim(s_smem[0][j, :], (ROWS, span), (0,))
                    return a, x_smem.at[:, cols].T

                if not by_slice:
                    for j in range(per):
                        plgpu.wgmma(tot, *operands(j))
                    plgpu.wgmma_wait(0)
                else:  # tot += s_j · (a_j @ x_jᵀ), slice j's product in one of two accumulators
                    parts = accs[1:]

                    def fold(j, wait_n):
                        part = parts[j % 2]
                        p = plgpu.wgmma_accumulator_load(part, wait_n=wait_n)
                        s = s_smem[0][j, :].astype(jnp.float32)
                        t = plgpu.wgmma_accumulator_load(tot, wait_n=None)
                        tot[...] = t + p * lax.broadcast_in_dim(s, (ROWS, bm), (0,))
                        part[...] = jnp.zeros((ROWS, bm), jnp.float32)

                    for j in range(per):
                        plgpu.wgmma(parts[j % 2], *operands(j))
                        if j:
                            fold(j - 1, wait_n=1)
                    fold(per - 1, wait_n=0)

                @pl.when((k_step(kk) == steps - 1) | (kk == length - 1))
                def _():
                    t = tile(kk)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last write read it
                    o_smem[...] = tot[...]
                    plgpu.commit_smem()
                    slot = ci - t * steps // length
                    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[slot, pl.ds(t * ROWS, ROWS)])
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
                body, grid=(length,), in_specs=in_specs, max_concurrent_steps=cfg.stages
            )
            pipeline(w_gmem, x_gmem, *s_gmem)
            plgpu.wait_smem_to_gmem(0)

        acc = plgpu.ACC((ROWS, bm), jnp.float32)
        pl.run_scoped(scoped, [acc] * (3 if by_slice else 1))

    args = [codes, x2] + ([scales] if scaled else [])
    scratch = {}
    if lut:
        args.append(jnp.asarray(dec.lut_words(decode)))
        scratch["lut_smem"] = plgpu.SMEM((256, dec.LUT_LANES), jnp.uint32)
        scratch["bar"] = plgpu.Barrier(num_arrivals=1, num_barriers=1)
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((slots, n_p, bm), jnp.float32),
        grid=(n_tiles * steps // length,),
        grid_names=("c",),
        scratch_types=dict(
            o_smem=plgpu.SMEM((ROWS, bm), jnp.float32, transforms=mg._tiled(bm, 32, "out")),
            **scratch,
        ),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(*args)


@functools.partial(jax.jit, static_argnames=("cfg",))
def matmul_rows(x2, w: QArray, cfg: mg.Config):
    """``x2 @ Ŵ`` for bf16 ``x2: (M, K_p)``, ``M ≤`` :data:`MAX_ROWS`, ``(M, N_p)`` in
    ``x2.dtype``: the kernel's partial sums, then one XLA pass (slots added, transposed, per-channel
    scales, cast)."""
    m = x2.shape[0]
    if m > mg.TMA_ROWS and m % mg.TMA_ROWS:  # TMA reads past the last row only of such x
        x2 = jnp.pad(x2, [(0, -m % mg.TMA_ROWS), (0, 0)])
    per_channel = w.layout == "gpu_f8t" or (w.layout != "gpu_nf4t" and w.spec.group == "channel")
    scales = None if per_channel else w.scales
    parts = _partials(x2, w.codes, scales, cfg, mg.decoder(w), mg.slice_codes(w))
    n_p, k_p = w.codes.shape
    y = mg.combine(parts, n_p // ROWS, k_p // cfg.block_k, cfg.cta_steps).T[:m]
    if per_channel:
        y = y * w.scales[:1].astype(jnp.float32)
    return y.astype(x2.dtype)
