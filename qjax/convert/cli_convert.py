"""``qjax convert SRC DST``: GGUF ↔ qjax (orbax) checkpoint ↔ Hugging Face, tensor by tensor.

=================  =================================================================================
SRC → DST           what happens
=================  =================================================================================
GGUF → GGUF         each tensor dequantized and re-encoded as ``--type`` (or ``--mix``; a tensor
                    already of its target type is copied byte for byte); 1-D tensors F32
GGUF → orbax        the params of :func:`~qjax.convert.gguf.load.load_gguf_model` (Q8_0 / Q4_0 /
                    Q4_1 kept as native QArrays unless ``--dequantize``) read, converted and
                    saved one at a time (:func:`qjax.save` of a tree of loaders); the GGUF
                    header (metadata, tokenizer, tensor order) is kept beside it in
                    ``gguf_metadata.gguf`` so the checkpoint converts back on its own
orbax → GGUF        :func:`~qjax.convert.gguf.model_export.export_model_gguf`: QArrays in their
                    exact GGML type where one exists (Q8_0, Q4_0, Q4_1), others requantized to
                    ``--type`` with a warning; arrays restored one at a time (orbax partial restore)
GGUF/orbax → HF     dense ``model.safetensors`` + ``config.json`` + tokenizer, or with ``--format``
                    (``gptq``, ``gptq_v2``, ``compressed-tensors``) the HF quantized export of the
                    Int QArrays (:func:`~qjax.convert.hf_export.export_hf_quantized`); Llama only
HF → GGUF/orbax     :func:`~qjax.convert.hf_export.read_hf_quantized` (GPTQ / compressed-tensors
                    kernels become QArrays); GGUF needs ``--metadata FILE.gguf`` for the header
=================  =================================================================================

Sources are recognised by content: a file starting with ``GGUF``, a directory with ``qjax.json``
(a :func:`qjax.save` checkpoint; a plain one from PTQ needs ``--metadata`` to become a GGUF), a
directory with ``config.json`` and safetensors. The destination kind is ``--to`` or, for a
``.gguf`` name, GGUF. Every output is written to a temporary file or directory beside ``DST`` and
renamed into place at the end: after an error (a :class:`~qjax.errors.QjaxError` naming the file
and tensor) nothing is left behind, and an existing ``DST`` is replaced only with ``--force``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qjax.convert.gguf.constants import GGMLType
from qjax.errors import FormatError, QjaxError, SpecError

__all__ = ["add_parser", "convert", "lazy_checkpoint"]

log = logging.getLogger(__name__)

GGUF_SIDECAR = "gguf_metadata.gguf"
KINDS = ("gguf", "orbax", "hf")


# ------------------------------------------------------------------------------- detection


def source_kind(src: Path) -> str:
    if src.is_file():
        with open(src, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise FormatError(f"{src}: not a GGUF file (no GGUF magic) and not a checkpoint directory")
    if src.is_dir():
        if (src / "qjax.json").is_file():
            return "orbax"
        if (src / "config.json").is_file() and any(src.glob("*.safetensors")):
            return "hf"
        raise FormatError(
            f"{src}: neither a qjax checkpoint (qjax.json) nor a Hugging Face checkpoint "
            f"(config.json + *.safetensors)"
        )
    raise FormatError(f"{src}: no such file or directory")


def _dest_kind(dst: Path, to: str | None) -> str:
    if to is not None:
        if to not in KINDS:
            raise SpecError(f"--to {to!r}: choose one of {', '.join(KINDS)}")
        return to
    if dst.suffix.lower() == ".gguf":
        return "gguf"
    raise SpecError(f"{dst}: say what to write with --to gguf|orbax|hf")


def _ggml_type(name: str | None) -> GGMLType | None:
    if name is None:
        return None
    try:
        return GGMLType[name.upper()]
    except KeyError:
        from qjax.convert.gguf.quants import QUANTIZABLE

        ok = ", ".join(sorted(t.name for t in QUANTIZABLE))
        raise SpecError(f"--type {name!r}: unknown GGML type; one of {ok}") from None


# ------------------------------------------------------------------------------- checkpoints


def _nest(flat: dict[str, Any]) -> dict:
    """``{"layers/0/attn/q_proj/kernel": v}`` -> nested pure dict (digit keys as ints)."""
    out: dict = {}
    for path, v in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in path.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def lazy_checkpoint(path: Path) -> dict[str, Callable[[], Any]]:
    """``{param path: loader}`` of a :func:`qjax.save` checkpoint; each loader restores only
    that leaf's arrays (:func:`qjax.checkpoint.leaf_loaders`), one tensor at a time in memory."""
    from qjax import checkpoint

    return checkpoint.leaf_loaders(path)


