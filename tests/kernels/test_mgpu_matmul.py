"""The Mosaic GPU kernel's layouts (``gpu_i4t``, ``gpu_i8t``, ``gpu_nf4t``, ``gpu_f8t``), register
decoders, configs and lowering, on the CPU.

This jax version cannot interpret a warp-specialized Mosaic GPU pipeline on the CPU, so the
kernel's numbers are checked on the H100 (``python -m experiments.kernel_bench --check``,
``experiments/results/kernels/``); here: the repack is exact, the layouts dequantize to the
float64 reference, the decoders' bit manipulations (mirrored in numpy) give every FP8 byte and
NF4 code exactly, every table config traces to a kernel that fits shared memory and lowers to
Mosaic GPU code with ``wgmma``, the large-M path is right, ``x`` goes in without a pad along ``K``
where its tiles allow, and a direct call on the CPU fails with a clear error.
"""

import dataclasses
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _testing import logged_tilings
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
from experiments.mgpu_probe_lib import retraced
from qjax import ops
from qjax.errors import FormatError, ShapeError
from qjax.formats.nf4 import nf4_levels
from qjax.kernels import repack as rp
from qjax.kernels.gpu import mgpu_decode as dec
from qjax.kernels.gpu import mgpu_matmul as mg

INT_SPECS = [
    qjax.Int(4, group=128),
    qjax.Int(4, group=128, symmetric=False),
    qjax.Int(4, group=256),
    qjax.Int(4, group="channel", symmetric=False),
    qjax.Int(8, group="channel"),
    qjax.Int(8, group=128, symmetric=False),
]
SPECS = INT_SPECS + [
    qjax.NF4(),
    qjax.NF4(block=128, double_quant=True),
    qjax.FP8("e4m3", group="channel"),
    qjax.FP8("e5m2", group="channel"),
]


def _layout(spec):
    if isinstance(spec, qjax.NF4):
        return "gpu_nf4t"
    if isinstance(spec, qjax.FP8):
        return "gpu_f8t"
    return "gpu_i4t" if spec.bits == 4 else "gpu_i8t"


def _bits(spec):
    return rp.LAYOUTS[_layout(spec)]


def _weight(spec, k, n, seed):
    w = jax.random.normal(jax.random.key(seed), (k, n)) * (1 + jnp.arange(n) / n)
    return spec.quantize(w)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("shape", [(300, 200), (1024, 384), (640, 129)])
def test_repack_is_exact_and_dequantizes_to_reference(spec, shape):
    seed = int(np.random.default_rng().integers(1 << 30))
    q = _weight(spec, *shape, seed)
    r = rp.repack(q, _layout(spec))
    layout = _layout(spec)
    k_p, n_p, g_p = rp.padded_dims(q, layout)
    assert r.codes.dtype == rp.SLICED_DTYPES[layout]
    assert r.codes.shape == (n_p, k_p) and n_p % 128 == 0
    assert r.scales.shape == (g_p, n_p)
    back = rp.unrepack(r)
    if isinstance(spec, qjax.Int):  # bit-exact (NF4 absmaxes are rounded to bf16, FP8 below)
        for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(q.codes))
    # stored codes = the canonical codes, shifted, transposed, in the kernel's register order
    # (8-bit: then each 64-row × 128-code block fragment-major)
    codes = np.asarray(rp.unpack_codes(r), np.int64)
    shift = 0 if layout == "gpu_f8t" else 2 ** (_bits(spec) - 1)
    stored = np.asarray(r.codes.astype(jnp.int32) if _bits(spec) == 4 else r.codes, np.int64)
    want = (codes.T - shift)[:, dec.stored_order(k_p, _bits(spec))]
    np.testing.assert_array_equal(dec.to_fragments(want) if _bits(spec) == 8 else want, stored)
    ref = np.asarray(q.dequantize(), np.float64)
    got = np.asarray(rp.dequantize_bf16(r), np.float64)[: shape[0], : shape[1]]
    if isinstance(spec, qjax.NF4):  # exactly bf16(L[c]·a), L and a rounded to bf16 first
        import ml_dtypes

        bf = ml_dtypes.bfloat16
        levels = np.asarray(nf4_levels(), np.float32).astype(bf).astype(np.float64)
        a = np.asarray(spec.absmax(q), np.float32).astype(bf).astype(np.float64)
        a_k = np.repeat(a, spec.block, axis=0)[: shape[0], : shape[1]]
        want = (levels[codes[: shape[0], : shape[1]]] * a_k).astype(bf).astype(np.float64)
        np.testing.assert_array_equal(got, want)
    rtol = 2**-6 if isinstance(spec, qjax.NF4) else 2**-8  # NF4: three bf16 roundings
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize(
    ("bits", "layout", "other"), [(4, "gpu_i4t", "gpu_i4p"), (8, "gpu_i8t", "gpu_i8")]
)
def test_small_groups_are_refused_with_the_layout_named(group, bits, layout, other):
    q = _weight(qjax.Int(bits, group=group), 256, 128, 0)
    with pytest.raises(ShapeError, match=f"{layout}.*'{other}'"):
        rp.repack(q, layout)


