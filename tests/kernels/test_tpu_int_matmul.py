"""TPU int kernels (Mosaic TPU) in Pallas interpret mode on CPU, against dequantize + f32 dot.

No TPU is available here: these tests are the kernels' only check. Fresh random inputs each case
(never zeros); K and N not multiples of the tiles; every group regime (groups inside a K step,
a group spanning K steps, per channel), symmetric and asymmetric.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _testing import matmul_case, rel_error

import qjax
from qjax import ops
from qjax.errors import ShapeError
from qjax.kernels import repack as rp
from qjax.kernels.tpu.int_matmul import Config, int_matmul, pick, supports

RTOL = 1e-2  # relative Frobenius error: dequantized tiles and the output are rounded to bf16

CASES = [  # spec, layout, (M, K, N), config (None: pick)
    (qjax.Int(4, group=128), "tpu_i4", (3, 300, 200), Config(16, 128, 128)),
    (qjax.Int(4, group=32, symmetric=False), "tpu_i4", (20, 512, 256), Config(16, 128, 256)),
    (qjax.Int(4, group=256), "tpu_i4", (5, 700, 130), Config(16, 128, 128)),
    (qjax.Int(4, group="channel"), "tpu_i4", (1, 384, 128), None),
    (qjax.Int(8, group="channel"), "tpu_i8", (17, 256, 300), Config(16, 128, 256)),
    (qjax.Int(8, group=64, symmetric=False), "tpu_i8", (2, 200, 96), None),
]


@pytest.mark.parametrize("spec,layout,mkn,cfg", CASES, ids=lambda v: getattr(v, "name", None))
def test_tpu_kernel_matches_dequantized_dot(spec, layout, mkn, cfg):
    m, k, n = mkn
    q, x, ref = matmul_case(spec, m, k, n, seed=hash((spec.label(), mkn)) % 2**31)
    w = rp.repack(q, layout)
    assert w.codes.shape[1] % 128 == 0  # TPU lanes
    assert supports(x, w)
    y = int_matmul(x, w, config=cfg, interpret=True)
    assert y.shape == (m, n)
    assert rel_error(y, ref) < RTOL


@pytest.mark.parametrize("spec", [qjax.Int(4, group=64, symmetric=False), qjax.Int(4, group=512)])
def test_tpu_i4_repack_round_trip_is_bit_exact(spec):
    q = spec.quantize(jax.random.normal(jax.random.key(1), (600, 70)))
    back = rp.unrepack(rp.repack(q, "tpu_i4"))
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(back.scales), np.asarray(q.scales))
    np.testing.assert_array_equal(np.asarray(rp.dequantize(rp.repack(q, "tpu_i4"))), q.dequantize())


def test_pick_nests_k_steps_with_groups():
    for g in (32, 128, 256, 384, "channel"):
        cfg = pick(8, 1536, 512, g)
        gk = 1536 if g == "channel" else g
        assert 1536 % cfg.block_k == 0 and (cfg.block_k % gk == 0 or gk % cfg.block_k == 0)


def test_untileable_config_is_a_clear_error():
    q = qjax.Int(4, group=128).quantize(jax.random.normal(jax.random.key(2), (256, 128)))
    w = rp.repack(q, "tpu_i4")
    with pytest.raises(ShapeError, match="does not tile"):
        int_matmul(jnp.ones((1, 256), jnp.bfloat16), w, config=Config(16, 96, 128), interpret=True)


def test_registered_for_the_tpu_backend():
    assert any(k.fn is int_matmul for k in ops._KERNELS[("tpu", "int", "tpu_i4")])