def _gguf_header(path: Path) -> tuple[dict, dict, list[str] | None]:
    """``(metadata, value_types, tensor order)`` of a GGUF file (a full one or a sidecar)."""
    from qjax.convert.gguf import read_gguf
    from qjax.convert.gguf.model_export import TENSOR_ORDER_KEY

    r = read_gguf(path)
    md, vt = dict(r.metadata), dict(r.value_types)
    order = md.pop(TENSOR_ORDER_KEY, None)
    vt.pop(TENSOR_ORDER_KEY, None)
    if order is None and r.tensors:
        order = list(r.tensors)
    return md, vt, (list(order) if order is not None else None)


def _write_sidecar(path: Path, reader) -> None:
    from qjax.convert.gguf import write_gguf
    from qjax.convert.gguf.constants import GGUFValueType
    from qjax.convert.gguf.model_export import TENSOR_ORDER_KEY

    md, vt = dict(reader.metadata), dict(reader.value_types)
    md[TENSOR_ORDER_KEY] = list(reader.tensors)
    vt[TENSOR_ORDER_KEY] = (GGUFValueType.ARRAY, GGUFValueType.STRING)
    write_gguf(path, md, [], alignment=reader.alignment, value_types=vt)


def _atomic_dir(dst: Path, force: bool, fill: Callable[[Path], None]) -> Path:
    """``fill(tmp)`` writes a directory at ``tmp`` (not yet existing); renamed to ``dst``."""
    dst = dst.absolute()
    if dst.exists() and not force:
        raise FormatError(f"{dst}: already exists (pass --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        fill(work / "out")
        if dst.exists():
            old = work / "old"
            os.replace(dst, old)
        os.replace(work / "out", dst)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dst


# ------------------------------------------------------------------------------- conversions


def _gguf_to_gguf(src: Path, dst: Path, gtype: GGMLType | None, mix: str | None, progress: bool):
    from tqdm import tqdm

    from qjax.convert.gguf import copy_gguf, quants, read_gguf, write_gguf
    from qjax.convert.gguf.constants import GGUFValueType
    from qjax.convert.gguf.model_export import FILE_TYPES
    from qjax.memory import trim_heap

    reader = read_gguf(src)
    if gtype is None and mix is None:
        return copy_gguf(reader, dst), {"tensors": len(reader.tensors), "how": "copied"}
    if dst.resolve() == reader.path.resolve():
        raise FormatError(f"{dst}: cannot convert a GGUF file onto itself")
    if mix is not None:
        return _gguf_mix(reader, dst, mix, progress)
    plan = []
    for name, info in reader.tensors.items():
        t = gtype if gtype is not None else info.ggml_type
        if len(info.shape) == 1:
            t = GGMLType.F32 if info.ggml_type not in (GGMLType.F32,) else info.ggml_type
        elif info.shape[-1] % quants.BLOCK_SIZES[t][0]:
            t = GGMLType.F16
        plan.append((name, info, t))

    bar = tqdm(total=len(plan), desc=dst.name, unit="tensor", disable=not progress, leave=False)

    def fetch(name: str, info, t: GGMLType):
        def data():
            bar.set_postfix_str(name, refresh=False)
            trim_heap()
            if t == info.ggml_type:
                out = reader.raw(name)
            else:
                w = reader.dequantize(name)
                if t == GGMLType.F32:
                    out = w
                else:
                    try:
                        out = quants.quantize(w, t)
                    except QjaxError as e:
                        raise type(e)(f"{reader.path}: tensor {name!r}: {e}") from None
                    del w
            bar.update(1)
            return out

        return data

    md, vt = dict(reader.metadata), dict(reader.value_types)
    counts: dict[GGMLType, int] = {}
    for _, info, t in plan:
        if len(info.shape) == 2:
            counts[t] = counts.get(t, 0) + info.n_elements
    main = max(counts, key=counts.get) if counts else GGMLType.F32
    md["general.file_type"] = FILE_TYPES.get(main, 1)
    vt["general.file_type"] = (GGUFValueType.UINT32,)
    try:
        write_gguf(
            dst,
            md,
            ((n, t, fetch(n, info, t), info.shape) for n, info, t in plan),
            alignment=reader.alignment,
            value_types=vt,
        )
    finally:
        bar.close()
    kinds: dict[str, int] = {}
    for _, _info, t in plan:
        kinds[t.name] = kinds.get(t.name, 0) + 1
    return dst, {"tensors": len(plan), "types": kinds}


def _gguf_mix(reader, dst: Path, mix: str, progress: bool):
    from tqdm import tqdm

    from qjax.convert.gguf.model_export import mix_types

    mix_types(mix, {}, reader.metadata)  # a clear error when mixes is absent or mix unknown
    from qjax.convert.gguf import mixes

    kinds: dict[str, int] = {}
    bar = tqdm(total=len(reader.tensors), desc=dst.name, unit="tensor", disable=not progress)

    def tick(name: str, _src: GGMLType, new: GGMLType) -> None:
        kinds[new.name] = kinds.get(new.name, 0) + 1
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    try:
        mixes.quantize_model_gguf(reader, dst, mix, progress=tick)
    finally:
        bar.close()
    return dst, {"tensors": len(reader.tensors), "mix": mix, "types": kinds}


def _gguf_to_orbax(src: Path, dst: Path, dequantize: bool, force: bool, progress: bool):
    """Streams: each param is read from the GGUF, converted and written by :func:`qjax.save`
    (a tree of loaders) before the next, so the whole model is never in memory."""
    import jax
    from flax import nnx
    from tqdm import tqdm

    from qjax import checkpoint
    from qjax.convert.gguf import read_gguf
    from qjax.convert.gguf.load import gguf_param_loaders
    from qjax.rules import path_str

    reader = read_gguf(src)
    _, model, loaders = gguf_param_loaders(reader, native=not dequantize)
    bar = tqdm(total=len(loaders), desc=dst.name, unit="tensor", disable=not progress, leave=False)

    def fetch(param: str) -> Callable[[], Any]:
        def load() -> Any:
            bar.set_postfix_str(param, refresh=False)
            out = loaders[param]()
            bar.update(1)
            return out

        return load

    pure = nnx.state(model, nnx.Param).to_pure_dict()  # abstract: shapes only
    tree = jax.tree_util.tree_map_with_path(lambda p, _: fetch(path_str(p)), pure)

    def fill(tmp: Path) -> None:
        checkpoint.save(tmp, tree)
        _write_sidecar(tmp / GGUF_SIDECAR, reader)

    try:
        return _atomic_dir(dst, force, fill), {"tensors": len(reader.tensors)}
    finally:
        bar.close()


def _params_source(src: Path, kind: str, metadata: Path | None):
    """``(flat params {path: value | loader}, gguf header or None, llama config or None)``."""
    if kind == "orbax":
        params = lazy_checkpoint(src)
        header = None
        if metadata is not None:
            header = _gguf_header(metadata)
        elif (src / GGUF_SIDECAR).is_file():
            header = _gguf_header(src / GGUF_SIDECAR)
        return params, header, None
    if kind == "hf":
        from qjax.convert.hf_export import read_hf_quantized

        config, flat = read_hf_quantized(src)
        header = _gguf_header(metadata) if metadata is not None else None
        return flat, header, config
    if kind == "gguf":
        import jax
        from flax import nnx

        from qjax.convert.gguf.load import load_gguf_model
        from qjax.qarray import is_qarray
        from qjax.rules import path_str

        config, model = load_gguf_model(src, native=True)
        state = nnx.state(model, nnx.Param)
        leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_qarray)[0]
        return {path_str(p): v for p, v in leaves}, _gguf_header(src), config
    raise AssertionError(kind)


