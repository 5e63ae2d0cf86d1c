"""The skinny Mosaic GPU kernel (:mod:`qjax.kernels.gpu.mgpu_skinny`: one warp group per CTA,
several CTAs per SM) on the CPU: when the dispatch takes it, its stream-K schedule and clusters,
that its configs fit their share of shared memory, that it lowers to Mosaic GPU code, and its
errors.
Its numbers are checked on the H100 (``python -m experiments.occupancy_probe``,
``python -m experiments.kernel_bench --check``)."""

import dataclasses
import functools
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from _testing import logged_tilings
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
from experiments.mgpu_probe_lib import retraced
from qjax.errors import ShapeError
from qjax.kernels import repack as rp
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk

SKINNY = [  # (spec, layout) the kernel takes: symmetric codes
    (qjax.Int(4, group=128), "gpu_i4t"),
    (qjax.Int(4, group="channel"), "gpu_i4t"),
    (qjax.Int(8, group="channel"), "gpu_i8t"),
    (qjax.FP8("e4m3", group="channel"), "gpu_f8t"),
    (qjax.NF4(), "gpu_nf4t"),
]
MAIN_ONLY = [(qjax.Int(4, group=128, symmetric=False), "gpu_i4t")]  # zeros


def _abstract(spec, layout, k, n):
    """The repacked weight's shapes and metadata only (no 57344 × 8192 array made)."""
    return jax.eval_shape(lambda: rp.repack(spec.quantize(jnp.zeros((k, n), jnp.float32)), layout))


def _weight(spec, layout, k, n, seed=0):
    w = jax.random.normal(jax.random.key(seed), (k, n)) * (1 + jnp.arange(n) / n)
    return rp.repack(spec.quantize(w), layout)


@pytest.mark.parametrize(("spec", "layout"), SKINNY + MAIN_ONLY, ids=lambda v: str(v))
@pytest.mark.parametrize("m", [1, 16, 17])
@pytest.mark.parametrize(("n", "k"), [(8192, 8192), (28672, 4096), (57344, 8192), (576, 576)])
def test_decode_sizes_take_the_skinny_kernel_where_it_was_measured_faster(spec, layout, m, n, k):
    w = _abstract(spec, layout, k, n)
    main = mg.table_config(w, m)
    cfg = mg.config_for(w, m)
    # the main kernel keeps 57344×8192 (partial sums added in the kernel, 56 steps per CTA),
    # and NF4 above 2^25 codes whose tiles fit no cluster of two in one wave (28672×4096)
    faster = (n, k) != (57344, 8192)
    nf4_main = layout == "gpu_nf4t" and (n, k) == (28672, 4096)
    want = (spec, layout) in SKINNY and m <= sk.MAX_ROWS and faster and not nf4_main
    assert cfg.path == ("skinny" if want else "mgpu")
    assert sk.beats(main, w) == faster
    assert (sk.pick(main, w, m) is not None) == want
    if want:  # the same placement of the scales as the main kernel's table
        assert cfg.scale_acc == main.scale_acc and cfg.cluster in range(sk.CLUSTER + 1)
        # NF4 (its 32 KiB pair table): two CTAs per SM where clusters of two fit (8192²)
        nf4_two = layout == "gpu_nf4t" and (n, k) == (8192, 8192)
        assert cfg.ctas_per_sm == (2 if nf4_two else sk.CTAS_PER_SM)
    if (n, k) == (28672, 4096):  # fused, but short CTA runs: the skinny kernel was faster
        assert main.fused and main.cta_steps * main.block_k < sk.MAIN_KEEPS_CODES


