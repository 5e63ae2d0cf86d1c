"""The Mosaic GPU int kernel's layouts (``gpu_i4t``, ``gpu_i8t``), configs and tracing, on the CPU.

This jax version cannot interpret a warp-specialized Mosaic GPU pipeline on the CPU, so the
kernel's numbers are checked on the H100 (``python -m experiments.kernel_bench --check``,
``experiments/results/kernels/``); here: the repack is exact, the layout dequantizes to the
float64 reference, every table config traces to a kernel that fits shared memory, the large-M
path is right, and a direct call on the CPU fails with a clear error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import ops
from qjax.errors import FormatError, ShapeError
from qjax.kernels import repack as rp
from qjax.kernels.gpu import mgpu_matmul as mg

SPECS = [
    qjax.Int(4, group=128),
    qjax.Int(4, group=128, symmetric=False),
    qjax.Int(4, group=256),
    qjax.Int(4, group="channel", symmetric=False),
    qjax.Int(8, group="channel"),
    qjax.Int(8, group=128, symmetric=False),
]


def _layout(spec):
    return "gpu_i4t" if spec.bits == 4 else "gpu_i8t"


def _weight(spec, k, n, seed):
    w = jax.random.normal(jax.random.key(seed), (k, n)) * (1 + jnp.arange(n) / n)
    return spec.quantize(w)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
@pytest.mark.parametrize("shape", [(300, 200), (1024, 384), (640, 129)])
def test_repack_is_exact_and_dequantizes_to_reference(spec, shape):
    seed = int(np.random.default_rng().integers(1 << 30))
    q = _weight(spec, *shape, seed)
    r = rp.repack(q, _layout(spec))
    k_p, n_p, g_p = rp.padded_dims(q, _layout(spec))
    assert r.codes.dtype == (jnp.int4 if spec.bits == 4 else jnp.int8)
    assert r.codes.shape == (n_p, k_p) and n_p % 128 == 0
    assert r.scales.shape == (k_p // 128, n_p)
    back = rp.unrepack(r)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # (c − z)·s in float64 from the canonical codes, vs the kernel layout's bf16 dequantization
    codes = np.asarray(rp.unpack_codes(r), np.float64)[: shape[0], : shape[1]]
    np.testing.assert_array_equal(
        codes - 2 ** (spec.bits - 1), np.asarray(r.codes, np.float64).T[: shape[0], : shape[1]]
    )
    ref = np.asarray(q.dequantize(), np.float64)
    got = np.asarray(rp.dequantize_bf16(r), np.float64)[: shape[0], : shape[1]]
    np.testing.assert_allclose(got, ref, rtol=2**-8, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize(
    ("bits", "layout", "other"), [(4, "gpu_i4t", "gpu_i4p"), (8, "gpu_i8t", "gpu_i8")]
)
def test_small_groups_are_refused_with_the_layout_named(group, bits, layout, other):
    q = _weight(qjax.Int(bits, group=group), 256, 128, 0)
    with pytest.raises(ShapeError, match=f"{layout}.*'{other}'"):
        rp.repack(q, layout)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("m", [1, 16, 32, 64, 100, 128])
@pytest.mark.parametrize(("k", "n"), [(8192, 8192), (8192, 57344), (28672, 8192), (640, 384)])
def test_table_configs_fit_shared_memory_and_divide_k(bits, m, k, n):
    cfg = mg.pick(m, k, n, bits)
    bm = max(16, -(-m // 16) * 16)
    assert cfg.path == "mgpu"
    assert k % cfg.block_k == 0 and cfg.block_k % mg.SLICE == 0
    assert (k // cfg.block_k) % cfg.split_k == 0
    assert mg.smem_bytes(bm, cfg.block_k, cfg.stages, bits) <= mg.SMEM_BYTES
    assert mg.pick(129, k, n).path == "xla"


def test_split_fills_whole_waves():
    # 64 CTA columns (N = 8192): split 2 makes 128 CTAs, one wave of 132 SMs; 80 (N = 10240):
    # split 4 makes 320 CTAs (3 waves, 81 % full) where split 2 leaves 160 (61 %)
    assert mg.split_for(8192, 1, 16) == 2
    assert mg.split_for(10240, 1, 16) == 4
    assert mg.split_for(640, 1, 5) == 1


@pytest.mark.parametrize("spec", [*SPECS[:2], *SPECS[4:]], ids=lambda s: s.label())
@pytest.mark.parametrize("m", [1, 16, 64, 128])
def test_kernel_traces_for_every_table_config(spec, m):
    w = rp.repack(_weight(spec, 1024, 256, 1), _layout(spec))
    x = jax.random.normal(jax.random.key(2), (m, 1024), jnp.bfloat16)
    cfg = mg.pick(m, 1024, 256, spec.bits)
    out = jax.eval_shape(lambda x, w: mg._mgpu_matmul(x, w, cfg), x, w)
    assert out.shape == (m, 256) and out.dtype == jnp.bfloat16
    jaxpr = str(jax.make_jaxpr(lambda x, w: mg._mgpu_matmul(x, w, cfg))(x, w))
    assert "wgmma" in jaxpr


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
    x = jax.random.normal(jax.random.key(seed + 1), (2, 150, 384), jnp.bfloat16)
    y = np.asarray(mg.matmul(x, w), np.float64)
    ref = np.asarray(x, np.float64) @ np.asarray(q.dequantize(), np.float64)
    assert y.shape == (2, 150, 200)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-2


@pytest.mark.parametrize("layout", ["gpu_i4t", "gpu_i8t"])
def test_registered_for_gpu_int(layout):
    names = [k.name for k in ops._KERNELS[("gpu", "int", layout)]]
    assert names == [f"pallas_mosaic_gpu_{layout}"]


def test_stored_bytes_count_two_codes_per_byte():
    q = _weight(SPECS[0], 1024, 256, 4)
    r = rp.repack(q, "gpu_i4t")
    # int4 codes, bf16 scales one row per 128 codes: 4 + 16/128 = 4.125 bits per weight
    assert r.nbytes == 256 * 1024 // 2 + 2 * (1024 // 128) * 256
    assert r.bits_per_weight == pytest.approx(4.125)
