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
(:func:`qjax.kernels.gpu.mgpu_matmul.combine`). Where the schedule can keep every tile's CTAs in
one cluster of two (``Config.cluster``, :func:`clustered_schedule`; Hopper thread-block
clusters), the pass goes: a tile's later CTAs store their sums into its first CTA's shared memory
(distributed shared memory), which adds them, scales, casts and writes ``y`` itself. Group scales
(int4 g128) multiply the weights or, with ``scale_acc``, the float32 per-slice sums, as in the
main kernel. NF4's 64-code blocks are loaded, decoded and multiplied two at a time
(:func:`qjax.kernels.gpu.mgpu_matmul.load_codes`: 64-byte TMA rows, each block of the decoded
slice scaled by its own row).

8-bit codes (``gpu_i8t`` / ``gpu_f8t``) are stored fragment-major
(:func:`~qjax.kernels.gpu.mgpu_decode.to_fragments`): a K step of a tile is consecutive bytes in
the order of the threads' registers. Where the schedule puts three CTAs on some SMs
(:data:`LDG_ABOVE_CTAS`, Llama-3-70B's 10240×8192), they skip TMA and shared memory
(``Config.ldg``): each thread loads its own codes from HBM with 128-bit read-only loads one step
ahead, carried through the pipeline's loop, and waits only for them, not for the whole step.

Measured on the H100 (``experiments/results/kernels/occupancy_probe_skinny_*.json``; same run as
the main kernel's table config, M = 1 / 16): int4 g128 2–7 % faster on three of the Llama-3-70B
shapes (8192²: 16.45 vs 17.36 µs at M = 1), 5–9 % on Llama-3-8B's, 12–27 % on SmolLM2-135M's;
int8 / FP8 1–8 %, 6–15 %, 12–46 % — but 0.3–4 % slower where the main kernel adds its partial
sums inside itself over long CTA runs (57344×8192), and NF4 (its 32 KB table leaves room for
256-code steps only at three CTAs per SM) 4–14 % slower on the 70B shapes but 5–36 % faster on
the smaller ones — until clusters of two added its partial sums: then 0.7–7.8 % faster than the
main kernel on three 70B shapes, two CTAs per SM where they fit one wave
(``skinny_rows_probe_nf4.json``). So :func:`~qjax.kernels.gpu.mgpu_matmul.config_for` takes
this kernel where :func:`pick` says.

Above 16 rows it was measured too (``skinny_rows_probe.json``, int4 g128 at M = 64 / 128 on the
70B shapes, 2–3 CTAs per SM, 128–256-code steps, with and without clusters): slower than the
main kernel by 2–49 % but on 8192² at M = 64 with clusters (3.9 % faster) — its 64-row tiles read
``x`` from L2 once per 64 weight rows, the main kernel's once per 128 — so it stays at M ≤ 16.
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
from qjax.kernels.gpu import mgpu_decode as dec
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.qarray import QArray

NF4_LOAD_CODES = 128  # NF4 codes per shared-memory tile row, decode and `wgmma`: two scale
#                      blocks of 64 (64-byte TMA rows, half the `wgmma` groups, the decoded
#                      slice scaled per block); 3.6 – 10.5 % faster than one block (64) on the H100
#                      at M = 1 / 16 (`experiments/results/kernels/nf4_wide_probe.json`)
ROWS = dec.ROWS  # weight rows per CTA: one warp group's wgmma M (64)
MAX_ROWS = 16  # rows of x it is chosen for (measured at M = 1 and 16)
CTAS_PER_SM = 3  # the default `Config.ctas_per_sm`: three CTAs' shared memory per SM
STAGES = 2  # K steps in flight per CTA (4 stages measured 4–10 % slower at M = 1)
SMEM_PER_SM = 228 * 1024  # H100: shared memory of an SM; each CTA reserves 1 KiB of it
LAYOUTS = ("gpu_i4t", "gpu_i8t", "gpu_f8t", "gpu_nf4t")


def smem_bytes(
    bm: int,
    bk: int,
    stages: int,
    bits: int,
    span: int = mg.SLICE,
    lut: bool = False,
    received: int | None = None,
) -> int:
    """Shared memory of one CTA: ``stages`` × (codes, ``x``, a scale row per ``span`` codes) +
    the float32 output tile + barriers (a bound) + the NF4 pair table (``lut``); ``received``:
    clustered (``Config.cluster``), the float32 slots other CTAs store into, the bf16 ``y``
    tile and two rows of per-channel scales instead of the output tile."""
    per_stage = ROWS * bk * bits // 8 + bm * bk * 2 + (bk // span) * ROWS * 2
    out = ROWS * bm * 4
    if received is not None:
        out = max(received, 1) * ROWS * bm * 4 + ROWS * bm * 2 + 2 * ROWS * 4
    return stages * per_stage + out + 512 + (mg.LUT_SMEM if lut else 0)


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
    return _most_balanced(total, fits)


def _most_balanced(total: int, lengths) -> int:
    """Of the CTA lengths ``L`` (divisors of ``total`` steps), the one whose busiest SM has the
    fewest steps, ``⌈(total / L) / 132⌉ · L``; ties to the smallest (most CTAs)."""
    return min(lengths, key=lambda d: (-(-total // d // mg.NUM_SMS) * d, d))


MAX_CLUSTER = 8  # CTAs per cluster: Hopper's portable limit


def cluster_size(n_tiles: int, steps: int, length: int) -> int:
    """The fewest consecutive CTAs per cluster (``Config.cluster``) such that no weight tile is
    split between two clusters (``C·L`` a multiple of the ``steps`` per tile) and clusters
    divide the CTAs; 0 where none up to :data:`MAX_CLUSTER` does."""
    ctas = n_tiles * steps // length
    fits = (c for c in range(1, MAX_CLUSTER + 1) if c * length % steps == 0 and ctas % c == 0)
    return next(fits, 0)


def clustered_schedule(
    n_tiles: int, steps: int, ctas_per_sm: int, max_cluster: int
) -> tuple[int, int]:
    """``(L, C)``: :func:`schedule`'s choice among the ``L`` no larger than its own (as many CTAs
    or more) whose tiles fit clusters of at most ``max_cluster`` CTAs (:func:`cluster_size`),
    with that ``C``; where none does (or ``max_cluster`` is 0), :func:`schedule`'s ``L`` and
    ``C = 0`` (an XLA pass adds the sums)."""
    balanced = schedule(n_tiles, steps, ctas_per_sm)
    total = n_tiles * steps
    fits = [d for d in range(1, balanced + 1) if total % d == 0]
    fits = [d for d in fits if 0 < cluster_size(n_tiles, steps, d) <= max_cluster]
    if not fits:
        return balanced, 0
    length = _most_balanced(total, fits)
    return length, cluster_size(n_tiles, steps, length)


CLUSTER = 2  # the dispatch's `Config.cluster` (the most CTAs per cluster, `pick`). Measured
#              (`skinny_cluster_probe.json`, H100, M = 1 / 16, int4 g128 / int8 / FP8 on
#              Llama-3-70B's 10240×8192, 8192², 8192×28672 and Llama-3-8B's 28672×4096):
#              clusters of at most 2 beat the XLA pass in 22 of 24 cases (by up to 6.4 %,
#              int4 8192² M = 1: 16.06 → 15.10 µs) and lost 1.3 % (FP8 10240×8192 M = 1) and
#              3.7 % (int4 28672×4096 M = 16); at most 4 or 8 lost in 20 and 23 of 24 (up to
#              42 %: fewer steps per CTA). Where no cluster of 2 fits, the XLA pass stays.
#              NF4: `pick`.


def received_slots(n_tiles: int, steps: int, length: int) -> int:
    """Partial sums a tile's first CTA receives at most: the later CTAs on one tile."""
    seg = mg.segments(n_tiles, steps, length)
    return int(np.max(seg[:, 1] - seg[:, 0]))


def eligible(w: QArray, m: int) -> bool:
    """Whether ``w`` (layout, symmetric codes) and ``m`` rows of ``x`` suit this kernel."""
    return m <= MAX_ROWS and w.layout in LAYOUTS and w.zeros is None


MAIN_KEEPS_CODES = 16384  # K codes per CTA from which the main kernel, adding its partial sums
#                          in the kernel, stays faster (57344×8192: 56 steps of 512, by 0.3–4 %;
#                          Llama-3-8B's 28672×4096, 14 steps: this kernel 0.5–5 % faster)


NF4_MAX_CODES = 1 << 25  # NF4 whose tiles fit no cluster of two: up to this many codes
#                          (Llama-3-8B's attention projections, SmolLM2's layers: 5–36 %
#                          faster); above, the pair table's 32 KiB per CTA leaves room for
#                          256-code steps only, which lose (8192² at M = 16: 14 %, 8192×28672:
#                          4–8 %, `occupancy_probe_skinny_nf4.json`)


LDG_ABOVE_CTAS = 2 * mg.NUM_SMS  # 8-bit codes go straight into registers (`Config.ldg`) where
#                                  the schedule puts three CTAs on some SMs (10240×8192: 1.88 –
#                                  1.93× bf16 against 1.70 – 1.80× by TMA); where every SM holds
#                                  two, TMA was 4 – 9 % faster (`ldg_probe*.json`)


def beats(main: mg.Config, w: QArray) -> bool:
    """Whether this kernel is expected to beat the main kernel's fitted config ``main`` for
    ``w`` (measured, ``occupancy_probe_skinny_*.json``): everywhere but where the main kernel
    adds its partial sums in the kernel (``fused``) over long CTA runs
    (:data:`MAIN_KEEPS_CODES`); NF4 also depends on its clusters (:func:`pick`)."""
    return not (main.fused and main.cta_steps * main.block_k >= MAIN_KEEPS_CODES)


def pick(main: mg.Config, w: QArray, m: int) -> mg.Config | None:
    """The dispatch's config of this kernel for ``w`` and ``m`` rows of ``x``, or ``None`` where
    the main kernel's ``main`` is expected faster (:func:`eligible`, :func:`beats`): 512-code
    steps (fitted), :data:`CTAS_PER_SM` CTAs per SM, clusters of at most :data:`CLUSTER`.

    NF4 (the pair table, 32 KiB a CTA): **two CTAs per SM, 512-code steps, where clusters of two
    hold its tiles in one wave**, else three per SM (256-code steps) in clusters of two, else
    (no cluster fits) three per SM and the XLA pass up to :data:`NF4_MAX_CODES` codes. Measured
    (``skinny_rows_probe_nf4.json``, H100, same run, M = 1 / 16, against the main kernel that
    took NF4 on these shapes): Llama-3-70B's 8192² two per SM clustered −6.8 / −3.0 %,
    8192×28672 −2.2 / −0.7 %, 10240×8192 (two per SM need two waves there) three per SM
    clustered −7.8 / −7.3 %."""
    if not (eligible(w, m) and beats(main, w)):
        return None
    n_p, k_p = w.codes.shape
    bits, span = mg.code_bits(w), mg.slice_codes(w)
    base = dataclasses.replace(
        main, path="skinny", block_k=512, ctas_per_sm=CTAS_PER_SM, cluster=CLUSTER
    )
    if w.layout != "gpu_nf4t":
        cfg = fit(base, m, k_p, n_p, bits, span)
        ctas = n_p // ROWS * (k_p // cfg.block_k) // cfg.cta_steps
        return dataclasses.replace(cfg, ldg=bits == 8 and ctas > LDG_ABOVE_CTAS)
    for per_sm in (2, CTAS_PER_SM):
        cfg = fit(dataclasses.replace(base, ctas_per_sm=per_sm), m, k_p, n_p, bits, span)
        ctas = n_p // ROWS * (k_p // cfg.block_k) // cfg.cta_steps
        if cfg.cluster and ctas <= per_sm * mg.NUM_SMS:
            return cfg
    if math.prod(w.codes.shape) > NF4_MAX_CODES:
        return None
    return fit(dataclasses.replace(base, cluster=0), m, k_p, n_p, bits, span)


def fit(cfg: mg.Config, m: int, k_p: int, n_p: int, bits: int, span: int = mg.SLICE) -> mg.Config:
    """``cfg`` (``path="skinny"``) made runnable: its K step halved until it divides ``K_p`` and
    :data:`STAGES` steps (and the pair table, ``cfg.lut``) fit the shared-memory share of
    ``cfg.ctas_per_sm`` CTAs, its ``L`` from :func:`schedule`, or with clusters of at most
    ``cfg.cluster`` CTAs from :func:`clustered_schedule` (halved while the slots a tile's first CTA
    receives do not fit even 128-code steps)."""
    _, bm = mg.padded_rows(m)
    bk, share, n_tiles = cfg.block_k, smem_share(cfg.ctas_per_sm), n_p // ROWS

    def layout(bk):  # (L, clusters, slots received, shared memory)
        steps = k_p // bk
        length, cl = clustered_schedule(n_tiles, steps, cfg.ctas_per_sm, cfg.cluster)
        received = received_slots(n_tiles, steps, length) if cl else None
        return length, cl, smem_bytes(bm, bk, STAGES, bits, span, cfg.lut, received)

    while bk > mg.SLICE and (k_p % bk or layout(bk)[2] > share):
        bk //= 2
    length, cl, need = layout(bk)
    if cl and need > share:
        return fit(dataclasses.replace(cfg, cluster=cfg.cluster // 2), m, k_p, n_p, bits, span)
    return dataclasses.replace(
        cfg, block_k=bk, stages=STAGES, cta_steps=length, fused=False, cluster=cl
    )


def config_smem(m: int, w: QArray, cfg: mg.Config) -> int:
    """:func:`smem_bytes` of one CTA of ``cfg`` for ``m`` rows of ``x`` times ``w`` (above
    :func:`smem_share`, fewer CTAs fit on an SM)."""
    n_p, k_p = w.codes.shape
    steps = k_p // cfg.block_k
    received = received_slots(n_p // ROWS, steps, cfg.cta_steps) if cfg.cluster else None
    _, bm = mg.padded_rows(m)
    bits, span = mg.code_bits(w), mg.slice_codes(w)
    return smem_bytes(bm, cfg.block_k, cfg.stages, bits, span, cfg.lut, received)


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
    if cfg.ldg and mg.code_bits(w) != 8:
        raise ShapeError(f"mgpu_matmul: Config.ldg loads fragment-major codes, which only "
                         f"the 8-bit layouts store ('gpu_i8t', 'gpu_f8t'), not "
                         f"{w.layout!r}")  # fmt: skip
    total = n_p // ROWS * (k_p // cfg.block_k)
    if cfg.cta_steps is None or total % cfg.cta_steps:
        raise ShapeError(f"mgpu_matmul: cta_steps {cfg.cta_steps} must divide the {total} K "
                         f"steps of the weight's 64-row tiles (use fit())")  # fmt: skip
    steps = k_p // cfg.block_k
    if cfg.cluster:
        c, length = cfg.cluster, cfg.cta_steps
        if c > MAX_CLUSTER or c * length % steps or (total // length) % c:
            raise ShapeError(f"mgpu_matmul: clusters of {c} CTAs must divide the "
                             f"{total // length} CTAs, be at most {MAX_CLUSTER} and hold "
                             f"whole tiles of {steps} K steps ({length} per CTA; see "
                             f"cluster_size())")  # fmt: skip
    need = config_smem(x2.shape[0], w, cfg)
    if need > mg.SMEM_BYTES:
        raise ShapeError(f"mgpu_matmul: {cfg} needs {need} bytes of shared memory, more than "
                         f"{mg.SMEM_BYTES} (use fit())")  # fmt: skip


def _partials(x2, codes, scales, ch_scales, cfg: mg.Config, decode: str, span: int):
    """The kernel: ``(slots, N_p, M_p)`` float32 partial sums of ``Ŵᵀ xᵀ`` — CTA ``c`` takes K
    steps ``[c·L, (c+1)·L)`` of the 64-row tiles end to end and writes its sum of tile ``t`` to
    slot ``c − first_cta(t)`` (:func:`qjax.kernels.gpu.mgpu_matmul.segments`); ``scales``: one
    row per ``span`` codes on the weights (or, ``cfg.scale_acc``, on the float32 slice sums), or
    ``None`` (per-channel scales applied by the caller); ``cfg.lut``: 4-bit codes decoded by
    the pair table (:mod:`~qjax.kernels.gpu.mgpu_decode`), copied to shared memory at the
    start and waited for at the first K step, once the pipeline has issued its first copies.

    8-bit ``codes`` are stored fragment-major (:func:`~qjax.kernels.gpu.mgpu_decode.to_fragments`):
    a K step of a tile is ``64 · bk`` consecutive bytes, which TMA copies as one box and each
    thread loads 16 codes at a time from (:func:`~qjax.kernels.gpu.mgpu_decode.load_block`), or,
    ``cfg.ldg``, which each thread loads from HBM straight into registers by 128-bit read-only
    loads at the start of the step before (the run's last step loads its own again, from L2), so
    no TMA and no shared memory carry them; the pipeline copies ``x`` and the scale rows only.

    ``cfg.cluster`` (``C`` consecutive CTAs per cluster, :func:`clustered_schedule`): returns
    ``y``, ``(rows of x2, N_p)`` in ``x2.dtype``, instead. A CTA that took a tile's later K
    steps stores its float32 sum straight into the shared memory of the tile's first CTA
    (``st.async`` to distributed shared memory, completing a barrier there, slot
    ``c − first − 1``); the first CTA reaches the tile last, at the end of its run, waits for
    the slots its tile has, adds them in slot order (the same float32 sum whoever arrives
    first), scales by ``ch_scales`` (``(1, N_p)``, prefetched at the start, taken to float32)
    and writes its block of ``y`` transposed. Nobody waits but a tile's first CTA, for CTAs of
    its own cluster (launched together); Mosaic GPU syncs the cluster after its CTAs initialize
    their barriers, so no partial sum lands before the barrier it completes exists."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m_rows, k_p = x2.shape[0], codes.shape[1]  # x2's columns past K: zeros (TMA fills them)
    _, bm = mg.padded_rows(m_rows)
    n_p = codes.shape[0]
    bk, length, lut, cl, ldg = cfg.block_k, cfg.cta_steps, cfg.lut, cfg.cluster, cfg.ldg
    n_tiles, steps = n_p // ROWS, k_p // bk
    ctas = n_tiles * steps // length
    slots = received_slots(n_tiles, steps, length) + 1  # a tile's CTAs, most
    per = bk // span
    bits = 4 if codes.dtype == jnp.int4 else 8
    frag = bits == 8  # stored fragment-major
    scaled = scales is not None
    by_slice = scaled and cfg.scale_acc
    load = mg.load_codes(decode, span, bk, by_slice, NF4_LOAD_CODES)  # per decode and `wgmma`
    blocks = load // span  # scale blocks per decoded slice
    channel = ch_scales is not None
    fp8_factor = 2.0 ** dec.FP8_SCALE_LOG2.get(decode, 0)

    def kernel(w_gmem, x_gmem, *rest, o_smem, lut_smem=None, bar=None):
        *s_gmem, o_gmem = rest
        if lut:
            *s_gmem, lut_gmem = s_gmem
        if channel:
            *s_gmem, chs_gmem = s_gmem
        if cl:
            y_smem, chs_smem, recv, rbar, cbar = o_smem
            ci = lax.axis_index("c") * cl + lax.axis_index("cl") if cl > 1 else lax.axis_index("c")
        else:
            ci = lax.axis_index("c")
        if lut:
            plgpu.copy_gmem_to_smem(lut_gmem, lut_smem, bar.at[0])

        def tile(kk):
            return (ci * length + kk) // steps

        def k_step(kk):
            return (ci * length + kk) % steps

        def first_cta(t):
            return t * steps // length

        def load_step(g):
            """``cfg.ldg``: the codes of the K step ``g`` of the tiles end to end."""
            return dec.load_fragments(w_gmem.at[g])

        if channel:  # the scales of the tile this CTA's run ends in (used if it writes it)
            rows_end = pl.ds(tile(length - 1) * ROWS, ROWS)
            plgpu.copy_gmem_to_smem(chs_gmem.at[0, rows_end], chs_smem.at[0], cbar.at[0])

        def finish(total, t, at_end):
            """Tile ``t``'s whole float32 sum: per-channel scales, cast, transposed to ``y``."""
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last write has read y_smem
            if channel:

                @pl.when(at_end)
                def _():
                    plgpu.barrier_wait(cbar.at[0])

                @pl.when(~at_end)  # a whole tile inside the run (L > steps): fetched now
                def _():
                    plgpu.copy_gmem_to_smem(
                        chs_gmem.at[0, pl.ds(t * ROWS, ROWS)], chs_smem.at[1], cbar.at[1]
                    )
                    plgpu.barrier_wait(cbar.at[1])

                s = chs_smem[jnp.where(at_end, 0, 1)].astype(jnp.float32)
                total = total * lax.broadcast_in_dim(s, (ROWS, bm), (0,))
            mg._store_transposed(total.astype(x2.dtype), y_smem)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_smem, o_gmem.at[pl.ds(0, bm), pl.ds(t * ROWS, ROWS)])

        def exchange(tot, kk):
            """Tile ``tile(kk)``'s sum so far: to its first CTA's shared memory, or (this CTA
            first) added to the later CTAs' and written to ``y``."""
            t = tile(kk)
            c0 = first_cta(t)
            later = ((t + 1) * steps - 1) // length - c0  # CTAs after the first on tile t
            total = tot[...]
            if slots > 1:

                @pl.when(ci != c0)
                def _():
                    slot = ci - c0 - 1
                    plgpu.async_store_smem(
                        total, recv.at[slot], rbar.at[slot], cluster_idx=c0 % cl, cluster_dim="cl"
                    )

            @pl.when(ci == c0)
            def _():
                def add(j, acc):
                    plgpu.barrier_wait(rbar.at[j])
                    return acc + recv[j]

                summed = lax.fori_loop(0, later, add, total) if slots > 1 else total
                finish(summed, t, kk == length - 1)

        def scoped(accs):
            tot = accs[0]

            def body(idx, *refs):
                (kk,) = idx
                if ldg:  # a later step's codes issued first; this step's came with the carry
                    x_smem, *s_smem, held = refs
                    nxt = load_step(ci * length + jnp.minimum(kk + 1, length - 1))
                    step_codes = dec.fragment_slices(held, bits, load, codes.dtype)
                else:
                    w_smem, x_smem, *s_smem = refs
                if lut:  # the table, at the first step: the pipeline's first copies are
                    #      already in flight (waiting before the pipeline held back every CTA's
                    #      stream: NF4 1 – 4 % slower, `table_wait_probe.json`)

                    @pl.when(kk == 0)
                    def _():
                        plgpu.barrier_wait(bar.at[0])

                def operands(j):
                    cols = pl.ds(j * load, load)
                    if ldg:
                        raw = step_codes[j]
                    elif frag:
                        raw = dec.load_block(w_smem.at[0, j])
                    else:
                        raw = plgpu.load(w_smem.at[:, cols], (), layout=dec.load_layout(bits))
                    a = dec.decode(decode, raw, lut_smem if lut else None)
                    if decode in dec.FP8_SHIFT:  # exact: a power of two
                        a = a * jnp.bfloat16(fp8_factor)
                    if scaled and not by_slice:
                        rows = [s_smem[0][j * blocks + b, :] for b in range(blocks)]
                        s = [lax.broadcast_in_dim(r, (ROWS, span), (0,)) for r in rows]
                        a = a * s[0] if blocks == 1 else dec.times_column_blocks(a, s)
                    return a, x_smem.at[:, cols].T

                if not by_slice:
                    for j in range(bk // load):
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
                    if cl:
                        exchange(tot, kk)
                    else:
                        t = tile(kk)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last write read it
                        o_smem[...] = tot[...]
                        plgpu.commit_smem()
                        slot = ci - first_cta(t)
                        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[slot, pl.ds(t * ROWS, ROWS)])
                    tot[...] = jnp.zeros((ROWS, bm), jnp.float32)

                return nxt if ldg else None

            if frag:  # the step's blocks: bk · 64 consecutive bytes
                w_spec = plgpu.BlockSpec(
                    (1, bk // dec.FRAGMENT_CODES, ROWS, dec.FRAGMENT_CODES),
                    lambda kk: (tile(kk), k_step(kk), 0, 0),
                )
            else:
                w_spec = plgpu.BlockSpec(
                    (ROWS, bk),
                    lambda kk: (tile(kk), k_step(kk)),
                    transforms=mg._tiled(load, bits, "lhs"),
                )
            in_specs = [] if ldg else [w_spec]
            in_specs += [
                plgpu.BlockSpec(
                    (bm, bk), lambda kk: (0, k_step(kk)), transforms=mg._tiled(load, 16, "rhs")
                ),
            ]
            if scaled:
                in_specs.append(plgpu.BlockSpec((per, ROWS), lambda kk: (k_step(kk), tile(kk))))
            carry = dict(init_carry=load_step(ci * length)) if ldg else {}
            pipeline = plgpu.emit_pipeline(
                body, grid=(length,), in_specs=in_specs, max_concurrent_steps=cfg.stages, **carry
            )
            pipeline(*([] if ldg else [w_gmem]), x_gmem, *s_gmem)
            if channel:  # the prefetched scales were not used: the run's last tile went on

                @pl.when(ci != first_cta(tile(length - 1)))
                def _():
                    plgpu.barrier_wait(cbar.at[0])

            plgpu.wait_smem_to_gmem(0)

        acc = plgpu.ACC((ROWS, bm), jnp.float32)
        pl.run_scoped(scoped, [acc] * (3 if by_slice else 1))

    if ldg:  # row g: K step g of the tiles end to end
        w_arg = codes.reshape(n_tiles * steps, ROWS * bk)
    else:
        w_arg = dec.fragment_blocks(codes) if frag else codes
    args = [w_arg, x2] + ([scales] if scaled else [])
    args += [ch_scales] if channel else []
    scratch = {}
    if lut:
        args.append(jnp.asarray(dec.lut_words(decode)))
        scratch["lut_smem"] = plgpu.SMEM((256, dec.LUT_LANES), jnp.uint32)
        scratch["bar"] = plgpu.Barrier(num_arrivals=1, num_barriers=1)
    mesh = dict(grid=(ctas,), grid_names=("c",))
    if cl:
        out_type = jax.ShapeDtypeStruct((m_rows, n_p), x2.dtype)
        o_smem = (
            plgpu.SMEM((bm, ROWS), x2.dtype, transforms=mg._tiled(ROWS, 16, "out")),
            plgpu.SMEM((2, ROWS), ch_scales.dtype if channel else jnp.float32),
            plgpu.SMEM(
                (max(slots - 1, 1), ROWS, bm), jnp.float32, transforms=mg._tiled(bm, 32, "out")
            ),
            plgpu.Barrier(num_arrivals=1, num_barriers=max(slots - 1, 1)),
            plgpu.Barrier(num_arrivals=1, num_barriers=2),
        )
        if cl > 1:
            mesh = dict(grid=(ctas // cl,), grid_names=("c",), cluster=(cl,), cluster_names=("cl",))
    else:
        out_type = jax.ShapeDtypeStruct((slots, n_p, bm), jnp.float32)
        o_smem = plgpu.SMEM((ROWS, bm), jnp.float32, transforms=mg._tiled(bm, 32, "out"))
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        **mesh,
        scratch_types=dict(o_smem=o_smem, **scratch),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(*args)


@functools.partial(jax.jit, static_argnames=("cfg",))
def matmul_rows(x2, w: QArray, cfg: mg.Config):
    """``x2 @ Ŵ`` for bf16 ``x2: (M, K)`` (or ``K_p``), ``M ≤`` :data:`MAX_ROWS`, ``(M, N_p)`` in
    ``x2.dtype``: the kernel's partial sums, then one XLA pass (slots added, transposed, per-channel
    scales, cast); with ``cfg.cluster``, the kernel's ``y`` as it is."""
    m = x2.shape[0]
    if m > mg.TMA_ROWS and m % mg.TMA_ROWS:  # TMA reads past the last row only of such x
        x2 = jnp.pad(x2, [(0, -m % mg.TMA_ROWS), (0, 0)])
    per_channel = w.layout == "gpu_f8t" or (w.layout != "gpu_nf4t" and w.spec.group == "channel")
    scales = None if per_channel else w.scales
    if cfg.cluster:
        ch = w.scales[:1] if per_channel else None  # cast to float32 in the kernel
        return _partials(x2, w.codes, scales, ch, cfg, mg.decoder(w), mg.slice_codes(w))[:m]
    parts = _partials(x2, w.codes, scales, None, cfg, mg.decoder(w), mg.slice_codes(w))
    n_p, k_p = w.codes.shape
    y = mg.combine(parts, n_p // ROWS, k_p // cfg.block_k, cfg.cta_steps).T[:m]
    if per_channel:
        y = y * w.scales[:1].astype(jnp.float32)
    return y.astype(x2.dtype)
