"""GPU int matmul kernels, run in Pallas interpret mode on CPU, against ``dequantize`` + f32 dot.

Every case draws fresh random weights and activations (never zeros); shapes include ones that are
not multiples of the tiles (ragged K groups, N not a multiple of 64, M not a multiple of the row
tile). The tolerance is bf16's: the kernels round the output (and the tiled path the dequantized
weights) to bf16, ~2e-3 relative.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _testing import matmul_case, rel_error

import qjax
from qjax import ops
from qjax.kernels import repack as rp
from qjax.kernels.gpu import configs
from qjax.kernels.gpu.int_matmul import int_matmul, supports

RTOL = 1e-2  # relative Frobenius error; bf16 output rounding alone is ~1e-3


def _c(path, bm=16, bn=32, split=1, planes=True):
    return configs.Config(path, bm, bn, split, 4, 3, planes=planes)


CASES = [  # spec, (M, K, N), config
    (qjax.Int(4, group=128), (1, 256, 128), _c("decode", split=2)),
    (qjax.Int(4, group=128), (3, 300, 96), _c("gemv", split=2)),
    (qjax.Int(4, group=32, symmetric=False), (5, 300, 96), _c("decode", bn=64)),
    (qjax.Int(4, group=32, symmetric=False), (20, 256, 128), _c("tiled", bm=16, bn=64)),
    (qjax.Int(4, group="channel"), (16, 384, 64), _c("decode", planes=False, split=3)),
    (qjax.Int(4, group="channel"), (33, 384, 64), _c("tiled", planes=False)),
    (qjax.Int(4, group=64, symmetric=False), (40, 200, 70), _c("tiled", bm=32, bn=64)),
    (qjax.Int(8, group="channel"), (2, 256, 96), _c("decode", bn=64, split=2)),
    (qjax.Int(8, group="channel"), (20, 200, 64), _c("tiled")),
    (qjax.Int(8, group=128, symmetric=False), (7, 300, 96), _c("decode", split=2)),
    (qjax.Int(8, group=128, symmetric=False), (17, 256, 64), _c("tiled", bm=16)),
    (qjax.Int(8, group=32), (4, 128, 64), _c("gemv", bn=64)),
    (qjax.Int(4, group=128), (1, 256, 128), _c("swap", bn=64, split=2)),
    (qjax.Int(4, group=32, symmetric=False), (5, 300, 96), _c("swap", bn=32)),
    (qjax.Int(4, group=64), (16, 384, 70), _c("swap", bn=64, split=3)),
    (qjax.Int(4, group=256, symmetric=False), (3, 640, 64), _c("swap", bn=64)),
    (qjax.Int(4, group="channel", symmetric=False), (9, 384, 64), _c("swap", split=3)),
    (qjax.Int(8, group="channel"), (2, 256, 96), _c("swap", bn=32, split=2)),
    (qjax.Int(8, group=64, symmetric=False), (7, 300, 96), _c("swap")),
]


@pytest.mark.parametrize("spec,mkn,cfg", CASES, ids=lambda v: getattr(v, "path", None))
def test_kernel_matches_dequantized_dot(spec, mkn, cfg):
    m, k, n = mkn
    q, x, ref = matmul_case(spec, m, k, n, seed=hash((spec.label(), mkn)) % 2**31)
    w = rp.repack(q, "gpu_i4p" if spec.bits == 4 else "gpu_i8")
    y = int_matmul(x, w, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert rel_error(y, ref) < RTOL


@pytest.mark.parametrize("bits", [4, 8])
def test_table_paths_and_batch_dims(bits):
    """The table's own choice (and the XLA path for large M) on ``x`` with leading batch dims."""
    spec = qjax.Int(4, group=256) if bits == 4 else qjax.Int(8, group=64, symmetric=False)
    q, x, ref = matmul_case(spec, 6, 192, 80, seed=bits)
    w = rp.repack(q, "gpu_i4p" if bits == 4 else "gpu_i8")
    y = int_matmul(x.reshape(2, 3, 192), w, interpret=True)
    assert y.shape == (2, 3, 80)
    assert rel_error(y.reshape(6, 80), ref) < RTOL
    y = int_matmul(x, w, config=configs.Config("xla"))
    assert rel_error(y, ref) < RTOL


def test_table_covers_every_bucket():
    for bits in (4, 8):
        for m in (1, 3, 16, 17, 100, 5000, 10**6):
            cfg = configs.pick(bits, m, 4096, 4096)
            assert cfg.path in ("gemv", "decode", "swap", "tiled", "xla")
            if cfg.path in ("decode", "swap", "gemv"):
                assert cfg.block_m >= min(m, 16)


@pytest.mark.parametrize(
    "spec,shape",
    [
        (qjax.Int(4, group=128), (200, 70)),  # ragged last group, N not a multiple of 64
        (qjax.Int(4, group=256, symmetric=False), (300, 8)),
        (qjax.Int(4, group="channel"), (72, 5)),
        (qjax.Int(8, group=32, symmetric=False), (130, 3)),
    ],
)
def test_repack_roundtrip_is_exact(spec, shape):
    q = spec.quantize(jax.random.normal(jax.random.key(shape[0]), shape))
    layout = "gpu_i4p" if spec.bits == 4 else "gpu_i8"
    r = rp.repack(q, layout)
    assert r.layout == layout and r.shape == q.shape and "layout=" in repr(r)
    back = rp.unrepack(r)
    assert back.layout == "canonical"
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(rp.dequantize(r), q.dequantize())
    k, n = shape
    fast = np.asarray(rp.dequantize_bf16(r), np.float32)[:k, :n]
    np.testing.assert_allclose(fast, np.asarray(q.dequantize()), rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize(
    "spec,layout,error",
    [
        (qjax.NF4(), "gpu_i4p", qjax.FormatError),
        (qjax.Int(8), "gpu_i4p", qjax.FormatError),
        (qjax.Int(4), "gpu_nope", qjax.FormatError),
        (qjax.Int(4, group=8), "gpu_i4p", qjax.ShapeError),
        (qjax.Int(4, group=(32, 4)), "gpu_i4p", qjax.ShapeError),
        (qjax.Int(4, group=96), "gpu_i4p", qjax.ShapeError),
    ],
)
def test_repack_rejects_what_the_kernels_cannot_load(spec, layout, error):
    with pytest.raises(error):
        rp.check_repackable(spec.abstract((128, 16)), layout)


def test_entry_point_errors_and_registry():
    q = qjax.Int(4, group=32).quantize(jax.random.normal(jax.random.key(1), (64, 32)))
    x = jnp.ones((2, 64), jnp.bfloat16)
    with pytest.raises(qjax.FormatError):  # canonical layout: repack first
        int_matmul(x, q, interpret=True)
    w = rp.repack(q, "gpu_i4p")
    with pytest.raises(qjax.FormatError):
        int_matmul(x.astype(jnp.float32), w, interpret=True)
    with pytest.raises(qjax.ShapeError):
        int_matmul(jnp.ones((2, 48), jnp.bfloat16), w, interpret=True)
    assert supports(x, w) and not supports(x.astype(jnp.float32), w) and not supports(x, q)
    for layout in ("gpu_i4p", "gpu_i8"):
        names = [k.name for k in ops._KERNELS[("gpu", "int", layout)]]
        assert names == [f"pallas_triton_{layout}"]
