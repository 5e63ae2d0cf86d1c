"""Quantized Llama / SmolLM2 params ↔ Hugging Face checkpoints (GPTQ, compressed-tensors).

>>> export_hf_quantized("out/smollm2-gptq", qstate, config, format="gptq")  # doctest: +SKIP
>>> AutoModelForCausalLM.from_pretrained("out/smollm2-gptq")                # doctest: +SKIP
>>> config, model = load_hf_quantized("out/smollm2-gptq")                   # doctest: +SKIP

The directory holds ``config.json`` (a ``LlamaConfig`` with a ``quantization_config``),
``model.safetensors`` and, when a tokenizer is given, ``tokenizer.json`` +
``tokenizer_config.json``. Decoder linears that are ``qjax.Int`` QArrays are written in the
chosen format (per-layer tensors: :mod:`qjax.convert.hf_quantized`):

* ``"gptq"`` / ``"gptq_v2"``: GPTQ ``qweight/qzeros/scales/g_idx``, ``checkpoint_format`` v1
  (stored zeros are ``zero - 1``) or v2. Every decoder linear must be quantized, all with the same
  bits, group size and symmetry; ``desc_act`` is true when a layer keeps an act-order perm.
* ``"compressed-tensors"``: ``pack-quantized`` ``weight_packed/weight_scale/...``; one config
  group per distinct scheme (``targets: ["Linear"]`` when there is one), float linears and
  ``lm_head`` in ``ignore``.

Everything else is written dense: norms and float kernels as they are (kernels transposed to
PyTorch's ``(out, in)``), and a QArray outside the decoder linears (a GGUF-native embedding,
a quantized untied head) as its exact dequantized values. The Flax model's Q/K rows are already in
Hugging Face's order (the GGUF loader undoes llama.cpp's permutation), so nothing is permuted.

transformers (5.23, CPU) loads both: GPTQ through ``gptqmodel`` + ``optimum`` (checked with
gptqmodel 7.6.0 / optimum 2.3.0 in a separate environment, qjax does not depend on them:
``experiments/hf_gptq_transformers.py``), compressed-tensors natively. gptqmodel's default CPU
kernel (``TorchAtenLinear``: torch's int4pack matmul, in bfloat16) needs ``in_features`` to be
whole groups; for a ragged last group (SmolLM2's 576 with g128) load with
``quantization_config=GPTQConfig(bits=4, backend="gptq_torch")`` (``TorchLinear``: weights
dequantized in float16, the scales' dtype). transformers dequantizes
compressed-tensors weights in the scales' dtype, so float32 scales (``scale_dtype="float32"``)
give exactly our weights and bfloat16 scales (the default: the QArrays' own, lossless in the
file) give them rounded to bfloat16. Its default load path rejects *asymmetric* pack-quantized
layers (it expects unpacked zero points); load those with
``quantization_config=CompressedTensorsConfig(dequantize=True)``, which in turn applies one
scheme to every layer.

The export is atomic: everything is converted and written into a temporary directory beside the
target, which is renamed into place at the end; on any error nothing is left behind.
:func:`load_hf_quantized` reads such a directory back into QArrays with the same codes (GPTQ
scales as float16); ``export → load`` dequantizes bit-identically to the exported params with
their scales rounded to the format's dtype (exactly the same params for bfloat16 scales).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax.convert import hf_quantized as hq
from qjax.convert.hf import read_hf_checkpoint
from qjax.errors import FormatError, SpecError
from qjax.models.llama import Llama, LlamaConfig
from qjax.qarray import QArray, is_qarray
from qjax.rules import path_str

__all__ = ["FORMATS", "export_hf_quantized", "hf_config", "load_hf_quantized", "read_hf_quantized"]

FORMATS = ("gptq", "gptq_v2", "compressed-tensors")

#: our param path -> Hugging Face Llama name (module name for kernels, tensor name otherwise).
_NAMES = [
    (r"embed/embedding", "model.embed_tokens.weight"),
    (r"final_norm/scale", "model.norm.weight"),
    (r"lm_head/kernel", "lm_head"),
    (r"layers/(\d+)/input_norm/scale", r"model.layers.\1.input_layernorm.weight"),
    (r"layers/(\d+)/post_attn_norm/scale", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers/(\d+)/attn/([qkvo])_proj/kernel", r"model.layers.\1.self_attn.\2_proj"),
    (r"layers/(\d+)/mlp/(gate|up|down)_proj/kernel", r"model.layers.\1.mlp.\2_proj"),
]
_DECODER_LINEAR = re.compile(r"layers/\d+/(attn/[qkvo]|mlp/(gate|up|down))_proj/kernel")


def _hf_name(path: str) -> str:
    for pattern, name in _NAMES:
        if re.fullmatch(pattern, path):
            return re.sub(pattern, name, path)
    raise SpecError(f"{path}: not a Llama param (no Hugging Face name for it)")


def _flat_params(params: Any) -> dict[str, Any]:
    state = nnx.state(params, nnx.Param) if isinstance(params, nnx.Module) else params
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_qarray)[0]
    return {path_str(p): leaf for p, leaf in leaves}


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


# ------------------------------------------------------------------------------------ config


def hf_config(config: LlamaConfig, dtype: Any = jnp.float32) -> dict[str, Any]:
    """The ``LlamaConfig`` dict of transformers for our config (no quantization_config)."""
    c = config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "intermediate_size": c.d_ff,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": c.rms_eps,
        "rope_theta": c.rope_theta,  # transformers 4; 5 reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "max_position_embeddings": c.max_seq_len,
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": _dtype_name(dtype),
        "torch_dtype": _dtype_name(dtype),
    }


def _llama_config(cfg: dict, where: Path) -> LlamaConfig:
    if cfg.get("model_type") != "llama":
        raise FormatError(f"{where}: model_type {cfg.get('model_type')!r}, expected 'llama'")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise FormatError(f"{where}: RoPE scaling {rope} is not supported")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise FormatError(f"{where}: biases or a non-SiLU activation are not supported")
    try:
        heads = int(cfg["num_attention_heads"])
        return LlamaConfig(
            vocab_size=int(cfg["vocab_size"]),
            d_model=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            d_ff=int(cfg["intermediate_size"]),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10_000.0))),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        )
    except KeyError as e:
        raise FormatError(f"{where}: config.json has no {e.args[0]!r}") from None


# ------------------------------------------------------------------------------------ export


def _dense(path: str, leaf: Any) -> np.ndarray:
    w = leaf.dequantize() if is_qarray(leaf) else leaf
    w = np.asarray(jax.device_get(w))
    return np.ascontiguousarray(w.T) if path.endswith("/kernel") else w


def _gptq_config(kernels: dict[str, QArray], format: str) -> dict[str, Any]:
    schemes = {p: hq.gptq_args(q, p) for p, q in kernels.items()}
    shared = {(a["bits"], a["group_size"], a["sym"]) for a in schemes.values()}
    if len(shared) != 1:
        raise SpecError(
            "GPTQ export needs every decoder linear quantized alike (bits, group size, symmetry); "
            f"found {sorted(shared)} — use format='compressed-tensors' for mixed schemes"
        )
    (bits, group_size, sym), = shared  # fmt: skip
    return {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": any(a["desc_act"] for a in schemes.values()),
        "sym": sym,
        "checkpoint_format": format,
        "format": format,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": ["qjax"]},
    }


def _ct_config(kernels: dict[str, QArray], modules: dict[str, str], dense: list[str]) -> dict:
    groups: dict[str, list[str]] = {}
    args: dict[str, dict] = {}
    for path, q in kernels.items():
        a = hq.ct_args(q, path)
        key = json.dumps(a, sort_keys=True)
        args[key] = a
        groups.setdefault(key, []).append(modules[path])
    one = len(groups) == 1
    config_groups = {
        f"group_{i}": {
            "targets": ["Linear"] if one else names,
            "weights": args[key],
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
        for i, (key, names) in enumerate(groups.items())
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ["lm_head", *dense],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def _tokenizer_files(tokenizer: Any, config: LlamaConfig) -> dict[str, str]:
    """``tokenizer.json`` (with a BOS post-processor if the model adds BOS) and its config."""
    from tokenizers import Tokenizer, processors

    backend = Tokenizer.from_str(tokenizer.backend.to_str())  # a copy

    def token(i: int | None) -> str | None:
        return None if i is None else backend.id_to_token(i)

    if tokenizer.add_bos and tokenizer.bos_id is not None:
        bos = token(tokenizer.bos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
        )

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(tokenizer.bos_id),
        "eos_token": token(tokenizer.eos_id),
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": False,
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    return {"tokenizer.json": backend.to_str(), "tokenizer_config.json": json.dumps(tok_config)}


def export_hf_quantized(
    directory: str | os.PathLike[str],
    params: Any,
    config: LlamaConfig | None = None,
    *,
    format: str = "gptq",
    tokenizer: Any = None,
    scale_dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a quantized Llama as a Hugging Face checkpoint directory (module docstring).

    Args:
      directory: the output directory; must not exist unless ``overwrite``.
      params: a :class:`~qjax.models.Llama`, or its ``nnx.Param`` state / pure dict (the output
        of :func:`qjax.quantize` or :func:`qjax.ptq.quantize_model`).
      config: the model's :class:`LlamaConfig` (default: ``params.config`` for a model).
      format: ``"gptq"`` (v1), ``"gptq_v2"`` or ``"compressed-tensors"``.
      tokenizer: a :class:`qjax.tokenizer.Tokenizer`, written as ``tokenizer.json``.
      scale_dtype: compressed-tensors only: the scales' dtype (default: the QArrays' own).

    Raises :class:`~qjax.errors.SpecError` / :class:`~qjax.errors.FormatError` /
    :class:`~qjax.errors.ShapeError` naming the param for anything the format cannot hold
    exactly (non-integer zero points, a ragged group in compressed-tensors, a scale out of
    float16's range, ...), before anything is written.
    """
    if format not in FORMATS:
        raise SpecError(f"unknown format {format!r}; choose one of {FORMATS}")
    if config is None:
        config = getattr(params, "config", None)
        if not isinstance(config, LlamaConfig):
            raise SpecError("export_hf_quantized needs the model's LlamaConfig")
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists (pass overwrite=True to replace it)")
    flat = _flat_params(params)
    kernels = {p: v for p, v in flat.items() if _DECODER_LINEAR.fullmatch(p) and is_qarray(v)}
    floats = [p for p, v in flat.items() if _DECODER_LINEAR.fullmatch(p) and not is_qarray(v)]
    if not kernels:
        raise SpecError("no decoder linear kernel is quantized: nothing to export as quantized")
    if format.startswith("gptq") and floats:
        raise SpecError(
            f"GPTQ export needs every decoder linear quantized; {len(floats)} are not "
            f"(e.g. {floats[0]}) — use format='compressed-tensors'"
        )
    modules = {p: _hf_name(p) for p in kernels}
    float_dtypes = {
        np.dtype(v.dtype) for v in flat.values() if not is_qarray(v) and hasattr(v, "dtype")
    }
    dtype = float_dtypes.pop() if len(float_dtypes) == 1 else np.dtype(np.float32)
    cfg = hf_config(config, dtype)
    if tokenizer is not None:
        cfg["bos_token_id"], cfg["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
    if format == "compressed-tensors":
        cfg["quantization_config"] = _ct_config(kernels, modules, [_hf_name(p) for p in floats])
    else:
        cfg["quantization_config"] = _gptq_config(kernels, format)

    tensors: dict[str, np.ndarray] = {}
    for path, leaf in flat.items():
        name = _hf_name(path)
        if path in kernels:
            if format == "compressed-tensors":
                layer = hq.ct_tensors(leaf, scale_dtype, where=path)
            else:
                layer = hq.gptq_tensors(leaf, format, where=path)
            tensors.update({f"{name}.{k}": v for k, v in layer.items()})
        else:
            tensors[name if name.endswith(".weight") else f"{name}.weight"] = _dense(path, leaf)
    files = {"config.json": json.dumps(cfg, indent=2)}
    if tokenizer is not None:
        files.update(_tokenizer_files(tokenizer, config))
    return _write_directory(directory, tensors, files, overwrite)


def _write_directory(
    directory: Path, tensors: dict[str, np.ndarray], files: dict[str, str], overwrite: bool
) -> Path:
    """Writes into a temp dir beside ``directory`` and renames it into place at the end."""
    from safetensors.numpy import save_file

    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=parent))
    old = None
    try:
        # safetensors.numpy writes an array's raw buffer: a non-C-contiguous array (a transposed
        # view) would be stored scrambled, silently
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        if directory.exists():
            if not overwrite:
                raise FileExistsError(f"{directory} exists (pass overwrite=True to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=parent))
            os.replace(directory, old / "dir")
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "dir").exists() and not directory.exists():
            os.replace(old / "dir", directory)  # put the previous directory back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return directory


