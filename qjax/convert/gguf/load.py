"""GGUF file → model config + Flax NNX model with the file's weights (dequantized).

>>> config, model = load_gguf_model(qjax.assets.path("smollm2"))  # doctest: +SKIP
>>> logits = model(tokens)                                         # doctest: +SKIP

Supported architectures: ``llama`` (→ :class:`~qjax.models.Llama`) and ``gemma3``
(→ :class:`~qjax.models.Gemma3`). Loading

1. reads the config from the ``<arch>.*`` metadata (a missing key is a :class:`FormatError`);
2. builds the model abstractly (``nnx.eval_shape``: no memory for random weights);
3. checks every expected tensor is present with the expected shape, and no tensor is left
   unused, before dequantizing anything;
4. dequantizes one tensor at a time with our reader, converts it (below) and places it, so the
   peak memory is the model plus a few copies of its largest tensor.

With ``native=True``, linear weights and the embedding stored as ``Q8_0``, ``Q4_0`` or ``Q4_1``
stay quantized: they become :class:`~qjax.QArray` s of ``Int(bits, group=32)`` along the input
axis holding the file's own codes and scales (see :func:`native_qarray`); other types are
dequantized as usual.

Conversions: GGUF stores a linear weight as ``(out, in)`` (NumPy order); we transpose to Flax's
``(in, out)``. llama.cpp's exporter permutes the rows of Llama's Q and K weights from the
half-split RoPE layout into the interleaved one, per head: ``W.reshape(heads, 2, D/2, in)
.swapaxes(1, 2)``; we undo it with ``W.reshape(heads, D/2, 2, in).swapaxes(1, 2)``, where K uses
the number of *KV* heads (REFERENCE §4). Gemma's exporter stores every RMSNorm weight as
``1 + w``; we subtract 1, as the model scales by ``(1 + w)``.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax.convert.gguf.constants import GGMLType
from qjax.convert.gguf.quants import BLOCK_DTYPES
from qjax.convert.gguf.reader import GGUFReader, read_gguf
from qjax.errors import FormatError
from qjax.formats.uniform import Int
from qjax.models.gemma3 import Gemma3, Gemma3Config, default_layer_types
from qjax.models.llama import Llama, LlamaConfig
from qjax.qarray import QArray
from qjax.rules import path_str

__all__ = [
    "config_from_gguf",
    "gguf_param_loaders",
    "load_gguf_model",
    "native_qarray",
    "unpermute_qk",
]

#: A per-tensor conversion applied before the (out, in) -> (in, out) transpose. It must act on
#: rows (the first axis) only, so that :func:`native_qarray` can apply it to per-block arrays.
Transform = Callable[[np.ndarray], np.ndarray]


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's export permutation of a Q or K weight ``(heads·D, in)``, per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ------------------------------------------------------------------------------- metadata


class _Meta:
    """``<arch>.<key>`` metadata lookups whose errors name the file and the key."""

    def __init__(self, reader: GGUFReader, arch: str):
        self.md, self.arch, self.file = reader.metadata, arch, str(reader.path)

    def get(self, key: str, default: Any = ...) -> Any:
        full = f"{self.arch}.{key}"
        if full in self.md:
            return self.md[full]
        if default is ...:
            raise FormatError(f"{self.file}: metadata key {full!r} is missing")
        return default

    def integer(self, key: str, default: Any = ...) -> int:
        value = self.get(key, default)
        if isinstance(value, list | np.ndarray):  # per-layer arrays: must be uniform here
            if len(set(np.asarray(value).tolist())) != 1:
                raise FormatError(f"{self.file}: {self.arch}.{key}: per-layer values unsupported")
            value = np.asarray(value).flat[0]
        return int(value)


def _vocab_size(reader: GGUFReader, meta: _Meta) -> int:
    """``<arch>.vocab_size``, else the length of the tokenizer's vocabulary."""
    if f"{meta.arch}.vocab_size" in reader.metadata:
        return meta.integer("vocab_size")
    tokens = reader.metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise FormatError(f"{meta.file}: neither {meta.arch}.vocab_size nor a vocabulary is given")
    return len(tokens)


