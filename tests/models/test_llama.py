"""Llama (SmolLM2-135M): layers, KV cache, GGUF loading, parity with transformers.

Tiny random models check the math against transformers' ``LlamaForCausalLM`` built from the same
weights; the real SmolLM2 GGUF checks the loader and the model against transformers' own GGUF
loading (float32), logits and greedy tokens.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _testing import jit_forward, jit_logits, max_rel
from flax import nnx

import qjax
from qjax.convert.gguf.load import config_from_gguf, load_gguf_model
from qjax.models import KVCache, Llama, LlamaConfig, generate
from qjax.rules import path_str

PROMPT_TOKENS, GEN_STEPS = 64, 32  # the prompt length is set in conftest.HFReference

TINY = LlamaConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
    rms_eps=1e-5, rope_theta=10_000.0, max_seq_len=64,
)  # fmt: skip


def _tiny(randomize_params, tie: bool = True, seed: int = 0) -> Llama:
    config = TINY if tie else LlamaConfig(**{**TINY.__dict__, "tie_embeddings": False})
    return randomize_params(Llama(config, rngs=nnx.Rngs(seed)), seed)


def _paths(model) -> set[str]:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {path_str(p) for p, _ in leaves}


# ------------------------------------------------------------------------------- tiny models


def test_param_paths():
    layer = {
        "input_norm/scale", "post_attn_norm/scale",
        *(f"attn/{p}_proj/kernel" for p in "qkvo"),
        *(f"mlp/{p}_proj/kernel" for p in ("gate", "up", "down")),
    }  # fmt: skip
    expected = {"embed/embedding", "final_norm/scale"}
    expected |= {f"layers/{i}/{p}" for i in range(2) for p in layer}
    assert _paths(Llama(TINY)) == expected
    untied = Llama(LlamaConfig(**{**TINY.__dict__, "tie_embeddings": False}))
    assert _paths(untied) == expected | {"lm_head/kernel"}
    assert untied.lm_head.kernel.get_value().shape == (32, 64)
    assert Llama(TINY).layers[0].attn.k_proj.kernel.get_value().shape == (32, 16)  # (in, out)


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_matches_transformers(tie, randomize_params, to_hf_state_dict, hf_generate_fn):
    import torch
    import transformers

    model = _tiny(randomize_params, tie)
    c = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_seq_len, tie_word_embeddings=tie,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    result = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    ids = np.random.default_rng(0).integers(0, c.vocab_size, 20)
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids[None])).logits[0].numpy()
    assert max_rel(jit_logits(model, ids), ref) < 1e-5
    np.testing.assert_array_equal(generate(model, ids, 8), hf_generate_fn(hf, ids, 8))


def test_block_protocol_composes(randomize_params):
    model = _tiny(randomize_params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 9)))
    positions = jnp.broadcast_to(jnp.arange(9), (2, 9))
    h = model.embed(tokens)
    for layer in model.layers:
        h, cache = layer(h, positions)
        assert cache is None
    np.testing.assert_allclose(model.head(h), model(tokens), rtol=1e-6, atol=1e-6)


def test_kv_cache_chunks_match_full_forward(randomize_params):
    model = _tiny(randomize_params)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 10)))
    fwd = jit_forward(model)
    full = fwd(tokens)[0]
    caches = model.init_cache(2, 16)
    assert isinstance(caches[0], KVCache) and caches[0].k.shape == (2, 16, 2, 8)
    outs = []
    for lo, hi in [(0, 5), (5, 8), (8, 9), (9, 10)]:
        logits, caches = fwd(tokens[:, lo:hi], caches)
        outs.append(logits)
    assert int(caches[0].end) == 10
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_quantized_q_proj_runs_under_jit(randomize_params):
    model = _tiny(randomize_params)
    ids = np.arange(1, 13)
    ref = jit_logits(model, ids)
    rules = [(r"layers/\d+/attn/q_proj/kernel", qjax.Int(8, group="channel")), (r".*", None)]
    nnx.update(model, qjax.quantize(nnx.state(model, nnx.Param), rules))
    assert isinstance(model.layers[1].attn.q_proj.kernel.get_value(), qjax.QArray)
    assert max_rel(jit_logits(model, ids), ref) < 2e-2
    assert generate(model, ids, 4).shape == (16,)


def test_generate_shapes_and_errors(randomize_params):
    model = _tiny(randomize_params)
    ids = np.array([[3, 4, 5], [6, 7, 8]])
    out = generate(model, ids, 3)
    assert out.shape == (2, 6) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :3], ids)
    np.testing.assert_array_equal(generate(model, ids[1], 3), out[1])
    np.testing.assert_array_equal(generate(model, ids, 0), ids)
    with pytest.raises(ValueError, match="max_len"):
        generate(model, ids, 3, max_len=4)


# ------------------------------------------------------------------------------- GGUF loading


@pytest.fixture()
def tiny_gguf(tmp_path, gguf_export, randomize_params):
    """``write(**changes) -> (path, model)``: the tiny model exported as llama.cpp would."""
    tensors_fn, metadata_fn, write = gguf_export
    model = _tiny(randomize_params, seed=3)

    def make(arch="llama", drop=(), replace=None, extra=None, drop_keys=()):
        tensors = tensors_fn(model, "llama")
        for name in drop:
            del tensors[name]
        tensors.update(replace or {})
        tensors.update(extra or {})
        metadata = metadata_fn(model.config, "llama")
        for key in drop_keys:
            del metadata[key]
        return write(tmp_path / "tiny.gguf", arch, metadata, tensors), model

    return make


def test_gguf_round_trip_undoes_qk_permutation(tiny_gguf):
    path, model = tiny_gguf()
    config, loaded = load_gguf_model(path)
    assert config == config_from_gguf(path)
    assert config.rms_eps == pytest.approx(model.config.rms_eps)  # stored as float32
    assert dataclasses.replace(config, rms_eps=model.config.rms_eps) == model.config
    for (p, a), (_, b) in zip(
        *(
            jax.tree_util.tree_flatten_with_path(nnx.state(m, nnx.Param))[0]
            for m in (model, loaded)
        ),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path_str(p))
    # bfloat16 loading
    _, half = load_gguf_model(path, dtype=jnp.bfloat16)
    assert half.layers[0].attn.q_proj.kernel.get_value().dtype == jnp.bfloat16


def test_gguf_native_qarrays(tiny_gguf, gguf_export):
    """Q8_0 / Q4_0 tensors kept as QArrays dequantize exactly to what the plain loader gives,
    row permutation of Q and K included."""
    _, model = tiny_gguf()
    exported = gguf_export[0](model, "llama")
    quantized = {
        "blk.0.attn_q.weight": "Q8_0", "blk.0.attn_k.weight": "Q4_0",
        "blk.1.attn_q.weight": "Q4_0", "blk.1.attn_k.weight": "Q8_0", "token_embd.weight": "Q8_0",
    }  # fmt: skip
    path, _ = tiny_gguf(replace={n: (exported[n], t) for n, t in quantized.items()})
    _, plain = load_gguf_model(path)
    _, native = load_gguf_model(path, native=True)
    pairs = [
        (native.embed.embedding, plain.embed.embedding),
        *((getattr(n.attn, p).kernel, getattr(q.attn, p).kernel)
          for n, q in zip(native.layers, plain.layers, strict=True) for p in ("q_proj", "k_proj")),
    ]  # fmt: skip
    for a, b in pairs:
        qa = a.get_value()
        assert isinstance(qa, qjax.QArray) and qa.spec.group == 32
        np.testing.assert_array_equal(np.asarray(qa.dequantize()), np.asarray(b.get_value()))
    assert not isinstance(native.layers[0].attn.v_proj.kernel.get_value(), qjax.QArray)  # F32
    ids = jnp.arange(1, 9)[None]
    np.testing.assert_allclose(native(ids), plain(ids), rtol=1e-6, atol=1e-6)


def test_gguf_missing_tensor(tiny_gguf):
    path, _ = tiny_gguf(drop=["blk.1.ffn_up.weight"])
    with pytest.raises(qjax.FormatError, match=r"tiny\.gguf.*'blk\.1\.ffn_up\.weight'.*missing"):
        load_gguf_model(path)


def test_gguf_shape_mismatch(tiny_gguf):
    path, _ = tiny_gguf(replace={"blk.0.attn_v.weight": np.zeros((8, 32), np.float32)})
    with pytest.raises(qjax.FormatError, match=r"tiny\.gguf.*'blk\.0\.attn_v\.weight'.*\(8, 32\)"):
        load_gguf_model(path)


def test_gguf_unused_tensor(tiny_gguf):
    path, _ = tiny_gguf(extra={"blk.0.attn_q.bias": np.zeros(32, np.float32)})
    with pytest.raises(qjax.FormatError, match=r"tiny\.gguf.*blk\.0\.attn_q\.bias"):
        load_gguf_model(path)


def test_gguf_unknown_architecture(tiny_gguf):
    path, _ = tiny_gguf(arch="mamba")
    with pytest.raises(qjax.FormatError, match=r"tiny\.gguf.*architecture 'mamba'"):
        load_gguf_model(path)


def test_gguf_missing_metadata(tiny_gguf):
    path, _ = tiny_gguf(drop_keys=["block_count"])
    with pytest.raises(qjax.FormatError, match=r"tiny\.gguf.*'llama\.block_count'"):
        load_gguf_model(path)


# ---------------------------------------------------------------------------- real SmolLM2


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_gguf_model(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_gguf, hf_reference):
    return hf_reference(smollm2_gguf)


@pytest.fixture(scope="module")
def our_logits(smollm2, reference):
    return jit_logits(smollm2[1], reference.ids)


def test_smollm2_config(smollm2):
    config, _ = smollm2
    assert config == LlamaConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64,
        d_ff=1536, rms_eps=config.rms_eps, rope_theta=100_000.0, tie_embeddings=True,
        max_seq_len=8192,
    )  # fmt: skip
    assert config.rms_eps == pytest.approx(1e-5)


def test_smollm2_logits_match_transformers(reference, our_logits):
    ref = reference.logits(reference.ids)
    assert our_logits.shape == ref.shape == (PROMPT_TOKENS, 49152)
    rel = max_rel(our_logits, ref)
    print(f"SmolLM2 max|Δlogits|/max|logits| = {rel:.2e}")
    assert rel <= 1e-4


def test_smollm2_greedy_matches_transformers(smollm2, reference):
    ours = generate(smollm2[1], reference.ids, GEN_STEPS)
    theirs = reference.generate(reference.ids, GEN_STEPS)
    assert theirs.shape == ours.shape == (PROMPT_TOKENS + GEN_STEPS,)
    np.testing.assert_array_equal(ours, theirs)


def test_smollm2_native_q4_1(smollm2_gguf, reference, our_logits):
    """SmolLM2's Q4_1 linears and Q8_0 embedding kept as QArrays give the same logits."""
    _, model = load_gguf_model(smollm2_gguf, native=True)
    kernel = model.layers[3].mlp.down_proj.kernel.get_value()
    assert isinstance(kernel, qjax.QArray) and kernel.shape == (1536, 576)
    assert kernel.spec == qjax.Int(4, group=32, symmetric=False, scale_dtype="float32")
    assert isinstance(model.embed.embedding.get_value(), qjax.QArray)
    rel = max_rel(jit_logits(model, reference.ids), our_logits)
    print(f"SmolLM2 native Q4_1 QArrays vs dequantized: rel Δlogits {rel:.2e}")
    assert rel <= 1e-5


