"""W8A8 GEMM as a Pallas **Mosaic GPU** kernel (Hopper: TMA, ``wgmma``): 8-bit activation codes
times 8-bit weight codes on the tensor cores, both scales applied in the kernel's epilogue.

For the codes of :class:`qjax.formats.W8A8` (SmoothQuant, Xiao et al. 2023; FP8 serving) it
computes

    y[t, n] = cast( acc[t, n] · s_x[t] · s_w[n] ),   acc[t, n] = Σ_k x_q[t, k] · w_q[n, k],

with ``acc`` exact in int32 for int8 codes (``wgmma`` s8 · s8 → s32) and float32 for e4m3 codes
(e4m3 · e4m3 → f32), ``s_x`` the per-token and ``s_w`` the per-channel float32 scales, ``y`` in
the activations' dtype. XLA's version of the same product writes ``acc`` to HBM (int32 for int8:
twice the bytes of a bf16 ``y``) and reads it back in a second, elementwise pass for the scales;
here the scaled, cast tile goes from registers to shared memory to ``y`` by TMA, once.

A CTA owns a ``(2·wg_rows, block_n)`` tile of ``y``: one memory warp group TMA-copies the
``(2·wg_rows, 128)`` codes of ``x`` and the ``(block_n, 128)`` codes of the weight per 128-code
K step into swizzled shared memory, ``stages`` steps ahead; each of two compute warp groups
multiplies its ``wg_rows`` rows of ``x`` by the whole weight tile (``wgmma``, both operands
K-major in shared memory — the only layout 8-bit ``wgmma`` takes, and the one both codes are
stored in). The CTAs are rastered in groups of :attr:`Config.group_m` row blocks (row blocks the
fastest), so the CTAs running together share a few row blocks of ``x`` and weight tiles in L2.
Rows of ``x`` past its end are read as zeros by TMA and their rows of ``y`` dropped.

Measured on the H100 (``experiments/results/kernels/``: ``w8a8_mgpu_probe_70b*.json``,
``kernel_bench_w8a8_mgpu_70b*``), the whole W8A8 product (row quantization included) on the
Llama-3-70B shapes at M = 4096 / 8192: int8 1.78 – 2.16× XLA's bf16 ``dot`` (68 – 77 % of the
8-bit tensor-core peak; the XLA GEMM + scaling pass it replaces made 1.18 – 1.61×, 1.14 – 1.52×
slower), e4m3 1.67 – 1.86× (XLA's path 1.52 – 1.88×, 6 – 13 % slower). Below
:data:`FROM_ROWS` its 128-row CTAs are too few to fill the SMs and XLA's GEMM stays.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from qjax.errors import ShapeError
from qjax.kernels.gpu import mgpu_matmul as mg

BLOCK_K = 128  # codes per K step: 128 bytes, the widest TMA swizzle
ROW_STEP = 8  # x's rows are padded to a multiple of this (TMA's tiling of a global array)
SMEM_BYTES = 227 * 1024  # H100 shared memory per block (opt-in maximum)


@dataclasses.dataclass(frozen=True)
class Config:
    wg_rows: int = 64  # rows of x (of y) per compute warp group: wgmma's M, 64 or 128
    block_n: int = 256  # weight rows (columns of y) per CTA: wgmma's N
    stages: int = 4  # K steps the memory warp group runs ahead
    group_m: int = 16  # CTA raster: groups of this many row blocks of x, row blocks fastest
    epi_cols: int = 64  # columns of y per epilogue store (one shared-memory tile per warp group)


# The configs `config_for` takes: the fastest of `w8a8_mgpu_probe`'s on the Llama-3-70B shapes at
# M = 4096 / 8192 (64 × 256 per warp group, 4 stages, groups of 16 row blocks: within 1 % of the
# best but on 57344×8192, where 3 stages or 128 × 128 tiles were 3 – 9 % faster), and for N
# not a multiple of 256 the best 128-column one.
WIDE = Config()
NARROW = Config(wg_rows=128, block_n=128, stages=3)

# Rows of x from which `w8a8_matmul` takes this kernel on Hopper (`w8a8_mgpu_probe_70b*.json`,
# `_8b.json`): int8 from M = 512 (1.14 – 1.96× faster than XLA's GEMM and scaling pass on the
# Llama-3-70B and 8B shapes but one: 8B's 4096×14336 at M = 512, 5 % slower — 64 CTAs over a
# long K, where XLA splits K); e4m3 from M = 2048 (1.01 – 1.14× faster on every shape measured;
# at M = 512 it lost on 10240×8192, its 160 CTAs two waves on 132 SMs, and on two 8B shapes).
FROM_ROWS = {"int8": 512, "e4m3": 2048}


def config_for(n: int) -> Config:
    """The kernel's config for ``N = n`` columns of ``y``."""
    return WIDE if n % WIDE.block_n == 0 else NARROW