# ------------------------------------------------------------------------------------ import


def _ct_scheme(module: str, qc: dict, where: Path) -> dict:
    """The ``weights`` args of the first config group whose targets match ``module``."""
    for group in (qc.get("config_groups") or {}).values():
        for target in group.get("targets", []):
            if target.startswith("re:"):
                hit = re.match(target[3:], module) is not None
            else:
                hit = target in ("Linear", "torch.nn.Linear", "nn.Linear") or target == module
            if hit:
                if group.get("format", qc.get("format")) != "pack-quantized":
                    raise FormatError(f"{where}: {module}: only pack-quantized is supported")
                return group["weights"]
    raise FormatError(f"{where}: {module} holds packed weights but no config group targets it")


def read_hf_quantized(
    directory: str | os.PathLike[str], dtype: Any = jnp.float32
) -> tuple[LlamaConfig, dict[str, Any]]:
    """``(config, {param path: array | QArray})`` of a quantized (or plain) Llama directory.

    Inverse of :func:`export_hf_quantized`; kernels come back as ``(in, out)``, quantized ones as
    QArrays with the checkpoint's codes and scales.
    """
    directory = Path(directory)
    cfg, tensors = read_hf_checkpoint(directory)
    config = _llama_config(cfg, directory)
    qc = cfg.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method not in (None, "gptq", "compressed-tensors"):
        raise FormatError(f"{directory}: quant_method {method!r} is not supported")
    if method == "compressed-tensors" and qc.get("format") != "pack-quantized":
        raise FormatError(f"{directory}: compressed-tensors format {qc.get('format')!r}")
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
    out: dict[str, Any] = {}
    used: set[str] = set()
    for path, leaf in _flat_params(model).items():
        name = _hf_name(path)
        kernel = path.endswith("/kernel")
        prefix = name if kernel else name.removesuffix(".weight")
        layer = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        used.update(f"{prefix}.{k}" for k in layer)
        if kernel and "qweight" in layer and method == "gptq":
            fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
            q = hq.qarray_from_gptq(
                layer, bits=int(qc["bits"]), group_size=int(qc["group_size"]),
                sym=bool(qc.get("sym", True)), checkpoint_format=fmt, dtype=dtype, where=path,
            )  # fmt: skip
        elif kernel and "weight_packed" in layer and method == "compressed-tensors":
            q = hq.qarray_from_ct(layer, _ct_scheme(name, qc, directory), dtype=dtype, where=path)
        elif "weight" in layer:
            w = np.asarray(layer["weight"], np.float32)
            w = w.T if kernel else w
            if w.shape != tuple(leaf.shape):
                raise FormatError(f"{directory}: {prefix}.weight has shape {w.shape[::-1]}")
            out[path] = jnp.asarray(w, dtype)
            continue
        else:
            raise FormatError(f"{directory}: no tensors for {path} ({prefix}.*)")
        if q.shape != tuple(leaf.shape):
            raise FormatError(f"{directory}: {prefix} has shape {q.shape[::-1]} (out, in)")
        out[path] = q
    unused = sorted(set(tensors) - used)
    if unused:
        raise FormatError(f"{directory}: {len(unused)} tensor(s) not used, e.g. {unused[:4]}")
    return config, out


def load_hf_quantized(
    directory: str | os.PathLike[str], dtype: Any = jnp.float32
) -> tuple[LlamaConfig, Llama]:
    """``(config, model)``: a :class:`~qjax.models.Llama` whose quantized kernels are QArrays."""
    config, flat = read_hf_quantized(directory, dtype)
    model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), dtype=dtype))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(lambda p, _: flat[path_str(p)], state))
    return config, model
