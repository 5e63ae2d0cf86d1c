"""The W8A8 Mosaic GPU GEMM (:mod:`qjax.kernels.gpu.mgpu_w8a8`) on the CPU: its CTA raster (every
output tile exactly once, hypothesis), that its configs fit shared memory, that it lowers to
Mosaic GPU code for int8 and e4m3 codes, when ``w8a8_matmul`` takes it, and its errors. Its
numbers are checked on the device (``kernel_bench.run_check_w8a8_mgpu``): Mosaic GPU's
warp-specialized pipeline has no interpret mode in this jax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qjax
from qjax.errors import FormatError, ShapeError
from qjax.kernels.gpu import mgpu_w8a8 as k8
from qjax.kernels.gpu import w8a8_matmul as w8


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 20))
def test_cta_raster_covers_every_tile_once(m_tiles, n_tiles, group):
    group = min(group, m_tiles)
    c = jnp.arange(40 * 40)  # one length for every example (no compile per example), cut below
    mi, ni = (np.asarray(a)[: m_tiles * n_tiles] for a in k8.cta_tile(c, m_tiles, n_tiles, group))
    assert mi.min() >= 0 and mi.max() < m_tiles and ni.min() >= 0 and ni.max() < n_tiles
    assert len(set(zip(mi.tolist(), ni.tolist(), strict=True))) == m_tiles * n_tiles
    # consecutive CTAs stay inside one group of `group` row blocks until it is done
    for start in range(0, m_tiles * n_tiles, group * n_tiles):
        rows = set(mi[start : start + group * n_tiles].tolist())
        assert len(rows) <= group and max(rows) - min(rows) < group


@pytest.mark.parametrize("cfg", [k8.WIDE, k8.NARROW])
def test_configs_fit_shared_memory(cfg):
    assert k8.smem_bytes(cfg) <= k8.SMEM_BYTES
    k8.check(4096, 8192, 10240, cfg)  # the 70B shapes take both


def _lowered(dtype, m, k, n, cfg):
    xq = jax.ShapeDtypeStruct((m, k), dtype)
    wq = jax.ShapeDtypeStruct((n, k), dtype)
    sx = jax.ShapeDtypeStruct((m, 1), jnp.float32)
    sw = jax.ShapeDtypeStruct((n,), jnp.float32)
    fn = jax.jit(lambda a, b, c, d: k8.gemm(a, b, c, d, jnp.bfloat16, cfg))
    return fn.trace(xq, wq, sx, sw).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
@pytest.mark.parametrize("m,k,n,cfg", [(300, 1024, 512, k8.WIDE), (1, 256, 384, k8.NARROW),
                                       (4096, 512, 256, k8.WIDE)])  # fmt: skip
def test_kernel_lowers_to_mosaic_gpu(dtype, m, k, n, cfg):
    # lowering for CUDA runs on the CPU: TMA specs, 8-bit wgmma and the scaled epilogue are built
    assert "mosaic_gpu" in _lowered(dtype, m, k, n, cfg)


@pytest.mark.parametrize(
    "m,k,n,cfg,match",
    [
        (64, 200, 256, k8.WIDE, "K = 200"),
        (64, 256, 384, k8.WIDE, "block_n 256"),
        (64, 256, 256, k8.Config(wg_rows=32), "wg_rows"),
        (64, 256, 256, k8.Config(wg_rows=128, block_n=256), "128 × 128"),
        (64, 256, 256, k8.Config(stages=6), "shared memory"),
        (64, 256, 256, k8.Config(epi_cols=96), "epi_cols"),
    ],
)
def test_bad_shapes_and_configs_are_named(m, k, n, cfg, match):
    with pytest.raises(ShapeError, match=match):
        k8.check(m, k, n, cfg)


def test_mixed_code_dtypes_are_rejected():
    xq = jnp.zeros((8, 256), jnp.int8)
    wq = jnp.zeros((256, 256), jnp.float8_e4m3fn)
    with pytest.raises(ShapeError, match="both int8 or both e4m3"):
        k8.gemm(xq, wq, jnp.ones((8, 1)), jnp.ones((256,)), jnp.bfloat16)


def test_mismatched_codes_and_scales_are_named():
    xq = jnp.zeros((8, 256), jnp.int8)
    with pytest.raises(ShapeError, match="do not match"):
        k8.gemm(
            xq, jnp.zeros((256, 384), jnp.int8), jnp.ones((8, 1)), jnp.ones((256,)), jnp.bfloat16
        )
    with pytest.raises(ShapeError, match="do not match"):
        k8.gemm(
            xq, jnp.zeros((256, 256), jnp.int8), jnp.ones((8, 1)), jnp.ones((128,)), jnp.bfloat16
        )


def test_config_for_takes_the_wide_tile_where_it_divides_n():
    assert k8.config_for(8192) == k8.WIDE
    assert k8.config_for(384) == k8.NARROW


def test_takes_only_on_hopper_from_the_measured_rows(monkeypatch):
    assert not k8.takes(8192, 8192, 8192, "int8", jnp.bfloat16)  # this CPU
    monkeypatch.setattr(k8, "on_hopper", lambda: True)
    for dtype, rows in k8.FROM_ROWS.items():
        assert k8.takes(rows, 8192, 8192, dtype, jnp.bfloat16)
        assert not k8.takes(rows - 1, 8192, 8192, dtype, jnp.bfloat16)
    assert not k8.takes(4096, 8192, 8192, "int8", jnp.float32)  # bf16 activations only
    assert not k8.takes(4096, 8192, 200, "int8", jnp.bfloat16)  # N % 128
    assert not k8.takes(4096, 200, 8192, "int8", jnp.bfloat16)  # K % 128


def test_w8a8_matmul_dispatch_and_bad_gemm(monkeypatch):
    rng = np.random.default_rng(3)
    w = qjax.W8A8().quantize(jnp.asarray(rng.standard_normal((256, 128)), jnp.float32))
    x = jnp.asarray(rng.standard_normal((600, 256)), jnp.bfloat16)
    with pytest.raises(FormatError, match="gemm must be"):
        w8.w8a8_matmul(x, w, gemm="cublas", interpret=True)
    taken = []
    monkeypatch.setattr(k8, "takes", lambda *a: taken.append(a) or True)
    monkeypatch.setattr(k8, "gemm", lambda *a: pytest.fail("interpret mode took the kernel"))
    w8.w8a8_matmul(x, w, interpret=True)  # interpret: never the device-only kernel
    assert not taken
    calls = []

    def fake_rows(x2, **kw):
        return jnp.zeros(x2.shape, jnp.int8), jnp.ones((x2.shape[0], 1))

    monkeypatch.setattr(w8, "quantize_rows", fake_rows)
    monkeypatch.setattr(k8, "gemm", lambda *a: calls.append(a) or jnp.zeros((600, 128), a[4]))
    w8.w8a8_matmul(x, w)
    assert taken[-1] == (600, 256, 128, "int8", jnp.bfloat16) and len(calls) == 1


@pytest.mark.parametrize("dtype", ["int8", "e4m3"])
@pytest.mark.parametrize("act", ["dynamic", "static"])
def test_w8a8_matmul_hands_the_kernel_the_formats_codes_and_scales(monkeypatch, dtype, act):
    # the kernel replaced by its math in float32: what w8a8_matmul passes it (codes of x and of
    # w in (N, K), per-token and per-channel scales) must give the format's own product
    def kernel_math(xq, wq, sx, sw, out_dtype, cfg=None):
        acc = xq.astype(jnp.float32) @ wq.astype(jnp.float32).T
        return (acc * sx * sw.reshape(1, -1)).astype(out_dtype)

    monkeypatch.setattr(k8, "gemm", kernel_math)
    rng = np.random.default_rng(11)
    spec = qjax.W8A8(act=act, dtype=dtype)
    w = spec.quantize(jnp.asarray(rng.standard_normal((384, 256)), jnp.float32))
    if act == "static":
        w = w.replace(aux={"act_scale": jnp.asarray(0.03, jnp.float32)})
    x = jnp.asarray(rng.standard_normal((2, 5, 384)) * 2, jnp.bfloat16)  # 3-D: rows flattened
    got = np.asarray(w8.w8a8_matmul(x, w, gemm="mgpu", interpret=True), np.float32)
    want = np.asarray(spec.matmul(x, w), np.float32)
    assert got.shape == want.shape == (2, 5, 256)
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * np.abs(want).max())
    assert np.abs(want).max() > 0.1  # not a vacuous comparison