def _to_gguf(src, kind, dst, gtype, mix, metadata, progress, near_exact):
    from qjax.convert.gguf.model_export import export_model_gguf

    params, header, _ = _params_source(src, kind, metadata)
    if header is None:
        raise FormatError(
            f"{src}: no GGUF metadata to write (tokenizer, hyperparameters): pass "
            f"--metadata FILE.gguf (e.g. the GGUF the model came from)"
        )
    md, vt, order = header
    path, plans = export_model_gguf(
        dst, params, md, vt, ggml_type=gtype if gtype is not None else GGMLType.F16, mix=mix,
        tensor_order=order, near_exact=near_exact, progress=progress,
    )  # fmt: skip
    hows: dict[str, int] = {}
    types: dict[str, int] = {}
    for p in plans:
        hows[p.how] = hows.get(p.how, 0) + 1
        types[p.ggml_type.name] = types.get(p.ggml_type.name, 0) + 1
    return path, {"tensors": len(plans), "how": hows, "types": types}


def _to_orbax(src, kind, dst, metadata, force):
    from qjax import checkpoint

    params, header, _ = _params_source(src, kind, metadata)

    def fill(tmp: Path) -> None:
        checkpoint.save(tmp, _nest(params))  # loaders are called one at a time by the writer
        if metadata is not None:
            from qjax.convert.gguf import read_gguf

            _write_sidecar(tmp / GGUF_SIDECAR, read_gguf(metadata))

    return _atomic_dir(dst, force, fill), {"tensors": len(params)}


