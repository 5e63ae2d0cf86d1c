"""llama.cpp quantization mixes ("file types"): which GGML type each tensor of a model gets.

A llama.cpp *mix* such as ``Q4_K_M`` is not one tensor type: ``llama_model_quantize`` starts from
the mix's default type and then applies per-tensor rules (``llama_tensor_get_type`` in
``src/llama-quant.cpp``). This module restates those rules for the llama.cpp version bundled with
llama-cpp-python 0.3.36 (our own code; the rules, not the source, are llama.cpp's) and writes
complete GGUF files with them through :func:`~qjax.convert.gguf.writer.write_gguf`, using our
byte-identical encoders (:func:`~qjax.convert.gguf.quants.quantize`).
``experiments/gguf_mixes_vs_llamacpp.py`` checks the result against llama.cpp's own quantizer,
tensor by tensor (types and bytes).

Mixes (``MIXES``; llama.cpp ftype number in brackets, written as ``general.file_type``; the
changes from the default type are those of a dense, non-Falcon model, before the fallback):

* ``F32`` [0], ``F16`` [1], ``BF16`` [32]: every quantizable matrix in that type, no rules.
* ``Q4_0`` [2], ``Q4_1`` [3], ``Q5_0`` [8], ``Q5_1`` [9], ``Q8_0`` [7]: that type; output (and a
  tied token_embd) Q6_K (``Q8_0`` keeps Q8_0); with an imatrix ``Q4_0`` / ``Q5_0`` put ffn_down of
  the first n/8 layers in Q4_1 / Q5_1.
* ``Q2_K`` [10]: Q2_K; attn_v Q4_K if ``n_head / n_head_kv >= 4`` else Q3_K; ffn_down and
  attn_output Q3_K.
* ``Q3_K_S`` [11]: Q3_K (output Q6_K).
* ``Q3_K_M`` [12]: Q3_K; attn_v Q5_K in the first 2 layers, else Q4_K; ffn_down Q5_K in layers
  < n/16, else Q4_K; attn_output Q4_K.
* ``Q3_K_L`` [13]: Q3_K; attn_v, ffn_down and attn_output Q5_K.
* ``Q4_K_S`` [14]: Q4_K; attn_v Q5_K in the first 4 layers; ffn_down Q5_K in layers < n/8.
* ``Q4_K_M`` [15]: Q4_K; attn_v and ffn_down Q6_K where ``use_more_bits(i, n)``.
* ``Q5_K_S`` [16]: Q5_K (output Q6_K).
* ``Q5_K_M`` [17]: Q5_K; attn_v and ffn_down Q6_K where ``use_more_bits(i, n)``.
* ``Q6_K`` [18]: Q6_K.

Rules, in llama.cpp's order (``llama_tensor_get_type`` and ``llama_tensor_get_type_impl``):

1. Only tensors that *allow quantization* change type: at least 2-D, name ending in ``weight``,
   not a norm (``_norm.weight``), not an expert router (``ffn_gate_inp.weight``), not a
   positional / token-type embedding and not one of llama.cpp's small special tensors (see
   :func:`allows_quantization`). Everything else keeps its source type and bytes (norms stay F32).
2. For a float mix (F32/F16/BF16) the type is the default; no further rules.
3. ``output.weight``, and ``token_embd.weight`` when the model has no ``output.weight`` (tied
   embeddings): Q8_0 if the row length is not a multiple of the default type's block size (or
   the architecture is Falcon), else Q6_K — unless the default is Q8_0, which stays.
   An untied ``token_embd`` keeps the default type.
4. Value projections (``attn_v``, and fused ``attn_qkv`` / ``attn_kv_b`` count as attn_v-like)
   and ``ffn_down`` follow the table above. The layer index is a running counter over the
   tensors of that kind in llama.cpp's tensor order (numeric layer, then name), i.e. the layer
   number for the usual one-per-layer models; n is the number of attn_v-like tensors for attn_v
   and the model's block count for ffn_down.
   ``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division,
   C ``%``). (llama.cpp also has a separate ``attn_qkv`` rule, but it is unreachable: fused
   QKV is attn_v-like and takes the attn_v branch.) attn_output follows the table; attn_k,
   attn_q, ffn_gate, ffn_up keep the default in these mixes. Llama 70B (80 layers with GQA)
   puts Q3_K/Q4_K attn_v in Q5_K; 8-expert models use Q8_0 for attn_v and attn_k and Q5_K for
   attn_output in the K mixes.
5. **Fallback** when the row length (GGML ``ne[0]``, the last NumPy axis) is not a multiple of the
   chosen type's block (``tensor_type_fallback``): Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0,
   Q2_K / Q3_K → Q4_0 (older llama.cpp used IQ4_NL here; the bundled version uses Q4_0),
   IQ1..IQ4_XS → IQ4_NL; a 32-block type keeps its type; and if the fallback still does not fit,
   F16. SmolLM2 (width 576) and Gemma 3 (width 640) hit this on every matrix whose input is
   the model width.

References: llama.cpp ``src/llama-quant.cpp`` (``tensor_allows_quantization``,
``tensor_get_category``, ``llama_tensor_get_type_impl``, ``tensor_type_fallback``,
``llama_ftype_get_default_type``), ``include/llama.h`` (``llama_ftype``), as vendored in
llama-cpp-python 0.3.36.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qjax.convert.gguf.constants import BLOCK_SIZES, GGMLType, GGUFValueType
from qjax.convert.gguf.reader import GGUFReader, read_gguf
from qjax.errors import FormatError, SpecError

__all__ = [
    "MIXES",
    "Mix",
    "ModelInfo",
    "allows_quantization",
    "fallback_type",
    "quantize_model_gguf",
    "tensor_category",
    "tensor_type",
    "tensor_types",
]

T = GGMLType
GGML_QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION


@dataclass(frozen=True)
class Mix:
    """A llama.cpp file type: its name, ``llama_ftype`` number and default tensor type."""

    name: str
    ftype: int
    default: GGMLType


#: The supported mixes by llama.cpp name (``llama_ftype`` / ``llama_ftype_get_default_type``).
MIXES: dict[str, Mix] = {
    m.name: m
    for m in (
        Mix("F32", 0, T.F32),
        Mix("F16", 1, T.F16),
        Mix("BF16", 32, T.BF16),
        Mix("Q4_0", 2, T.Q4_0),
        Mix("Q4_1", 3, T.Q4_1),
        Mix("Q8_0", 7, T.Q8_0),
        Mix("Q5_0", 8, T.Q5_0),
        Mix("Q5_1", 9, T.Q5_1),
        Mix("Q2_K", 10, T.Q2_K),
        Mix("Q3_K_S", 11, T.Q3_K),
        Mix("Q3_K_M", 12, T.Q3_K),
        Mix("Q3_K_L", 13, T.Q3_K),
        Mix("Q4_K_S", 14, T.Q4_K),
        Mix("Q4_K_M", 15, T.Q4_K),
        Mix("Q5_K_S", 16, T.Q5_K),
        Mix("Q5_K_M", 17, T.Q5_K),
        Mix("Q6_K", 18, T.Q6_K),
    )
}

_FLOAT = frozenset({T.F32, T.F16, T.BF16})


def _mix(mix: str | Mix) -> Mix:
    if isinstance(mix, Mix):
        return mix
    key = str(mix).upper()
    if key not in MIXES:
        raise SpecError(f"unknown llama.cpp mix {mix!r} (known: {', '.join(MIXES)})")
    return MIXES[key]


# ------------------------------------------------------------------------------ model facts


@dataclass(frozen=True)
class ModelInfo:
    """The model facts the rules read (llama.cpp's ``hparams`` / ``model.type``).

    ``n_layers`` is the block count (``<arch>.block_count``); ``n_head`` / ``n_head_kv`` give
    ``n_gqa = n_head // n_head_kv`` (only Q2_K reads it); ``n_expert`` (``<arch>.expert_count``,
    0 for dense models) switches on the 8-expert rules.
    """

    arch: str = "llama"
    n_layers: int = 1
    n_head: int = 1
    n_head_kv: int = 1
    n_expert: int = 0

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_llama_70b(self) -> bool:
        """llama.cpp's ``LLM_TYPE_70B``: a llama with 80 layers and grouped-query attention."""
        return self.arch == "llama" and self.n_layers == 80 and self.n_head != self.n_head_kv

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> ModelInfo:
        arch = str(metadata.get("general.architecture", "llama"))

        def get(key: str, default: int) -> int:
            v = metadata.get(f"{arch}.{key}", default)
            if isinstance(v, list | tuple | np.ndarray):  # per-layer arrays: the first layer
                v = v[0] if len(v) else default
            return int(v)

        n_head = get("attention.head_count", 1)
        return cls(
            arch=arch,
            n_layers=get("block_count", 1),
            n_head=n_head,
            n_head_kv=get("attention.head_count_kv", n_head),
            n_expert=get("expert_count", 0),
        )