def test_smollm2_int8_q_proj_stays_close(smollm2, reference, our_logits):
    model = nnx.clone(smollm2[1])
    rules = [(r"layers/\d+/attn/q_proj/kernel", qjax.Int(8, group="channel")), (r".*", None)]
    nnx.update(model, qjax.quantize(nnx.state(model, nnx.Param), rules))
    assert isinstance(model.layers[7].attn.q_proj.kernel.get_value(), qjax.QArray)
    assert not isinstance(smollm2[1].layers[7].attn.q_proj.kernel.get_value(), qjax.QArray)
    q = jit_logits(model, reference.ids)
    rel = max_rel(q, our_logits)
    agree = float((q.argmax(-1) == our_logits.argmax(-1)).mean())
    print(f"SmolLM2 int8 q_proj: rel Δlogits {rel:.2e}, top-1 agreement {agree:.3f}")
    assert 0 < rel < 3e-2 and agree >= 0.95


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp
    from flax import nnx
    from qjax.convert.gguf.load import load_gguf_model

    def status(key):  # VmRSS / VmHWM (peak) of this process's memory map, in bytes
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    jnp.zeros(8).block_until_ready()  # start the CPU client before measuring
    base = status("VmRSS")
    _, model = load_gguf_model(sys.argv[1])
    # not getrusage's ru_maxrss: it keeps the parent's peak across fork + exec
    peak = status("VmHWM")
    n = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    print(json.dumps({"base": base, "peak": peak, "params": int(n)}))
    """
)


def test_smollm2_load_peak_memory(smollm2_gguf):
    """Loading dequantizes one tensor at a time: peak RSS growth < 3x the float32 model."""
    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(smollm2_gguf)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    fp32 = 4 * m["params"]
    growth = m["peak"] - m["base"]
    print(f"SmolLM2 load: {m['params']:,} params, fp32 {fp32 / 2**20:.0f} MiB, "
          f"peak RSS growth {growth / 2**20:.0f} MiB ({growth / fp32:.2f}x)")  # fmt: skip
    assert 130e6 < m["params"] < 140e6
    assert growth < 3 * fp32