def _llama_config_from_header(md: dict, params: dict):
    import dataclasses

    from qjax.convert.gguf import load
    from qjax.models.llama import LlamaConfig

    class _R:  # the config readers only need .metadata, .tensors and .path
        metadata = md
        tensors = {"output.weight": None} if "lm_head/kernel" in params else {}
        path = "metadata"

    if md.get("general.architecture") != "llama":
        raise FormatError(
            f"Hugging Face export supports llama only, not {md.get('general.architecture')!r}"
        )
    cfg = load._llama_config(_R, load._Meta(_R, "llama"))
    assert isinstance(cfg, LlamaConfig)
    return dataclasses.replace(cfg, tie_embeddings="lm_head/kernel" not in params)


def _to_hf(src, kind, dst, fmt, metadata, force):
    from qjax.convert import hf_export
    from qjax.qarray import is_qarray

    params, header, config = _params_source(src, kind, metadata)
    if kind == "hf":
        raise SpecError(f"{src}: already a Hugging Face checkpoint")
    if header is None:
        raise FormatError(f"{src}: no GGUF metadata for the config: pass --metadata FILE.gguf")
    md = header[0]
    flat = {k: (v() if callable(v) else v) for k, v in params.items()}
    if config is None:
        config = _llama_config_from_header(md, flat)
    tokenizer = None
    if "tokenizer.ggml.model" in md:
        from qjax.tokenizer import tokenizer_from_gguf

        tokenizer = tokenizer_from_gguf(src if kind == "gguf" else (metadata or src / GGUF_SIDECAR))
    if fmt is not None:
        out = hf_export.export_hf_quantized(
            dst, _nest(flat), config, format=fmt, tokenizer=tokenizer, overwrite=force
        )
        return out, {"format": fmt, "tensors": len(flat)}
    dst = dst.absolute()
    if dst.exists() and not force:
        raise FormatError(f"{dst}: already exists (pass --force to replace it)")
    tensors = {}
    for path, leaf in flat.items():
        name = hf_export._hf_name(path)
        name = name if name.endswith(".weight") else f"{name}.weight"
        tensors[name] = np.asarray(hf_export._dense(path, leaf), np.float32)
    n_q = sum(is_qarray(v) for v in flat.values())
    files = {"config.json": json.dumps(hf_export.hf_config(config), indent=2)}
    if tokenizer is not None:
        files.update(hf_export._tokenizer_files(tokenizer, config))
    hf_export._write_directory(dst, tensors, files, force)
    return dst, {"format": "dense float32", "tensors": len(flat), "dequantized_qarrays": n_q}


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: str | None = None,
    ggml_type: str | None = None,
    mix: str | None = None,
    format: str | None = None,
    metadata: str | os.PathLike[str] | None = None,
    dequantize: bool = False,
    near_exact: bool = True,
    force: bool = False,
    progress: bool = False,
) -> tuple[Path, dict]:
    """Convert ``src`` to ``dst`` (module docstring); ``(dst, summary)``."""
    src, dst = Path(src), Path(dst)
    kind = source_kind(src)
    dest = _dest_kind(dst, to)
    gtype = _ggml_type(ggml_type)
    meta = Path(metadata) if metadata is not None else None
    if meta is not None and source_kind(meta) != "gguf":
        raise FormatError(f"--metadata {meta}: not a GGUF file")
    if mix is not None and gtype is not None:
        raise SpecError("--type and --mix are exclusive")
    if (gtype is not None or mix is not None) and dest != "gguf":
        raise SpecError("--type / --mix apply to GGUF output only")
    if format is not None and dest != "hf":
        raise SpecError("--format applies to Hugging Face output only (--to hf)")
    if dst.exists() and not force:
        raise FormatError(f"{dst}: already exists (pass --force to replace it)")
    if src.resolve() == dst.resolve():
        raise FormatError(f"{dst}: the destination is the source")
    if dest == "gguf" and dst.exists() and dst.is_dir():
        raise FormatError(f"{dst}: is a directory")
    if dest == "gguf":
        if kind == "gguf":
            out, summary = _gguf_to_gguf(src, dst, gtype, mix, progress)
        else:
            out, summary = _to_gguf(src, kind, dst, gtype, mix, meta, progress, near_exact)
    elif dest == "orbax":
        if kind == "gguf":
            out, summary = _gguf_to_orbax(src, dst, dequantize, force, progress)
        elif kind == "orbax":
            raise SpecError(f"{src}: already a qjax checkpoint")
        else:
            out, summary = _to_orbax(src, kind, dst, meta, force)
    else:
        out, summary = _to_hf(src, kind, dst, format, meta, force)
    summary = {"src": str(src), "src_kind": kind, "dst": str(out), "dst_kind": dest, **summary}
    return Path(out), summary


