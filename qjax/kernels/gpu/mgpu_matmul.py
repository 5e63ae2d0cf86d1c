"""Weight-only quantized matmul as a Pallas **Mosaic GPU** kernel (Hopper: TMA, ``wgmma``):
int4 / int8 (:class:`~qjax.formats.Int`), NF4 and per-channel FP8 weights, bf16 activations.

Computes ``y = x @ Ŵ`` for bf16 ``x: (M, K)`` and a weight repacked (:mod:`qjax.kernels.repack`)
to ``"gpu_i4t"`` / ``"gpu_i8t"`` (signed codes ``c − h``, ``h = 2^(b−1)``, as ``jnp.int4`` /
``int8``), ``"gpu_nf4t"`` (NF4 indices ``c − 8`` as ``jnp.int4``) or ``"gpu_f8t"`` (FP8 bytes),
all ``(N_p, K_p)`` with K in the register order of :mod:`qjax.kernels.gpu.mgpu_decode`; scales
(zeros, NF4 absmaxes) one row per 128 (NF4: 64) codes along K; FP8: per-channel float32 scales.

The product is computed transposed, ``yᵀ = Ŵᵀ xᵀ``, because Hopper's warpgroup MMA may take its
*left* operand from registers: that is where the dequantized weights are made, so they never go
back to shared memory (Marlin's idea, Frantar et al. 2024, on ``wgmma``). Per K step of ``BK``
codes, one memory warp group TMA-copies a ``(128, BK)`` weight tile, the ``(BM, BK)`` tile of
``x`` and the step's scale (and zero) rows into shared memory, ``stages`` steps ahead; each of
two compute warp groups loads its ``(64, BK)`` half into registers (4-bit codes 32 bits per
thread, no shuffles; 8-bit codes, stored fragment-major, 128 bits per thread and 128-code
slice, :func:`~qjax.kernels.gpu.mgpu_decode.load_block`) and, per 128-code slice (NF4: two
64-code scale blocks, each scaled by its own row, :data:`NF4_LOAD_CODES`),

    a = decode(c) [− (z − h)] · s  (int: Mosaic GPU's prmt/lop3 converters, ``c − z`` exact in
                                    bf16; NF4: the bf16 levels of two codes per ``ld.shared``
                                    from a pair table (``Config.lut``); FP8: a bit
                                    move to ``value·2⁻¹²⁰``, times ``2¹²⁰``; one bf16 rounding of
                                    the product, as :func:`qjax.kernels.repack.dequantize_bf16`)
    acc += a @ x_sliceᵀ            (``wgmma``, float32 accumulator, ``xᵀ`` read transposed
                                    from shared memory)

With ``scale_acc`` (the table's choice up to 32 rows of ``x``, int formats) the scale moves to
the float32 sums instead: ``acc += s · (a @ x_sliceᵀ)``, each slice's product in one of two
accumulators that alternate, so one slice's ``wgmma`` runs while the previous one is scaled
(``BLOCK_N·BM`` multiply-adds per slice instead of ``BLOCK_N·span`` bf16 multiplies, and no
bf16 rounding of ``c·s``); per-channel scales multiply the result once.

Work is scheduled stream-K (:func:`schedule`; Osama et al. 2023): the weight's 128-row tiles are
laid end to end as ``tiles × K steps``, and every CTA takes the same number ``L`` of consecutive
steps, so a CTA may finish one tile and start the next. The 70B shapes run in one wave of 128
CTAs whatever their tile count. A tile split between CTAs needs its partial sums added:

* **in the kernel** (``Config.fused``, chosen where :func:`handoffs_early`): the tile's first CTA
  (the one that takes its first K step, at the end of its run) waits on a semaphore for the later
  CTAs' float32 sums, which each wrote to a workspace slot at the start of its run; it adds them,
  scales per channel, casts and writes its block of ``y`` transposed (``WGMMA_TRANSPOSED`` → a
  swizzled ``(BM, 64)`` tile → TMA);
* **or after it**: every CTA writes its sum to a slot at the tile's last step (and its own), and
  one fused XLA pass adds each tile's slots, transposes and casts (:func:`combine`; FP8 /
  per-channel int: times the scales). Where CTAs split tiles into aligned parts that end together
  (8192² at decode sizes) that pass is cheaper than the hand-over the first CTA would wait for.

``wgmma`` takes the rows of ``x`` 8 at a time: TMA reads the rows past the end of ``x`` as zeros
(``x`` with more than 8 rows is padded to a multiple of 8, TMA's tiling) and drops the rows of ``y``
past its end; it reads the columns past ``x``'s ``K`` (up to the weight's padded ``K_p``) as zeros
too, so ``x`` is not padded along ``K`` (:func:`kernel_rows`). Above 128 rows ``x`` is cut into 128-
or 256-row blocks (a grid axis; the blocks of one weight range launch together, so the range is read
from HBM once; 256-row blocks decode each weight tile half as often and take whole tiles per CTA,
:func:`pick` chooses by :func:`estimated_steps`; above :data:`GROUPED_ROWS` their jobs go
round-robin in groups of row blocks, :func:`grouped_job`, so that ``x`` stays in L2); above
:data:`MAX_ROWS` (8192) :func:`qjax.kernels.calls.dequantized_matmul` takes over (XLA's GEMM).

At M ≤ 16 :func:`config_for` hands most shapes to :mod:`qjax.kernels.gpu.mgpu_skinny` (one warp
group per CTA, several CTAs per SM), measured faster there; this kernel keeps the others.

Measured on the H100 (``experiments/results/kernels/README.md``), ratio to XLA's bf16 ``dot`` at
M ≤ 16 on the Llama-3-70B shapes (this kernel alone): int4 g128 2.60–3.30× (2.5–2.7 TB/s on the
large shapes), int8 per-channel 1.64–1.88×, FP8 1.58–1.86×, NF4 2.2–3.0× (1.10–1.17× int4's
time, in 64-code slices; with the skinny kernel in the dispatch, its partial sums added by
clusters of two: int4 2.82–3.44×, int8 1.73–1.98×, FP8 1.72–1.96×, runs of one day; NF4
1.11–1.22× int4's time, 1.02–1.08× since both kernels take its codes 128 at a time); M = 64
2.27–2.66×, M = 128 1.59–1.76×; int4 M = 256–1024 0.83–1.01×, M = 2048 0.89–1.09×, M = 4096
0.93–1.02×, M = 8192 0.89–1.03× (the other formats 0.77–1.04× from 512 rows). With no decode at
all (a constant operand) the same pipeline makes 1.81–2.04× at M = 128 and 2.58–2.94× at 64:
the decode costs 12–24 %, and the rest is the pipeline (Nsight Compute: tensor pipe busy 57 % of
the cycles at M = 128, 70 % without the decode; 83 % and 90 % at M = 2048; README, "ncu").
Tested on the device (``kernel_bench --check``); the CPU tests lower the kernel to Mosaic GPU
code and check the layouts, decoders and the stream-K bookkeeping, because this jax version's
interpreter cannot run warp-specialized pipelines.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qjax.errors import FormatError, ShapeError
from qjax.kernels import calls
from qjax.kernels import repack as rp
from qjax.qarray import QArray

LAYOUTS = ("gpu_i4t", "gpu_i8t", "gpu_nf4t", "gpu_f8t")
SLICE = 128  # codes per scale row (and per wgmma issue) along K
BLOCK_N = 64  # weight rows per compute warp group (wgmma M)
MAX_BLOCK_M = 128  # rows of x per CTA
ROW_STEP = 8  # wgmma's N (rows of x per CTA) is a multiple of this
TMA_ROWS = 8  # x's rows: fewer than this, or a multiple of it (TMA's tiling of a global array)
X_TILE_COLS = 64  # columns of x per row of its shared-memory tiles (128-byte swizzle of bf16): a
#                 K that is not a multiple of it is padded to K_p before the kernels read x
SMEM_BYTES = 227 * 1024  # H100 shared memory per block (opt-in maximum)
NF4_LOAD_CODES = 128  # this kernel's NF4 codes per shared-memory tile row, decode and `wgmma`
#                      (:func:`load_codes`; the skinny kernel's is `mgpu_skinny.NF4_LOAD_CODES`):
#                      two 64-code scale blocks, 8.4 – 9.5 % faster than 64 at M ≤ 16 on the
#                      H100, within ±4 % from 64 rows up, faster in 16 of 20 cases
#                      (`nf4_main_wide_probe*.json`)


@dataclasses.dataclass(frozen=True)
class Config:
    path: str  # "mgpu" | "skinny" (`mgpu_skinny`: one warp group per CTA, M ≤ 16) | "xla"
    block_k: int = 512
    cta_steps: int | None = None  # K steps per CTA (stream-K); None: chosen by `schedule`
    stages: int = 2  # K steps the memory warp group runs ahead
    scale_acc: bool = False  # scales on float32 per-slice sums (`_stream_k`), not on the weights
    fused: bool | None = None  # partial sums added in the kernel (`_stream_k`), y written as
    #                            is; None: where every hand-off comes early (`handoffs_early`)
    lut: bool = False  # 4-bit codes decoded by the shared-memory pair table (`mgpu_decode`)
    m_inner: bool = False  # the row blocks of x as the grid's fastest axis (CTAs launched
    #                        together share weight steps, not rows of x)
    block_m: int = MAX_BLOCK_M  # rows of x per CTA above 128 rows: 128 or 256 (256: each
    #                             weight tile decoded half as often; whole tiles per CTA)
    grouped: bool | None = None  # whole tiles per CTA: (row block, tile) jobs dealt round-robin
    #                              in groups of GROUP_M row blocks (`grouped_job`), not each
    #                              CTA's tiles in a row; None: above GROUPED_ROWS rows of x
    ctas_per_sm: int = 1  # "skinny": CTAs an SM holds (shared memory cut to a share each,
    #                       the stream-K schedule fills 132 × this in one wave)
    cluster: int = 0  # "skinny": CTAs per cluster that add a split tile's partial sums in the
    #                   shared memory of its first CTA, which writes y (`mgpu_skinny`; `fit`
    #                   takes it as the most allowed); 0: an XLA pass adds them
    ldg: bool = False  # "skinny", 8-bit codes (stored fragment-major, `mgpu_decode.to_fragments`):
    #                    loaded from HBM straight into registers, one K step ahead, not by TMA
    #                    through shared memory; `mgpu_skinny.pick` sets it where some SMs hold
    #                    three CTAs (`mgpu_skinny.LDG_ABOVE_CTAS`, `ldg_probe*.json`)


# Above 128 rows of x, XLA's dequantize + bf16 GEMM (`calls.dequantized_matmul`) made int4
# 0.35–0.39× bf16 at M = 256, 0.50–0.52× (512), 0.65–0.72× (1024), 0.78–0.93× (2048), 0.84–0.97×
# (4096) where this kernel (the table's pick of 128- / 256-row blocks) makes 0.90–0.99×,
# 0.83–0.98×, 0.85–1.01×, 0.97–1.05×, 0.94–1.03×; at 8192 the two are level (int4 0.93–0.99×
# grouped against 0.88–1.02×, int8 0.88–0.97× against 0.89–1.03×, `large_m_mgpu_probe_bm256*`,
# `_grouped`), and the kernel needs no bf16 copy of the weight: rows up to which it runs.
MAX_ROWS = 8192


# M bucket -> candidate configs (`pick` takes the one `estimated_steps` expects to finish
# first); winners of `kernel_bench --autotune --formats w4g128t` on an H100 SXM (the Llama-3-70B
# shapes, experiments/results/kernels/, the latest under stream-K): large K steps amortize the
# per-step barriers; stages are cut to shared memory by `fit`.
# NF4 codes are decoded by the shared-memory pair table (`config_for` sets `lut`): 10–20 % faster
# than the prmt decoder at every M, while int4's own converter stays 1–9 % faster than the table
# (`lut_decode_probe.json`).
# Up to 32 rows the scales go on the float32 sums (`scale_acc`): int4 +1–5 %, int8 per-channel
# +1–2 %, NF4 −4–6 % (so `config_for` turns it off there), `scale_acc_probe.json`.
TABLE = {
    16: (Config("mgpu", 512, None, 3, scale_acc=True),),
    32: (Config("mgpu", 512, None, 3, scale_acc=True),),
    64: (Config("mgpu", 256, None, 4),),
    128: (Config("mgpu", 128, None, 4),),
    MAX_ROWS: (
        Config("mgpu", 128, None, 4, m_inner=True),
        Config("mgpu", 128, None, 2, m_inner=True, block_m=256),
    ),
}
# A K step of 256 rows of x costs this many 128-row steps (M = 2048, 8192², int4: 4 whole tiles
# per CTA in 356 µs against 8 in 424 µs, `large_m_mgpu_probe_bm256.json`): each weight tile is
# decoded half as often, so 256-row blocks win where they still fill the SMs.
ROWS_256_STEP_COST = 1.7
NUM_SMS = 132  # H100 SXM; one CTA per SM (three warp groups and their registers fill it)


def padded_rows(m: int, block_m: int = MAX_BLOCK_M) -> tuple[int, int]:
    """``(M_p, BM)``: ``m`` rows of ``x`` padded to a multiple of 8 (``wgmma``'s N), and of
    ``block_m`` (:data:`MAX_BLOCK_M` or 256) above 128; ``BM`` rows per CTA."""
    m_p = max(ROW_STEP, -(-m // ROW_STEP) * ROW_STEP)
    if m_p > MAX_BLOCK_M:
        m_p = -(-m // block_m) * block_m
    return m_p, min(m_p, block_m)


def smem_bytes(
    bm: int,
    bk: int,
    stages: int,
    bits: int = 4,
    span: int = SLICE,
    lut: bool = False,
    whole: bool = False,
) -> int:
    """Shared memory of one CTA: ``stages`` × (weight tile, x tile, scale and zero rows, one per
    ``span`` codes) + the float32 output tiles of the two compute warp groups (which the fused
    epilogue reuses for its per-channel scales and ``y``; ``whole`` tiles per CTA: only the bf16
    ``y`` tiles) + its barriers (Mosaic GPU's count, for asymmetric int, within
    :data:`EPILOGUE_SMEM`; an upper bound for the other formats) + the decoder's pair table
    (``lut``)."""
    per_stage = 2 * BLOCK_N * bk * bits // 8 + bm * bk * 2 + 2 * (bk // span) * 2 * BLOCK_N * 2
    table = LUT_SMEM if lut else 0
    out = 2 * BLOCK_N * bm * (2 if whole else 4)
    return stages * per_stage + out + EPILOGUE_SMEM + table


EPILOGUE_SMEM = 1024  # the fused epilogue's 2 barriers and their alignment (a bound; measured:
#                       a (2, BLOCK_N) float32 buffer more took 1056 bytes, so the per-channel
#                       scales share the output tiles' buffer)


LUT_SMEM = 256 * 32 * 4  # the pair table, one copy per lane (`mgpu_decode.lut_words`)


GROUP_M = 8  # row blocks of x per group of jobs (`Config.grouped`): their x stays in L2
GROUPED_ROWS = 4096  # above: grouped jobs (M = 8192, int4: +5–7 % on 8192² and 8192×28672, level
#                      on the others; at 2048 −2–3 %, `large_m_mgpu_probe_grouped.json`)

RAMP_STEPS = 2  # a CTA's pipeline fill + drain, in K steps (measured: 3 waves of 4-step CTAs
#                 take the time of ≈ 19 steps on 10240×8192)


def segments(n_tiles: int, steps: int, cta_steps: int) -> np.ndarray:
    """``(n_tiles, 2)``: the first and last CTA that work on each ``(128, K)`` weight tile when
    CTA ``c`` takes K steps ``[c·L, (c+1)·L)`` of the tiles laid end to end (``L`` =
    ``cta_steps``, ``steps`` per tile)."""
    starts = np.arange(n_tiles) * steps
    return np.stack([starts // cta_steps, (starts + steps - 1) // cta_steps], axis=1)


def schedule(n_tiles: int, steps: int, m_tiles: int = 1, whole: bool = False) -> int:
    """Stream-K: K steps per CTA, a divisor ``L`` of the ``n_tiles·steps`` steps (``whole``: a
    multiple of ``steps``, whole tiles per CTA), that minimizes ``waves · (L + RAMP_STEPS)``
    (ties: larger ``L``, fewer partial sums). A CTA's steps may span the end of one weight tile
    and the start of the next (Osama et al. 2023, "Stream-K"), so ``N·K`` work spreads evenly
    over the SMs whatever the number of tiles."""
    total = n_tiles * steps

    def cost(length: int) -> tuple[int, int]:
        waves = -(-(total // length) * m_tiles // NUM_SMS)
        return waves * (length + RAMP_STEPS), -length

    unit = steps if whole else 1
    return min((d for d in range(unit, total + 1, unit) if total % d == 0), key=cost)


def grouped_job(cta, i, n_ctas: int, n_tiles: int, group: int):
    """``(row block, tile)`` of CTA ``cta``'s ``i``-th job when whole-tile jobs are dealt
    round-robin (``Config.grouped``): job ``j = cta + i·n_ctas`` in the order groups of
    ``group`` row blocks of ``x``, within a group tile by tile, its row blocks fastest — the
    CTAs running together share ``group`` row blocks (their ``x`` stays in L2) and read each
    weight tile once per group. Works on ints, numpy arrays and traced indices."""
    j = cta + n_ctas * i
    return j // (group * n_tiles) * group + j % group, j % (group * n_tiles) // group


def handoffs_early(n_tiles: int, steps: int, cta_steps: int) -> bool:
    """Whether every weight tile split between CTAs is split between two, the later of which
    takes the tile's last K steps at the start of its run and goes on to the next tile — so its
    partial sum reaches the tile's first CTA long before that one needs it (the fused epilogue
    of :func:`_stream_k` then costs nothing; where a CTA's run ends inside or at the end of a
    tile it did not start, the first CTA waits on it at the end: measured slower than an XLA
    pass, ``fused_epilogue_probe.json``)."""
    seg = segments(n_tiles, steps, cta_steps)
    split = seg[:, 1] > seg[:, 0]
    ends_at_cta_end = (np.arange(1, n_tiles + 1) * steps) % cta_steps == 0
    return bool(np.all(~split | ((seg[:, 1] - seg[:, 0] == 1) & ~ends_at_cta_end)))


def fit(cfg: Config, m: int, k_p: int, n_p: int, bits: int = 4, span: int = SLICE) -> Config:
    """``cfg`` made runnable for ``m`` rows, ``K_p`` codes and ``N_p`` columns: its K step
    halved until it divides ``K_p``, its pipeline depth (then its K step) cut to shared memory,
    its K steps per CTA chosen by :func:`schedule` (``None``) or cut to divide the steps.
    256-row blocks of ``x`` (``block_m``) take whole weight tiles per CTA, their ``y`` written
    by the kernel, and decode 4-bit codes in registers (beside the pair table only one stage
    fits: NF4 0.29–0.55× bf16, 0.55–0.94× with two: ``large_m_mgpu_probe_bm256_nf4_fp8``)."""
    bk = cfg.block_k
    while k_p % bk:
        bk //= 2
    m_p, bm = padded_rows(m, cfg.block_m)
    whole = bm > MAX_BLOCK_M
    stages = cfg.stages
    lut = cfg.lut and bits == 4 and not whole

    def too_big(bk: int, stages: int) -> bool:
        return smem_bytes(bm, bk, stages, bits, span, lut, whole) > SMEM_BYTES

    while too_big(bk, stages) and (stages > 1 or bk > SLICE):
        if stages > 1:
            stages -= 1
        else:
            bk //= 2
    n_tiles, steps = n_p // (2 * BLOCK_N), k_p // bk
    if cfg.cta_steps is None:
        cta_steps = schedule(n_tiles, steps, m_p // bm, whole)
    elif whole:
        cta_steps = steps * calls.largest_divisor_at_most(n_tiles, max(1, cfg.cta_steps // steps))
    else:
        cta_steps = calls.largest_divisor_at_most(n_tiles * steps, cfg.cta_steps)
    fused = True if whole else cfg.fused
    grouped = whole and (m_p > GROUPED_ROWS if cfg.grouped is None else cfg.grouped)
    if fused is None:
        fused = handoffs_early(n_tiles, steps, cta_steps)
    return dataclasses.replace(
        cfg,
        block_k=bk,
        stages=stages,
        cta_steps=cta_steps,
        fused=fused,
        lut=lut,
        block_m=bm if whole else MAX_BLOCK_M,
        grouped=grouped,
    )


def pick(
    m: int,
    k_p: int,
    n_p: int,
    bits: int = 4,
    span: int = SLICE,
    lut: bool = False,
) -> Config:
    """The table's config for ``m`` rows, ``K_p`` codes and ``N_p`` columns of ``bits``-bit
    codes with a scale row per ``span`` codes (decoded by the pair table: ``lut``), :func:`fit`
    to them (of a bucket's candidates, the one :func:`estimated_steps` expects to finish
    first); ``"xla"`` above :data:`MAX_ROWS` rows."""
    bucket = next((b for b in TABLE if m <= b), None)
    if bucket is None:
        return Config("xla")
    fitted = [fit(dataclasses.replace(c, lut=lut), m, k_p, n_p, bits, span) for c in TABLE[bucket]]
    return min(fitted, key=lambda c: estimated_steps(c, m, k_p, n_p))


def estimated_steps(cfg: Config, m: int, k_p: int, n_p: int) -> float:
    """A fitted config's run time in 128-code, 128-row K steps: waves of CTAs × (their steps +
    :data:`RAMP_STEPS`) × the cost of one step (:data:`ROWS_256_STEP_COST` for 256 rows)."""
    m_p, bm = padded_rows(m, cfg.block_m)
    steps = k_p // cfg.block_k
    ctas = n_p // (2 * BLOCK_N) * steps // cfg.cta_steps * (m_p // bm)
    step = cfg.block_k / SLICE * (ROWS_256_STEP_COST if bm > MAX_BLOCK_M else 1.0)
    return -(-ctas // NUM_SMS) * (cfg.cta_steps + RAMP_STEPS) * step


def load_codes(decode: str, span: int, bk: int, by_slice: bool, nf4: int) -> int:
    """Codes per shared-memory tile row, decode and ``wgmma`` of one K step: ``span`` (one scale
    block), or for NF4 with its scales on the weights (not ``by_slice``) ``nf4`` (a kernel's
    ``NF4_LOAD_CODES``) where that many codes are whole scale blocks dividing the step — the
    decoded slice then has each block scaled by its own row
    (:func:`~qjax.kernels.gpu.mgpu_decode.times_column_blocks`), its tile rows are wider TMA rows
    and a step issues fewer ``wgmma`` groups. (int4 g128 in 256-code slices, its scales on the
    weights, was 0.1 – 1.6 % faster than 128 with ``scale_acc`` in the skinny kernel,
    `int4_wide_probe.json`: not adopted.)"""
    want = nf4 if decode == "nf4" and not by_slice else span
    return want if want % span == 0 and bk % want == 0 else span


def code_bits(w: QArray) -> int:
    """Bits per stored code: 4 (``gpu_i4t``, ``gpu_nf4t``) or 8 (``gpu_i8t``, ``gpu_f8t``)."""
    return rp.LAYOUTS[w.layout]


def slice_codes(w: QArray) -> int:
    """Codes per decoded slice (and per scale row): 64 for ``"gpu_nf4t"``, else 128."""
    return rp.SLICE_CODES.get(w.layout, SLICE)


def decoder(w: QArray) -> str:
    """The :func:`qjax.kernels.gpu.mgpu_decode.decode` kind of ``w``'s layout."""
    if w.layout == "gpu_f8t":
        return w.spec.fmt
    return "nf4" if w.layout == "gpu_nf4t" else "int"


