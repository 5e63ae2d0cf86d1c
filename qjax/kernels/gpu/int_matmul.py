"""W4A16 / W8A16 uniform-int matmul in Pallas (Triton lowering), float32 accumulation.

Computes ``y = x @ Ŵ`` for bf16 ``x: (M, K)`` and an :class:`~qjax.formats.Int` weight repacked by
:func:`qjax.kernels.repack.repack` (layouts ``"gpu_i4p"`` / ``"gpu_i8"``), where
``Ŵ[k, n] = (c[k, n] − z[g(k), n]) · s[g(k), n]``, ``g(k) = k // group`` and ``z = 2^(b−1)`` for
symmetric weights. Paths (chosen per M bucket by :mod:`qjax.kernels.gpu.configs`):

**decode** (skinny M). The codes enter the MMA unscaled. For int4 a code ``c`` becomes the bf16
``128 + c`` with one OR: the bit pattern ``0x4300 | c`` is exactly ``128 + c`` (bf16's unit in the
last place at 128 is 1). Per scale group ``G``::

    a = Σ_{k∈G} x_k (128 + c_k)          (tensor cores, f32 accumulate)
    y += s·a − s·(128 + z)·Σ_{k∈G} x_k    (= s·Σ x_k (c_k − z), two FMAs per output)

so no per-weight multiply is spent; int8 codes (stored signed, ``q = c − 128``) are converted
directly and ``z − 128`` plays the part of ``128 + z``. int4 is unpacked either one 16-row plane
at a time (``planes=True``: shift by ``4j``, one K=16 MMA per plane) or as one ``(8, 16, BN)``
shift reshaped to 128 rows (``planes=False``); which is faster depends on M (see the table).
Optional split-K writes float32 partials that XLA sums.

**swap** (skinny M, the decode path transposed). ``yᵀ = Ŵᵀ xᵀ``: each dequantized plane, as a
``(BN, 16)`` tile, is the MMA's *left* operand and ``xᵀ`` the ``(16, BM)`` right one, so the
weights fill the MMA's large M side instead of padding ``x``'s few rows to 16. A plane is
``c − z`` exactly in bf16 (int4: ``(128 + c) − (128 + z)`` from the OR trick; int8: ``q − (z −
128)``), and the scale multiplies the float32 accumulator once per group. Measured on the
H100: 3–17 % faster than decode at M ≤ 16, 15–62 % at M = 32–64, 34–50 % faster than tiled at
M = 128 (``experiments/results/kernels/README.md``).

**gemv** (CUDA cores, no MMA). Nibble ``j`` is moved to mantissa bits 19..22 of the float32
``16.0`` (one shift, one AND/OR), which is exactly ``16 + c``; ``p += (16 + c)·x`` is one FMA per
weight and row, and per scale group ``acc += s·p − s·(16 + z)·Σx`` as above. int8 codes become
``2^23 + 128 + q`` by an integer add and a bitcast, minus ``2^23 + 128``: no int→float conversion
instruction anywhere. Measured slower than decode on H100 for M > 1; kept for experiments.

**tiled** (prefill). Each ``(128, BN)`` weight tile (or each 16-row plane) is dequantized once in
registers, ``(2^23 + c) − (2^23 + z)`` exactly in float32 times ``s``, to bf16, and multiplied
with the matching tile of ``x``; output tiles are visited in groups of ``group_m`` row-tiles so
that the ``x`` and weight tiles a wave needs stay in L2.

**xla** (large M). :func:`qjax.kernels.repack.dequantize_bf16` (one fused XLA pass) then XLA's
bf16 ``dot``: on H100 cuBLAS beats the tiled kernel from M ≈ 256 on.

Rows of ``x`` beyond ``M`` are masked (no padding of ``x`` along M); ``K`` and ``N`` are padded
once, at repack time (``x`` is zero-padded along ``K`` only when ``K`` is not a multiple of 128).
On Hopper, int4 weights with groups of 128·j (or per channel) run 1.1–2.1× faster in the Mosaic
GPU kernel (:mod:`qjax.kernels.gpu.mgpu_matmul`, layout ``"gpu_i4t"``); this one serves every
group size, int8, older GPUs and the interpret-mode tests
(``experiments/results/kernels/README.md``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qjax.errors import ShapeError
from qjax.kernels import calls
from qjax.kernels import repack as rp
from qjax.kernels.gpu import configs
from qjax.qarray import QArray

CHUNK = rp.CHUNK
LAYOUTS = ("gpu_i4p", "gpu_i8")


_F32_2P23 = 0x4B000000  # float32 bits of 2^23: OR a code c < 2^23 into them to get 2^23 + c
_F32_16 = 0x41800000  # float32 bits of 16.0; a nibble in mantissa bits 19..22 gives 16 + c


def _i8_magic(q):
    """int8 codes → float32 ``2^23 + 128 + q`` by integer add + bitcast (no int→float convert)."""
    return lax.bitcast_convert_type(q.astype(jnp.int32) + (_F32_2P23 + 128), jnp.float32)


def _swizzle(pid, m_tiles: int, n_tiles: int, group_m: int):
    """Program id → (row tile, column tile), visiting ``group_m`` row tiles per column sweep."""
    if m_tiles == 1:
        return jnp.int32(0), pid
    width = group_m * n_tiles
    first = (pid // width) * group_m
    rows = jnp.minimum(m_tiles - first, group_m)
    local = pid % width
    return first + local % rows, local // rows


def _kernel(
    x_ref,
    w_ref,
    s_ref,
    *rest,
    bits,
    gk,
    m,
    bm,
    bn,
    m_tiles,
    n_tiles,
    cps,
    path,
    sym,
    group_m,
    planes,
):
    z_ref, o_ref = (None, rest[0]) if sym else rest
    pm, _ = _swizzle(pl.program_id(0), m_tiles, n_tiles, group_m)
    rows = pm * bm + lax.broadcasted_iota(jnp.int32, (bm, 1), 0)
    row_ok = rows < m
    c_first = pl.program_id(1) * cps

    def load_x(k0, kk):
        mask = jnp.broadcast_to(row_ok, (bm, kk))
        return plgpu.load(x_ref.at[:, pl.ds(k0, kk)], mask=mask, other=0.0)

    def load_row(ref, gi):  # one group's (1, bn) scales or zeros, float32
        return ref[pl.ds(gi, 1), :].astype(jnp.float32)

    def load_rows(ref, g0, n):  # n consecutive groups, (n, bn) float32
        return ref[pl.ds(g0, n), :].astype(jnp.float32)

    def decode_step(i, acc):
        c = c_first + i
        sub = min(gk, CHUNK)  # K rows per scale group inside the chunk
        if bits == 4:
            words = w_ref[pl.ds(pl.multiple_of(c * 16, 16), 16), :]  # (16, bn) int32
        for d in range(CHUNK // sub):
            k0 = pl.multiple_of(c * CHUNK + d * sub, 16)
            xt = load_x(k0, sub)
            if bits == 4 and planes:  # one K=16 MMA per plane: no 3-D broadcast, no reshape
                a = None
                for e in range(sub // 16):
                    j = d * (sub // 16) + e
                    t = ((words >> (4 * j)) & 0xF) | 0x4300  # bf16 bits of 128 + c
                    wt = lax.bitcast_convert_type(t.astype(jnp.int16), jnp.bfloat16)
                    xj = load_x(pl.multiple_of(c * CHUNK + 16 * j, 16), 16)
                    aj = jnp.dot(xj, wt, preferred_element_type=jnp.float32)
                    a = aj if a is None else a + aj
                offset = 128.0
            elif bits == 4:
                n_pl = sub // 16
                shifts = 4 * (d * n_pl + lax.broadcasted_iota(jnp.int32, (n_pl, 1, 1), 0))
                t = ((words[None] >> shifts) & 0xF) | 0x4300  # bf16 bits of 128 + c
                wt = lax.bitcast_convert_type(t.reshape(sub, bn).astype(jnp.int16), jnp.bfloat16)
                a = jnp.dot(xt, wt, preferred_element_type=jnp.float32)
                offset = 128.0
            else:
                wt = w_ref[pl.ds(k0, sub), :].astype(jnp.float32).astype(jnp.bfloat16)
                a = jnp.dot(xt, wt, preferred_element_type=jnp.float32)
                offset = -128.0
            gi = c * (CHUNK // gk) + d if gk <= CHUNK else c // (gk // CHUNK)
            s = load_row(s_ref, gi)
            acc = acc + a * s
            if sym and bits == 8:
                continue  # signed codes, zero offset 0
            z = (1 << (bits - 1)) + offset if sym else load_row(z_ref, gi) + offset
            xs = jnp.sum(xt.astype(jnp.float32), axis=1, keepdims=True)
            acc = acc - xs * (z * s)
        return acc

    def swap_step(i, acc):  # acc (bn, bm): yᵀ = Ŵᵀ xᵀ, the weight plane is the left operand
        c = c_first + i
        sub = min(gk, CHUNK)
        if bits == 4:
            words = w_ref[pl.ds(pl.multiple_of(c * 16, 16), 16), :].T  # (bn, 16) int32
        for d in range(CHUNK // sub):
            gi = c * (CHUNK // gk) + d if gk <= CHUNK else c // (gk // CHUNK)
            s = load_row(s_ref, gi).T  # (bn, 1)
            if bits == 4:  # (128 + c) − (128 + z) = c − z, exact in bf16
                zero = 136.0 if sym else (load_row(z_ref, gi).T + 128.0).astype(jnp.bfloat16)
            else:  # q − (z − 128) = c − z, |c − z| ≤ 255: exact in bf16
                zero = None if sym else (load_row(z_ref, gi).T - 128.0).astype(jnp.bfloat16)
            a = None
            for e in range(sub // 16):
                j = d * (sub // 16) + e
                k0 = pl.multiple_of(c * CHUNK + 16 * j, 16)
                if bits == 4:
                    t = ((words >> (4 * j)) & 0xF) | 0x4300  # bf16 bits of 128 + c
                    wt = lax.bitcast_convert_type(t.astype(jnp.int16), jnp.bfloat16)
                else:
                    wt = w_ref[pl.ds(k0, 16), :].T.astype(jnp.float32).astype(jnp.bfloat16)
                if zero is not None:
                    wt = wt - zero
                aj = jnp.dot(wt, load_x(k0, 16).T, preferred_element_type=jnp.float32)
                a = aj if a is None else a + aj
            acc = acc + a * s
        return acc

    def tiled_planes_step(i, acc):  # int4: dequantize and multiply one 16-row plane at a time
        c = c_first + i
        words = w_ref[pl.ds(pl.multiple_of(c * 16, 16), 16), :]
        for j in range(8):
            gi = c * (CHUNK // gk) + (16 * j) // gk if gk <= CHUNK else c // (gk // CHUNK)
            s = load_row(s_ref, gi)
            zero = 2.0**23 + (8.0 if sym else load_row(z_ref, gi))
            t = ((words >> (4 * j)) & 0xF) | _F32_2P23
            wt = ((lax.bitcast_convert_type(t, jnp.float32) - zero) * s).astype(jnp.bfloat16)
            xj = load_x(pl.multiple_of(c * CHUNK + 16 * j, 16), 16)
            acc = acc + jnp.dot(xj, wt, preferred_element_type=jnp.float32)
        return acc

    def tiled_step(i, acc):
        c = c_first + i
        if gk >= CHUNK:
            gi = c // (gk // CHUNK)
            s = load_row(s_ref, gi)[None]  # (1, 1, bn)
            z = None if sym else load_row(z_ref, gi)[None]
        else:
            per = CHUNK // gk
            s = load_rows(s_ref, c * per, per)
            z = None if sym else load_rows(z_ref, c * per, per)
        if bits == 4:
            words = w_ref[pl.ds(pl.multiple_of(c * 16, 16), 16), :]
            shifts = 4 * lax.broadcasted_iota(jnp.int32, (8, 1, 1), 0)
            t = ((words[None] >> shifts) & 0xF) | _F32_2P23  # (8, 16, bn): k = 16j + r
            q = lax.bitcast_convert_type(t, jnp.float32)  # 2^23 + c, exact
            if gk < CHUNK:  # plane j belongs to group j // (gk // 16)
                s = jnp.broadcast_to(s[:, None], (per, 8 // per, bn)).reshape(8, 1, bn)
                z = (
                    None
                    if sym
                    else jnp.broadcast_to(z[:, None], (per, 8 // per, bn)).reshape(8, 1, bn)
                )
            zero = 2.0**23 + (8.0 if sym else z)
        else:
            k0 = pl.multiple_of(c * CHUNK, CHUNK)
            q = _i8_magic(w_ref[pl.ds(k0, CHUNK), :])  # (128, bn): 2^23 + 128 + q
            q = q.reshape(CHUNK // min(gk, CHUNK), min(gk, CHUNK), bn)
            if gk < CHUNK:
                s = s[:, None]
                z = None if sym else z[:, None]
            zero = 2.0**23 + 128.0 + (0.0 if sym else z - 128.0)
        wt = ((q - zero) * s).astype(jnp.bfloat16).reshape(CHUNK, bn)
        xt = load_x(pl.multiple_of(c * CHUNK, CHUNK), CHUNK)
        return acc + jnp.dot(xt, wt, preferred_element_type=jnp.float32)

    def gemv_step(i, acc):
        c = c_first + i
        sub = min(gk, CHUNK) // 16  # 16-row slices per scale group inside the chunk
        if bits == 4:
            words = w_ref[pl.ds(pl.multiple_of(c * 16, 16), 16), :]
        for d in range(8 // sub):
            p = xs = None
            for e in range(sub):
                j = d * sub + e
                k0 = pl.multiple_of(c * CHUNK + 16 * j, 16)
                if bits == 4:  # nibble j to mantissa bits 19..22 of 16.0: 16 + c, exact
                    sh = 19 - 4 * j
                    t = words << sh if sh >= 0 else lax.shift_right_logical(words, -sh)
                    f = lax.bitcast_convert_type((t & 0x780000) | _F32_16, jnp.float32)
                else:
                    f = _i8_magic(w_ref[pl.ds(k0, 16), :]) - (2.0**23 + 128.0)  # q, exact
                xt = load_x(k0, 16).astype(jnp.float32)[:, :, None]  # (bm, 16, 1)
                term = f[None] * xt
                p = term if p is None else p + term
                xs = xt if xs is None else xs + xt
            gi = c * (CHUNK // gk) + d if gk <= CHUNK else c // (gk // CHUNK)
            s = load_row(s_ref, gi)[None]  # (1, 1, bn)
            acc = acc + p * s
            if bits == 4:
                off = 24.0 if sym else load_row(z_ref, gi)[None] + 16.0
            else:
                off = None if sym else load_row(z_ref, gi)[None] - 128.0
            if off is not None:
                acc = acc - xs * (off * s)
        return acc

    if path == "gemv":
        acc = lax.fori_loop(0, cps, gemv_step, jnp.zeros((bm, 16, bn), jnp.float32))
        acc = jnp.sum(acc, axis=1)
    elif path == "swap":
        acc = lax.fori_loop(0, cps, swap_step, jnp.zeros((bn, bm), jnp.float32)).T
    else:
        tiled = tiled_planes_step if planes and bits == 4 else tiled_step
        step = decode_step if path == "decode" else tiled
        acc = lax.fori_loop(0, cps, step, jnp.zeros((bm, bn), jnp.float32))
    plgpu.store(o_ref, acc.astype(o_ref.dtype), mask=jnp.broadcast_to(row_ok, (bm, bn)))


@functools.partial(jax.jit, static_argnames=("cfg", "interpret"))
def _pallas_matmul(x2, w: QArray, cfg: configs.Config, interpret: bool):
    m, k_p = x2.shape
    n_p = w.codes.shape[1]
    bits = rp.LAYOUTS[w.layout]
    g = w.spec.group
    gk = k_p if g == "channel" else g
    bm, bn = cfg.block_m, cfg.block_n
    if cfg.path == "gemv":  # CUDA-core path: no MMA minimum, so no wasted rows
        bm = min(bm, pl.next_power_of_2(m))
    elif bm < 16:
        raise ShapeError(f"int_matmul: {cfg.path} needs block_m >= 16 (MMA tile), got {cfg}")
    while n_p % bn:
        bn //= 2
    chunks = k_p // CHUNK
    split = calls.largest_divisor_at_most(chunks, cfg.split_k)
    m_tiles, n_tiles = pl.cdiv(m, bm), n_p // bn
    sym = w.spec.symmetric

    def tile_map(pid, sid):  # grid (pid, split id) -> (row tile, column tile)
        return _swizzle(pid, m_tiles, n_tiles, cfg.group_m)

    in_specs = [
        pl.BlockSpec((bm, k_p), lambda pid, sid: (tile_map(pid, sid)[0], 0)),
        pl.BlockSpec((w.codes.shape[0], bn), lambda pid, sid: (0, tile_map(pid, sid)[1])),
        pl.BlockSpec((w.scales.shape[0], bn), lambda pid, sid: (0, tile_map(pid, sid)[1])),
    ]
    args = [x2, w.codes, w.scales]
    if not sym:
        in_specs.append(in_specs[-1])
        args.append(w.zeros)
    out_shape, out_spec = calls.split_k_output(
        split, m, n_p, bm, bn, x2.dtype, tile_map, lambda pid, sid: sid
    )
    kernel = functools.partial(
        _kernel,
        bits=bits,
        gk=gk,
        m=m,
        bm=bm,
        bn=bn,
        m_tiles=m_tiles,
        n_tiles=n_tiles,
        cps=chunks // split,
        planes=cfg.planes,
        path=cfg.path,
        sym=sym,
        group_m=cfg.group_m,
    )
    y = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(m_tiles * n_tiles, split),
        in_specs=in_specs,
        out_specs=out_spec,
        compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"qjax_w{bits}_{cfg.path}",
    )(*args)
    return calls.sum_splits(y, x2.dtype)


def check_supported(x: jax.Array, w: QArray) -> None:
    """Raises a :class:`~qjax.QjaxError` saying why ``int_matmul(x, w)`` cannot run."""
    calls.check("int_matmul", x, w, LAYOUTS)


def supports(x: jax.Array, w: QArray) -> bool:
    """Registry predicate: bf16 activations and a weight in a kernel layout."""
    return calls.supports(x, w, LAYOUTS)


def int_matmul(
    x: jax.Array, w: QArray, *, config: configs.Config | None = None, interpret: bool = False
) -> jax.Array:
    """``x @ dequantize(w)`` for bf16 ``x: (..., K)`` and a repacked int weight ``(K, N)``.

    ``config`` overrides the block-size table; ``interpret=True`` runs the Pallas kernel in
    interpret mode (any backend, used by the CPU tests).
    """
    check_supported(x, w)
    k, n = w.shape
    lead = x.shape[:-1]
    x2 = calls.as_rows(x, w.codes.shape[0] * (8 if w.layout == "gpu_i4p" else 1))
    cfg = config or configs.pick(rp.LAYOUTS[w.layout], x2.shape[0], k, n)
    if cfg.path == "xla":
        y = calls.dequantized_matmul(x2, w)
    else:
        y = _pallas_matmul(x2, w, cfg, interpret)
    if y.shape[1] != n:
        y = y[:, :n]
    return y.reshape(*lead, n)
