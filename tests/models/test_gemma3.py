"""Gemma 3 (gemma-3-270m): local/global attention, norms, GGUF loading, parity with transformers.

A tiny random model with a 4-token sliding window, linear RoPE scaling on its global layer,
``query_pre_attn_scalar != head_dim`` and a final-logit soft-cap checks every Gemma-specific path
against transformers' ``Gemma3ForCausalLM`` built from the same weights; the real GGUF is checked
against transformers' own GGUF loading (float32), logits and greedy tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _testing import jit_forward, jit_logits, max_rel
from flax import nnx

import qjax
from qjax.convert.gguf.load import load_gguf_model
from qjax.models import Gemma3, Gemma3Config, generate
from qjax.models.gemma3 import default_layer_types
from qjax.rules import path_str

PROMPT_TOKENS, GEN_STEPS = 64, 32  # the prompt length is set in conftest.HFReference

TINY = Gemma3Config(
    vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=48,
    rms_eps=1e-6, rope_theta=1_000_000.0, rope_local_theta=10_000.0, rope_scaling=8.0,
    sliding_window=4, layer_types=("sliding", "full", "sliding"), query_pre_attn_scalar=24.0,
    final_logit_softcap=30.0, max_seq_len=64,
)  # fmt: skip


def _tiny(randomize_params, seed: int = 0, **changes) -> Gemma3:
    config = dataclasses.replace(TINY, **changes)
    return randomize_params(Gemma3(config, rngs=nnx.Rngs(seed)), seed)


# ------------------------------------------------------------------------------- tiny models


def test_param_paths_and_layer_pattern():
    layer = {
        "input_norm/scale", "post_attn_norm/scale", "pre_mlp_norm/scale", "post_mlp_norm/scale",
        "attn/q_norm/scale", "attn/k_norm/scale",
        *(f"attn/{p}_proj/kernel" for p in "qkvo"),
        *(f"mlp/{p}_proj/kernel" for p in ("gate", "up", "down")),
    }  # fmt: skip
    expected = {"embed/embedding", "final_norm/scale"}
    expected |= {f"layers/{i}/{p}" for i in range(3) for p in layer}
    model = Gemma3(TINY)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    assert {path_str(p) for p, _ in leaves} == expected
    assert model.layers[0].attn.q_norm.scale.get_value().shape == (16,)
    assert [layer.attn.window for layer in model.layers] == [4, None, 4]
    types = default_layer_types(18)
    assert [i for i, t in enumerate(types) if t == "full"] == [5, 11, 17]
    with pytest.raises(ValueError, match="layer_types"):
        dataclasses.replace(TINY, layer_types=("sliding", "full"))


def _hf_tiny(model, attn_implementation="eager"):
    import transformers

    c = model.config
    hf_config = transformers.Gemma3TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_eps,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_theta},
            "full_attention": {"rope_type": "linear", "factor": c.rope_scaling,
                               "rope_theta": c.rope_theta},
        },
        sliding_window=c.sliding_window,
        layer_types=[f"{t}_attention" for t in c.layer_types],
        query_pre_attn_scalar=int(c.query_pre_attn_scalar),
        final_logit_softcapping=c.final_logit_softcap,
        attn_logit_softcapping=50.0,  # transformers' Gemma 3 ignores it, and so do we
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )  # fmt: skip
    return transformers.Gemma3ForCausalLM(hf_config).eval()


@pytest.mark.parametrize("softcap", [30.0, None])
def test_tiny_matches_transformers(softcap, randomize_params, to_hf_state_dict, hf_generate_fn):
    import torch

    model = _tiny(randomize_params, final_logit_softcap=softcap)
    hf = _hf_tiny(model, "eager" if softcap else "sdpa")
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, 20)  # 5x the window
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids[None])).logits[0].numpy()
    assert max_rel(jit_logits(model, ids), ref) < 1e-5
    np.testing.assert_array_equal(generate(model, ids, 10), hf_generate_fn(hf, ids, 10))


def test_sliding_window_cache_chunks_match_full_forward(randomize_params):
    model = _tiny(randomize_params)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 11)))
    fwd = jit_forward(model)
    full = fwd(tokens)[0]
    caches = model.init_cache(2, 16)
    outs = []
    for lo, hi in [(0, 6), (6, 7), (7, 11)]:
        logits, caches = fwd(tokens[:, lo:hi], caches)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_block_protocol_composes(randomize_params):
    model = _tiny(randomize_params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, 9)))
    h = model.embed(tokens)
    np.testing.assert_allclose(
        h, model.embed.embedding.get_value()[tokens] * jnp.float32(np.sqrt(32)), rtol=1e-6
    )
    positions = jnp.arange(9)[None]
    for layer in model.layers:
        h, _ = layer(h, positions)
    np.testing.assert_allclose(model.head(h), model(tokens), rtol=1e-6, atol=1e-6)


def test_gguf_round_trip_norms(tmp_path, randomize_params, gguf_export):
    """llama.cpp stores Gemma's norm weights as 1 + w and does not permute Q/K."""
    tensors_fn, metadata_fn, write = gguf_export
    model = _tiny(
        randomize_params, seed=4, rope_scaling=1.0, query_pre_attn_scalar=16.0,
        layer_types=(), n_layers=6, final_logit_softcap=None,
    )  # fmt: skip
    path = write(tmp_path / "g.gguf", "gemma3", metadata_fn(model.config, "gemma3"),
                 tensors_fn(model, "gemma3"))  # fmt: skip
    config, loaded = load_gguf_model(path)
    assert config.layer_types == default_layer_types(6)
    assert dataclasses.replace(config, rms_eps=TINY.rms_eps) == model.config
    ours = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    theirs = jax.tree_util.tree_leaves(nnx.state(loaded, nnx.Param))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- real Gemma 3


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    return load_gguf_model(gemma3_gguf)


