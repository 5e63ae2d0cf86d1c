"""TPU NF4 / FP8 kernel (Mosaic TPU) in Pallas interpret mode on CPU, against dequantize + f32 dot.

No TPU is available here: these tests are the kernel's only check. Fresh random inputs each case
(never zeros); shapes that are and are not multiples of the tiles; NF4 blocks inside a K step and
spanning K steps, double-quantized NF4, FP8 e4m3 / e5m2 per channel (accumulator-scaled) and per
group. The decoders themselves are checked exhaustively in ``test_table_matmul.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _testing import matmul_case, rel_error

import qjax
from qjax import ops
from qjax.errors import FormatError, ShapeError
from qjax.kernels import repack as rp
from qjax.kernels.tpu.table_matmul import Config, supports, table_matmul

RTOL = 1e-2  # relative Frobenius error: dequantized tiles and the output are rounded to bf16

CASES = [  # spec, layout, (M, K, N), config (None: pick)
    (qjax.NF4(), "tpu_nf4", (3, 300, 200), Config(16, 128, 128)),
    (qjax.NF4(double_quant=True), "tpu_nf4", (5, 512, 256), Config(16, 128, 256)),
    (qjax.NF4(block=32), "tpu_nf4", (20, 200, 130), None),
    (qjax.NF4(block=128), "tpu_nf4", (16, 384, 128), Config(16, 128, 128)),
    (qjax.NF4(block=256), "tpu_nf4", (2, 700, 96), Config(16, 128, 128)),
    (qjax.FP8("e4m3", group="channel"), "tpu_f8", (3, 300, 96), None),
    (qjax.FP8("e4m3", group=128), "tpu_f8", (17, 256, 300), Config(16, 128, 256)),
    (qjax.FP8("e5m2", group=128), "tpu_f8", (2, 384, 128), Config(16, 128, 128)),
    (qjax.FP8("e5m2", group="channel"), "tpu_f8", (16, 512, 256), Config(16, 256, 256)),
]


@pytest.mark.parametrize("spec,layout,mkn,cfg", CASES, ids=lambda v: getattr(v, "name", None))
def test_tpu_kernel_matches_dequantized_dot(spec, layout, mkn, cfg):
    m, k, n = mkn
    q, x, ref = matmul_case(spec, m, k, n, seed=hash((spec.label(), mkn)) % 2**31)
    w = rp.repack(q, layout)
    assert w.codes.shape[1] % 128 == 0 and w.codes.dtype == jnp.uint8  # TPU lanes, bytes
    assert supports(x, w)
    y = table_matmul(x, w, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert rel_error(y, ref) < RTOL


def test_batched_input():
    q, x, ref = matmul_case(qjax.NF4(), 6, 256, 128, seed=11)
    w = rp.repack(q, "tpu_nf4")
    y = table_matmul(x.reshape(2, 3, 256), w, interpret=True)
    assert y.shape == (2, 3, 128)
    assert rel_error(y.reshape(6, 128), ref) < RTOL


@pytest.mark.parametrize(
    "spec,layout",
    [
        (qjax.NF4(), "tpu_nf4"),
        (qjax.NF4(block=256, double_quant=True), "tpu_nf4"),
        (qjax.FP8("e4m3", group="channel"), "tpu_f8"),
        (qjax.FP8("e5m2", group=128), "tpu_f8"),
    ],
)
def test_repack_round_trip_is_bit_exact(spec, layout):
    q = spec.quantize(jax.random.normal(jax.random.key(3), (300, 70)))
    w = rp.repack(q, layout)
    k_p, n_p, _ = rp.padded_dims(q, layout)
    assert w.codes.shape == (k_p // 2 if layout == "tpu_nf4" else k_p, n_p) and n_p == 128
    back = rp.unrepack(w)
    assert back.layout == "canonical"
    scales = q.scales
    if getattr(spec, "double_quant", False):  # repacked as plain NF4 with the decoded absmax
        assert back.spec == qjax.NF4(block=256)
        scales = spec.absmax(q)
    else:
        assert back.spec == q.spec
    for a, b in [(back.codes, q.codes), (back.scales, scales)]:
        np.testing.assert_array_equal(
            np.asarray(a).view(np.uint8) if a.dtype.itemsize == 1 else np.asarray(a),
            np.asarray(b).view(np.uint8) if b.dtype.itemsize == 1 else np.asarray(b),
        )
    ref = np.asarray(q.dequantize())
    np.testing.assert_array_equal(np.asarray(rp.dequantize(w)), ref)
    bf16 = np.asarray(rp.dequantize_bf16(w)[:300, :70].astype(jnp.float32))
    np.testing.assert_array_equal(
        bf16, np.asarray(jnp.asarray(ref).astype(jnp.bfloat16), np.float32)
    )


def test_tpu_nf4_is_the_tpu_i4_byte_layout():
    q = qjax.NF4().quantize(jax.random.normal(jax.random.key(4), (256, 128)))
    w = rp.repack(q, "tpu_nf4")
    codes = rp.unpack_codes(w)
    b = np.asarray(w.codes)
    np.testing.assert_array_equal(b[:64] & 0xF, np.asarray(codes[:64]))  # rows 0..63: low
    np.testing.assert_array_equal(b[:64] >> 4, np.asarray(codes[64:128]))  # 64..127: high


def test_untileable_config_is_a_clear_error():
    q = qjax.FP8("e4m3", group=128).quantize(jax.random.normal(jax.random.key(5), (256, 128)))
    w = rp.repack(q, "tpu_f8")
    with pytest.raises(ShapeError, match="does not tile"):
        table_matmul(jnp.ones((1, 256), jnp.bfloat16), w, config=Config(16, 96, 128))


def test_wrong_layout_is_a_clear_error():
    q = qjax.NF4().quantize(jax.random.normal(jax.random.key(6), (128, 64)))
    x = jnp.ones((1, 128), jnp.bfloat16)
    for w in (q, rp.repack(q, "gpu_nf4")):
        with pytest.raises(FormatError, match="repacked to.*tpu_nf4"):
            table_matmul(x, w)
    with pytest.raises(FormatError, match="tpu_f8.*FP8"):
        rp.repack(q, "tpu_f8")
    with pytest.raises(FormatError, match="bf16"):
        table_matmul(x.astype(jnp.float32), rp.repack(q, "tpu_nf4"))


def test_supports():
    q = qjax.FP8("e4m3").quantize(jax.random.normal(jax.random.key(7), (128, 64)))
    w = rp.repack(q, "tpu_f8")
    x = jnp.ones((2, 128), jnp.bfloat16)
    assert supports(x, w) and supports(x[0], w)
    assert not supports(x, q)  # canonical
    assert not supports(x, rp.repack(q, "gpu_f8"))  # the GPU layout
    assert not supports(x.astype(jnp.float32), w)  # activations not bf16
    assert not supports(jnp.ones((2, 64), jnp.bfloat16), w)  # K mismatch
    assert not supports(jnp.ones((0, 128), jnp.bfloat16), w)  # empty


def test_registered_for_the_tpu_backend():
    for fmt, layout in [("nf4", "tpu_nf4"), ("fp8", "tpu_f8")]:
        kernels = ops._KERNELS[("tpu", fmt, layout)]
        assert any(k.fn is table_matmul and k.name == f"pallas_mosaic_{layout}" for k in kernels)
    assert ("tpu", "fp8", "tpu_nf4") not in ops._KERNELS
