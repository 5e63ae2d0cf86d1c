"""W8A8 (int8 / FP8 e4m3) matmul on the GPU: fused activation quantization, then an 8-bit GEMM.

The format (:class:`qjax.formats.W8A8`, SmoothQuant / FP8 serving) computes

    y = (Σ_k x_q[t, k] · w_q[k, n]) · s_x[t] · s_w[n],   x_q = cast(x / s_x),

with dynamic per-token ``s_x[t] = max_k |x[t, k]| / qmax`` (``qmax`` 127 or 448). Its reference
product (``W8A8.matmul``) leaves the activation quantization to XLA, which reads ``x`` twice (one
reduction fusion for ``max|x|``, one elementwise fusion for the cast) and, for e4m3, writes the
float32 GEMM result that a third pass scales to bf16. Here:

* :func:`quantize_rows` — a Pallas (Triton) kernel: per row, all of its chunks are loaded at
  once (kept in registers up to ``RESIDENT_CHUNKS`` chunks; longer rows are read a second time,
  from L2), ``max|x|`` is reduced, then each chunk is divided, rounded and stored as codes
  (int8: round-half-even by adding ``1.5·2^23`` and reading the integer from the float's bits,
  then clip to ±127; e4m3: clip to ±448, then the round-to-nearest-even cast): HBM sees ``x``
  once;
* on Hopper, from :data:`~qjax.kernels.gpu.mgpu_w8a8.FROM_ROWS` rows of bf16 activations
  (:func:`~qjax.kernels.gpu.mgpu_w8a8.takes`), the GEMM is our Mosaic GPU kernel
  (:mod:`qjax.kernels.gpu.mgpu_w8a8`: int8 ``wgmma`` into int32, e4m3 into float32, both scales
  and the cast in its epilogue — ``y`` written once, in bf16);
* elsewhere it is XLA's (cuBLAS int8 → int32, cuBLASLt e4m3 → **bf16** for bf16 activations: the
  accumulation stays float32 inside the GEMM, only its output is rounded — one extra bf16 rounding
  before the scales, within the bf16 output's own tolerance), and one elementwise pass applies
  ``s_x[t] · s_w[n]``.

Static activation scales skip the kernel (the cast is one XLA elementwise pass already).
Measured on an H100 in ``experiments/results/kernels/README.md``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qjax.errors import FormatError, ShapeError
from qjax.formats.fp8 import fp8_dtype, fp8_max
from qjax.formats.w8a8 import INT8_MAX, W8A8
from qjax.kernels.gpu import mgpu_w8a8
from qjax.qarray import QArray

LAYOUTS = ("canonical",)
K_ALIGN = 128  # the row kernel walks K in power-of-two chunks; other K take XLA's two passes
_RNE = 1.5 * 2.0**23  # v + _RNE has ulp 1: it rounds |v| < 2^22 to an integer, ties to even
_RNE_BITS = 0x4B400000  # float32 bits of _RNE: bits(v + _RNE) − _RNE_BITS = round(v)


def _round_half_even(v: jax.Array) -> jax.Array:
    """``round(v)`` as int32, ties to even, for ``|v| < 2^22`` (no rounding op needed in Triton)."""
    return lax.bitcast_convert_type(v + _RNE, jnp.int32) - _RNE_BITS


def _chunk(k: int) -> int:
    return max(c for c in (128, 256, 512, 1024) if k % c == 0)


RESIDENT_CHUNKS = 32  # rows of up to 32 chunks stay in registers between the two passes


def _quant_kernel(x_ref, q_ref, s_ref, *, m, bm, bk, nk, dtype):
    rows = pl.program_id(0) * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    row_ok = rows < m
    mask = jnp.broadcast_to(row_ok, (bm, bk))
    qmax = float(INT8_MAX) if dtype == "int8" else fp8_max("e4m3")

    def chunk(ref, i):  # i: a Python int (resident rows) or a traced loop index
        start = i * bk if isinstance(i, int) else pl.multiple_of(i * bk, bk)
        return ref.at[:, pl.ds(start, bk)]

    def load(i):
        return plgpu.load(chunk(x_ref, i), mask=mask, other=0.0).astype(jnp.float32)

    def amax_of(v):
        return jnp.max(jnp.abs(v), axis=1, keepdims=True)

    def store(i, v, sx):
        v = v / sx
        if dtype == "int8":
            q = jnp.clip(_round_half_even(v), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        else:
            q = jnp.clip(v, -qmax, qmax).astype(fp8_dtype("e4m3"))
        plgpu.store(chunk(q_ref, i), q, mask=mask)

    if nk <= RESIDENT_CHUNKS:  # every chunk loaded once, all loads in flight together
        vals = [load(i) for i in range(nk)]
        amax = amax_of(vals[0])
        for v in vals[1:]:
            amax = jnp.maximum(amax, amax_of(v))
    else:  # long rows: the second pass re-reads them (from L2)
        amax = lax.fori_loop(
            0, nk, lambda i, a: jnp.maximum(a, amax_of(load(i))), jnp.zeros((bm, 1), jnp.float32)
        )
    sx = amax / qmax
    sx = jnp.where(sx > 0, sx, 1.0)
    if nk <= RESIDENT_CHUNKS:
        for i, v in enumerate(vals):
            store(i, v, sx)
    else:

        def cast_step(i, carry):
            store(i, load(i), sx)
            return carry

        lax.fori_loop(0, nk, cast_step, 0)
    plgpu.store(s_ref, sx, mask=row_ok)


@functools.partial(jax.jit, static_argnames=("dtype", "block_m", "interpret"))
def quantize_rows(x2, *, dtype: str, block_m: int = 1, interpret: bool = False):
    """Per-row ``(codes, s_x)`` of ``x2: (M, K)``, ``K % 128 == 0``: ``s_x = max|x|/qmax`` (1 for
    all-zero rows), codes ``cast(x / s_x)`` as int8 or float8_e4m3fn, like ``W8A8._cast``."""
    m, k = x2.shape
    if k % K_ALIGN:
        raise ShapeError(f"quantize_rows: K = {k} is not a multiple of {K_ALIGN}")
    bk = _chunk(k)
    code_dtype = jnp.int8 if dtype == "int8" else fp8_dtype("e4m3")
    kernel = functools.partial(_quant_kernel, m=m, bm=block_m, bk=bk, nk=k // bk, dtype=dtype)
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((m, k), code_dtype),
            jax.ShapeDtypeStruct((m, 1), jnp.float32),
        ),
        grid=(pl.cdiv(m, block_m),),
        in_specs=[pl.BlockSpec((block_m, k), lambda i: (i, 0))],
        out_specs=(
            pl.BlockSpec((block_m, k), lambda i: (i, 0)),
            pl.BlockSpec((block_m, 1), lambda i: (i, 0)),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=4 if k <= 8192 else 8, num_stages=1),
        interpret=interpret,
        name=f"qjax_quantize_rows_{dtype}",
    )(x2)


def _is_w8a8(w) -> bool:
    return isinstance(w, QArray) and isinstance(w.spec, W8A8) and w.layout in LAYOUTS


def supports(x: jax.Array, w) -> bool:
    """Registry predicate: a 2-D W8A8 weight quantized along K, float activations; dynamic
    activation scales need ``K % 128 == 0`` (the row kernel's chunks)."""
    return (
        _is_w8a8(w)
        and len(w.shape) == 2
        and w.spec.axis == 0
        and x.dtype in (jnp.bfloat16, jnp.float32)
        and x.shape[-1] == w.shape[0]
        and x.size > 0
        and (w.spec.act == "static" or w.shape[0] % K_ALIGN == 0)
    )


def w8a8_matmul(
    x: jax.Array,
    w: QArray,
    *,
    interpret: bool = False,
    gemm: str | None = None,
    config: mgpu_w8a8.Config | None = None,
) -> jax.Array:
    """``x @ W`` for a W8A8 weight ``(K, N)``: fused row quantization, then the 8-bit GEMM —
    ``gemm="xla"`` (XLA's, scales in an elementwise pass) or ``"mgpu"`` (the Mosaic GPU kernel
    of :mod:`qjax.kernels.gpu.mgpu_w8a8`, scales in its epilogue; Hopper only, ``config`` its
    config); ``None``: ``"mgpu"`` where :func:`~qjax.kernels.gpu.mgpu_w8a8.takes` (measured
    faster), else ``"xla"``."""
    if not supports(x, w):
        got = w.spec.label() if isinstance(w, QArray) else type(w).__name__
        raise FormatError(
            f"w8a8_matmul needs a 2-D W8A8 weight (axis 0) and float x with matching K "
            f"(dynamic: K % {K_ALIGN} == 0); got {got}, x {x.dtype} {tuple(x.shape)}, "
            f"w {tuple(w.shape)}"
        )
    if gemm not in (None, "xla", "mgpu"):
        raise FormatError(f"w8a8_matmul: gemm must be 'xla' or 'mgpu', got {gemm!r}")
    spec = w.spec
    k, n = w.shape
    x2 = x.reshape(-1, k)
    if gemm is None:
        fast = not interpret and mgpu_w8a8.takes(x2.shape[0], k, n, spec.dtype, x.dtype)
        gemm = "mgpu" if fast else "xla"
    if spec.act == "dynamic":
        xq, sx = quantize_rows(x2, dtype=spec.dtype, interpret=interpret)
    else:
        sx = w.aux["act_scale"]
        xq = spec._cast(x2.astype(jnp.float32) / sx)
    if gemm == "mgpu":
        sx = jnp.broadcast_to(jnp.asarray(sx, jnp.float32).reshape(-1, 1), (x2.shape[0], 1))
        y = mgpu_w8a8.gemm(xq, w.codes[0], sx, w.scales[0], x.dtype, config)
        return y.reshape(*x.shape[:-1], n)
    if spec.dtype == "int8":
        out = jnp.int32
    else:  # float32 accumulation inside the GEMM either way; bf16 halves the bytes it writes
        out = jnp.bfloat16 if x.dtype == jnp.bfloat16 else jnp.float32
    acc = jnp.matmul(xq, w.codes[0].T, preferred_element_type=out)
    y = acc.astype(jnp.float32) * sx * w.scales[0]
    return y.astype(x.dtype).reshape(*x.shape[:-1], n)


__all__ = ["LAYOUTS", "quantize_rows", "supports", "w8a8_matmul"]
