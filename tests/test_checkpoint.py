import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax


def _quantized_tree():
    k = jax.random.split(jax.random.key(0), 4)
    tree = {
        "a": {"kernel": jax.random.normal(k[0], (128, 64))},
        "b": [jax.random.normal(k[1], (64, 64)), jax.random.normal(k[2], (64,))],
        "c": jax.random.normal(k[3], (256, 32)).astype(jnp.bfloat16),
        "n": 3,
    }
    rules = [
        ("a/kernel", qjax.Int(3, group=64, symmetric=False)),
        ("b/0", qjax.NF4(double_quant=True)),
        ("b/1", None),
        ("c", qjax.NVFP4()),
    ]
    return qjax.quantize(tree, rules)


def test_roundtrip_is_bit_identical_with_identical_metadata(tmp_path):
    tree = _quantized_tree()
    qjax.save(tmp_path / "ck", tree)
    back = qjax.load(tmp_path / "ck")
    leaves_a, def_a = jax.tree_util.tree_flatten(tree)
    leaves_b, def_b = jax.tree_util.tree_flatten(back)
    assert def_a == def_b  # includes every QArray's spec, shape, dtype, layout
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(
            np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8)
        )
    assert back["c"].dtype == jnp.bfloat16 and back["n"] == 3


def test_existing_path_and_failed_save_leave_nothing(tmp_path):
    qjax.save(tmp_path / "ck", {"x": jnp.ones(3)})
    with pytest.raises(qjax.FormatError, match="already exists"):
        qjax.save(tmp_path / "ck", {"x": jnp.ones(3)})
    with pytest.raises(qjax.FormatError, match="cannot checkpoint a leaf of type object"):
        qjax.save(tmp_path / "bad", {"x": jnp.ones(3), "y": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_nnx_state_with_quantized_kernels_roundtrips(tmp_path):
    from flax import nnx

    model = nnx.Sequential(
        nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 8, rngs=nnx.Rngs(1))
    )
    state = nnx.state(model, nnx.Param)
    qstate = qjax.quantize(state, [(r".*kernel", qjax.Int(4, group=32)), (r".*bias", None)])
    qjax.save(tmp_path / "ck", qstate)
    back = qjax.load(tmp_path / "ck")  # a pure dict, int keys for the layer list
    restored = nnx.state(nnx.clone(model), nnx.Param)
    nnx.replace_by_pure_dict(restored, back)
    a = restored["layers"][1]["kernel"].get_value()
    b = qstate["layers"][1]["kernel"].get_value()
    assert isinstance(a, qjax.QArray) and a.spec == b.spec
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())


def test_load_rejects_non_checkpoints(tmp_path):
    with pytest.raises(qjax.FormatError, match="not a qjax checkpoint"):
        qjax.load(tmp_path)