def on_hopper() -> bool:
    """Whether the default device is an sm_90 GPU (``wgmma``; Blackwell has none)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", None) == "9.0"


def takes(m: int, k: int, n: int, dtype: str, x_dtype) -> bool:
    """Whether ``w8a8_matmul`` hands ``m`` rows of ``x_dtype`` activations times a ``(K, N)``
    weight of ``dtype`` codes to this kernel: Hopper, bf16 activations, ``m`` at least
    :data:`FROM_ROWS`, and shapes the kernel takes."""
    return (
        x_dtype == jnp.bfloat16
        and m >= FROM_ROWS[dtype]
        and k % BLOCK_K == 0
        and n % NARROW.block_n == 0
        and on_hopper()
    )


def smem_bytes(cfg: Config, out_bytes: int = 2) -> int:
    """Shared memory of ``cfg``: the pipeline's code buffers, the two ``y`` tiles, the scales."""
    codes = cfg.stages * (2 * cfg.wg_rows + cfg.block_n) * BLOCK_K
    y_tiles = 2 * cfg.wg_rows * cfg.epi_cols * out_bytes
    return codes + y_tiles + 4 * 2 * (cfg.wg_rows + cfg.block_n)


def check(m: int, k: int, n: int, cfg: Config, out_bytes: int = 2) -> None:
    """Raises a :class:`~qjax.errors.ShapeError` naming what of the shapes or ``cfg`` the kernel
    cannot take."""
    if k % BLOCK_K or n % cfg.block_n:
        raise ShapeError(
            f"mgpu_w8a8: K = {k} must be a multiple of {BLOCK_K} and N = {n} of block_n "
            f"{cfg.block_n}"
        )
    if cfg.wg_rows not in (64, 128) or cfg.block_n % 8 or not 8 <= cfg.block_n <= 256:
        raise ShapeError(f"mgpu_w8a8: {cfg}: wg_rows must be 64 or 128, block_n 8–256 by 8")
    if cfg.block_n % cfg.epi_cols or cfg.epi_cols % 8:
        raise ShapeError(f"mgpu_w8a8: {cfg}: epi_cols must divide block_n (by 8)")
    if cfg.wg_rows * cfg.block_n > 128 * 128:
        raise ShapeError(f"mgpu_w8a8: {cfg}: a warp group's accumulator exceeds 128 × 128")
    if smem_bytes(cfg, out_bytes) > SMEM_BYTES:
        raise ShapeError(f"mgpu_w8a8: {cfg} needs {smem_bytes(cfg, out_bytes)} bytes of shared "
                         f"memory, more than {SMEM_BYTES}")  # fmt: skip
    if m < 1:
        raise ShapeError(f"mgpu_w8a8: x has {m} rows")


def cta_tile(c, m_tiles: int, n_tiles: int, group: int):
    """``(row block, column block)`` of CTA ``c``: groups of ``group`` row blocks (the last group
    may be smaller), in a group the row blocks fastest, then the column blocks."""
    per_group = group * n_tiles
    g = c // per_group
    first = g * group
    rows_in = jnp.minimum(group, m_tiles - first)
    r = c - g * per_group
    return first + r % rows_in, r // rows_in