# ------------------------------------------------------------------------------- CLI


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between GGUF, qjax (orbax) checkpoints and Hugging Face",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("src", help="a GGUF file, a qjax checkpoint dir or a HF checkpoint dir")
    p.add_argument("dst", help="the output (a .gguf name implies --to gguf)")
    p.add_argument("--to", choices=KINDS, help="what to write (default: from DST's suffix)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--type", dest="ggml_type", help="GGML type of float matrices, and the "
                   "fallback of QArrays with no exact type (default F16)")  # fmt: skip
    g.add_argument("--mix", help="a llama.cpp mix, e.g. Q4_K_M (qjax.convert.gguf.mixes)")
    p.add_argument("--format", choices=["gptq", "gptq_v2", "compressed-tensors"],
                   help="HF output: quantized export of Int QArrays (default: dense)")  # fmt: skip
    p.add_argument("--metadata", help="GGUF whose header (tokenizer, hparams) to use")
    p.add_argument("--dequantize", action="store_true",
                   help="GGUF → orbax: float32 params, no native QArrays")  # fmt: skip
    p.add_argument("--strict", action="store_true",
                   help="requantize Q4_1-like QArrays whose float16 zero points are not "
                        "bit-exact (default: keep their codes)")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=_cli)


def _cli(args: argparse.Namespace) -> int:
    out, summary = convert(
        args.src, args.dst, to=args.to, ggml_type=args.ggml_type, mix=args.mix,
        format=args.format, metadata=args.metadata, dequantize=args.dequantize,
        near_exact=not args.strict, force=args.force, progress=not args.no_progress,
    )  # fmt: skip
    print(json.dumps(summary))
    return 0
