"""Register-level weight decoders of the Mosaic GPU kernel: codes in shared memory → the bf16
left operand of Hopper's ``wgmma``, with no data exchanged between threads.

**Why a stored permutation.** ``wgmma`` wants its register operand in the "WGMMA layout": in each
8-column block a thread holds columns ``2q, 2q + 1`` (``q`` = lane mod 4). A thread loading
4-bit or 8-bit codes that way reads one or two bytes at a time, so Mosaic GPU loads them 32 bits
per thread ("upcast" layouts: 8 consecutive int4 / 4 consecutive int8 columns) and moves them
into place with warp shuffles — two per 8 int4 codes. Here the weight's K axis is stored
permuted instead (:func:`stored_order`, applied once by the repack), so that the 32-bit load
already holds, in order, exactly the columns the WGMMA layout gives the thread: the decoded
vector is split into pairs and relabelled (:func:`as_wgmma`), no shuffle, no ``prmt`` blend.

Within each block of ``4v`` columns (``v`` codes per 32-bit load: 8 for 4-bit, 4 for 8-bit)
stored column ``v·q + 2i + t`` holds logical column ``8i + 2q + t`` (``q < 4``, ``i < v/2``,
``t < 2``).

**Fragment-major 8-bit codes.** The 8-bit layouts go one step further (:func:`to_fragments`):
each 64-row × 128-code block is stored in the order a warp group holds it in registers, so a
thread's 16 codes of a block are 16 consecutive bytes — one 128-bit load, from shared memory
(:func:`load_block`) or straight from HBM (:func:`load_fragments`), and the load is relabelled
into the 32-bit-load layout (:func:`fragment_slices`), again with no instruction.

**Decoders** (each a few ``prmt`` / ``lop3`` per 32-bit register, written as PTX):

* int4 / int8 — Mosaic GPU's own converters (``prmt`` + ``lop3`` + ``sub.bf16x2``), exact;
* FP8 — the byte ``s eeee mmm`` (e4m3) is moved to the bf16 bit pattern ``s 000eeee mmm 0000``,
  which is *exactly* ``value · 2⁻¹²⁰`` for normal and subnormal e4m3 alike (bf16's subnormals
  cover e4m3's); e5m2 ``s eeeee mm`` → ``s 00eeeee mm 000`` = ``value · 2⁻¹¹²``. The kernel
  multiplies by ``2¹²⁰`` / ``2¹¹²`` (exact);
* NF4 — a 16-entry table lookup with byte permutes: the low and the high bytes of the 16 bf16
  levels live in immediates, ``prmt`` picks a byte for 4 codes at once from each half of a table
  (codes 0–7, 8–15), a third ``prmt`` chooses by the code's top bit, and two more interleave the
  low and high bytes into bf16 pairs (2.6 instructions per code);
* any 4-bit code (int4, NF4) by a **pair table in shared memory** (``kind="lut"``): each byte of
  the load holds two codes, and the 256-entry table maps it to their two bf16 values, one 32-bit
  word — a ``prmt`` (the byte), an ``mad`` (its address) and an ``ld.shared`` per two codes
  (1 instruction per code, half of them loads). The table is stored once per lane of a warp
  (``(256, 32)`` words, :func:`lut_words`; lane ``l`` reads column ``l``), so the 32 lanes of a
  load always hit 32 different banks whatever their codes.

The bit manipulations are mirrored by :func:`emulate` (numpy) so that the CPU tests check every
code against ``ml_dtypes`` and the NF4 table; the kernels themselves run on Hopper only.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from qjax.formats.nf4 import nf4_levels

VEC = {4: 8, 8: 4}  # bits per code -> codes per 32-bit register of the load layout
FP8_SHIFT = {"e4m3": 4, "e5m2": 3}  # right shift of the lane holding the byte in its high half
FP8_SCALE_LOG2 = {"e4m3": 120, "e5m2": 112}  # the decoded pattern is value · 2^-this


# -- the stored order --------------------------------------------------------------------------
def stored_order(k: int, bits: int) -> np.ndarray:
    """``order`` with ``stored[..., p] = logical[..., order[p]]`` for ``k`` columns of ``bits``-bit
    codes (``k`` a multiple of ``4·v``); ``np.argsort(order)`` takes stored back to logical."""
    v = VEC[bits]
    q, i, t = np.meshgrid(np.arange(4), np.arange(v // 2), np.arange(2), indexing="ij")
    block = (8 * i + 2 * q + t).reshape(-1)  # stored position v·q + 2i + t, C order over (q, i, t)
    span = 4 * v
    return np.arange(k) // span * span + np.tile(block, k // span)


def to_stored(codes, bits: int, pairs: bool = False):
    """``codes[..., K]`` in logical K order → :func:`stored_order` (a reshape and a transpose,
    which XLA fuses; ``jnp`` or ``numpy`` arrays). ``pairs``: ``codes`` holds one element per
    pair ``(2j, 2j + 1)`` of columns (the order moves pairs, never splits them)."""
    v = VEC[bits]
    *lead, k = codes.shape
    t = 1 if pairs else 2
    blocks = codes.reshape(*lead, k // (4 * v // 2 * t), v // 2, 4, t)  # logical (i, q, t)
    return blocks.swapaxes(-3, -2).reshape(*lead, k)


def to_logical(codes, bits: int):
    """Inverse of :func:`to_stored`."""
    v = VEC[bits]
    *lead, k = codes.shape
    blocks = codes.reshape(*lead, k // (4 * v), 4, v // 2, 2)  # stored (q, i, t)
    return blocks.swapaxes(-3, -2).reshape(*lead, k)


def x_to_stored(x, bits: int):
    """:func:`to_stored` for bf16 ``x: (M, K)``, each pair of columns moved as one 32-bit word:
    XLA transposes rows of two 16-bit elements ~13× slower (316 vs 24 µs for 2048×8192 on the
    H100)."""
    import jax
    import jax.numpy as jnp

    m, k = x.shape
    words = jax.lax.bitcast_convert_type(x.reshape(m, k // 2, 2), jnp.uint32)
    return jax.lax.bitcast_convert_type(to_stored(words, bits, pairs=True), x.dtype).reshape(m, k)


# -- NF4 lookup constants ------------------------------------------------------------------------
@functools.cache
def nf4_tables() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(low, high)``: four 32-bit words each, the low / high bytes of the bf16 NF4 levels indexed
    by the stored nibble ``u = c ^ 8`` (codes are stored as ``c − 8`` in ``jnp.int4``, whose bits
    are ``c ^ 8``). Word ``w`` holds entries ``4w .. 4w + 3``, entry ``4w + b`` in byte ``b``."""
    import ml_dtypes

    levels = np.asarray(nf4_levels(), np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    by_u = levels[np.arange(16) ^ 8].astype(np.uint32)
    lo, hi = by_u & 0xFF, by_u >> 8

    def words(b):
        return tuple(int(sum(int(b[4 * w + j]) << (8 * j) for j in range(4))) for w in range(4))

    return words(lo), words(hi)


# -- the pair table ----------------------------------------------------------------------------
LUT_LANES = 32  # one copy of the table per lane of a warp (one shared-memory bank each)


def pair_table(kind: str) -> np.ndarray:
    """``(256,)`` uint32: entry ``b`` holds the bf16 values of the stored nibbles ``b & 15`` (low
    half) and ``b >> 4`` (high half) — ``kind="int"``: the signed int4 ``c − 8`` (stored as
    ``jnp.int4``, exact in bf16); ``"nf4"``: the NF4 level of code ``c`` (nibble ``c ^ 8``)."""
    import ml_dtypes

    u = np.arange(16)
    if kind == "int":
        vals = np.where(u < 8, u, u - 16).astype(np.float32)
    elif kind == "nf4":
        vals = np.asarray(nf4_levels(), np.float32)[u ^ 8]
    else:
        raise ValueError(f"pair_table: no pair table for decoder {kind!r}")
    bits = vals.astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
    b = np.arange(256)
    return bits[b & 15] | bits[b >> 4] << 16


def lut_words(kind: str) -> np.ndarray:
    """``(256, LUT_LANES)`` uint32: :func:`pair_table` with every entry repeated once per lane, the
    layout the kernel copies to shared memory (entry ``b`` of lane ``l`` at word ``32·b + l``)."""
    return np.repeat(pair_table(kind)[:, None], LUT_LANES, axis=1)


# -- numpy mirror of the PTX -----------------------------------------------------------------------
def prmt(a, b, sel):
    """PTX ``prmt.b32`` (default mode) on uint32 numpy arrays: byte ``i`` of the result is byte
    ``sel[4i + 2 : 4i]`` of ``{b, a}`` (``a`` bytes 0–3, ``b`` bytes 4–7), or that byte's sign
    replicated when bit ``4i + 3`` of ``sel`` is set."""
    a, b, sel = (np.asarray(v, np.uint64) for v in (a, b, sel))
    pool = a | (b << np.uint64(32))
    out = np.zeros(np.broadcast(a, b, sel).shape, np.uint64)
    for i in range(4):
        nib = (sel >> np.uint64(4 * i)) & np.uint64(0xF)
        byte = (pool >> ((nib & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        sign = np.where(byte & np.uint64(0x80), np.uint64(0xFF), np.uint64(0))
        byte = np.where(nib & np.uint64(8), sign, byte)
        out |= byte << np.uint64(8 * i)
    return out.astype(np.uint32)


def emulate(kind: str, words: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
    """The decoder's output registers for 32-bit input ``words`` (uint32): ``(..., n)`` uint32,
    two bf16 bit patterns each (element ``2j`` in the low half of register ``j``); ``"lut"``
    reads ``table`` (:func:`lut_words`) as lane ``l = word index mod 32`` would."""
    x = np.asarray(words, np.uint32)
    if kind == "lut":
        lane = np.arange(x.size).reshape(x.shape) % LUT_LANES
        idx = [prmt(x, 0, 0x4440 + j) for j in range(4)]  # byte j, zero-extended
        return np.stack([table[i.astype(np.int64), lane] for i in idx], -1)
    if kind in FP8_SHIFT:
        mask = 0x7F << (8 - FP8_SHIFT[kind])
        mask = np.uint32(mask | mask << 16)
        outs = []
        for sel in (0x1404, 0x3424):  # bytes 0,1 / 2,3 into the high byte of each half
            lane = prmt(x, 0, sel)
            outs.append((lane & np.uint32(0x80008000)) | ((lane >> FP8_SHIFT[kind]) & mask))
        return np.stack(outs, -1)
    if kind == "nf4":
        lo, hi = nf4_tables()
        i7 = x & np.uint32(0x77777777)
        s2 = ((x >> 1) & np.uint32(0x44444444)) | np.uint32(0x32103210)
        outs = []
        for idx, pick in ((i7, s2), (i7 >> 16, s2 >> 16)):
            pl = prmt(prmt(lo[0], lo[1], idx), prmt(lo[2], lo[3], idx), pick)
            ph = prmt(prmt(hi[0], hi[1], idx), prmt(hi[2], hi[3], idx), pick)
            outs += [prmt(pl, ph, 0x5140), prmt(pl, ph, 0x7362)]
        return np.stack(outs, -1)
    raise ValueError(f"emulate: unknown decoder {kind!r}")


# -- the PTX (Mosaic GPU, inside plgpu.inline_mgpu) ----------------------------------------------
def _fp8_ptx(kind: str) -> str:
    mask = 0x7F << (8 - FP8_SHIFT[kind])  # the 7 magnitude bits after the shift
    lines = ["{", ".reg .b32 lane, mag;"]
    for out, sel in enumerate((0x1404, 0x3424)):  # bytes 0,1 / 2,3 into each half's high byte
        lines += [
            f"prmt.b32 lane, $2, 0, {sel:#06x};",
            f"shr.b32 mag, lane, {FP8_SHIFT[kind]};",
            f"and.b32 mag, mag, {mask | mask << 16:#010x};",
            f"lop3.b32 ${out}, lane, 0x80008000, mag, 0xEA;",  # (lane & 0x8000_8000) | mag
        ]
    return "\n".join(lines + ["}"])


def _nf4_ptx() -> str:
    lo, hi = nf4_tables()
    lines = [
        "{",
        ".reg .b32 i7, i7h, xs, s2, s2h, a, b, pl, ph;",
        "and.b32 i7, $4, 0x77777777;",
        "shr.b32 i7h, i7, 16;",
        "shr.b32 xs, $4, 1;",
        "lop3.b32 s2, xs, 0x44444444, 0x32103210, 0xEA;",
        "shr.b32 s2h, s2, 16;",
    ]
    for half, (idx, pick) in enumerate((("i7", "s2"), ("i7h", "s2h"))):
        for plane, t in (("pl", lo), ("ph", hi)):
            lines += [
                f"prmt.b32 a, {t[0]:#010x}, {t[1]:#010x}, {idx};",
                f"prmt.b32 b, {t[2]:#010x}, {t[3]:#010x}, {idx};",
                f"prmt.b32 {plane}, a, b, {pick};",
            ]
        lines += [
            f"prmt.b32 ${2 * half}, pl, ph, 0x5140;",
            f"prmt.b32 ${2 * half + 1}, pl, ph, 0x7362;",
        ]
    return "\n".join(lines + ["}"])


def _lut_ptx() -> str:
    """Inputs ``$4`` (8 codes) and ``$5`` (the table's shared address + 4 × lane); outputs the 4
    words of the byte pairs: word ``32·b + lane`` at address ``$5 + 128·b``."""
    lines = ["{", ".reg .b32 b<4>;"]
    for j in range(4):
        lines += [
            f"prmt.b32 b{j}, $4, 0, {0x4440 + j:#06x};",
            f"mad.lo.u32 b{j}, b{j}, {4 * LUT_LANES}, $5;",
            f"ld.shared.b32 ${j}, [b{j}];",
        ]
    return "\n".join(lines + ["}"])


def as_wgmma(arr):
    """A Mosaic GPU ``FragmentedArray`` in a 32-bit-load layout (``WGMMA_LAYOUT_UPCAST_4X`` or
    ``WGMMA_LAYOUT_8BIT``) relabelled as ``WGMMA_LAYOUT``: register ``(…, b, …)`` of ``v`` values
    becomes registers ``(…, b·v/2 + i, …)`` of its pairs ``2i, 2i + 1`` — valid because the
    weight was stored in :func:`stored_order`."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax.experimental.mosaic.gpu import utils

    v = arr.layout.vector_length
    out = np.empty(mgpu.WGMMA_LAYOUT.registers_shape(arr.shape), dtype=object)
    for idx, reg in np.ndenumerate(arr.registers):
        for i in range(v // 2):
            out[(idx[0], idx[1] * (v // 2) + i, *idx[2:])] = utils.vector_slice(
                reg, slice(2 * i, 2 * i + 2)
            )
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)


def times_column_blocks(a, blocks):
    """``a`` (a ``(64, S)`` bf16 Pallas array in the WGMMA layout) with its ``len(blocks)``
    column blocks of equal width each multiplied by the matching array of ``blocks`` (``(64,
    S / len(blocks))``, WGMMA layout): one operand of ``wgmma`` that spans several scale groups.
    The layout's registers are blocked by 8 columns, so the blocks are a relabelling."""
    import jax.experimental.mosaic.gpu as mgpu
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp

    rows, cols = a.shape
    width = cols // len(blocks)
    if width * len(blocks) != cols or width % 8 or any(b.shape != (rows, width) for b in blocks):
        raise ValueError(f"times_column_blocks: {a.shape} does not split into {len(blocks)} "
                         f"blocks of {[b.shape for b in blocks]}")  # fmt: skip
    ret = plgpu.ShapeDtypeStruct(a.shape, jnp.bfloat16, plgpu.Layout.WGMMA)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,) * (1 + len(blocks)), return_type=ret)
    def run(_, arr, *scales):
        regs, per = arr.registers, width // 8

        def block(i):
            part = regs[:, i * per : (i + 1) * per]
            return mgpu.FragmentedArray(_registers=part, _layout=arr.layout, _is_signed=None)

        parts = [(block(i) * s).registers for i, s in enumerate(scales)]
        return mgpu.FragmentedArray(
            _registers=np.concatenate(parts, axis=1), _layout=arr.layout, _is_signed=None
        )

    return run(a, *blocks)


def _asm_map(arr, ptx: str, n_out: int, extra=()):
    """Applies ``ptx`` (one 32-bit input ``$n_out``, then the 32-bit values ``extra``; ``n_out ≥
    2`` 32-bit outputs) to each 32-bit register of ``arr``; returns the array of
    ``2·n_out``-bf16 registers in ``arr``'s layout."""
    import jax.experimental.mosaic.gpu as mgpu
    from jax.experimental.mosaic.gpu import utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import llvm, vector

    i32 = ir.IntegerType.get_signless(32)
    bf16 = ir.BF16Type.get()
    out = np.empty(arr.registers.shape, dtype=object)
    for idx, reg in np.ndenumerate(arr.registers):
        word = utils.bitcast(reg, i32)
        constraints = ",".join(["=r"] * n_out + ["r"] * (1 + len(extra)))
        struct = llvm.inline_asm(
            llvm.StructType.get_literal([i32] * n_out), [word, *extra], ptx, constraints
        )
        regs = [llvm.extractvalue(i32, struct, [j]) for j in range(n_out)]
        vec = utils.vector_concat([vector.broadcast(ir.VectorType.get((1,), i32), r) for r in regs])
        out[idx] = utils.bitcast(vec, ir.VectorType.get((2 * n_out,), bf16))
    return mgpu.FragmentedArray(_registers=out, _layout=arr.layout, _is_signed=None)


def load_layout(bits: int):
    """The Pallas layout of the 32-bit-per-thread code loads (``bits`` = 4 or 8)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu.Layout.WGMMA_UPCAST_4X if bits == 4 else plgpu.Layout.WGMMA_8BIT


def _lane_address(table):
    """The shared-memory address of lane ``l``'s first entry of ``table`` (``(256, 32)`` words):
    its base + 4·l, as an i32."""
    from jax.experimental.mosaic.gpu import utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm

    i32 = ir.IntegerType.get_signless(32)
    base = llvm.ptrtoint(i32, utils.memref_ptr(table))
    lane = arith.remui(utils.thread_idx(), utils.c(LUT_LANES, i32))
    return arith.addi(base, arith.muli(lane, utils.c(4, i32)))


def decode(kind: str, codes, table=None):
    """``codes`` (a ``(64, S)`` Pallas array loaded in :func:`load_layout`) → bf16 in the WGMMA
    layout. ``kind``: ``"int"`` (signed int4 / int8 values), ``"e4m3"`` / ``"e5m2"``
    (``value · 2^-FP8_SCALE_LOG2``), ``"nf4"`` (the bf16 NF4 level); with ``table`` (4-bit codes:
    a shared-memory ref holding :func:`lut_words` of ``kind``) by the pair-table lookup."""
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp

    bits = 4 if codes.dtype == jnp.int4 else 8
    ret = plgpu.ShapeDtypeStruct(codes.shape, jnp.bfloat16, plgpu.Layout.WGMMA)
    if table is not None:
        if bits != 4:
            raise ValueError(f"decode: the pair table decodes 4-bit codes, not {codes.dtype}")

        @plgpu.inline_mgpu(arg_types=(load_layout(bits), plgpu.RefType()), return_type=ret)
        def run_lut(_, arr, lut):
            return as_wgmma(_asm_map(arr, _lut_ptx(), 4, (_lane_address(lut),)))

        return run_lut(codes, table)

    @plgpu.inline_mgpu(arg_types=(load_layout(bits),), return_type=ret)
    def run(_, arr):
        from jaxlib.mlir import ir

        if kind == "int":
            vals = arr.astype(ir.BF16Type.get())
        elif kind in FP8_SHIFT:
            vals = _asm_map(arr, _fp8_ptx(kind), 2)
        elif kind == "nf4":
            vals = _asm_map(arr, _nf4_ptx(), 4)
        else:
            raise ValueError(f"decode: unknown decoder {kind!r}")
        return as_wgmma(vals)

    return run(codes)


# -- codes loaded from HBM straight into registers ---------------------------------------------
ROWS = 64  # weight rows of one warp group's `wgmma` (M)
LDG_VEC = 4  # 32-bit words per thread and load instruction (128-bit loads)


def fragment_order(n_p: int, k_p: int, bits: int, bk: int) -> np.ndarray:
    """``order`` (int64, ``(n_p / 64 · k_p / bk, 128 · R)``, ``R = bk / (2v)``) with
    ``fragment[i, j] = words[order[i, j] // (k_p / v), order[i, j] % (k_p / v)]``, where
    ``words`` are the 32-bit words of ``bits``-bit codes already in :func:`stored_order` (``v``
    codes each).

    Row ``t · steps + s`` holds the ``bk``-code K step ``s`` of the 64-row tile ``t`` in the order
    a warp group loads it into registers, 128 bits per thread and load: word
    ``512 · i + 4 · tid + e`` is register ``j = 4i + e`` of thread ``tid`` in :func:`load_layout`
    (``WGMMA_UPCAST_4X`` / ``WGMMA_8BIT``), which holds row ``16w + 8h + r`` and word ``4b + q``
    of the step (``tid = 32w + 4r + q``, ``j = 2b + h``). Each load instruction of the warp group
    thus reads 2 KiB of consecutive bytes, and each thread gets exactly the words its ``wgmma``
    fragments need."""
    v = VEC[bits]
    nb = bk // (4 * v)  # blocks of 4 words (one per q) along a row of the step
    if n_p % ROWS or k_p % bk or nb % 2:
        raise ValueError(f"fragment_order: {n_p}×{k_p} does not split into 64-row tiles of "
                         f"{bk}-code steps (an even number of {4 * v}-code blocks)")  # fmt: skip
    per_row = k_p // v
    t, w, h, r, s, i, e2, q = np.meshgrid(
        *(np.arange(d) for d in (n_p // ROWS, 4, 2, 8, k_p // bk, nb // 2, 2, 4)), indexing="ij"
    )
    row = ROWS * t + 16 * w + 8 * h + r
    col = s * (bk // v) + 4 * (2 * i + e2) + q
    flat = row * per_row + col  # axes (t, w, h, r, s, i, e2, q)
    flat = flat.transpose(0, 4, 5, 1, 3, 7, 6, 2)  # (t, s, i, w, r, q, e2, h)
    return flat.reshape((n_p // ROWS) * (k_p // bk), -1)


FRAGMENT_CODES = 128  # K codes per fragment-major block of the 8-bit layouts (any K step of
#                       `bk` codes is `bk / 128` consecutive blocks: `fragment_order` of `bk`)


def _fragment_axes(n_p: int, k_p: int) -> tuple[int, ...]:
    """The ``(N_p, K_p)`` 8-bit codes (in :func:`stored_order`) as the axes ``(t, w, h, r, s, i,
    e2, q, b)``: row ``64t + 16w + 8h + r``, byte ``128s + 16(2i + e2) + 4q + b``."""
    if n_p % ROWS or k_p % FRAGMENT_CODES:
        raise ValueError(f"fragments: {n_p}×{k_p} codes do not split into {ROWS}-row × "
                         f"{FRAGMENT_CODES}-code blocks")  # fmt: skip
    return (n_p // ROWS, 4, 2, 8, k_p // FRAGMENT_CODES, 4, 2, 4, 4)


TO_FRAGMENTS = (0, 4, 5, 1, 3, 7, 6, 2, 8)  # (t, w, h, r, s, i, e2, q, b) → (t, s, i, w, r, q, e2,
#                                            h, b): `fragment_order`'s word order, bytes kept


def to_fragments(codes):
    """8-bit ``codes`` (``(N_p, K_p)``, :func:`stored_order`; ``jnp`` or ``numpy``) with each
    64-row × 128-code block's 8 KiB laid out fragment-major, blocks in (row tile, K) order — the
    bytes of :func:`fragment_order` for ``bk = 128``: byte ``16 · (512 · i + 4 · tid + e) + b`` of a
    block is byte ``b`` of register ``4i + e`` of thread ``tid`` in ``WGMMA_8BIT``. Each 64-row
    stripe keeps its own codes (the array's rows say which stripe, not which row); a K step of
    ``bk`` codes of a stripe is ``bk · 64`` consecutive bytes, which a warp group loads with
    128-bit loads, consecutive threads on consecutive 16 bytes (:func:`load_fragments`,
    :func:`fragment_slices`)."""
    n_p, k_p = codes.shape
    return codes.reshape(_fragment_axes(n_p, k_p)).transpose(TO_FRAGMENTS).reshape(n_p, k_p)


def from_fragments(codes):
    """Inverse of :func:`to_fragments`."""
    n_p, k_p = codes.shape
    axes = _fragment_axes(n_p, k_p)
    blocked = codes.reshape([axes[a] for a in TO_FRAGMENTS])
    return blocked.transpose(np.argsort(TO_FRAGMENTS)).reshape(n_p, k_p)


def fragment_blocks(codes):
    """The ``(N_p, K_p)`` codes of :func:`to_fragments` as its ``(N_p / 64, K_p / 128, 64, 128)``
    blocks (a reshape, free): a K step of a stripe is a box of consecutive blocks."""
    n_p, k_p = codes.shape
    return codes.reshape(n_p // ROWS, k_p // FRAGMENT_CODES, ROWS, FRAGMENT_CODES)


LDG_PTX = "ld.global.nc.L1::no_allocate.v4.u32"  # `load_fragments`' load: the read-only path,
#  no L1 lines (the codes are read once); 2 – 6 % faster than Mosaic GPU's own generic vector
#  load (`experiments/results/kernels/ldg_probe_nc.json`)


def load_fragments(ref):
    """One K step of fragment-major codes (a GMEM row ref of :func:`to_fragments`' bytes, or
    of :func:`fragment_order`'s ``uint32`` words: ``128 · R`` words) loaded into registers in
    Mosaic GPU's strided layout, ``uint32``: ``R / 4`` loads of 128 bits per thread
    (:data:`LDG_PTX`), thread ``tid``'s ``i``-th reading words ``512 · i + 4 · tid …``."""
    import jax.experimental.mosaic.gpu as mgpu
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm

    (n,) = ref.shape
    n = n * jnp.dtype(ref.dtype).itemsize // 4  # 32-bit words
    ret = plgpu.ShapeDtypeStruct((n,), jnp.uint32, plgpu.Layout.WG_STRIDED((n,), vec_size=LDG_VEC))

    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),), return_type=ret)
    def run(_, gmem):
        i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
        base = llvm.ptrtoint(i64, utils.memref_ptr(gmem))
        tid = arith.remui(utils.thread_idx(), utils.c(128, i32))
        offset = arith.extui(i64, arith.muli(tid, utils.c(4 * LDG_VEC, i32)))
        per = 128 * LDG_VEC
        regs = np.empty((n // per,), dtype=object)
        for i in range(n // per):
            addr = arith.addi(base, arith.addi(offset, utils.c(4 * per * i, i64)))
            words = llvm.inline_asm(
                llvm.StructType.get_literal([i32] * LDG_VEC),
                [addr],
                f"{LDG_PTX} {{$0, $1, $2, $3}}, [$4];",
                "=r,=r,=r,=r,l",
            )
            vec = llvm.mlir_undef(ir.VectorType.get((LDG_VEC,), i32))
            for e in range(LDG_VEC):
                word = llvm.extractvalue(i32, words, [e])
                vec = llvm.insertelement(vec, word, utils.c(e, i32))
            regs[i] = vec
        layout = fa.WGStridedFragLayout((n,), LDG_VEC)
        return mgpu.FragmentedArray(_registers=regs, _layout=layout, _is_signed=False)

    return run(ref)


def load_block(ref):
    """A shared-memory block of :func:`to_fragments` (``(…, 128)`` 8-bit, one 64-row × 128-code
    block, e.g. ``(64, 128)``) → its ``(64, 128)`` codes in :func:`load_layout`: one 128-bit
    ``ld.shared`` per thread and 16 codes (consecutive threads on consecutive 16 bytes, so
    conflict-free), against four 32-bit loads from a swizzled tile."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    raw = plgpu.load(ref, (), layout=plgpu.Layout.WG_STRIDED(ref.shape, vec_size=16))
    (codes,) = fragment_slices(raw, 8, FRAGMENT_CODES, ref.dtype)
    return codes


def fragment_slices(words, bits: int, width: int, dtype):
    """A K step of fragment-major codes in registers — :func:`load_fragments`' ``uint32`` words,
    or the 8-bit codes of a shared-memory block of :func:`to_fragments` loaded in
    ``WG_STRIDED`` with 16 codes (128 bits) per register — as the step's ``(64, width)`` slices
    of codes (``dtype``) in :func:`load_layout`: a relabelling of registers, no instruction."""
    import jax.experimental.mosaic.gpu as mgpu
    import jax.experimental.pallas.mosaic_gpu as plgpu
    import jax.numpy as jnp
    from jax.experimental.mosaic.gpu import utils
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import vector

    v = VEC[bits]
    in_bits = 4 if words.dtype == jnp.int4 else 8 * jnp.dtype(words.dtype).itemsize
    in_vec = 32 * LDG_VEC // in_bits  # elements per 128-bit register
    n = math.prod(words.shape) * in_bits // 32  # 32-bit words
    per = width // (4 * v)  # blocks of a slice
    signed = bool(jnp.issubdtype(dtype, jnp.signedinteger))
    n_slices = n // 128 // 2 // per
    layout = load_layout(bits)
    ret = tuple(plgpu.ShapeDtypeStruct((ROWS, width), dtype, layout) for _ in range(n_slices))

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WG_STRIDED(words.shape, vec_size=in_vec),),
                       return_type=ret)  # fmt: skip
    def run(_, arr):
        i32 = ir.IntegerType.get_signless(32)
        code_t = ir.IntegerType.get_signless(bits)
        mlayout = layout.to_mgpu()
        quads = [utils.bitcast(r, ir.VectorType.get((LDG_VEC,), i32)) for r in arr.registers.flat]
        out = []
        for sl in range(n_slices):
            regs = np.empty(mlayout.registers_shape((ROWS, width)), dtype=object)
            for b in range(per):
                for h in range(2):
                    j = 2 * (sl * per + b) + h
                    word = vector.extract(quads[j // LDG_VEC], [], [j % LDG_VEC])
                    one = vector.broadcast(ir.VectorType.get((1,), i32), word)
                    regs[0, b, 0, 0, h, 0, 0, 0, 0] = utils.bitcast(
                        one, ir.VectorType.get((v,), code_t)
                    )
            out.append(mgpu.FragmentedArray(_registers=regs, _layout=mlayout, _is_signed=signed))
        return tuple(out)

    return run(words)
