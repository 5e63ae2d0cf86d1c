import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.models.llama import Llama, LlamaConfig
from qjax.ptq import calibrate
from qjax.ptq.gptq import GPTQ

CFG = LlamaConfig(
    vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96
)
LINEARS = r"layers/\d+/(attn|mlp)/.*_proj/kernel"


@pytest.fixture(scope="module")
def model_and_tokens():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (6, 24)).astype(np.int32)
    return model, tokens


@pytest.fixture
def seen_hessians(monkeypatch):
    """``{param path: Hessian}`` handed to each method by the engine (records, then delegates)."""
    seen = {}
    real = calibrate._apply

    def spy(method, weight, stats, key, where):
        seen[where] = stats.hessian
        return real(method, weight, stats, key, where)

    monkeypatch.setattr(calibrate, "_apply", spy)
    return seen


def test_hessians_are_those_of_the_true_layer_inputs(model_and_tokens, seen_hessians):
    model, tokens = model_and_tokens
    seen = seen_hessians
    calibrate.quantize_model(
        model,
        [(LINEARS, GPTQ(qjax.Int(4, group=32)))],
        tokens,
        default=None,
        batch_size=4,
        progress=False,
    )
    # oracle: recompute block 0's attention input by hand, in float64
    h = np.asarray(model.embed(jnp.asarray(tokens)), np.float64)
    x = np.asarray(model.layers[0].input_norm(jnp.asarray(h, jnp.float32)), np.float64)
    x = x.reshape(-1, CFG.d_model)
    want = 2 * x.T @ x / len(x)
    for proj in ("q_proj", "k_proj", "v_proj"):
        np.testing.assert_allclose(seen[f"layers/0/attn/{proj}/kernel"], want, rtol=1e-4, atol=1e-5)
    assert seen["layers/1/mlp/down_proj/kernel"].shape == (CFG.d_ff, CFG.d_ff)


def test_later_blocks_see_the_quantized_outputs_of_earlier_ones(model_and_tokens, seen_hessians):
    model, tokens = model_and_tokens
    seen = seen_hessians
    rules = [(LINEARS, GPTQ(qjax.Int(2, group="channel")))]
    qstate, _ = calibrate.quantize_model(model, rules, tokens, default=None, progress=False)
    qmodel = nnx.clone(model)
    nnx.update(qmodel, qstate)
    h = qmodel.embed(jnp.asarray(tokens))
    h = qmodel.layers[0](h)[0]  # quantized block 0
    x = np.asarray(qmodel.layers[1].input_norm(h), np.float64).reshape(-1, CFG.d_model)
    np.testing.assert_allclose(
        seen["layers/1/attn/q_proj/kernel"], 2 * x.T @ x / len(x), rtol=1e-4, atol=1e-5
    )


def test_engine_with_rtn_equals_plain_quantize_and_model_runs(model_and_tokens):
    model, tokens = model_and_tokens
    rules = [
        (LINEARS, qjax.Int(4, group=32)),
        ("embed/embedding", qjax.Int(8, group="channel", axis=1)),
    ]
    qstate, report = calibrate.quantize_model(model, rules, tokens, default=None, progress=False)
    plain = qjax.quantize(nnx.state(model, nnx.Param), rules, default=None)
    a = qstate["layers"][1]["mlp"]["down_proj"]["kernel"].get_value()
    b = plain["layers"][1]["mlp"]["down_proj"]["kernel"].get_value()
    np.testing.assert_array_equal(a.dequantize(), b.dequantize())
    assert len(report) == 2 * 7 + 1
    qmodel = nnx.clone(model)
    nnx.update(qmodel, qstate)
    ref = model(jnp.asarray(tokens))
    got = qmodel(jnp.asarray(tokens))
    assert float(jnp.max(jnp.abs(got - ref))) < 0.2 * float(jnp.max(jnp.abs(ref)))


def test_gptq_model_is_closer_to_the_reference_than_rtn(model_and_tokens):
    model, tokens = model_and_tokens
    ref = model(jnp.asarray(tokens))
    errs = {}
    for name, method in [
        ("rtn", qjax.Int(3, group="channel")),
        ("gptq", GPTQ(qjax.Int(3, group="channel"))),
    ]:
        qstate, report = calibrate.quantize_model(
            model, [(LINEARS, method)], tokens, default=None, progress=False
        )
        qmodel = nnx.clone(model)
        nnx.update(qmodel, qstate)
        errs[name] = float(jnp.linalg.norm(qmodel(jnp.asarray(tokens)) - ref))
    assert all("rel_output_error" in r for r in report)
    assert errs["gptq"] < errs["rtn"]


def test_calibration_method_outside_blocks_is_an_error(model_and_tokens):
    model, tokens = model_and_tokens
    with pytest.raises(qjax.RuleError, match="embed/embedding"):
        calibrate.quantize_model(
            model,
            [("embed/embedding", GPTQ(qjax.Int(4, group=32)))],
            tokens,
            default=None,
            progress=False,
        )


def test_short_calibration_text_is_a_clear_error():
    with pytest.raises(qjax.QjaxError, match="tokens"):
        calibrate.calibration_tokens(lambda text: list(range(100)), n=4, length=128)
