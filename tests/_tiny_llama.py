"""A tiny Llama GGUF with SmolLM2's real header (tokenizer included) and random weights.

2 layers, d = 64, 4 heads / 2 KV heads of 16, d_ff = 128, SmolLM2's vocabulary (49152): the
linears in Q4_0 (or ``linear_type``), token_embd and output in Q8_0, norms F32. Converts in a
second or two, so the ``qjax convert`` round trips can run on every path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qjax import assets
from qjax.convert.gguf import GGMLType, quants, read_gguf, write_gguf
from qjax.convert.gguf.constants import GGUFValueType

D, HEADS, KV, HEAD_DIM, FF, LAYERS = 64, 4, 2, 16, 128, 2


def write_tiny_llama(path: Path, linear_type: GGMLType = GGMLType.Q4_0, seed: int = 0) -> Path:
    src = read_gguf(assets.path("smollm2"))
    md, vt = dict(src.metadata), dict(src.value_types)
    vocab = len(md["tokenizer.ggml.tokens"])
    md.update({
        "llama.embedding_length": D, "llama.block_count": LAYERS,
        "llama.feed_forward_length": FF, "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV, "llama.rope.dimension_count": HEAD_DIM,
        "general.file_type": 2,
    })  # fmt: skip
    for k in ("llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
              "llama.attention.head_count", "llama.attention.head_count_kv",
              "llama.rope.dimension_count", "general.file_type"):  # fmt: skip
        vt[k] = (GGUFValueType.UINT32,)
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int, t: GGMLType):
        return quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, t)

    tensors = [("token_embd.weight", GGMLType.Q8_0, mat(vocab, D, GGMLType.Q8_0), (vocab, D))]
    for i in range(LAYERS):
        b = f"blk.{i}."
        norm = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
        shapes = {"attn_q": (HEADS * HEAD_DIM, D), "attn_k": (KV * HEAD_DIM, D),
                  "attn_v": (KV * HEAD_DIM, D), "attn_output": (D, HEADS * HEAD_DIM),
                  "ffn_gate": (FF, D), "ffn_up": (FF, D), "ffn_down": (D, FF)}  # fmt: skip
        tensors.append((b + "attn_norm.weight", GGMLType.F32, norm, (D,)))
        for kind, shape in shapes.items():
            tensors.append((f"{b}{kind}.weight", linear_type, mat(*shape, linear_type), shape))
        tensors.append((b + "ffn_norm.weight", GGMLType.F32, norm.copy(), (D,)))
    tensors.append(("output_norm.weight", GGMLType.F32, np.ones(D, np.float32), (D,)))
    tensors.append(("output.weight", GGMLType.Q8_0, mat(vocab, D, GGMLType.Q8_0), (vocab, D)))
    return write_gguf(path, md, tensors, alignment=src.alignment, value_types=vt)
