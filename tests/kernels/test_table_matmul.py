"""NF4 / FP8 GPU kernels in Pallas interpret mode on CPU, against ``dequantize`` + float32 dot.

Fresh random weights and activations for every case (never zeros), shapes that are not tile
multiples (K not a multiple of 128, N not of 64, M not of the row tile). The in-kernel decoders
are checked exhaustively against ml_dtypes / the NF4 table, the repack round trip bit for bit.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from _testing import matmul_case, rel_error

import qjax
from qjax import ops
from qjax.errors import FormatError
from qjax.formats.nf4 import nf4_levels
from qjax.kernels import repack as rp
from qjax.kernels.gpu.table_matmul import (
    Config,
    f8_to_f16,
    f8_to_f32,
    f8_unit,
    nf4_select,
    supports,
    table_matmul,
)

RTOL = 1e-2  # relative Frobenius error; the dequantized tile and the output are rounded to bf16


@pytest.mark.parametrize(
    "fmt,dtype", [("e4m3", ml_dtypes.float8_e4m3fn), ("e5m2", ml_dtypes.float8_e5m2)]
)
def test_f8_decoder_is_exact_for_every_byte(fmt, dtype):
    b = np.arange(256, dtype=np.uint8)
    want = b.view(dtype).astype(np.float32)
    got = np.asarray(f8_to_f32(jnp.asarray(b, jnp.int32), fmt))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[finite], want[finite])  # subnormals and ±0 included
    assert finite.sum() == {"e4m3": 254, "e5m2": 248}[fmt]  # only NaN (and e5m2 ±inf) skipped
    # the kernel feeds the MMA bf16(f16 pattern) and folds the unit into the scale: also exact
    as_bf16 = f8_to_f16(jnp.asarray(b, jnp.int32), fmt).astype(jnp.bfloat16)
    got16 = np.asarray(as_bf16.astype(jnp.float32)) * f8_unit(fmt)
    np.testing.assert_array_equal(got16[finite], want[finite])


def test_nf4_select_equals_table():
    c = jnp.arange(16, dtype=jnp.int32)
    np.testing.assert_array_equal(np.asarray(nf4_select(c)), nf4_levels())
    bf16 = np.asarray(nf4_select(c, jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(bf16, nf4_levels().astype(ml_dtypes.bfloat16).astype(np.float32))


CASES = [  # spec, layout, (M, K, N), config
    (qjax.NF4(), "gpu_nf4", (1, 256, 128), Config(16, 64, 2)),
    (qjax.NF4(double_quant=True), "gpu_nf4", (5, 300, 96), Config(16, 32, 1)),
    (qjax.NF4(block=128), "gpu_nf4", (20, 384, 70), Config(16, 64, 3)),
    (qjax.FP8("e4m3", group="channel"), "gpu_f8", (3, 300, 96), Config(16, 64, 2)),
    (qjax.FP8("e4m3", group=128), "gpu_f8", (17, 256, 64), Config(16, 32, 1)),
    (qjax.FP8("e5m2", group=32), "gpu_f8", (2, 200, 64), Config(16, 64, 1)),
]


@pytest.mark.parametrize("spec,layout,mkn,cfg", CASES, ids=lambda v: getattr(v, "name", None))
def test_kernel_matches_dequantized_dot(spec, layout, mkn, cfg):
    m, k, n = mkn
    q, x, ref = matmul_case(spec, m, k, n, seed=hash((spec.label(), mkn)) % 2**31)
    w = rp.repack(q, layout)
    assert supports(x, w)
    y = table_matmul(x, w, config=cfg, interpret=True)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert rel_error(y, ref) < RTOL


@pytest.mark.parametrize("spec,layout", [(qjax.NF4(), "gpu_nf4"), (qjax.FP8("e4m3"), "gpu_f8")])
def test_large_m_path_and_batched_input(spec, layout):
    q, x, ref = matmul_case(spec, 300, 256, 96, seed=7)
    w = rp.repack(q, layout)
    y = table_matmul(x.reshape(3, 100, 256), w)  # M = 300 ≥ XLA_FROM_M: dequantize + XLA dot
    assert rel_error(y.reshape(300, 96), ref) < RTOL


@pytest.mark.parametrize(
    "spec,layout",
    [
        (qjax.NF4(), "gpu_nf4"),
        (qjax.FP8("e4m3", group="channel"), "gpu_f8"),
        (qjax.FP8("e5m2", group=64), "gpu_f8"),
    ],
)
def test_repack_round_trip_is_bit_exact(spec, layout):
    q = spec.quantize(jax.random.normal(jax.random.key(3), (300, 70)))
    back = rp.unrepack(rp.repack(q, layout))
    assert back.layout == "canonical" and back.spec == q.spec
    for a, b in [(back.codes, q.codes), (back.scales, q.scales)]:
        np.testing.assert_array_equal(
            np.asarray(a).view(np.uint8) if a.dtype.itemsize == 1 else np.asarray(a),
            np.asarray(b).view(np.uint8) if b.dtype.itemsize == 1 else np.asarray(b),
        )
    np.testing.assert_array_equal(np.asarray(rp.dequantize(rp.repack(q, layout))), q.dequantize())


def test_double_quant_nf4_repacks_to_its_decoded_absmax():
    q = qjax.NF4(double_quant=True).quantize(jax.random.normal(jax.random.key(4), (256, 64)))
    w = rp.repack(q, "gpu_nf4")
    assert not w.spec.double_quant  # the kernel reads float32 absmaxes
    np.testing.assert_array_equal(np.asarray(rp.dequantize(w)), np.asarray(q.dequantize()))


def test_wrong_spec_for_layout_is_a_clear_error():
    q = qjax.Int(4, group=64).quantize(jax.random.normal(jax.random.key(5), (128, 64)))
    with pytest.raises(FormatError, match="gpu_nf4.*NF4"):
        rp.repack(q, "gpu_nf4")
    with pytest.raises(FormatError, match="repacked"):
        table_matmul(jnp.ones((1, 128), jnp.bfloat16), q)


def test_registered_behind_ops_matmul_for_gpu():
    for fmt, layout in [("nf4", "gpu_nf4"), ("fp8", "gpu_f8")]:
        kernels = ops._KERNELS[("gpu", fmt, layout)]
        assert any(kr.fn is table_matmul for kr in kernels)