def table_config(w: QArray, m: int) -> Config:
    """This kernel's config for ``m`` rows of ``x`` times the repacked weight ``w``: the table's
    (:func:`pick`), the scales on the weights for NF4."""
    n_p, k_p = w.codes.shape
    lut = w.layout == "gpu_nf4t"
    cfg = pick(m, k_p, n_p, code_bits(w), slice_codes(w), lut)
    return dataclasses.replace(cfg, scale_acc=cfg.scale_acc and w.layout != "gpu_nf4t")


def config_for(w: QArray, m: int, cfg: Config | None = None) -> Config:
    """``cfg`` :func:`fit` to ``m`` rows of ``x`` times the repacked weight ``w``; by default
    :func:`table_config`, or at decode sizes the skinny kernel's
    (:mod:`~qjax.kernels.gpu.mgpu_skinny`, several CTAs per SM) where it is measured faster
    (:func:`~qjax.kernels.gpu.mgpu_skinny.pick`)."""
    from qjax.kernels.gpu import mgpu_skinny

    n_p, k_p = w.codes.shape
    if cfg is None:
        cfg = table_config(w, m)
        skinny = mgpu_skinny.pick(cfg, w, m) if cfg.path == "mgpu" else None
        return skinny or cfg
    if cfg.path == "skinny":
        return mgpu_skinny.fit(cfg, m, k_p, n_p, code_bits(w), slice_codes(w))
    return fit(cfg, m, k_p, n_p, code_bits(w), slice_codes(w))