def gemm(xq, wq, sx, sw, out_dtype, cfg: Config | None = None) -> jax.Array:
    """``(xq @ wqᵀ) · sx · sw`` cast to ``out_dtype``: ``xq: (M, K)`` and ``wq: (N, K)`` codes (both
    int8 or both float8_e4m3fn), ``sx: (M, 1)`` and ``sw: (N,)`` (or ``(1, N)``) float32;
    ``cfg=None``: :func:`config_for`."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = xq.shape
    n = wq.shape[0]
    cfg = cfg or config_for(n)
    check(m, k, n, cfg, jnp.dtype(out_dtype).itemsize)
    if wq.shape[1] != k or sx.size != m or sw.size != n:
        raise ShapeError(f"mgpu_w8a8: codes x {tuple(xq.shape)}, w {tuple(wq.shape)} (N, K) and "
                         f"scales {tuple(sx.shape)}, {tuple(sw.shape)} do not match")  # fmt: skip
    if xq.dtype != wq.dtype or jnp.dtype(xq.dtype).itemsize != 1:
        raise ShapeError(f"mgpu_w8a8: codes must be both int8 or both e4m3, got {xq.dtype} "
                         f"and {wq.dtype}")  # fmt: skip
    acc_dtype = jnp.int32 if xq.dtype == jnp.int8 else jnp.float32
    wg_rows, block_n = cfg.wg_rows, cfg.block_n
    cta_m = 2 * wg_rows
    m_p = -(-m // ROW_STEP) * ROW_STEP
    m_tiles, n_tiles, steps = -(-m_p // cta_m), n // block_n, k // BLOCK_K
    group = min(cfg.group_m, m_tiles)
    if m_p != m:  # TMA tiles a global array by 8 rows
        xq = jnp.pad(xq, ((0, m_p - m), (0, 0)))
    sx_rows = jnp.pad(sx.reshape(1, m).astype(jnp.float32), ((0, 0), (0, m_tiles * cta_m - m)))
    sw_row = sw.reshape(1, n).astype(jnp.float32)
    acc_shape = (wg_rows, block_n)
    epi = cfg.epi_cols

    def kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, y_gmem, y_smem, sx_smem, sw_smem, bar):
        mi, ni = cta_tile(lax.axis_index("c"), m_tiles, n_tiles, group)
        wg = lax.axis_index("wg")
        cols = pl.ds(ni * block_n, block_n)

        def wg_rows_of(i):
            return pl.ds(mi * cta_m + i * wg_rows, wg_rows)

        @pl.when(wg < 2)  # the scales, read while the pipeline runs
        def _():
            plgpu.copy_gmem_to_smem(sx_gmem.at[0, wg_rows_of(wg)], sx_smem.at[wg], bar.at[2 * wg])
            plgpu.copy_gmem_to_smem(sw_gmem.at[0, cols], sw_smem.at[wg], bar.at[2 * wg + 1])

        def body(idx, x_smem, w_smem, acc):
            rows = pl.ds(lax.axis_index("wg") * wg_rows, wg_rows)
            plgpu.wgmma(acc, x_smem.at[rows], w_smem.T)
            plgpu.wgmma_wait(0)
            return acc

        def compute_context(eval_pipeline):
            @functools.partial(pl.run_scoped, acc=plgpu.ACC(acc_shape, acc_dtype))
            def _(acc):
                eval_pipeline(acc)
                i = lax.axis_index("wg")
                total = acc[...].astype(jnp.float32)
                plgpu.barrier_wait(bar.at[2 * i])
                plgpu.barrier_wait(bar.at[2 * i + 1])
                s_t = lax.broadcast_in_dim(sx_smem[i], acc_shape, (0,))
                s_n = lax.broadcast_in_dim(sw_smem[i], acc_shape, (1,))
                y = (total * s_t * s_n).astype(out_dtype)
                for j in range(block_n // epi):  # y_smem[i] reused: its last copy has read it
                    if j:
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    y_smem[i] = y[:, j * epi : (j + 1) * epi]
                    plgpu.commit_smem()
                    dst = y_gmem.at[wg_rows_of(i), pl.ds(ni * block_n + j * epi, epi)]
                    plgpu.copy_smem_to_gmem(y_smem.at[i], dst)
                plgpu.wait_smem_to_gmem(0)

        codes = mg._tiled(BLOCK_K, 8, "codes")
        pipeline = plgpu.emit_pipeline_warp_specialized(
            body,
            grid=(steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec((cta_m, BLOCK_K), lambda kk: (mi, kk), transforms=codes),
                plgpu.BlockSpec((block_n, BLOCK_K), lambda kk: (ni, kk), transforms=codes),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.stages,
            compute_context=compute_context,
        )
        pipeline(x_gmem, w_gmem)

    y_tiles = mg._tiled(epi, 8 * jnp.dtype(out_dtype).itemsize, "out")
    y = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((m_p, n), out_dtype),
        grid=(m_tiles * n_tiles,),
        grid_names=("c",),
        num_threads=3,
        thread_name="wg",
        scratch_types=dict(
            y_smem=plgpu.SMEM((2, wg_rows, epi), out_dtype, transforms=y_tiles),
            sx_smem=plgpu.SMEM((2, wg_rows), jnp.float32),
            sw_smem=plgpu.SMEM((2, block_n), jnp.float32),
            bar=plgpu.Barrier(num_arrivals=1, num_barriers=4),
        ),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )(xq, wq, sx_rows, sw_row)
    return y[:m] if m_p != m else y


__all__ = [
    "BLOCK_K",
    "FROM_ROWS",
    "Config",
    "check",
    "config_for",
    "cta_tile",
    "gemm",
    "on_hopper",
    "smem_bytes",
    "takes",
]