@settings(max_examples=80, deadline=None)
@given(n_tiles=st.integers(1, 900), steps=st.integers(1, 64), per_sm=st.integers(1, 4))
def test_schedule_fits_one_wave_and_loads_the_busiest_sm_least(n_tiles, steps, per_sm):
    total = n_tiles * steps
    length = sk.schedule(n_tiles, steps, per_sm)
    assert total % length == 0 and total // length <= mg.NUM_SMS * per_sm

    def busiest(d):  # steps on the SM holding the most CTAs of d steps
        return -(-(total // d) // mg.NUM_SMS) * d

    one_wave = [
        d for d in range(1, total + 1) if total % d == 0 and total // d <= mg.NUM_SMS * per_sm
    ]
    assert busiest(length) == min(busiest(d) for d in one_wave)
    assert all(busiest(d) > busiest(length) for d in one_wave if d < length)  # ties: more CTAs


def test_schedule_balances_the_70b_qkv_projection():
    # 10240×8192, 512-code steps: 256 CTAs of 10 steps, not 320 of 8 (56 SMs holding three)
    assert sk.schedule(160, 16, 3) == 10
    assert sk.schedule(128, 16, 3) == 8  # 8192²: 256 CTAs of 8, already two per SM


@settings(max_examples=80, deadline=None)
@given(
    n_tiles=st.integers(1, 600),
    steps=st.integers(1, 64),
    per_sm=st.integers(1, 4),
    most=st.sampled_from([0, 1, 2, 4, 8]),
)
def test_clustered_schedule_keeps_every_tile_inside_one_cluster(n_tiles, steps, per_sm, most):
    total = n_tiles * steps
    balanced = sk.schedule(n_tiles, steps, per_sm)
    length, c = sk.clustered_schedule(n_tiles, steps, per_sm, most)
    assert total % length == 0 and length <= balanced  # as many CTAs as the balanced one, or more
    clustered = [
        d
        for d in range(1, balanced + 1)
        if total % d == 0 and 0 < sk.cluster_size(n_tiles, steps, d) <= most
    ]
    if c == 0:  # no L up to the balanced one fits clusters of at most `most`: the XLA pass
        assert length == balanced and not clustered
        return
    assert 1 <= c <= most and (total // length) % c == 0
    for t in range(n_tiles):  # from first principles: the CTAs that take K steps of tile t
        first, last = t * steps // length, ((t + 1) * steps - 1) // length
        assert first // c == last // c  # one cluster: its first CTA's shared memory is reachable
    later = max(((t + 1) * steps - 1) // length - t * steps // length for t in range(n_tiles))
    assert sk.received_slots(n_tiles, steps, length) == later
    ctas = total // length
    assert c == min(k for k in range(1, c + 1) if k * length % steps == 0 and ctas % k == 0)


@pytest.mark.parametrize(
    ("k", "n", "bits", "want"),
    [  # (L, C) as measured (`skinny_cluster_probe.json`), 3 CTAs per SM, clusters of at most 2
        (8192, 10240, 4, (8, 2)),  # not the balanced L = 10: no cluster of 2 holds its tiles
        (8192, 8192, 4, (8, 2)),
        (28672, 8192, 4, (28, 2)),
        (8192, 10240, 8, (16, 2)),
        (4096, 28672, 4, (4, 2)),
        (4096, 4096, 4, (2, 0)),  # Llama-3-8B's o: 64 tiles of 8 steps, L = 2 -> clusters of 4
    ],
)
def test_dispatch_adds_partial_sums_in_clusters_of_two_where_they_fit(k, n, bits, want):
    spec, layout = (qjax.Int(4, group=128), "gpu_i4t") if bits == 4 else SKINNY[2]
    cfg = mg.config_for(_abstract(spec, layout, k, n), 1)
    assert cfg.path == "skinny" and (cfg.cta_steps, cfg.cluster) == want


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize(("spec", "layout"), SKINNY, ids=lambda v: str(v))
@pytest.mark.parametrize(("k", "n"), [(8192, 10240), (8192, 8192), (28672, 8192), (4096, 6144)])
def test_8_bit_codes_go_straight_to_registers_where_sms_hold_three_ctas(m, spec, layout, k, n):
    # measured (`ldg_probe*.json`): faster only where the schedule puts three CTAs on some SMs
    # (Llama-3-70B's qkv), 4 – 9 % slower where every SM holds two; int4 slower everywhere
    cfg = mg.config_for(_abstract(spec, layout, k, n), m)
    ctas = n // sk.ROWS * (k // cfg.block_k) // cfg.cta_steps
    eight = layout in ("gpu_i8t", "gpu_f8t")
    assert cfg.ldg == (eight and ctas > 2 * mg.NUM_SMS)
    if eight and (k, n) == (8192, 10240):
        assert cfg.ldg


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize(
    ("k", "n", "want"),
    [  # NF4: (K step, L, CTAs per SM, C) as measured (`skinny_rows_probe_nf4.json`)
        (8192, 8192, (512, 8, 2, 2)),  # 256 CTAs of 8 steps: one wave at two per SM
        (28672, 8192, (512, 28, 2, 2)),
        (8192, 10240, (256, 16, 3, 2)),  # two per SM: clusters need L = 8, 320 CTAs > 264
        (4096, 6144, (256, 4, 3, 0)),  # Llama-3-8B's qkv: no cluster fits, the XLA pass
    ],
)
def test_nf4_takes_two_ctas_per_sm_where_clusters_of_two_fit_one_wave(m, k, n, want):
    cfg = mg.config_for(_abstract(qjax.NF4(), "gpu_nf4t", k, n), m)
    assert cfg.path == "skinny" and cfg.lut
    assert (cfg.block_k, cfg.cta_steps, cfg.ctas_per_sm, cfg.cluster) == want
    ctas = n // sk.ROWS * (k // cfg.block_k) // cfg.cta_steps
    assert ctas <= cfg.ctas_per_sm * mg.NUM_SMS


@pytest.mark.parametrize(("bits", "span", "lut"), [(4, 128, False), (8, 128, False), (4, 64, True)])
@pytest.mark.parametrize("m", [1, 7, 8, 13, 16])
@pytest.mark.parametrize(("k", "n"), [(8192, 8192), (640, 640), (28672, 8192), (384, 256)])
@pytest.mark.parametrize("per_sm", [2, 3])
@pytest.mark.parametrize("cluster", [0, 8])
def test_configs_fit_their_share_of_shared_memory_and_divide_the_work(
    bits, span, lut, m, k, n, per_sm, cluster
):
    cfg = mg.Config("skinny", 512, lut=lut, ctas_per_sm=per_sm, cluster=cluster)
    cfg = sk.fit(cfg, m, k, n, bits, span)
    _, bm = mg.padded_rows(m)
    assert k % cfg.block_k == 0 and cfg.block_k % mg.SLICE == 0 and cfg.stages == sk.STAGES
    n_tiles, steps = n // sk.ROWS, k // cfg.block_k
    assert (n_tiles * steps) % cfg.cta_steps == 0
    smem = functools.partial(sk.smem_bytes, bm, bits=bits, span=span, lut=lut)
    # clustered: the slots the later CTAs of a tile store into, instead of the output tile
    received = sk.received_slots(n_tiles, steps, cfg.cta_steps) if cfg.cluster else None
    assert smem(cfg.block_k, cfg.stages, received=received) <= sk.smem_share(per_sm)
    if not cluster:  # the largest K step that fits: twice it would not divide K or not fit
        bigger = 2 * cfg.block_k
        fits = k % bigger == 0 and smem(bigger, sk.STAGES) <= sk.smem_share(per_sm)
        assert cfg.block_k == 512 or not fits


@pytest.mark.parametrize(("spec", "layout"), SKINNY, ids=lambda v: str(v))
@pytest.mark.parametrize(("m", "k", "n"), [(1, 1024, 256), (16, 576, 200), (7, 2048, 384)])
@pytest.mark.parametrize("scale_acc", [False, True])
@pytest.mark.parametrize("cluster", [0, 8])
def test_kernel_lowers_to_mosaic_gpu(spec, layout, m, k, n, scale_acc, cluster):
    # lowering for CUDA runs on the CPU: the plain pipeline, the decoders and wgmma are built
    w = _weight(spec, layout, k, n)
    x = jax.random.normal(jax.random.key(2), (m, w.codes.shape[1]), jnp.bfloat16)
    lut = layout == "gpu_nf4t"  # NF4: the pair table, as the main kernel's
    cfg = mg.Config("skinny", 512, scale_acc=scale_acc, lut=lut, ctas_per_sm=3, cluster=cluster)
    cfg = mg.config_for(w, m, cfg)
    assert bool(cfg.cluster) == bool(cluster)  # every case here fits clusters of at most 8
    sk.check_config(x, w, cfg)
    out = jax.eval_shape(lambda x, w: sk.matmul_rows(x, w, cfg), x, w)
    assert out.shape == (m, w.codes.shape[0]) and out.dtype == jnp.bfloat16
    lowered = jax.jit(lambda x, w: sk.matmul_rows(x, w, cfg)).trace(x, w)
    text = lowered.lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
    assert ("ld.shared.b32" in text) == lut  # the pair table's loads
    # clustered: partial sums stored into another CTA's shared memory (mapa + st.async)
    assert ("st.async" in text and "mapa" in text) == bool(cfg.cluster)


def _lowered_under(w, m: int, *patches) -> str:
    """The dispatched (skinny) kernel for ``m`` rows of ``x`` and ``w``, traced with ``patches``
    in force (:func:`~experiments.mgpu_probe_lib.retraced`) and lowered for CUDA: its text."""
    x = jax.ShapeDtypeStruct((m, w.codes.shape[1]), jnp.bfloat16)
    with retraced(*patches):
        cfg = mg.config_for(w, m)
        assert cfg.path == "skinny"
        f = jax.jit(lambda x, w: sk.matmul_rows(x, w, cfg))
        return f.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()


def _waits_and_pipeline_start(w, m: int) -> list:
    """The order in which tracing the dispatched kernel for ``m`` rows of ``x`` waited on a
    barrier (``"wait"``) and started its weight pipeline (``"pipeline"``)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    events, wait, emit = [], plgpu.barrier_wait, plgpu.emit_pipeline

    def logged_wait(*a, **k):
        events.append("wait")
        return wait(*a, **k)

    def logged_emit(*a, **k):
        run = emit(*a, **k)

        def start(*refs):
            events.append("pipeline")
            return run(*refs)

        return start

    _lowered_under(
        w, m, mock.patch.multiple(plgpu, barrier_wait=logged_wait, emit_pipeline=logged_emit)
    )
    return events


@pytest.mark.parametrize("m", [1, 16])
def test_nf4_waits_for_its_pair_table_only_once_the_weight_pipeline_has_started(m):
    # measured on the H100 (`table_wait_probe.json`): waiting before the pipeline issued its
    # first copies held back every CTA's stream, NF4 1 – 4 % slower
    events = _waits_and_pipeline_start(_abstract(qjax.NF4(), "gpu_nf4t", 8192, 8192), m)
    assert "pipeline" in events and "wait" in events
    assert events.index("wait") > events.index("pipeline")


def test_int4_has_no_table_to_wait_for_before_its_stream():
    events = _waits_and_pipeline_start(_abstract(qjax.Int(4, group=128), "gpu_i4t", 8192, 8192), 1)
    assert events[0] == "pipeline"


def _lowered_with_nf4_loads(w, m: int, codes: int, tiles: list) -> str:
    """The dispatched kernel for ``m`` rows of ``x`` lowered for CUDA with ``codes`` NF4 codes per
    tile row, decode and ``wgmma``; ``tiles`` records its shared-memory tilings
    ``(elements per row, bits, operand)``."""
    return _lowered_under(
        w, m, mock.patch.object(sk, "NF4_LOAD_CODES", codes), logged_tilings(tiles)
    )


@pytest.mark.parametrize("m", [1, 16])
def test_nf4_loads_two_scale_blocks_per_tile_row_by_default(m):
    # measured on the H100 (`nf4_wide_probe.json`): 128-code rows, decodes and `wgmma` made NF4
    # 3.6 – 10.5 % faster than one 64-code scale block at a time; 64 still lowers
    w = _abstract(qjax.NF4(), "gpu_nf4t", 8192, 8192)
    assert sk.NF4_LOAD_CODES == 128
    wide_tiles, narrow_tiles = [], []
    wide = _lowered_with_nf4_loads(w, m, sk.NF4_LOAD_CODES, wide_tiles)
    narrow = _lowered_with_nf4_loads(w, m, 64, narrow_tiles)
    assert "mosaic_gpu" in wide and "mosaic_gpu" in narrow and wide != narrow
    # codes: 128 × 4 bits = 64-byte tile rows (swizzle 64); 64 × 4 bits = 32
    assert (128, 4, "lhs") in wide_tiles and (64, 4, "lhs") not in wide_tiles
    assert (64, 4, "lhs") in narrow_tiles and (128, 4, "lhs") not in narrow_tiles
    assert "swizzle<64 : i32>" in wide


def test_int4_is_the_same_kernel_whatever_nf4_loads():
    w = _abstract(qjax.Int(4, group=128), "gpu_i4t", 8192, 8192)
    assert _lowered_with_nf4_loads(w, 1, 64, []) == _lowered_with_nf4_loads(w, 1, 128, [])


def test_block_scaling_refuses_blocks_that_do_not_split_the_operand():
    from qjax.kernels.gpu import mgpu_decode as dec

    a = jax.ShapeDtypeStruct((64, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="does not split"):
        dec.times_column_blocks(a, [jax.ShapeDtypeStruct((64, 48), jnp.bfloat16)] * 2)


@pytest.mark.parametrize(("spec", "layout"), MAIN_ONLY, ids=lambda v: str(v))
def test_weights_it_does_not_take_are_refused_with_their_layout_named(spec, layout):
    w = _weight(spec, layout, 512, 128)
    x = jnp.ones((4, 512), jnp.bfloat16)
    cfg = sk.fit(mg.Config("skinny", 512, ctas_per_sm=3), 4, 512, 128, 4)
    with pytest.raises(ShapeError, match=layout):
        sk.check_config(x, w, cfg)


def test_too_many_rows_and_unfitted_configs_are_refused():
    w = _weight(*SKINNY[0], 1024, 256)
    cfg = sk.fit(mg.Config("skinny", 512, ctas_per_sm=3), 16, 1024, 256, 4)
    with pytest.raises(ShapeError, match="at most 16 rows"):
        sk.check_config(jnp.ones((17, 1024), jnp.bfloat16), w, cfg)
    x = jnp.ones((16, 1024), jnp.bfloat16)
    with pytest.raises(ShapeError, match="cta_steps"):
        sk.check_config(x, w, dataclasses.replace(cfg, cta_steps=3))  # 4 tiles × 2 steps
    with pytest.raises(ShapeError, match="block_k"):
        sk.check_config(x, w, dataclasses.replace(cfg, block_k=384))


def test_clusters_that_split_a_tile_or_the_ctas_are_refused():
    w = _weight(*SKINNY[0], 1024, 1024)  # 16 tiles of 2 K steps
    x = jnp.ones((1, 1024), jnp.bfloat16)
    cfg = sk.fit(mg.Config("skinny", 512, ctas_per_sm=3, cluster=2), 1, 1024, 1024, 4)
    assert (cfg.cta_steps, cfg.cluster) == (1, 2)
    sk.check_config(x, w, cfg)
    for bad in (dict(cluster=3), dict(cluster=16), dict(cta_steps=4, cluster=3)):
        with pytest.raises(ShapeError, match="clusters of"):
            sk.check_config(x, w, dataclasses.replace(cfg, **bad))


@pytest.mark.parametrize(("spec", "layout"), SKINNY[2:4], ids=lambda v: str(v))
@pytest.mark.parametrize(("m", "cluster"), [(1, 2), (16, 0)])
def test_codes_loaded_straight_into_registers_lower_to_read_only_128_bit_loads(
    spec, layout, m, cluster
):
    # Config.ldg: the 8-bit layouts' fragment-major codes (mgpu_decode.to_fragments) by read-only
    # 128-bit loads, no TMA of the weight; its bits against the TMA path's are checked on the
    # H100 (experiments/ldg_probe.py)
    from qjax.kernels.gpu import mgpu_decode as dec

    w = _weight(spec, layout, 2048, 384)
    x = jax.random.normal(jax.random.key(3), (m, w.codes.shape[1]), jnp.bfloat16)
    base = mg.Config("skinny", 512, ctas_per_sm=3, cluster=cluster)
    cfg = dataclasses.replace(mg.config_for(w, m, base), ldg=True)
    sk.check_config(x, w, cfg)
    f = jax.jit(sk.matmul_rows, static_argnums=2)
    for c, text_has in ((cfg, True), (dataclasses.replace(cfg, ldg=False), False)):
        text = f.trace(x, w, c).lower(lowering_platforms=("cuda",)).as_text()
        assert (dec.LDG_PTX in text) == text_has
    assert jax.eval_shape(f, x, w, cfg).shape == (m, w.codes.shape[0])


@pytest.mark.parametrize(("spec", "layout"), SKINNY[:2] + SKINNY[4:], ids=lambda v: str(v))
def test_codes_in_registers_need_a_fragment_major_layout(spec, layout):
    w = _weight(spec, layout, 1024, 256)  # 4-bit codes: stored as they are
    x = jnp.ones((1, 1024), jnp.bfloat16)
    cfg = dataclasses.replace(mg.config_for(w, 1), ldg=True)
    with pytest.raises(ShapeError, match=f"fragment-major.*'gpu_f8t'.*{layout!r}"):
        sk.check_config(x, w, cfg)