@pytest.mark.parametrize(
    ("spec", "layout", "other"),
    [
        (qjax.NF4(block=32), "gpu_nf4t", "gpu_nf4"),
        (qjax.FP8("e4m3", group=128), "gpu_f8t", "gpu_f8"),
    ],
)
def test_nf4_small_blocks_and_fp8_groups_are_refused(spec, layout, other):
    with pytest.raises(ShapeError, match=f"{layout}.*'{other}'"):
        rp.repack(_weight(spec, 256, 128, 0), layout)


# -- the stored order and the register decoders (numpy mirror of the PTX) ----------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_stored_order_puts_each_threads_wgmma_columns_in_its_32_bit_load(bits):
    # WGMMA layout: in each 8-column block, lane q (mod 4) holds columns 2q, 2q + 1; the 32-bit
    # load gives lane q the v stored columns v·q .. v·q + v − 1 of each block of 4v
    v, k = dec.VEC[bits], 256
    order = dec.stored_order(k, bits)
    assert sorted(order) == list(range(k))
    for block in range(k // (4 * v)):
        for q in range(4):
            got = order[block * 4 * v + v * q : block * 4 * v + v * (q + 1)]
            want = [c for c in range(block * 4 * v, (block + 1) * 4 * v) if c % 8 // 2 == q]
            assert list(got) == want
    x = np.random.default_rng().integers(0, 99, (3, k))
    np.testing.assert_array_equal(dec.to_stored(x, bits), x[:, order])
    np.testing.assert_array_equal(dec.to_logical(dec.to_stored(x, bits), bits), x)
    xb = jax.random.normal(jax.random.key(int(x[0, 0])), (3, k), jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(dec.x_to_stored(xb, bits)), np.asarray(xb)[:, order])


def _bf16_values(regs):
    """Decoder output registers (uint32, two bf16 each) → float64 values in element order."""
    import ml_dtypes

    halves = np.stack([regs & 0xFFFF, regs >> 16], -1).astype(np.uint16)
    return halves.reshape(*regs.shape[:-1], -1).view(ml_dtypes.bfloat16).astype(np.float64)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_decoder_is_exact_for_every_byte(fmt):
    import ml_dtypes

    b = np.arange(256, dtype=np.uint32)
    words = b[0::4] | b[1::4] << 8 | b[2::4] << 16 | b[3::4] << 24
    got = _bf16_values(dec.emulate(fmt, words)).reshape(-1) * 2.0 ** dec.FP8_SCALE_LOG2[fmt]
    dtype = ml_dtypes.float8_e4m3fn if fmt == "e4m3" else ml_dtypes.float8_e5m2
    ref = b.astype(np.uint8).view(dtype).astype(np.float64)
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[finite], ref[finite])
    np.testing.assert_array_equal(np.signbit(got[finite]), np.signbit(ref[finite]))


def test_nf4_decoder_gives_the_bf16_level_of_every_code_in_every_position():
    import ml_dtypes

    rng = np.random.default_rng()
    c = np.concatenate([np.arange(16).repeat(8).reshape(16, 8), rng.integers(0, 16, (500, 8))])
    words = np.zeros(len(c), np.uint32)
    for j in range(8):  # stored as c − 8 in int4: the nibble is c ^ 8
        words |= ((c[:, j] ^ 8).astype(np.uint32)) << (4 * j)
    got = _bf16_values(dec.emulate("nf4", words))
    levels = np.asarray(nf4_levels(), np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(got, levels[c])


@pytest.mark.parametrize("kind", ["int", "nf4"])
def test_pair_table_decoder_gives_every_code_pair_in_every_lane(kind):
    import ml_dtypes

    rng = np.random.default_rng()
    c = rng.integers(0, 16, (4096, 8))  # 128 words per lane
    words = np.zeros(len(c), np.uint32)
    for j in range(8):  # stored as c − 8 in int4: the nibble is c ^ 8
        words |= ((c[:, j] ^ 8).astype(np.uint32)) << (4 * j)
    table = dec.lut_words(kind)
    got = _bf16_values(dec.emulate("lut", words, table))
    levels = np.asarray(nf4_levels()) if kind == "nf4" else np.arange(16) - 8.0
    ref = levels.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    np.testing.assert_array_equal(got, ref[c])
    assert np.all(table == table[:, :1])  # every lane's copy is the same table
    ptx = dec._lut_ptx()
    assert ptx.count("ld.shared.b32") == 4 and f"{4 * dec.LUT_LANES}, $5" in ptx


def test_ptx_uses_the_emulated_constants():
    lo, hi = dec.nf4_tables()
    ptx = dec._nf4_ptx()
    assert all(f"{w:#010x}" in ptx for w in lo + hi)
    assert ptx.count("prmt.b32") == 16
    assert "shr.b32 mag, lane, 3;" in dec._fp8_ptx("e5m2")


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 16, 32, 64, 100, 128, 300, 1024, 2048, 4096, 8192])
@pytest.mark.parametrize(("k", "n"), [(8192, 8192), (8192, 57344), (28672, 8192), (640, 384)])
def test_table_configs_fit_shared_memory_and_divide_k(bits, m, k, n):
    cfg = mg.pick(m, k, n, bits)
    _, bm = mg.padded_rows(m, cfg.block_m)
    assert cfg.path == "mgpu" and cfg.stages >= 2
    assert k % cfg.block_k == 0 and cfg.block_k % mg.SLICE == 0
    n_tiles, steps = -(-n // 128), k // cfg.block_k
    assert (n_tiles * steps) % cfg.cta_steps == 0
    whole = bm > mg.MAX_BLOCK_M
    if whole:  # 256-row blocks: whole weight tiles per CTA, y written by the kernel
        assert cfg.cta_steps % steps == 0 and cfg.fused
    assert mg.smem_bytes(bm, cfg.block_k, cfg.stages, bits, whole=whole) <= mg.SMEM_BYTES
    assert mg.pick(mg.MAX_ROWS, k, n).path == "mgpu"
    assert mg.pick(mg.MAX_ROWS + 1, k, n).path == "xla"


@pytest.mark.parametrize(
    ("n", "k", "m", "block_m"),
    [
        (8192, 8192, 256, 128),  # 256-row blocks: 64 CTAs
        (10240, 8192, 512, 128),  # 80 tiles: whole tiles per CTA leave 52 SMs idle
        (10240, 8192, 1024, 128),
        (8192, 8192, 512, 256),
        (57344, 8192, 512, 256),
        (8192, 8192, 1024, 256),
        (8192, 28672, 1024, 256),
        (8192, 8192, 2048, 256),
        (10240, 8192, 2048, 256),
        (8192, 28672, 4096, 256),
    ],
)
def test_pick_takes_the_row_blocks_that_won_on_the_h100(n, k, m, block_m):
    # large_m_mgpu_probe_bm256*.json: the faster of the 128- and 256-row configs, int4
    assert mg.pick(m, k, n).block_m == block_m


@pytest.mark.parametrize("m", [2048, 4096, 4097, 8192])
def test_jobs_are_grouped_above_grouped_rows(m):
    cfg = mg.pick(m, 8192, 8192)
    assert cfg.block_m == 256 and cfg.grouped == (m > mg.GROUPED_ROWS)
    assert mg.pick(m, 8192, 8192 * 4).grouped == (m > mg.GROUPED_ROWS)


def test_256_row_blocks_decode_nf4_in_registers():
    # beside the pair table (32 KB) only one pipeline stage of 256 rows fits
    w = rp.repack(_weight(SPECS[6], 1024, 8192, 1), "gpu_nf4t")
    cfg = mg.config_for(w, 2048)
    assert cfg.block_m == 256 and not cfg.lut and cfg.stages == 2
    assert mg.config_for(w, 16).lut and mg.config_for(w, 128).lut


@pytest.mark.parametrize("m", [1, 7, 8, 9, 16, 33, 100, 128, 129, 300])
def test_rows_of_x_go_to_wgmma_in_steps_of_8(m):
    m_p, bm = mg.padded_rows(m)
    assert m_p >= m and bm % 8 == 0 and m_p % bm == 0 and bm <= mg.MAX_BLOCK_M
    assert m_p - m < max(8, bm)  # never a whole wasted 8-row step below 128 rows


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("m", [1, 32, 64])
def test_scales_go_on_float32_sums_up_to_32_rows_except_nf4(spec, m):
    w = rp.repack(_weight(spec, 1024, 256, 1), _layout(spec))
    cfg = mg.table_config(w, m)
    assert cfg.scale_acc == (m <= 32 and not isinstance(spec, qjax.NF4))
    assert cfg.lut == isinstance(spec, qjax.NF4)  # NF4 decoded by the pair table
    assert mg.smem_bytes(8 * -(-m // 8), cfg.block_k, cfg.stages, _bits(spec), mg.slice_codes(w),
                         cfg.lut) <= mg.SMEM_BYTES  # fmt: skip


@given(
    n_tiles=st.integers(1, 600),
    steps=st.integers(1, 64),
    m_tiles=st.integers(1, 32),
)
@settings(max_examples=200, deadline=None)
def test_whole_tile_schedule_gives_each_cta_whole_tiles_in_the_fewest_step_waves(
    n_tiles, steps, m_tiles
):
    length = mg.schedule(n_tiles, steps, m_tiles, whole=True)
    assert length % steps == 0 and (n_tiles * steps) % length == 0

    def cost(d):  # waves × (steps per CTA + ramp), as `schedule` weighs it
        return -(-(n_tiles * steps // d) * m_tiles // mg.NUM_SMS) * (d + mg.RAMP_STEPS)

    divisors = [t * steps for t in range(1, n_tiles + 1) if n_tiles % t == 0]
    assert cost(length) == min(cost(d) for d in divisors)


@pytest.mark.parametrize(
    ("n_tiles", "m_tiles", "per_cta"), [(64, 32, 16), (80, 8, 5), (448, 16, 56), (3, 5, 1)]
)
def test_grouped_jobs_cover_every_row_block_and_tile_once(n_tiles, m_tiles, per_cta):
    n_ctas = n_tiles * m_tiles // per_cta
    group = max(g for g in range(1, mg.GROUP_M + 1) if m_tiles % g == 0)
    cta, i = np.meshgrid(np.arange(n_ctas), np.arange(per_cta), indexing="ij")
    m_block, tile = mg.grouped_job(cta, i, n_ctas, n_tiles, group)
    pairs = set(zip(m_block.ravel().tolist(), tile.ravel().tolist(), strict=True))
    assert pairs == {(m, t) for m in range(m_tiles) for t in range(n_tiles)}
    # the CTAs running together (one job each) stay within one group of row blocks
    first = m_block[:, 0]
    assert first.max() - first.min() < max(group, -(-n_ctas // n_tiles))


def test_only_two_stages_of_256_rows_fit_and_only_without_float32_staging():
    # 2 × (8 KB weight + 64 KB x + scales) + the bf16 y tiles: 210 KB; a third stage or the
    # float32 partial-sum tiles (128 KB) of a split tile would not fit
    assert mg.smem_bytes(256, 128, 2, whole=True) <= mg.SMEM_BYTES
    assert mg.smem_bytes(256, 128, 3, whole=True) > mg.SMEM_BYTES
    assert mg.smem_bytes(256, 128, 2, whole=False) > mg.SMEM_BYTES


def test_stream_k_schedule_fills_the_sms_in_one_wave_where_it_can():
    # 10240×8192 in 512-code steps: 80 tiles × 16 steps = 1280 steps; 128 CTAs of 10 steps
    # (one wave) beat split-K's best (320 CTAs of 4 steps: three waves)
    assert mg.schedule(80, 16) == 10
    assert mg.schedule(64, 16) == 8
    assert mg.schedule(448, 16) == 56
    for n_tiles, steps in [(5, 5), (7, 3), (448, 64), (1, 1), (131, 1)]:
        length = mg.schedule(n_tiles, steps)
        ctas = n_tiles * steps // length
        assert n_tiles * steps % length == 0
        assert ctas <= mg.NUM_SMS or length == 1


def _stream_k_case(n_tiles, steps, data, seed, shape):
    """A stream-K case: ``(total steps, K steps per CTA (a drawn divisor), per-step random
    contributions of ``shape``, segments)``."""
    total = n_tiles * steps
    length = data.draw(st.sampled_from([d for d in range(1, total + 1) if total % d == 0]))
    contrib = np.random.default_rng(seed).standard_normal((total, *shape)).astype(np.float32)
    return total, length, contrib, mg.segments(n_tiles, steps, length)


@settings(max_examples=60, deadline=None)
@given(n_tiles=st.integers(1, 12), steps=st.integers(1, 9), data=st.data(), seed=st.integers(0, 99))
def test_stream_k_partials_combine_to_the_full_sum(n_tiles, steps, data, seed):
    # emulate the kernel: CTA c takes K steps [c·L, (c+1)·L) of the tiles end to end and flushes
    # its sum for tile t (at the tile's last step or its own) into slot c − first_cta(t);
    # slots never written hold NaN and must not reach the result
    total, length, contrib, seg = _stream_k_case(n_tiles, steps, data, seed, (2, 3))
    slots = int((seg[:, 1] - seg[:, 0]).max()) + 1
    parts = np.full((slots, n_tiles * 2, 3), np.nan, np.float32)
    for c in range(total // length):
        acc = np.zeros((2, 3), np.float32)
        for g in range(c * length, (c + 1) * length):
            t = g // steps
            acc += contrib[g]
            if g % steps == steps - 1 or g == (c + 1) * length - 1:
                parts[c - t * steps // length, 2 * t : 2 * t + 2] = acc
                acc[:] = 0
    got = np.asarray(mg.combine(jnp.asarray(parts), n_tiles, steps, length))
    want = contrib.reshape(n_tiles, steps, 2, 3).sum(1).reshape(n_tiles * 2, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=80, deadline=None)
@given(n_tiles=st.integers(1, 12), steps=st.integers(1, 9), data=st.data(), seed=st.integers(0, 99))
def test_fused_epilogue_hands_every_partial_sum_to_the_tiles_first_cta(n_tiles, steps, data, seed):
    # emulate the fused kernel (all CTAs in one wave, step kk of every CTA at time kk): a CTA
    # that did not take a tile's first step writes its sum to workspace slot c − c0 − 1 and
    # signals after its next step (or at once at its last); the tile's first CTA waits until the
    # later CTAs have signalled, then adds the slots and writes y. Unwritten slots hold NaN.
    total, length, contrib, seg = _stream_k_case(n_tiles, steps, data, seed, (3,))
    ws = np.full((max(int((seg[:, 1] - seg[:, 0]).max()), 1), n_tiles, 3), np.nan, np.float32)
    signals: dict[int, list[tuple[int, int]]] = {t: [] for t in range(n_tiles)}  # (time, cta)
    waits = []  # (time, cta, tile, later CTAs, own sum)
    for c in range(total // length):
        acc = np.zeros(3, np.float32)
        for kk in range(length):
            g = c * length + kk
            t, c0 = g // steps, g // steps * steps // length
            acc += contrib[g]
            if g % steps == steps - 1 or kk == length - 1:
                if c != c0:
                    assert np.isnan(ws[c - c0 - 1, t]).all()  # each slot written once
                    ws[c - c0 - 1, t] = acc
                    signals[t].append((kk if kk == length - 1 else kk + 1, c))
                else:
                    waits.append((kk, c, t, ((t + 1) * steps - 1) // length - c0, acc))
                acc = np.zeros(3, np.float32)
    y = np.full((n_tiles, 3), np.nan, np.float32)
    for kk, c, t, later, own in waits:
        # it waits for exactly the later CTAs of its tile, each signalling once, after writing
        assert sorted(cta for _, cta in signals[t]) == list(range(c + 1, c + 1 + later))
        y[t] = own + ws[:later, t].sum(0)
        # a CTA signals before it waits, so CTAs dispatched in order always make progress
        assert all(when <= kk for sigs in signals.values() for when, cs in sigs if cs == c)
    np.testing.assert_allclose(y, contrib.reshape(n_tiles, steps, 3).sum(1), rtol=1e-5, atol=1e-5)
    handoffs_late = any(when == length - 1 for sigs in signals.values() for when, _ in sigs)
    assert mg.handoffs_early(n_tiles, steps, length) == (not handoffs_late)


@pytest.mark.parametrize("fused", [False, True])
def test_fused_config_lowers_with_semaphores_and_a_transposed_store(fused):
    w = rp.repack(_weight(SPECS[4], 1024, 256, 1), "gpu_i8t")
    x = jax.random.normal(jax.random.key(2), (16, 1024), jnp.bfloat16)
    cfg = dataclasses.replace(mg.table_config(w, 16), fused=fused)
    out = jax.eval_shape(lambda x, w: mg._mgpu_matmul(x, w, cfg), x, w)
    assert out.shape == (16, 256) and out.dtype == jnp.bfloat16
    lowered = jax.jit(lambda x, w: mg._mgpu_matmul(x, w, cfg)).trace(x, w)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert ("red.release.gpu.global.add" in text) == fused
    assert ("stablehlo.transpose" in text) != fused  # unfused: XLA transposes the partial sums


@pytest.mark.parametrize("spec", [*SPECS[:2], *SPECS[4:]], ids=lambda s: s.label())
@pytest.mark.parametrize("m", [1, 16, 64, 128])
def test_kernel_traces_for_every_table_config(spec, m):
    w = rp.repack(_weight(spec, 1024, 256, 1), _layout(spec))
    x = jax.random.normal(jax.random.key(2), (m, 1024), jnp.bfloat16)
    cfg = mg.table_config(w, m)
    out = jax.eval_shape(lambda x, w: mg._mgpu_matmul(x, w, cfg), x, w)
    assert out.shape == (m, 256) and out.dtype == jnp.bfloat16
    jaxpr = str(jax.make_jaxpr(lambda x, w: mg._mgpu_matmul(x, w, cfg))(x, w))
    assert "wgmma" in jaxpr and "inline_mgpu" in jaxpr


@pytest.mark.parametrize(
    ("spec", "m"),
    [
        (SPECS[1], 16),
        (SPECS[4], 1),
        (SPECS[6], 16),
        (SPECS[8], 100),
        (SPECS[0], 128),
        (SPECS[6], 300),
        (SPECS[0], 2048),
        (SPECS[4], 700),
        (SPECS[6], 2048),
    ],  # fmt: skip
    ids=lambda v: v.label() if hasattr(v, "label") else str(v),
)
def test_kernel_lowers_to_mosaic_gpu_with_its_decoder(spec, m):
    # lowering for CUDA runs on the CPU: layout inference, the decoders' inline_mgpu bodies
    # (their PTX strings) and the wgmma / TMA pipeline are all built; only ptxas needs the GPU
    w = rp.repack(_weight(spec, 1024, 256, 1), _layout(spec))
    x = jax.random.normal(jax.random.key(2), (m, 1024), jnp.bfloat16)
    cfg = mg.table_config(w, m)
    assert cfg.path == "mgpu" and cfg.m_inner == (m > mg.MAX_BLOCK_M)
    lowered = jax.jit(lambda x, w: mg._mgpu_matmul(x, w, cfg)).trace(x, w)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    if isinstance(spec, qjax.NF4):  # the pair table's loads (not with 256-row blocks)
        assert cfg.lut == (cfg.block_m == mg.MAX_BLOCK_M)
        assert ("ld.shared.b32" in text) == cfg.lut


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("spec", [SPECS[1], SPECS[6], SPECS[8]], ids=lambda s: s.label())
def test_256_row_blocks_lower_with_whole_tiles_per_cta(spec, grouped):
    w = rp.repack(_weight(spec, 1024, 384, 1), _layout(spec))
    x = jax.random.normal(jax.random.key(2), (700, 1024), jnp.bfloat16)
    cand = dataclasses.replace(mg.TABLE[mg.MAX_ROWS][1], grouped=grouped)
    cfg = mg.config_for(w, 700, cand)
    assert cfg.block_m == 256 and cfg.fused and cfg.cta_steps % (1024 // cfg.block_k) == 0
    assert cfg.grouped == grouped
    lowered = jax.jit(lambda x, w: mg._mgpu_matmul(x, w, cfg)).trace(x, w)
    assert "mosaic_gpu" in lowered.lower(lowering_platforms=("cuda",)).as_text()


@given(
    decode=st.sampled_from(["int", "nf4", "e4m3"]),
    span=st.sampled_from([64, 128]),
    steps=st.integers(1, 8),
    by_slice=st.booleans(),
    nf4=st.sampled_from([64, 128, 256]),
)
def test_loads_are_whole_scale_blocks_dividing_the_step(decode, span, steps, by_slice, nf4):
    bk = 128 * steps
    load = mg.load_codes(decode, span, bk, by_slice, nf4)
    assert load % span == 0 and bk % load == 0
    wide = decode == "nf4" and not by_slice and nf4 % span == 0 and bk % nf4 == 0
    assert load == (nf4 if wide else span)


def _main_lowered_with_nf4_loads(w, m: int, codes: int, cfg=None) -> tuple[str, list]:
    """This kernel (``cfg``, default the table's) for ``m`` rows of ``x`` lowered for CUDA with
    ``codes`` NF4 codes per tile row, decode and ``wgmma``: its text and its shared-memory
    tilings ``(elements per row, bits, operand)``."""
    tiles = []
    x = jax.ShapeDtypeStruct((m, w.codes.shape[1]), jnp.bfloat16)
    with retraced(mock.patch.object(mg, "NF4_LOAD_CODES", codes), logged_tilings(tiles)):
        cfg = mg.config_for(w, m, cfg) if cfg else mg.table_config(w, m)
        assert cfg.path == "mgpu"
        f = jax.jit(lambda x, w: mg._mgpu_matmul(x, w, cfg))
        return f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text(), tiles


@pytest.mark.parametrize(("m", "block_m"), [(64, 128), (700, 256)])
def test_nf4_tile_rows_span_two_scale_blocks_by_default(m, block_m):
    # 128 codes: two 64-code scale blocks per tile row (64-byte TMA rows), decode and `wgmma`, as
    # in the skinny kernel; both the pair-table (128-row blocks) and register (256) decoders.
    # Measured on the H100 (`nf4_main_wide_probe*.json`): 8.4 – 9.5 % faster than 64 at M ≤ 16,
    # within ±4 % from 64 rows up (faster in 16 of 20 cases); 64 still lowers
    assert mg.NF4_LOAD_CODES == 128
    w = rp.repack(_weight(qjax.NF4(), 1024, 384, 1), "gpu_nf4t")
    cand = mg.TABLE[mg.MAX_ROWS][1] if block_m == 256 else None
    wide, wide_tiles = _main_lowered_with_nf4_loads(w, m, mg.NF4_LOAD_CODES, cand)
    narrow, narrow_tiles = _main_lowered_with_nf4_loads(w, m, 64, cand)
    assert "mosaic_gpu" in wide and "mosaic_gpu" in narrow and wide != narrow
    assert (128, 4, "lhs") in wide_tiles and (64, 4, "lhs") not in wide_tiles
    assert (64, 4, "lhs") in narrow_tiles and (128, 4, "lhs") not in narrow_tiles
    assert "swizzle<64 : i32>" in wide


def test_int4_with_zeros_is_the_same_kernel_whatever_nf4_loads():
    w = rp.repack(_weight(SPECS[1], 1024, 256, 1), "gpu_i4t")
    assert _main_lowered_with_nf4_loads(w, 64, 64)[0] == _main_lowered_with_nf4_loads(w, 64, 128)[0]


def test_direct_call_on_cpu_says_it_needs_a_gpu():
    w = rp.repack(_weight(SPECS[0], 256, 128, 3), "gpu_i4t")
    x = jnp.ones((4, 256), jnp.bfloat16)
    with pytest.raises(FormatError, match="needs a GPU"):
        mg.matmul(x, w)
    with pytest.raises(FormatError, match="gpu_i4t"):
        mg.matmul(x, rp.repack(_weight(SPECS[0], 256, 128, 3), "gpu_i4p"))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_large_m_takes_xla_and_matches_float64(spec):
    seed = int(np.random.default_rng().integers(1 << 30))
    q = _weight(spec, 384, 200, seed)
    w = rp.repack(q, _layout(spec))
    x = jax.random.normal(jax.random.key(seed + 1), (3, 2740, 384), jnp.bfloat16)  # 8220 rows
    assert mg.config_for(w, 8220).path == "xla"
    y = np.asarray(mg.matmul(x, w), np.float64)
    ref = np.asarray(x, np.float64) @ np.asarray(q.dequantize(), np.float64)
    assert y.shape == (3, 2740, 200)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-2


@pytest.mark.parametrize(
    ("fmt", "layout"),
    [("int", "gpu_i4t"), ("int", "gpu_i8t"), ("nf4", "gpu_nf4t"), ("fp8", "gpu_f8t")],
)
def test_registered_for_gpu(fmt, layout):
    names = [k.name for k in ops._KERNELS[("gpu", fmt, layout)]]
    assert names == [f"pallas_mosaic_gpu_{layout}"]


def test_stored_bytes_count_two_codes_per_byte():
    q = _weight(SPECS[0], 1024, 256, 4)
    r = rp.repack(q, "gpu_i4t")
    # int4 codes, bf16 scales one row per 128 codes: 4 + 16/128 = 4.125 bits per weight
    assert r.nbytes == 256 * 1024 // 2 + 2 * (1024 // 128) * 256
    assert r.bits_per_weight == pytest.approx(4.125)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), max_size=2),
    k=st.one_of(st.integers(1, 17).map(lambda j: j * mg.X_TILE_COLS), st.integers(1, 1100)),
    extra=st.sampled_from([0, 64, 128, 512]),
)
def test_kernel_rows_pads_x_only_where_its_tiles_do_not_fit(lead, k, extra):
    # the kernels read x's columns past K as zeros (TMA); a K that is not a multiple of the
    # tiles' columns is padded with zeros to K_p as for the Triton kernels
    k_p = -(-k // 128) * 128 + extra
    x = jax.random.normal(jax.random.key(k), (*lead, k), jnp.bfloat16)
    x2 = mg.kernel_rows(x, k_p)
    rows = int(np.prod(lead, dtype=int))
    want_k = k if k % mg.X_TILE_COLS == 0 else k_p
    assert x2.shape == (rows, want_k)
    np.testing.assert_array_equal(np.asarray(x2[:, :k]), np.asarray(x).reshape(rows, k))
    assert not np.asarray(x2[:, k:]).any()


@pytest.mark.parametrize(("spec", "m"), [(SPECS[0], 1), (SPECS[6], 16), (SPECS[8], 64),
                                         (SPECS[1], 128)], ids=str)  # fmt: skip
def test_kernels_read_x_without_a_pad_where_k_is_whole_tiles(spec, m):
    # SmolLM2's 576-wide layers, K_p = 640: no XLA pad of x before the kernel (the skinny kernel
    # at M ≤ 16, the main one above; rows are padded to a multiple of 8 above 8 rows, not here)
    w = rp.repack(_weight(spec, 576, 192, 1), _layout(spec))
    assert w.codes.shape[1] == 640
    x = jax.random.normal(jax.random.key(2), (m, 576), jnp.bfloat16)
    cfg = mg.config_for(w, m)
    assert cfg.path == ("skinny" if m <= 16 else "mgpu")

    def product(x, w):
        from qjax.kernels.gpu import mgpu_skinny

        x2 = mg.kernel_rows(x, w.codes.shape[1])
        run = mgpu_skinny.matmul_rows if cfg.path == "skinny" else mg._mgpu_matmul
        return run(x2, w, cfg)

    assert jax.eval_shape(product, x, w).shape == (m, w.codes.shape[0])
    text = jax.jit(product).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "stablehlo.pad" not in text
    operands = re.search(r"custom_call @mosaic_gpu\w*\(.*?: \((.*?)\) ->", text, re.S)
    assert f"tensor<{m}x576xbf16>" in operands.group(1)