@pytest.fixture(scope="module")
def reference(gemma3_gguf, hf_reference):
    return hf_reference(gemma3_gguf)


def test_gemma3_config(gemma3):
    config, model = gemma3
    expected = Gemma3Config(
        vocab_size=262144, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
        d_ff=2048, rms_eps=config.rms_eps, rope_theta=1_000_000.0, rope_local_theta=10_000.0,
        sliding_window=512, query_pre_attn_scalar=256.0, final_logit_softcap=None,
        tie_embeddings=True, max_seq_len=32768,
    )  # fmt: skip
    assert config == expected and config.rms_eps == pytest.approx(1e-6)
    assert model.lm_head is None and model.embed.scale == pytest.approx(640**0.5)


def test_gemma3_logits_match_transformers(gemma3, reference):
    assert reference.ids[0] == 2  # BOS, added by the tokenizer
    ours = jit_logits(gemma3[1], reference.ids)
    ref = reference.logits(reference.ids)
    assert ours.shape == ref.shape == (PROMPT_TOKENS, 262144)
    rel = max_rel(ours, ref)
    print(f"Gemma3 max|Δlogits|/max|logits| = {rel:.2e}")
    assert rel <= 1e-4


def test_gemma3_greedy_matches_transformers(gemma3, reference):
    ours = generate(gemma3[1], reference.ids, GEN_STEPS)
    theirs = reference.generate(reference.ids, GEN_STEPS)
    assert theirs.shape == ours.shape == (PROMPT_TOKENS + GEN_STEPS,)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_gemma3_long_prompt_uses_sliding_window(gemma3, reference):
    """A 600-token prompt: local layers see 512 keys, global layers all (transformers' masks)."""
    ids = np.concatenate([reference.ids, np.tile(reference.ids[1:], 10)])[:600]
    rel = max_rel(jit_logits(gemma3[1], ids), reference.logits(ids))
    print(f"Gemma3, 600 tokens: max|Δlogits|/max|logits| = {rel:.2e}")
    assert rel <= 1e-4


def test_gemma3_embedding_may_be_quantized(gemma3, reference):
    """The tied head dequantizes a quantized embedding table."""
    model = nnx.clone(gemma3[1])
    rules = [(r"embed/embedding", qjax.Int(8, group="channel", axis=1)), (r".*", None)]
    nnx.update(model, qjax.quantize(nnx.state(model, nnx.Param), rules))
    assert isinstance(model.embed.embedding.get_value(), qjax.QArray)
    ids = reference.ids[:16]
    ref = jit_logits(gemma3[1], ids)
    q = jit_logits(model, ids)
    assert max_rel(q, ref) < 5e-2
    assert (q.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
