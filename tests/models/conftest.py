"""Fixtures for the model tests: real GGUF files, transformers references, tiny GGUF writers.

transformers (torch, float32) is the reference: it dequantizes the same GGUF file with gguf-py
and runs its own Llama / Gemma 3 code. Loading it is slow on 2 cores, so each test module loads
one model once (module-scoped fixtures in the test files).
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from qjax.rules import path_str

#: The prompt: the start of the test text, tokenized by transformers, cut to this many tokens.
PROMPT_TOKENS = 64
GEN_STEPS = 32


@pytest.fixture(scope="session", autouse=True)
def _torch_one_thread():
    """torch on one thread: with 2 cores and another busy process, torch's 2 OpenMP threads
    spin against each other and a 135M-param forward pass gets ~20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_VOCAB_KEYS = [f"tokenizer.ggml.{k}" for k in ("tokens", "scores", "token_type", "merges")]


def without_vocabulary(src: Path, dst: Path) -> Path:
    """A copy of a GGUF file without the tokenizer's vocabulary arrays (tensors byte for byte,
    the other metadata as is, ``<arch>.vocab_size`` added): gguf-py, which transformers parses
    the file with, takes ~12 s per parse of Gemma's 262k-token vocabulary, and transformers
    parses the file twice to load a model."""
    import gguf

    from qjax.convert.gguf import GGUFValueType, read_gguf

    reader = read_gguf(src)
    arch = reader.metadata["general.architecture"]
    w = gguf.GGUFWriter(dst, arch)
    if reader.alignment != 32:
        w.add_custom_alignment(reader.alignment)
    for key, value in reader.metadata.items():
        if key in (*_VOCAB_KEYS, "general.architecture", "general.alignment"):
            continue
        types = [gguf.GGUFValueType(int(t)) for t in reader.value_types[key]]
        if types[0] == GGUFValueType.ARRAY:
            w.add_key_value(key, list(value), types[0], sub_type=types[1])
        else:
            w.add_key_value(key, value, types[0])
    if f"{arch}.vocab_size" not in reader.metadata:
        w.add_uint32(f"{arch}.vocab_size", len(reader.metadata["tokenizer.ggml.tokens"]))
    for name, info in reader.tensors.items():
        rows = int(np.prod(info.shape[:-1]))
        raw = reader.raw(name).reshape(*info.shape[:-1], info.nbytes // max(rows, 1))
        w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType(int(info.ggml_type)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


class HFReference:
    """transformers' tokenizer and float32 model loaded from one GGUF file, plus the prompt."""

    def __init__(self, gguf: Path, tmp: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import qjax.data

        (tmp / "tok").mkdir()
        (tmp / "tok" / gguf.name).symlink_to(gguf)
        tokenizer = AutoTokenizer.from_pretrained(tmp / "tok", gguf_file=gguf.name)
        ids = tokenizer(qjax.data.test_text()[:400])["input_ids"]
        assert len(ids) >= PROMPT_TOKENS, len(ids)
        self.ids = np.asarray(ids[:PROMPT_TOKENS], np.int32)
        torch.manual_seed(0)
        light = without_vocabulary(gguf, tmp / gguf.name)
        self.model = AutoModelForCausalLM.from_pretrained(
            tmp, gguf_file=light.name, dtype=torch.float32
        ).eval()

    def logits(self, ids: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.as_tensor(ids[None], dtype=torch.long)).logits[0].numpy()

    def generate(self, ids: np.ndarray, steps: int) -> np.ndarray:
        return hf_generate(self.model, ids, steps)


def hf_generate(model, ids: np.ndarray, steps: int) -> np.ndarray:
    """transformers' greedy continuation, exactly ``steps`` new tokens (no EOS stop)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids[None], dtype=torch.long),
            max_new_tokens=steps,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0].numpy()


@pytest.fixture(scope="session")
def hf_reference(tmp_path_factory):
    """``make(gguf_path) -> HFReference`` (call it from a module-scoped fixture)."""
    return lambda gguf: HFReference(gguf, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def hf_generate_fn():
    return hf_generate


# ---------------------------------------------------------------- our params <-> transformers

_HF_NAMES = [
    (r"embed/embedding", "model.embed_tokens.weight"),
    (r"final_norm/scale", "model.norm.weight"),
    (r"lm_head/kernel", "lm_head.weight"),
    (r"layers/(\d+)/attn/(\w)_proj/kernel", r"model.layers.\1.self_attn.\2_proj.weight"),
    (r"layers/(\d+)/attn/(\w)_norm/scale", r"model.layers.\1.self_attn.\2_norm.weight"),
    (r"layers/(\d+)/mlp/(\w+)_proj/kernel", r"model.layers.\1.mlp.\2_proj.weight"),
    (r"layers/(\d+)/input_norm/scale", r"model.layers.\1.input_layernorm.weight"),
    (r"layers/(\d+)/post_attn_norm/scale", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers/(\d+)/pre_mlp_norm/scale", r"model.layers.\1.pre_feedforward_layernorm.weight"),
    (r"layers/(\d+)/post_mlp_norm/scale", r"model.layers.\1.post_feedforward_layernorm.weight"),
]


def hf_state_dict(model) -> dict:
    """Our params as a transformers state dict (kernels transposed to ``(out, in)``)."""
    import torch

    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        path = path_str(keypath)
        for pattern, name in _HF_NAMES:
            if re.fullmatch(pattern, path):
                w = np.array(leaf, np.float32)
                out[re.sub(pattern, name, path)] = torch.from_numpy(
                    np.ascontiguousarray(w.T if path.endswith("kernel") else w)
                )
                break
        else:
            raise AssertionError(f"no transformers name for {path}")
    return out


@pytest.fixture(scope="session")
def to_hf_state_dict():
    return hf_state_dict


def randomize(model, seed: int = 0, std: float = 0.3):
    """Gives every param of ``model`` random values (norm scales too), in place."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        jax.random.normal(k, x.shape, x.dtype) * (std if x.ndim > 1 else 0.2)
        + (0 if x.ndim > 1 else 1)
        for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
    return model


@pytest.fixture(scope="session")
def randomize_params():
    return randomize


# ---------------------------------------------------------------------------- tiny GGUF files


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's export permutation of a Q/K weight ``(heads·D, in)`` (REFERENCE §4)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_GGUF_NAMES = {
    "input_norm": "attn_norm",
    "attn/q_proj": "attn_q",
    "attn/k_proj": "attn_k",
    "attn/v_proj": "attn_v",
    "attn/o_proj": "attn_output",
    "attn/q_norm": "attn_q_norm",
    "attn/k_norm": "attn_k_norm",
    "mlp/gate_proj": "ffn_gate",
    "mlp/up_proj": "ffn_up",
    "mlp/down_proj": "ffn_down",
}


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """Our params as the float32 GGUF tensors llama.cpp would export (NumPy order)."""
    c = model.config
    llama = arch == "llama"
    names = dict(_GGUF_NAMES)
    names["post_attn_norm"] = "ffn_norm" if llama else "post_attention_norm"
    names.update(pre_mlp_norm="ffn_norm", post_mlp_norm="post_ffw_norm")
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        path = path_str(keypath)
        w = np.asarray(leaf, np.float32)
        if path.endswith("kernel"):
            w = np.ascontiguousarray(w.T)
        if not llama and path.endswith("norm/scale"):
            w = w + np.float32(1.0)
        if path == "embed/embedding":
            out["token_embd.weight"] = w
        elif path == "final_norm/scale":
            out["output_norm.weight"] = w
        elif path == "lm_head/kernel":
            out["output.weight"] = w
        else:
            m = re.fullmatch(r"layers/(\d+)/(.+)/(kernel|scale)", path)
            i, module = m.group(1), m.group(2)
            if llama and module == "attn/q_proj":
                w = permute_qk(w, c.n_heads)
            if llama and module == "attn/k_proj":
                w = permute_qk(w, c.n_kv_heads)
            out[f"blk.{i}.{names[module]}.weight"] = w
    return out


def gguf_metadata(config, arch: str) -> dict:
    c = config
    md = {
        "context_length": c.max_seq_len,
        "embedding_length": c.d_model,
        "block_count": c.n_layers,
        "feed_forward_length": c.d_ff,
        "attention.head_count": c.n_heads,
        "attention.head_count_kv": c.n_kv_heads,
        "attention.layer_norm_rms_epsilon": c.rms_eps,
        "rope.freq_base": c.rope_theta,
        "vocab_size": c.vocab_size,
    }
    if arch == "llama":
        md["rope.dimension_count"] = c.head_dim
    else:
        md["attention.key_length"] = md["attention.value_length"] = c.head_dim
        md["attention.sliding_window"] = c.sliding_window
    return md


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict) -> Path:
    """A GGUF file written by gguf-py: ``<arch>.<key>`` metadata and the tensors, float32 or,
    for a ``name: (array, "Q8_0")`` entry, quantized by gguf-py to that type."""
    import gguf

    w = gguf.GGUFWriter(path, arch)
    for key, value in metadata.items():
        full = f"{arch}.{key}"
        if isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, int(value))
    for name, x in tensors.items():
        if isinstance(x, tuple):
            qtype = gguf.GGMLQuantizationType[x[1]]
            w.add_tensor(name, gguf.quants.quantize(np.float32(x[0]), qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def gguf_export():
    """``(tensors(model, arch), metadata(config, arch), write(path, arch, metadata, tensors))``."""
    return gguf_tensors, gguf_metadata, write_gguf
