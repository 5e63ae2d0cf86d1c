import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax.models.gemma3 import Gemma3, Gemma3Config
from qjax.models.llama import Llama, LlamaConfig
from qjax.ptq import awq, calibrate, folding
from qjax.ptq.awq import AWQ
from qjax.ptq.calibrate import LayerStats

LINEARS = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"
MODELS = {
    "llama-gqa": lambda: Llama(
        LlamaConfig(
            vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96
        ),
        rngs=nnx.Rngs(0),
    ),
    "llama-mha": lambda: Llama(
        LlamaConfig(
            vocab_size=97, d_model=64, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=16, d_ff=96
        ),
        rngs=nnx.Rngs(1),
    ),
    "gemma3": lambda: Gemma3(
        Gemma3Config(
            vocab_size=97, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=96
        ),
        rngs=nnx.Rngs(2),
    ),
}


def _randomize_norms(model, seed):
    """Norm weights away from their init, so folding into them is really exercised."""
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(seed), 1000))
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            x + 0.3 * jax.random.normal(next(keys), x.shape)
            if "norm" in jax.tree_util.keystr(p)
            else x
        ),
        state,
    )
    nnx.update(model, state)


@pytest.mark.parametrize("name", list(MODELS))
def test_scale_folding_leaves_the_unquantized_model_unchanged(name):
    model = MODELS[name]()
    _randomize_norms(model, 3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 16)))
    ref = model(tokens)
    rng = np.random.default_rng(1)
    for block in model.layers:
        params = calibrate._param_values(block)
        methods = {
            p: AWQ(qjax.Int(4, group=32), clip=False) for p in params if p.endswith("_proj/kernel")
        }
        stats = {}
        for p in methods:
            n_in = params[p].shape[0]
            x = rng.standard_normal((256, n_in)) * rng.gamma(1.0, 1.0, n_in)  # uneven channels
            stats[p] = LayerStats(
                jnp.asarray(2 * x.T @ x / 256, jnp.float32),
                jnp.asarray(np.abs(x).mean(0), jnp.float32),
                jnp.asarray(np.abs(x).max(0), jnp.float32),
                256,
            )
        after, _ = folding.transform_block(block, params, stats, methods)
        changed = [p for p in after if after[p] is not params[p]]
        assert any("norm" in p for p in changed) and any("down_proj" in p for p in changed)
        state = nnx.state(block, nnx.Param)
        nnx.update(block, calibrate._replace(state, after))
    got = model(tokens)
    rel = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
    assert rel <= 1e-5, rel


def test_awq_beats_rtn_and_awq_gptq_runs_through_the_engine():
    model = MODELS["llama-gqa"]()
    tokens = np.random.default_rng(2).integers(0, 97, (8, 24)).astype(np.int32)
    ref = model(jnp.asarray(tokens))
    errs = {}
    for label, method in [
        ("rtn", qjax.Int(3, group=32)),
        ("awq", AWQ(qjax.Int(3, group=32))),
        ("awq+gptq", AWQ(qjax.Int(3, group=32), then="gptq")),
    ]:
        qstate, report = calibrate.quantize_model(
            model, [(LINEARS, method)], tokens, default=None, progress=False
        )
        qmodel = nnx.clone(model)
        nnx.update(qmodel, qstate)
        errs[label] = float(jnp.linalg.norm(qmodel(jnp.asarray(tokens)) - ref))
    assert errs["awq"] < errs["rtn"]
    assert errs["awq+gptq"] < errs["rtn"]


def test_clip_search_never_increases_the_group_output_error():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_t(3, (128, 16)).astype(np.float32))
    x = rng.standard_normal((512, 128))
    h = jnp.asarray(2 * x.T @ x / 512, jnp.float32)
    spec = qjax.Int(3, group=32)
    clipped = awq.search_clip(w, h, spec)

    def err(v):
        d = spec.quantize(v).dequantize() - w
        return float(jnp.sum(d * (h @ d)))

    assert err(clipped) <= err(w) + 1e-6


def test_smoothquant_w8a8_matmul_is_integer_and_close():
    from qjax.formats import W8A8

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 64)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((64, 32)).astype(np.float32))
    q = W8A8().quantize(w)
    assert q.codes.dtype == jnp.int8
    y = qjax.matmul(x, q)
    # float64 oracle of the documented integer product, dynamic per-token activation scales
    x64, c = np.asarray(x, np.float64), np.asarray(q.codes[0].T, np.int64)
    sx = np.abs(x64).max(-1, keepdims=True) / 127
    xq = np.clip(np.round(x64 / sx), -127, 127).astype(np.int64)
    want = (xq @ c) * sx * np.asarray(q.scales[0], np.float64)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_smoothquant_through_the_engine_beats_plain_w8a8_static():
    from qjax.ptq.smoothquant import SmoothQuant

    model = MODELS["llama-gqa"]()
    emb = nnx.state(model, nnx.Param)
    # an outlier channel in the activations: scale one embedding dimension up
    model.embed.embedding.set_value(emb["embed"]["embedding"].get_value().at[:, 3].multiply(40.0))
    tokens = np.random.default_rng(6).integers(0, 97, (8, 24)).astype(np.int32)
    ref = model(jnp.asarray(tokens))
    errs = {}
    for alpha in (0.0, 0.5):  # α = 0 migrates nothing: s = 1/max|W|^1 ... so compare to α=0.5
        qstate, _ = calibrate.quantize_model(
            model, [(LINEARS, SmoothQuant(alpha=alpha))], tokens, default=None, progress=False
        )
        qmodel = nnx.clone(model)
        nnx.update(qmodel, qstate)
        errs[alpha] = float(jnp.linalg.norm(qmodel(jnp.asarray(tokens)) - ref))
    assert errs[0.5] < errs[0.0]