def _tiled(minor_elems: int, bits: int, what: str):
    """TMA tiling + swizzle transforms for a shared-memory tile whose rows are ``minor_elems``."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    sw = plgpu.find_swizzle(minor_elems * bits, what)
    return (plgpu.TilingTransform((8, sw * 8 // bits)), plgpu.SwizzleTransform(sw))


def _stream_k(x2, codes, scales, zeros, ch_scales, cfg: Config, decode: str, span: int):
    """The kernel: ``Ŵᵀ xᵀ`` by stream-K (module docstring) over ``codes`` in
    :func:`~qjax.kernels.gpu.mgpu_decode.stored_order`, decoded by ``decode`` (a
    :func:`~qjax.kernels.gpu.mgpu_decode.decode` kind) ``span`` codes at a time, one row of
    ``scales`` (and ``zeros``) per ``span`` codes; ``scales=None``: applied by ``ch_scales``
    (``(1, N_p)`` float32, per channel) or the caller.

    ``cfg.fused``: returns ``y = x2 @ Ŵ``, ``(rows of x2, N_p)`` in ``x2.dtype``. The first CTA of
    a weight tile (the one that takes the tile's first K step — it reaches the tile last, at the
    end of its run) adds the later CTAs' partial sums to its own: each later CTA writes its sum to
    a float32 workspace slot and signals the tile's semaphore; the first waits for them, adds,
    scales by ``ch_scales``, casts and writes ``y``'s block transposed. Only later CTAs are waited
    for, and a CTA signals before it waits, so CTAs dispatched in order always make progress.

    Otherwise: ``(slots, N_p, M_p)`` float32 partial sums — CTA ``c`` writes its sum over the K
    steps it took of tile ``t`` to slot ``c − first_cta(t)`` (:func:`segments`), the other slots
    of a tile are left unwritten (:func:`combine` masks them)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    from qjax.kernels.gpu import mgpu_decode as dec

    m_rows, k_p = x2.shape[0], codes.shape[1]  # columns past x2's K (and rows past its M): zeros
    m_p, bm = padded_rows(m_rows, cfg.block_m)  # (TMA fills what it reads out of bounds)
    m_tiles = m_p // bm
    n_p = codes.shape[0]
    bk, length = cfg.block_k, cfg.cta_steps
    cta_n = 2 * BLOCK_N
    n_tiles, steps = n_p // cta_n, k_p // bk
    ctas = n_tiles * steps // length
    seg = segments(n_tiles, steps, length)
    slots = int(np.max(seg[:, 1] - seg[:, 0])) + 1
    per = bk // span  # scale rows (and decoded slices) per step
    sym = zeros is None
    scaled = scales is not None
    fused = cfg.fused
    whole = fused and length % steps == 0  # every tile in one CTA: nothing handed over
    grouped = whole and bool(cfg.grouped)
    group = max(g for g in range(1, GROUP_M + 1) if m_tiles % g == 0)
    n_ctas = ctas * m_tiles
    bits = 4 if codes.dtype == jnp.int4 else 8
    frag = bits == 8  # stored fragment-major (`mgpu_decode.to_fragments`)
    half = 1 << (bits - 1)  # int codes are stored as c − half
    fp8_factor = 2.0 ** dec.FP8_SCALE_LOG2.get(decode, 0)
    by_slice = cfg.scale_acc and scaled
    n_acc = 3 if by_slice else 1  # the total (+ two per-slice partial sums)
    lut = cfg.lut
    load = load_codes(decode, span, bk, by_slice, NF4_LOAD_CODES)  # per decode and `wgmma`
    blocks = load // span  # scale rows per decoded slice
    assert blocks == 1 or sym, "only NF4 (no zeros) loads several scale blocks per slice"

    def kernel(w_gmem, x_gmem, *rest, out_smem, bar, lut_smem=None):
        # one buffer: a tile's float32 sums, then its per-channel scales, then its y block
        # (y_smem[wg, 0] and c_smem[wg, 0] lie in o_smem[wg]: each warp group reuses its part)
        if whole:
            y_smem, c_smem = out_smem
            *rest, y_gmem = rest
        else:
            o_smem, y_smem, c_smem = out_smem
        if fused and not whole:
            *rest, ws_gmem, y_gmem = rest
        elif not fused:
            *rest, o_gmem = rest
        if lut:
            *rest, lut_gmem = rest
        if fused and ch_scales is not None:
            *rest, chs_gmem = rest
        if grouped:
            # job j = (row block, tile) in the order: groups of `group` row blocks, in a group
            # tile by tile, the row blocks fastest; CTA g takes jobs g, g + n_ctas, ...: the
            # CTAs running together share a few row blocks of x (in L2) and many tiles
            ci = mi = None

            def tile(kk):
                return grouped_job(lax.axis_index("c"), kk // steps, n_ctas, n_tiles, group)[1]

            def m_block(kk):
                return grouped_job(lax.axis_index("c"), kk // steps, n_ctas, n_tiles, group)[0]

            def k_step(kk):
                return kk % steps
        else:
            ci, mi = lax.axis_index("c"), lax.axis_index("m")
            first = ci * length  # the CTA's first K step, counting over the tiles end to end

            def tile(kk):
                return (first + kk) // steps

            def m_block(kk):
                return mi

            def k_step(kk):
                return (first + kk) % steps

        def write(total, dst):
            """TMA-writes this warp group's float32 ``(BLOCK_N, bm)`` block to ``dst``."""
            wg = lax.axis_index("wg")
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last write has read o_smem
            o_smem[wg] = total
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], dst)

        def fetch(src, dst):
            """``dst`` (this warp group's shared memory) ← ``src`` (global), waited for."""
            wg = lax.axis_index("wg")
            plgpu.copy_gmem_to_smem(src, dst, bar.at[wg])
            plgpu.barrier_wait(bar.at[wg])

        def signal(t):
            """Tells tile ``t``'s first CTA that this CTA's sum is in the workspace."""
            wg = lax.axis_index("wg")
            plgpu.wait_smem_to_gmem(0)  # written, not only read
            plgpu.semaphore_signal(sems.at[(t * m_tiles + mi) * 2 + wg], 1, memory_scope="gpu")

        def flush(acc, t, kk):
            """Tile ``t``'s sum so far (at step ``kk``): to its slot (or, fused, to the tile's
            first CTA, or to ``y``); zeroes the accumulator."""
            wg = lax.axis_index("wg")
            rows = pl.ds(t * cta_n + wg * BLOCK_N, BLOCK_N)
            cols = pl.ds(m_block(kk) * bm, bm)
            c0 = t * steps // length
            if whole:
                finish(acc[...], rows, cols)
            elif not fused:
                write(acc[...], o_gmem.at[ci - c0, rows, cols])
            else:

                @pl.when(ci != c0)
                def _():
                    write(acc[...], ws_gmem.at[ci - c0 - 1, rows, cols])

                    @pl.when(kk == length - 1)  # else one step later, not to stall this one
                    def _():
                        signal(t)

                @pl.when(ci == c0)
                def _():
                    later = ((t + 1) * steps - 1) // length - c0
                    plgpu.semaphore_wait(
                        sems.at[(t * m_tiles + mi) * 2 + wg], later, memory_scope="gpu"
                    )
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

                    def add(slot, total):
                        fetch(ws_gmem.at[slot, rows, cols], o_smem.at[wg])
                        return total + o_smem[wg]

                    finish(lax.fori_loop(0, later, add, acc[...]), rows, cols)

            acc[...] = jnp.zeros((BLOCK_N, bm), jnp.float32)

        def finish(total, rows, cols):
            """A tile's whole float32 sum: times the per-channel scales, cast, to ``y``."""
            wg = lax.axis_index("wg")
            if whole:  # the last tile's write has read y_smem (the other case waited above)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            if ch_scales is not None:
                fetch(chs_gmem.at[0, rows], c_smem.at[wg, 0])
                s = c_smem[wg, 0]
                total = total * lax.broadcast_in_dim(s, (BLOCK_N, bm), (0,))
            _store_transposed(total.astype(x2.dtype), y_smem.at[wg, 0])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(y_smem.at[wg, 0], y_gmem.at[cols, rows])

        def body(idx, w_smem, x_smem, *rest):
            s_smem = rest[0] if scaled else None
            z_smem = None if sym else rest[int(scaled)]
            accs = rest[-1]
            rows = pl.ds(lax.axis_index("wg") * BLOCK_N, BLOCK_N)

            def slice_operand(j):
                cols = pl.ds(j * load, load)
                if frag:  # this warp group's stripe, block j
                    raw = dec.load_block(w_smem.at[lax.axis_index("wg"), j])
                else:
                    raw = plgpu.load(w_smem, (rows, cols), layout=dec.load_layout(bits))
                a = dec.decode(decode, raw, lut_smem if lut else None)
                if decode in dec.FP8_SHIFT:  # exact: a power of two, no overflow
                    a = a * jnp.bfloat16(fp8_factor)
                if not sym:  # (c − h) − (z − h) = c − z, exact in bf16 (|c − z| < 256)
                    zh = z_smem[j, rows] - half
                    a = a - lax.broadcast_in_dim(zh, (BLOCK_N, span), (0,))
                return a

            def x_slice(j):
                return x_smem.at[:, pl.ds(j * load, load)].T

            def scaled_operand(j):
                a = slice_operand(j)
                if scaled:
                    rows_s = [s_smem[j * blocks + b, rows] for b in range(blocks)]
                    s = [lax.broadcast_in_dim(r, (BLOCK_N, span), (0,)) for r in rows_s]
                    a = a * s[0] if blocks == 1 else dec.times_column_blocks(a, s)
                return a

            if not by_slice:
                for j in range(bk // load):
                    plgpu.wgmma(accs[0], scaled_operand(j), x_slice(j))
                plgpu.wgmma_wait(0)
            else:
                # tot += s_j · (a_j @ x_jᵀ): slice j's product goes to one of two float32
                # accumulators while slice j − 1's is scaled into the running total
                tot, parts = accs[0], accs[1:]

                def fold(j, wait_n):
                    part = parts[j % 2]
                    p = plgpu.wgmma_accumulator_load(part, wait_n=wait_n)
                    s = s_smem[j, rows].astype(jnp.float32)
                    t = plgpu.wgmma_accumulator_load(tot, wait_n=None)
                    tot[...] = t + p * lax.broadcast_in_dim(s, (BLOCK_N, bm), (0,))
                    part[...] = jnp.zeros((BLOCK_N, bm), jnp.float32)

                for j in range(per):
                    plgpu.wgmma(parts[j % 2], slice_operand(j), x_slice(j))
                    if j:
                        fold(j - 1, wait_n=1)
                fold(per - 1, wait_n=0)

            (kk,) = idx
            if fused and not whole:  # a CTA starting its first tile after step 0 signals later
                first_end = steps - 1 - k_step(0)

                @pl.when((k_step(0) != 0) & (kk == first_end + 1))
                def _():
                    signal(tile(0))

            @pl.when((k_step(kk) == steps - 1) | (kk == length - 1))
            def _():
                flush(accs[0], tile(kk), kk)

            return accs

        def compute_context(eval_pipeline):
            acc = plgpu.ACC((BLOCK_N, bm), jnp.float32)

            @functools.partial(pl.run_scoped, accs=[acc] * n_acc)
            def _(accs):
                if lut:  # the pair table, copied by the memory warp group
                    plgpu.barrier_wait(bar.at[2])
                eval_pipeline(tuple(accs))
                plgpu.wait_smem_to_gmem(0)

        row_spec = plgpu.BlockSpec((per, cta_n), lambda kk: (k_step(kk), tile(kk)))
        if frag:  # both stripes' blocks of the step: 2 × bk · 64 consecutive bytes each
            w_spec = plgpu.BlockSpec(
                (2, bk // dec.FRAGMENT_CODES, BLOCK_N, dec.FRAGMENT_CODES),
                lambda kk: (tile(kk), k_step(kk), 0, 0),
            )
        else:
            w_spec = plgpu.BlockSpec(
                (cta_n, bk), lambda kk: (tile(kk), k_step(kk)), transforms=_tiled(load, bits, "lhs")
            )
        in_specs = [
            w_spec,
            plgpu.BlockSpec(
                (bm, bk),
                lambda kk: (m_block(kk) if grouped else 0, k_step(kk)),
                transforms=_tiled(load, 16, "rhs"),
            ),
        ] + [row_spec] * (int(scaled) + int(not sym))
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(length,),
            memory_registers=40,
            in_specs=in_specs,
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.stages,
            compute_context=compute_context,
        )
        n_sems = n_tiles * m_tiles * 2  # per tile, row block of x and warp group
        sems = (
            pl.get_global(plgpu.SemaphoreType.REGULAR((n_sems,))) if fused and not whole else None
        )
        if lut:

            @pl.when(lax.axis_index("wg") == 2)
            def _():
                plgpu.copy_gmem_to_smem(lut_gmem, lut_smem, bar.at[2])

        pipeline(w_gmem, x_gmem if grouped else x_gmem.at[pl.ds(mi * bm, bm)], *rest)

    args = [dec.fragment_blocks(codes) if frag else codes, x2] + ([scales] if scaled else [])
    args += [] if sym else [zeros]
    y_type = jax.ShapeDtypeStruct((m_rows, n_p), x2.dtype)
    if fused:
        ws = max(slots - 1, 1)
        args += [] if ch_scales is None else [ch_scales]
        out_type = y_type if whole else (jax.ShapeDtypeStruct((ws, n_p, m_p), jnp.float32), y_type)
    else:
        out_type = jax.ShapeDtypeStruct((slots, n_p, m_p), jnp.float32)
    scratch = {}
    if lut:
        args.append(jnp.asarray(dec.lut_words(decode)))
        scratch["lut_smem"] = plgpu.SMEM((256, dec.LUT_LANES), jnp.uint32)
    y_sw = _tiled(BLOCK_N, 16, "out")
    if whole:  # the bf16 y tiles, and in each warp group's part its per-channel scales
        out_smem = plgpu.RefUnion(
            plgpu.SMEM((2, 1, bm, BLOCK_N), x2.dtype, transforms=y_sw),
            plgpu.SMEM((2, bm // 2, BLOCK_N), jnp.float32),
        )
    else:
        out_smem = plgpu.RefUnion(
            plgpu.SMEM((2, BLOCK_N, bm), jnp.float32, transforms=_tiled(bm, 32, "out")),
            plgpu.SMEM((2, 2, bm, BLOCK_N), x2.dtype, transforms=y_sw),
            plgpu.SMEM((2, bm, BLOCK_N), jnp.float32),
        )
    grid, names = ((m_tiles, ctas), ("m", "c")) if cfg.m_inner else ((ctas, m_tiles), ("c", "m"))
    if grouped:
        grid, names = (n_ctas,), ("c",)
    out = plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=grid,
        grid_names=names,
        num_threads=3,
        thread_name="wg",
        scratch_types=dict(
            out_smem=out_smem,
            bar=plgpu.Barrier(num_arrivals=1, num_barriers=3),
            **scratch,
        ),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(*args)
    if whole:
        return out
    return out[1] if fused else out


def _store_transposed(value, ref):
    """``ref[...] = value.T`` for a bf16 ``(BLOCK_N, bm)`` array in the WGMMA layout and a
    ``(bm, BLOCK_N)`` swizzled shared-memory tile (one shuffle and ``prmt`` per register pair,
    Mosaic GPU's ``WGMMA → WGMMA_TRANSPOSED``)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    transforms = _tiled(BLOCK_N, 16, "out")

    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.RefType(transforms)),
    )
    def run(_, arr, smem):
        import jax.experimental.mosaic.gpu as mgpu

        t = arr.to_layout(mgpu.WGMMA_TRANSPOSED_LAYOUT)
        t.store_tiled(mgpu.memref_transpose(smem, (1, 0, 3, 2)), swizzle=transforms[1].swizzle)

    run(value, ref)


def combine(parts, n_tiles: int, steps: int, cta_steps: int):
    """Sums ``(slots, N_p, M_p)`` partials over the slots each weight tile was written to
    (:func:`segments`): the slots a tile did not get are masked, never read as data."""
    if parts.shape[0] == 1:
        return parts[0]
    seg = segments(n_tiles, steps, cta_steps)
    written = np.arange(parts.shape[0])[:, None] <= (seg[:, 1] - seg[:, 0])[None, :]
    mask = np.repeat(written, parts.shape[1] // n_tiles, axis=1)[:, :, None]  # (slots, N_p, 1)
    return jnp.sum(jnp.where(mask, parts, 0.0), axis=0)


def product(x2, codes, scales, zeros, cfg: Config, decode: str, span: int):
    """``Ŵᵀ xᵀ``, ``(N_p, M_p)`` float32: the kernel's partial sums (:func:`_stream_k`),
    combined in one fused XLA pass."""
    parts = _stream_k(x2, codes, scales, zeros, None, cfg, decode, span)
    n_tiles = codes.shape[0] // (2 * BLOCK_N)
    return combine(parts, n_tiles, codes.shape[1] // cfg.block_k, cfg.cta_steps)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _mgpu_matmul(x2, w: QArray, cfg: Config):
    m = x2.shape[0]
    if m > TMA_ROWS and m % TMA_ROWS:  # TMA reads past the last row only of such x (as zeros)
        x2 = jnp.pad(x2, [(0, -m % TMA_ROWS), (0, 0)])
    # per-channel scales multiply the float32 sums once (FP8 always, int with `scale_acc`)
    per_channel = w.layout == "gpu_f8t" or (cfg.scale_acc and w.spec.group == "channel")
    scales = None if per_channel else w.scales
    if cfg.fused:
        ch_scales = w.scales[:1].astype(jnp.float32) if per_channel else None
        args = (x2, w.codes, scales, w.zeros, ch_scales, cfg, decoder(w), slice_codes(w))
        return _stream_k(*args)[:m]
    y = product(x2, w.codes, scales, w.zeros, cfg, decoder(w), slice_codes(w)).T[:m]
    if per_channel:
        y = y * w.scales[:1].astype(jnp.float32)
    return y.astype(x2.dtype)


def check_supported(x: jax.Array, w: QArray) -> None:
    """Raises a :class:`~qjax.QjaxError` saying why ``matmul(x, w)`` cannot run."""
    calls.check("mgpu_matmul", x, w, LAYOUTS)


def supports(x: jax.Array, w: QArray) -> bool:
    """Registry predicate: bf16 activations and a weight in one of :data:`LAYOUTS`."""
    return calls.supports(x, w, LAYOUTS)


def check_config(x2, w: QArray, cfg: Config) -> None:
    """Raises a :class:`~qjax.QjaxError` naming what of ``cfg`` does not fit ``x2 @ w``."""
    bits, span = code_bits(w), slice_codes(w)
    if cfg.block_k % SLICE or w.codes.shape[1] % cfg.block_k:
        raise ShapeError(f"mgpu_matmul: block_k {cfg.block_k} must be a multiple of "
                         f"{SLICE} dividing K_p = {w.codes.shape[1]}")  # fmt: skip
    n_p, k_p = w.codes.shape
    total = n_p // (2 * BLOCK_N) * (k_p // cfg.block_k)
    if cfg.cta_steps is None or total % cfg.cta_steps:
        raise ShapeError(f"mgpu_matmul: cta_steps {cfg.cta_steps} must divide the {total} "
                         f"K steps of the weight's tiles (use fit())")  # fmt: skip
    _, bm = padded_rows(x2.shape[0], cfg.block_m)
    whole = cfg.fused and cfg.cta_steps % (k_p // cfg.block_k) == 0
    need = smem_bytes(bm, cfg.block_k, cfg.stages, bits, span, cfg.lut, whole)
    if need > SMEM_BYTES:
        raise ShapeError(
            f"mgpu_matmul: {cfg} needs {need} bytes "
            f"of shared memory for {x2.shape[0]} rows, more than {SMEM_BYTES} (use fit())"
        )


def kernel_rows(x: jax.Array, k_p: int) -> jax.Array:
    """``x (..., K)`` as the ``(M, K)`` rows the kernels read, **not** padded along ``K`` to the
    repacked ``k_p``: their TMA copies of ``x`` read the columns past ``K`` as zeros, and the
    weight's padding codes decode to finite values, so those columns add nothing — and the pad
    XLA would run before every call goes (SmolLM2's 576-wide layers: ``K_p`` = 640). A ``K``
    that is not a multiple of :data:`X_TILE_COLS` is padded as for the Triton kernels
    (:func:`~qjax.kernels.calls.as_rows`)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.shape[1] % X_TILE_COLS == 0 else calls.as_rows(x, k_p)


def matmul(x: jax.Array, w: QArray, *, config: Config | None = None) -> jax.Array:
    """``x @ dequantize(w)`` for bf16 ``x: (..., K)`` and a weight ``(K, N)`` repacked to one of
    :data:`LAYOUTS`.

    Needs a Hopper GPU up to :data:`MAX_ROWS` rows (``config`` overrides the table); larger M
    runs XLA.
    """
    check_supported(x, w)
    k, n = w.shape
    lead = x.shape[:-1]
    cfg = config or config_for(w, math.prod(lead))
    if cfg.path == "xla":
        y = calls.dequantized_matmul(calls.as_rows(x, w.codes.shape[1]), w)
    else:
        if jax.default_backend() != "gpu":
            raise FormatError(
                f"mgpu_matmul: the Mosaic GPU kernel needs a GPU, backend is "
                f"{jax.default_backend()!r}"
            )
        x2 = kernel_rows(x, w.codes.shape[1])
        if cfg.path == "skinny":
            from qjax.kernels.gpu import mgpu_skinny

            mgpu_skinny.check_config(x2, w, cfg)
            y = mgpu_skinny.matmul_rows(x2, w, cfg)
        else:
            check_config(x2, w, cfg)
            y = _mgpu_matmul(x2, w, cfg)
    if y.shape[1] != n:
        y = y[:, :n]
    return y.reshape(*lead, n)