def _llama_config(reader: GGUFReader, meta: _Meta) -> LlamaConfig:
    if "rope_freqs.weight" in reader.tensors:
        raise FormatError(f"{meta.file}: Llama 3 RoPE frequency scaling (rope_freqs) unsupported")
    d, n_heads = meta.integer("embedding_length"), meta.integer("attention.head_count")
    return LlamaConfig(
        vocab_size=_vocab_size(reader, meta),
        d_model=d,
        n_layers=meta.integer("block_count"),
        n_heads=n_heads,
        n_kv_heads=meta.integer("attention.head_count_kv", n_heads),
        head_dim=meta.integer("attention.key_length", d // n_heads),
        d_ff=meta.integer("feed_forward_length"),
        rms_eps=float(meta.get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("rope.freq_base", 10_000.0)),
        tie_embeddings="output.weight" not in reader.tensors,
        max_seq_len=meta.integer("context_length", 2048),
    )


def _gemma3_config(reader: GGUFReader, meta: _Meta) -> Gemma3Config:
    d, n_heads = meta.integer("embedding_length"), meta.integer("attention.head_count")
    n_layers = meta.integer("block_count")
    head_dim = meta.integer("attention.key_length", 256)
    scaling = 1.0
    if meta.get("rope.scaling.type", "none") == "linear":
        scaling = float(meta.get("rope.scaling.factor"))
    # llama.cpp (and Google's reference) scale queries by d/heads for the 27B model only.
    scalar = d // n_heads if n_layers == 62 else head_dim
    softcap = meta.get("final_logit_softcapping", None)
    return Gemma3Config(
        vocab_size=_vocab_size(reader, meta),
        d_model=d,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=meta.integer("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        d_ff=meta.integer("feed_forward_length"),
        rms_eps=float(meta.get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get("rope.freq_base", 1_000_000.0)),
        rope_local_theta=10_000.0,  # not in the metadata; fixed by llama.cpp and transformers
        rope_scaling=scaling,
        sliding_window=meta.integer("attention.sliding_window"),
        layer_types=default_layer_types(n_layers, 6),
        query_pre_attn_scalar=float(scalar),
        final_logit_softcap=None if softcap is None else float(softcap),
        tie_embeddings="output.weight" not in reader.tensors,
        max_seq_len=meta.integer("context_length", 32768),
    )


def _minus_one(w: np.ndarray) -> np.ndarray:
    return w - np.float32(1.0)


def _llama_tensors(c: LlamaConfig) -> list[tuple[str, str, Transform | None]]:
    return [
        (r"layers/(\d+)/attn/q_proj/kernel", "blk.{}.attn_q.weight",
         lambda w: unpermute_qk(w, c.n_heads)),
        (r"layers/(\d+)/attn/k_proj/kernel", "blk.{}.attn_k.weight",
         lambda w: unpermute_qk(w, c.n_kv_heads)),
        (r"layers/(\d+)/input_norm/scale", "blk.{}.attn_norm.weight", None),
        (r"layers/(\d+)/post_attn_norm/scale", "blk.{}.ffn_norm.weight", None),
        (r"final_norm/scale", "output_norm.weight", None),
    ]  # fmt: skip


def _gemma3_tensors(c: Gemma3Config) -> list[tuple[str, str, Transform | None]]:
    norms = {
        "input_norm": "attn_norm", "post_attn_norm": "post_attention_norm",
        "pre_mlp_norm": "ffn_norm", "post_mlp_norm": "post_ffw_norm",
        "attn/q_norm": "attn_q_norm", "attn/k_norm": "attn_k_norm",
    }  # fmt: skip
    rows = [
        (rf"layers/(\d+)/{p}/scale", f"blk.{{}}.{g}.weight", _minus_one) for p, g in norms.items()
    ]
    return [*rows, (r"final_norm/scale", "output_norm.weight", _minus_one)]


_COMMON = [
    (r"embed/embedding", "token_embd.weight"),
    (r"layers/(\d+)/attn/q_proj/kernel", "blk.{}.attn_q.weight"),
    (r"layers/(\d+)/attn/k_proj/kernel", "blk.{}.attn_k.weight"),
    (r"layers/(\d+)/attn/v_proj/kernel", "blk.{}.attn_v.weight"),
    (r"layers/(\d+)/attn/o_proj/kernel", "blk.{}.attn_output.weight"),
    (r"layers/(\d+)/mlp/gate_proj/kernel", "blk.{}.ffn_gate.weight"),
    (r"layers/(\d+)/mlp/up_proj/kernel", "blk.{}.ffn_up.weight"),
    (r"layers/(\d+)/mlp/down_proj/kernel", "blk.{}.ffn_down.weight"),
    (r"lm_head/kernel", "output.weight"),
]

_ARCHS: dict[str, tuple[Callable, type, Callable]] = {
    "llama": (_llama_config, Llama, _llama_tensors),
    "gemma3": (_gemma3_config, Gemma3, _gemma3_tensors),
}


def _architecture(reader: GGUFReader) -> str:
    arch = reader.metadata.get("general.architecture")
    if arch not in _ARCHS:
        raise FormatError(
            f"{reader.path}: unsupported architecture {arch!r} (general.architecture); "
            f"supported: {', '.join(sorted(_ARCHS))}"
        )
    return arch


def config_from_gguf(path_or_reader: str | os.PathLike[str] | GGUFReader):
    """The model config (:class:`LlamaConfig` or :class:`Gemma3Config`) of a GGUF file."""
    reader = path_or_reader if isinstance(path_or_reader, GGUFReader) else read_gguf(path_or_reader)
    arch = _architecture(reader)
    return _ARCHS[arch][0](reader, _Meta(reader, arch))


def _tensor_for(param: str, table: list[tuple[str, str, Transform | None]]):
    """``(gguf name, transform)`` of a param path; first matching row wins."""
    for pattern, gguf_name, transform in table:
        m = re.fullmatch(pattern, param)
        if m:
            return gguf_name.format(*m.groups()), transform
    raise AssertionError(f"no GGUF tensor mapped to param {param}")  # a bug, not bad input


def load_gguf_model(
    path: str | os.PathLike[str], dtype: Any = jnp.float32, *, native: bool = False
):
    """``(config, model)`` from a GGUF file, weights dequantized to ``dtype``.

    ``native=True`` keeps ``Q8_0`` / ``Q4_0`` / ``Q4_1`` linear weights and embeddings as
    QArrays (:func:`native_qarray`).

    Raises :class:`~qjax.errors.FormatError` naming the file (and the tensor or key) for an
    unsupported architecture, a missing metadata key, a missing or unused tensor, or a tensor
    whose shape does not match the config.
    """
    config, model, loaders = gguf_param_loaders(path, dtype, native=native)
    abstract = nnx.state(model, nnx.Param)
    params = jax.tree_util.tree_map_with_path(
        lambda p, _: jax.device_put(loaders[path_str(p)]()), abstract
    )
    nnx.update(model, params)
    return config, model


def gguf_param_loaders(
    path_or_reader: str | os.PathLike[str] | GGUFReader,
    dtype: Any = jnp.float32,
    *,
    native: bool = False,
) -> tuple[Any, nnx.Module, dict[str, Callable[[], Any]]]:
    """``(config, abstract model, {param path: loader})`` of a GGUF file: what
    :func:`load_gguf_model` fills the model with, one zero-argument loader per param (it reads
    and converts that one tensor: a QArray, or a NumPy array of ``dtype``), so a caller can
    stream the params without the whole model.

    The model is built with ``nnx.eval_shape`` (no weights). Every tensor is checked (present,
    expected shape, none unused) before this returns.
    """
    reader = path_or_reader if isinstance(path_or_reader, GGUFReader) else read_gguf(path_or_reader)
    arch = _architecture(reader)
    config_fn, model_cls, tensors_fn = _ARCHS[arch]
    config = config_fn(reader, _Meta(reader, arch))
    model = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0), dtype=dtype))
    abstract = nnx.state(model, nnx.Param)

    overrides = tensors_fn(config)
    table = [*overrides, *((p, g, None) for p, g in _COMMON)]
    plan: dict[str, tuple[str, Transform | None, tuple[int, ...]]] = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        param = path_str(keypath)
        name, transform = _tensor_for(param, table)
        is_kernel = param.endswith("/kernel")
        plan[param] = (name, transform, tuple(reversed(leaf.shape)) if is_kernel else leaf.shape)
    _check_tensors(reader, plan)

    def loader(param: str, name: str, transform: Transform | None, ndim: int):
        def load():
            if native and reader.tensors[name].ggml_type in _NATIVE and ndim == 2:
                return native_qarray(reader, name, transform, kernel=param.endswith("/kernel"),
                                     dtype=dtype)  # fmt: skip
            w = reader.dequantize(name)
            if transform is not None:
                w = transform(w)
            if w.ndim == 2 and param.endswith("/kernel"):
                w = np.ascontiguousarray(w.T)
            return w.astype(dtype, copy=False)  # NumPy: a writer needs no device copy

        return load

    loaders = {p: loader(p, name, t, len(shape)) for p, (name, t, shape) in plan.items()}
    return config, model, loaders