# ------------------------------------------------------------------------------ categories

#: Substrings (after the exact-name checks) that make a tensor non-quantizable in llama.cpp.
_NEVER_QUANTIZED = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)


def allows_quantization(name: str, shape: tuple[int, ...], *, quantize_output: bool = True) -> bool:
    """llama.cpp's ``tensor_allows_quantization``: may this tensor change type at all?

    True for tensors of >= 2 dims (``ggml_n_dims``: leading NumPy axes of size 1 do not
    count) whose name ends in ``weight`` and is none of: a norm
    (``*_norm.weight``), ``output.weight`` when ``quantize_output`` is False, MoE routers
    (``ffn_gate_inp``), positional / token-type embeddings (``position_embd.weight``,
    ``token_types.weight``), and llama.cpp's list of small special tensors (Mamba conv1d, RWKV
    time-mix, T5 relative bias, Gemma 3n altup/laurel, vision patch embeddings ...).
    """
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:  # ggml_n_dims: trailing ne == 1 do not count
        dims.pop(0)
    if len(dims) < 2 or not name.endswith("weight"):
        return False
    if not quantize_output and name == "output.weight":
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    return not any(s in name for s in _NEVER_QUANTIZED)


def tensor_category(name: str) -> str:
    """llama.cpp's ``tensor_get_category``: broad role of a tensor from its name.

    One of ``output``, ``token_embd`` (also ``per_layer_token_embd``), ``attn_qkv``,
    ``attn_kv_b``, ``attn_v``, ``attn_k``, ``attn_q``, ``attn_output`` (each matched as
    ``<kind>.weight`` anywhere in the name), ``ffn_up``, ``ffn_gate``, ``ffn_down`` (matched
    anywhere, so expert tensors ``ffn_down_exps`` count), else ``other`` — tested in that order.
    """
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for kind in ("attn_qkv", "attn_kv_b", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{kind}.weight" in name:
            return kind
    for kind in ("ffn_up", "ffn_gate", "ffn_down"):
        if kind in name:
            return kind
    return "other"


_ATTN_V_LIKE = frozenset({"attn_v", "attn_qkv", "attn_kv_b"})


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third
    layer in between (``i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``, C integer arithmetic)."""
    a = n_layers // 8
    d = i_layer - a
    rem = abs(d) % 3 * (1 if d >= 0 else -1)  # C's remainder takes the dividend's sign
    return i_layer < a or i_layer >= 7 * n_layers // 8 or rem == 2


# ------------------------------------------------------------------------------ fallback

_FALLBACK = {
    **dict.fromkeys(
        (T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ4_XS),
        T.IQ4_NL,
    ),
    **dict.fromkeys((T.Q2_K, T.Q3_K, T.TQ1_0, T.TQ2_0), T.Q4_0),
    T.Q4_K: T.Q5_0,
    T.Q5_K: T.Q5_1,
    T.Q6_K: T.Q8_0,
}


def fallback_type(ggml_type: GGMLType | int, row: int) -> GGMLType:
    """llama.cpp's ``tensor_type_fallback``: a type whose block fits a row of ``row`` elements.

    A type whose block divides ``row`` is returned unchanged. Otherwise the 256-element types
    fall back to a 32-element one (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, Q2_K/Q3_K → Q4_0,
    IQ1_S..IQ4_XS → IQ4_NL), a 32-element type is kept; if the result still does not divide the
    row, F16. ``row`` is GGML's ``ne[0]``, the last NumPy axis.
    """
    t = GGMLType(int(ggml_type))
    block = BLOCK_SIZES[t][0]
    if row % block == 0:
        return t
    if t in _FALLBACK:
        t = _FALLBACK[t]
    elif block > 32:
        raise SpecError(f"llama.cpp defines no fallback type for {t.name}")
    return t if row % BLOCK_SIZES[t][0] == 0 else T.F16


# ------------------------------------------------------------------------------ the rules


@dataclass
class _Counters:
    """llama.cpp's ``quantize_state_impl`` counters."""

    n_attention_wv: int = 0
    i_attention_wv: int = 0
    n_ffn_down: int = 0
    i_ffn_down: int = 0
    tied: bool = True


def _layer_of(name: str) -> int | None:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _rule(
    mix: Mix,
    name: str,
    row: int,
    category: str,
    model: ModelInfo,
    qs: _Counters,
    has_imatrix: bool,
) -> GGMLType:
    """``llama_tensor_get_type_impl`` for the supported mixes (before the fallback)."""
    m = mix.name
    new = mix.default
    falcon = model.arch == "falcon"
    moe8 = model.n_expert == 8

    def layer(counter: int, n: int) -> tuple[int, int]:
        if model.n_expert > 1:  # MoE: llama.cpp parses the layer from the name
            i = _layer_of(name)
            if i is None or not 0 <= i < n:
                raise FormatError(f"tensor {name!r}: cannot determine its layer (of {n})")
            return i, n
        return counter, n

    if category == "output" or (qs.tied and category == "token_embd"):
        if falcon or row % BLOCK_SIZES[new][0]:
            return T.Q8_0
        return new if new == T.Q8_0 else T.Q6_K
    if category == "token_embd":
        return new
    if category in _ATTN_V_LIKE:
        i, n = qs.i_attention_wv, qs.n_attention_wv
        if m == "Q2_K":
            new = T.Q4_K if model.n_gqa >= 4 else T.Q3_K
        elif m == "Q3_K_M":
            new = T.Q5_K if i < 2 else T.Q4_K
        elif m == "Q3_K_L":
            new = T.Q5_K
        elif m in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
            new = T.Q6_K
        elif m == "Q4_K_S" and i < 4:
            new = T.Q5_K
        if model.is_llama_70b and new in (T.Q3_K, T.Q4_K):
            new = T.Q5_K
        if moe8:
            new = T.Q8_0
        qs.i_attention_wv += 1
        return new
    if category == "attn_k":
        return T.Q8_0 if moe8 else new
    if category == "ffn_down":
        i, n = layer(qs.i_ffn_down, qs.n_ffn_down)
        qs.i_ffn_down += 1
        if m == "Q2_K":
            return T.Q3_K
        if m == "Q3_K_M":
            if i < n // 16:
                return T.Q5_K
            return T.Q4_K if not falcon or use_more_bits(i, n) else T.Q3_K
        if m == "Q3_K_L":
            return T.Q4_K if falcon else T.Q5_K
        if m == "Q4_K_M":
            if falcon:
                return T.Q6_K if i < n // 16 else T.Q5_K if use_more_bits(i, n) else T.Q4_K
            return T.Q6_K if use_more_bits(i, n) else new
        if m == "Q5_K_M" and use_more_bits(i, n):
            return T.Q6_K
        if m == "Q4_K_S" and not falcon and i < n // 8:
            return T.Q5_K
        if m in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
            return T.Q4_1 if m == "Q4_0" else T.Q5_1
        return new
    if category == "attn_output":
        if falcon:
            return T.Q4_K if m == "Q3_K_L" else new
        if moe8:
            return T.Q5_K if m in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M") else new
        return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(m, new)
    return new


def tensor_types(
    mix: str | Mix,
    tensors: Iterable[tuple[str, tuple[int, ...]] | tuple[str, tuple[int, ...], Any]],
    model: ModelInfo,
    *,
    has_imatrix: bool = False,
    quantize_output: bool = True,
) -> dict[str, GGMLType | None]:
    """The GGML type llama.cpp's quantizer gives each tensor of a model under ``mix``.

    ``tensors``: every tensor of the model as ``(name, numpy_shape)`` or
    ``(name, numpy_shape, source_type)``. Returns ``name -> type``; a tensor that does not
    :func:`allow quantization <allows_quantization>` maps to its ``source_type`` (``None`` when
    not given): it is copied unchanged. The running counters of the rules (attn_v and ffn_down
    layer indices, tied embeddings) are computed over all the tensors, in llama.cpp's order
    (layer number, then name), so the result matches llama.cpp for any input order.
    """
    mx = _mix(mix)
    items = []
    for t in tensors:
        name, shape = t[0], tuple(int(s) for s in t[1])
        src = GGMLType(int(t[2])) if len(t) > 2 and t[2] is not None else None
        items.append((name, shape, src))

    def order(item: tuple) -> tuple[int, str]:
        layer = _layer_of(item[0])
        return (-1 if layer is None else layer, item[0])

    items.sort(key=order)
    qs = _Counters()
    for name, _, _ in items:
        cat = tensor_category(name)
        qs.n_attention_wv += cat in _ATTN_V_LIKE
        qs.tied &= cat != "output"
    qs.n_ffn_down = model.n_layers
    out: dict[str, GGMLType | None] = {}
    for name, shape, src in items:
        if not allows_quantization(name, shape, quantize_output=quantize_output):
            out[name] = src
            continue
        new = mx.default
        if new not in _FLOAT:
            cat = tensor_category(name)
            new = _rule(mx, name, shape[-1], cat, model, qs, has_imatrix)
            new = fallback_type(new, shape[-1])
        out[name] = new
    return out


def tensor_type(
    mix: str | Mix,
    name: str,
    shape: tuple[int, ...],
    n_layers: int,
    arch: str = "llama",
    *,
    tied_embeddings: bool = True,
    n_head: int = 1,
    n_head_kv: int = 1,
    n_expert: int = 0,
    has_imatrix: bool = False,
) -> GGMLType | None:
    """The type of one tensor under ``mix`` (``None``: not quantizable, keeps its source type).

    Stateless form of :func:`tensor_types` for a model with one attn_v and one ffn_down per
    layer: the layer index of the attn_v / ffn_down rules is the ``blk.N`` of the name and both
    counts are ``n_layers``. ``tied_embeddings``: the model has no ``output.weight`` (then
    ``token_embd`` follows the output rule).
    """
    mx = _mix(mix)
    shape = tuple(int(s) for s in shape)
    if not allows_quantization(name, shape):
        return None
    if mx.default in _FLOAT:
        return mx.default
    layer = _layer_of(name) or 0
    qs = _Counters(n_layers, layer, n_layers, layer, tied_embeddings)
    model = ModelInfo(arch, n_layers, n_head, n_head_kv, n_expert)
    return fallback_type(
        _rule(mx, name, shape[-1], tensor_category(name), model, qs, has_imatrix), shape[-1]
    )


# ------------------------------------------------------------------------------ writer


def _source_reader(src: Any, source: Any, tmpdir: str) -> GGUFReader:
    """A reader over ``src`` (a GGUF path / reader), or over an F32 export of Llama params."""
    if isinstance(src, GGUFReader):
        return src
    if isinstance(src, str | os.PathLike):
        return read_gguf(src)
    if source is None:
        raise FormatError("quantize_model_gguf: params need source= (the GGUF they came from)")
    from qjax.convert.gguf.writer import export_llama_params

    path = Path(tmpdir) / "params_f32.gguf"
    return read_gguf(export_llama_params(path, src, source, T.F32))


def quantize_model_gguf(
    src: str | os.PathLike[str] | GGUFReader | Any,
    dst: str | os.PathLike[str],
    mix: str | Mix,
    *,
    imatrix: Mapping[str, np.ndarray] | None = None,
    source: str | os.PathLike[str] | GGUFReader | None = None,
    progress: Callable[[str, GGMLType, GGMLType], None] | None = None,
) -> Path:
    """Write a complete GGUF of the model in ``src`` quantized with llama.cpp's ``mix``.

    Args:
        src: a GGUF file (path or reader; any tensor types our reader can dequantize), or a qjax
            Llama model / its ``nnx.Param`` state, in which case ``source`` is the GGUF it came
            from (metadata, tokenizer, tensor order; the params are first exported as an F32 GGUF
            in a temporary directory next to ``dst`` with
            :func:`~qjax.convert.gguf.writer.export_llama_params`).
        dst: the output file, written atomically (temp file + rename) by ``write_gguf``.
        mix: a name in :data:`MIXES` (e.g. ``"Q4_K_M"``) or a :class:`Mix`.
        imatrix: optional importance matrix, ``tensor name -> (row_length,)`` float32 weights
            (llama.cpp's per-column mean squared activations); used by the encoders that take
            one and, as in llama.cpp, by the Q4_0/Q5_0 ffn_down rule. A tensor without an entry
            is quantized without; an entry of the wrong length is an error (except for
            ``token_embd``, where it is ignored, as llama.cpp does).

    Per tensor (streamed one at a time, in the source's order): the type from
    :func:`tensor_types`; a tensor whose chosen type equals its source type, or that may not be
    quantized, is copied byte for byte (as llama.cpp does); every other tensor is dequantized to
    float32 and encoded with :func:`~qjax.convert.gguf.quants.quantize` — what
    ``llama_model_quantize`` with ``allow_requantize`` writes. Metadata is the source's, in its
    order and value types, with ``general.quantization_version = 2`` and
    ``general.file_type = mix.ftype`` (both UINT32). ``progress(name, source_type, new_type)`` is
    called before each tensor is encoded.
    """
    from qjax.convert.gguf import quants
    from qjax.convert.gguf.writer import write_gguf

    mx = _mix(mix)
    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent if str(dst.parent) else ".") as tmpdir:
        reader = _source_reader(src, source, tmpdir)
        if dst.resolve() == reader.path.resolve():
            raise FormatError(f"{dst}: cannot quantize a GGUF file onto itself")
        model = ModelInfo.from_metadata(reader.metadata)
        infos = list(reader.tensors.values())
        types = tensor_types(
            mx,
            [(t.name, t.shape, t.ggml_type) for t in infos],
            model,
            has_imatrix=imatrix is not None,
        )
        imat = dict(imatrix or {})

        def fetch(name: str, new: GGMLType) -> Callable[[], np.ndarray]:
            def data() -> np.ndarray:
                info = reader.tensors[name]
                if progress is not None:
                    progress(name, info.ggml_type, new)
                if new == info.ggml_type:
                    return reader.raw(name)
                w = reader.dequantize(name)
                qw = imat.get(name)
                if qw is not None:
                    qw = np.asarray(qw, np.float32).reshape(-1)
                    if qw.size != w.shape[-1]:
                        if tensor_category(name) == "token_embd":
                            qw = None
                        else:
                            raise FormatError(
                                f"imatrix for {name!r} has {qw.size} values, "
                                f"the rows have {w.shape[-1]}"
                            )
                return quants.quantize(w, new, imatrix=qw)

            return data

        def tensors():
            for t in infos:
                new = types[t.name]
                new = t.ggml_type if new is None else new
                yield t.name, new, fetch(t.name, new), t.shape

        metadata = dict(reader.metadata)
        value_types = dict(reader.value_types)
        for key, value in (
            ("general.quantization_version", GGML_QUANTIZATION_VERSION),
            ("general.file_type", mx.ftype),
        ):
            metadata[key] = value
            value_types[key] = (GGUFValueType.UINT32,)
        return write_gguf(
            dst, metadata, tensors(), alignment=reader.alignment, value_types=value_types
        )
