"""Flax NNX decoder-only language models: Llama (SmolLM2) and Gemma 3 (text).

Every linear layer goes through :func:`qjax.ops.matmul`, so quantizing the param state with
:func:`qjax.quantize` and ``nnx.update(model, qstate)`` gives a quantized model. Models expose a
block protocol for layer-by-layer calibration (``model.embed``, ``model.layers[i]``,
``model.head``; see :mod:`qjax.models.common`). Load real weights with
:func:`qjax.convert.gguf.load.load_gguf_model`.
"""

from qjax.models.common import DecoderLM, KVCache
from qjax.models.gemma3 import Gemma3, Gemma3Config
from qjax.models.generate import generate
from qjax.models.llama import Llama, LlamaConfig

__all__ = ["DecoderLM", "Gemma3", "Gemma3Config", "KVCache", "Llama", "LlamaConfig", "generate"]