def _check_tensors(reader: GGUFReader, plan: dict) -> None:
    """Every planned tensor exists with the expected (NumPy-order) shape; none is left over."""
    for param, (name, _, shape) in plan.items():
        info = reader.tensors.get(name)
        if info is None:
            raise FormatError(f"{reader.path}: tensor {name!r} (for {param}) is missing")
        if tuple(info.shape) != tuple(shape):
            raise FormatError(
                f"{reader.path}: tensor {name!r} has shape {info.shape}, expected {tuple(shape)} "
                f"for {param} (NumPy order, from the metadata)"
            )
    unused = sorted(set(reader.tensors) - {name for name, _, _ in plan.values()})
    if unused:
        shown = ", ".join(unused[:8]) + (" ..." if len(unused) > 8 else "")
        raise FormatError(f"{reader.path}: {len(unused)} tensor(s) not used by the model: {shown}")


#: GGML block types that map exactly (Q8_0, Q4_0) or to float32 rounding (Q4_1) onto ``Int``:
#: type -> (bits, symmetric).
_NATIVE = {GGMLType.Q8_0: (8, True), GGMLType.Q4_0: (4, True), GGMLType.Q4_1: (4, False)}


def native_qarray(
    reader: GGUFReader,
    name: str,
    row_transform: Transform | None = None,
    *,
    kernel: bool = True,
    dtype: Any = jnp.float32,
) -> QArray:
    """A ``Q8_0`` / ``Q4_0`` / ``Q4_1`` matrix as a QArray with the file's codes and scales.

    A GGML block is 32 consecutive elements of a row (the input axis): ``Q8_0`` ``y = d·q``
    (``q`` int8) and ``Q4_0`` ``y = d·(q - 8)`` are exactly ``Int(8|4, group=32, symmetric)``
    with float16 scales ``d`` (codes ``q + 128`` and ``q``); ``Q4_1`` ``y = d·q + m`` is
    ``Int(4, group=32, symmetric=False)`` with the zero point ``z = -m/d``, stored in float32
    (exact up to float32 rounding of ``z·d``). ``row_transform`` (the Q/K unpermutation) acts on
    the rows, i.e. the first axis of the per-block arrays. ``kernel=True`` gives an ``(in, out)``
    kernel (blocks along axis 0), else the ``(rows, cols)`` matrix as stored (an embedding,
    blocks along axis 1).
    """
    info = reader.tensors[name]
    bits, symmetric = _NATIVE[info.ggml_type]
    rows, cols = info.shape
    blocks = reader.raw(name).view(BLOCK_DTYPES[info.ggml_type]).reshape(rows, cols // 32)
    scales = blocks["d"].astype(np.float32)
    if info.ggml_type == GGMLType.Q8_0:  # q + 128 as uint8 is q's byte with the top bit flipped
        codes = blocks["qs"].view(np.uint8) ^ np.uint8(0x80)
    else:
        qs = blocks["qs"]
        codes = np.concatenate([qs & 15, qs >> 4], axis=-1)  # low nibbles: elements 0-15
    zeros = None
    if not symmetric:  # y = d q + m = (q - z) d with z = -m / d; a block with d = 0 is all m
        mins = blocks["m"].astype(np.float32)
        flat = scales == 0
        codes = np.where(flat[..., None], np.uint8(0), codes)
        scales = np.where(flat, np.float32(1.0), scales)
        zeros = -mins / scales
    arrays = [codes, scales] + ([] if zeros is None else [zeros])
    if row_transform is not None:
        arrays = [row_transform(a) for a in arrays]
    if kernel:  # (rows = out, blocks, 32) -> grid (blocks, out) of the (in, out) kernel
        arrays = [np.ascontiguousarray(np.swapaxes(a, 0, 1)) for a in arrays]
    spec = Int(
        bits=bits, group=32, symmetric=symmetric, axis=0 if kernel else 1,
        scale_dtype="float16" if symmetric else "float32",
    )  # fmt: skip
    codes, scales = arrays[0], arrays[1].astype(spec.scale_dtype)
    zeros = None if symmetric else jnp.asarray(arrays[2].astype(spec.scale_dtype))
    shape = (cols, rows) if kernel else (rows, cols)
    return _from_codes(spec, codes, jnp.asarray(scales), zeros, shape, dtype)


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _from_codes(spec: Int, codes, scales, zeros, shape, dtype) -> QArray:
    """``spec.from_codes`` compiled: the code packing fused, without its eager uint32
    temporaries (4 bytes a code: 450 MiB for SmolLM2's Q8_0 embedding)."""
    return spec.from_codes(codes, scales, zeros, shape, dtype)
