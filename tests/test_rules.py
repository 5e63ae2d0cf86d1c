import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax


def _tree():
    k = jax.random.split(jax.random.key(0), 3)
    return {
        "embed": {"embedding": jax.random.normal(k[0], (64, 32))},
        "layers": [
            {
                "attn": {"kernel": jax.random.normal(k[1], (32, 32))},
                "mlp": {
                    "down": {"kernel": jax.random.normal(k[2], (128, 32))},
                    "bias": jnp.zeros(32),
                },
            }
        ],
        "step": jnp.array(3, jnp.int32),
    }


RULES = [
    (r".*mlp/down/kernel", qjax.Int(8, group="channel")),
    (r"embed/.*", None),
    (r".*kernel", qjax.Int(4, group=32)),
    (r".*bias", None),
]


def test_first_match_wins_and_none_keeps():
    q = qjax.quantize(_tree(), RULES)
    assert isinstance(q["layers"][0]["mlp"]["down"]["kernel"], qjax.QArray)
    assert q["layers"][0]["mlp"]["down"]["kernel"].spec.bits == 8
    assert q["layers"][0]["attn"]["kernel"].spec.bits == 4
    assert not isinstance(q["embed"]["embedding"], qjax.QArray)
    assert q["step"].dtype == jnp.int32  # non-floating leaves pass through


def test_fullmatch_not_search():
    with pytest.raises(qjax.RuleError, match="matching no param.*'kernel'"):
        qjax.plan(_tree(), [("kernel", None)], default=None)


def test_unmatched_param_is_an_error_naming_it():
    with pytest.raises(qjax.RuleError, match="layers/0/mlp/bias"):
        qjax.quantize(_tree(), RULES[:3])


def test_unused_rule_is_an_error():
    with pytest.raises(qjax.RuleError, match="typo"):
        qjax.quantize(_tree(), [*RULES, (r".*kernal", qjax.NF4())])


def test_nan_and_inf_are_errors_naming_the_param():
    tree = _tree()
    tree["layers"][0]["attn"]["kernel"] = tree["layers"][0]["attn"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(qjax.NonFiniteError, match="layers/0/attn/kernel.*1 NaN"):
        qjax.quantize(tree, RULES)


def test_unknown_format_is_an_error():
    with pytest.raises(qjax.SpecError, match="unknown format 'int5'"):
        qjax.spec_from_config({"format": "int5", "bits": 5})


def test_same_call_on_nnx_state_and_linen_style_dict():
    model = nnx.Sequential(
        nnx.Linear(64, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 8, rngs=nnx.Rngs(1))
    )
    state = nnx.state(model, nnx.Param)
    rules = [(r".*kernel", qjax.Int(4, group=32)), (r".*bias", None)]
    qstate = qjax.quantize(state, rules)
    qdict = qjax.quantize(
        {"params": nnx.to_pure_dict(state)}, [(r"params/" + p, m) for p, m in rules]
    )
    a = qstate["layers"][0]["kernel"].get_value()
    b = qdict["params"]["layers"][0]["kernel"]
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())
    # the quantized state plugs back into the model, whose linears now see QArrays
    nnx.update(model, qstate)
    assert isinstance(model.layers[0].kernel.get_value(), qjax.QArray)


def test_explain_counts_bytes_exactly(capsys):
    rows = qjax.explain(_tree(), RULES)
    by_path = {r["path"]: r for r in rows}
    q = qjax.quantize(_tree(), RULES)
    assert by_path["layers/0/attn/kernel"]["bytes_after"] == q["layers"][0]["attn"]["kernel"].nbytes
    assert by_path["embed/embedding"]["bytes_after"] == 64 * 32 * 4
    assert by_path["layers/0/attn/kernel"]["bits_per_weight"] == pytest.approx(4.5)
    assert "total" in capsys.readouterr().out


def test_quantize_is_pure_and_jittable():
    tree = _tree()
    before = jax.tree_util.tree_map(np.asarray, tree)
    fn = jax.jit(lambda t: qjax.quantize(t, RULES))
    q = fn(tree)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, tree)
    )
    eager = qjax.quantize(tree, RULES)
    np.testing.assert_array_equal(
        q["layers"][0]["attn"]["kernel"].dequantize(),
        eager["layers"][0]["attn"]["kernel"].dequantize(),
    )
