"""A Llama / Gemma 3 param tree (float arrays and QArrays) → a GGUF file, one tensor at a time.

:func:`export_model_gguf` is the inverse of :func:`~qjax.convert.gguf.load.load_gguf_model` for
any mix of float params and QArrays: kernels ``(in, out)`` are transposed to GGUF's ``(out,
in)``, llama's Q / K rows are permuted back (:func:`~qjax.convert.gguf.writer.permute_qk`, K with
the KV-head count), Gemma's norms are written as ``1 + w``. Every QArray goes through
:func:`~qjax.convert.gguf.qarray_export.plan_tensor`: the exact GGML type when one exists, else a
requantization to ``ggml_type`` with a warning. Metadata (tokenizer included) comes from a GGUF
file's metadata (the source file, or the header that ``qjax convert`` keeps beside an orbax
checkpoint).

Params may be given lazily: a flat ``{param path: value or zero-argument callable}``; a callable
is called once to plan the tensor's type and once more when its bytes are written, so at most one
tensor (plus its encoding) is in memory at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qjax.convert.gguf import qarray_export as qx
from qjax.convert.gguf.constants import GGMLType, GGUFValueType
from qjax.convert.gguf.writer import permute_qk, write_gguf
from qjax.errors import FormatError, SpecError
from qjax.memory import trim_heap

__all__ = ["FILE_TYPES", "export_model_gguf", "gguf_names", "mix_types"]

#: ``general.file_type`` (llama.cpp's ``llama_ftype``) of a file mostly of one type.
FILE_TYPES = {
    GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3, GGMLType.Q8_0: 7,
    GGMLType.Q5_0: 8, GGMLType.Q5_1: 9, GGMLType.Q2_K: 10, GGMLType.Q3_K: 12, GGMLType.Q4_K: 14,
    GGMLType.Q5_K: 16, GGMLType.Q6_K: 18, GGMLType.IQ4_NL: 25, GGMLType.BF16: 32,
}  # fmt: skip

#: metadata keys qjax adds to a metadata-only GGUF (dropped on export)
TENSOR_ORDER_KEY = "qjax.tensor_order"


def _table(arch: str) -> list[tuple[str, str, Any]]:
    from qjax.convert.gguf import load

    if arch not in load._ARCHS:
        raise FormatError(
            f"unsupported architecture {arch!r} (general.architecture); "
            f"supported: {', '.join(sorted(load._ARCHS))}"
        )
    rows = load._ARCHS[arch][2](None)  # the config is only used inside the transforms
    return [*rows, *((p, g, None) for p, g in load._COMMON)]


def gguf_names(arch: str, params: Mapping[str, Any]) -> dict[str, str]:
    """``{param path: GGUF tensor name}``; a param with no GGUF name is a FormatError."""
    table = _table(arch)
    out = {}
    for param in params:
        for pattern, name, _ in table:
            m = re.fullmatch(pattern, param)
            if m:
                out[param] = name.format(*m.groups())
                break
        else:
            raise FormatError(f"param {param!r} has no GGUF tensor name for {arch}")
    return out


def _transforms(arch: str, name: str, metadata: Mapping[str, Any]):
    """``(row_transform, value_transform)`` undoing the loader's conversion of tensor ``name``."""
    kind = name.split(".")[2] if name.startswith("blk.") else name.split(".")[0]
    if arch == "llama" and kind in ("attn_q", "attn_k"):
        key = "llama.attention.head_count" + ("_kv" if kind == "attn_k" else "")
        heads = metadata.get(key, metadata.get("llama.attention.head_count"))
        if heads is None:
            raise FormatError(f"metadata key {key!r} is missing (needed to permute {name!r})")
        heads = int(np.asarray(heads).flat[0])
        return (lambda w: permute_qk(w, heads)), None
    if arch == "gemma3" and kind.endswith("norm"):
        return None, (lambda w: w + np.float32(1.0))
    return None, None


def _order(names: list[str], order: list[str] | None) -> list[str]:
    if order is not None:
        missing = sorted(set(order) - set(names))
        extra = sorted(set(names) - set(order))
        if missing or extra:
            raise FormatError(
                f"the params do not match the tensors of the metadata source "
                f"(missing: {missing[:4]}, not in the source: {extra[:4]})"
            )
        return list(order)

    def key(n: str):
        m = re.match(r"blk\.(\d+)\.", n)
        head = {"token_embd.weight": -2}.get(n, 10**9 if not m else int(m.group(1)))
        return (head, n)

    return sorted(names, key=key)


def mix_types(mix: str, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, Any]):
    """``({tensor name: GGMLType}, file_type)`` of a llama.cpp mix (``Q4_K_M``, ...).

    Delegates to :func:`qjax.convert.gguf.mixes.tensor_types` (imported lazily; a clear error
    when that module is absent). Tensors the mix leaves alone (norms) are not in the result.
    """
    try:
        from qjax.convert.gguf import mixes
    except ImportError:
        raise SpecError(
            f"--mix {mix}: qjax.convert.gguf.mixes is not available in this version "
            f"(use --type for one type everywhere)"
        ) from None
    if mix not in mixes.MIXES:
        raise SpecError(f"--mix {mix!r}: unknown mix; one of {', '.join(mixes.MIXES)}")
    model = mixes.ModelInfo.from_metadata(metadata)
    types = mixes.tensor_types(mix, [(n, s, None) for n, s in shapes.items()], model)
    return {n: GGMLType(int(t)) for n, t in types.items() if t is not None}, mixes.MIXES[mix].ftype


def export_model_gguf(
    path: str | os.PathLike[str],
    params: Mapping[str, Any],
    metadata: Mapping[str, Any],
    value_types: Mapping[str, tuple] | None = None,
    *,
    ggml_type: GGMLType | int = GGMLType.F16,
    mix: str | None = None,
    tensor_order: list[str] | None = None,
    near_exact: bool = True,
    exact: bool = True,
    progress: bool = False,
    alignment: int | None = None,
) -> tuple[Path, list[qx.TensorPlan]]:
    """Write flat params ``{path: value | callable}`` as a GGUF file; ``(path, plans)``.

    Args:
      params: param path (``layers/0/attn/q_proj/kernel``) -> float array, QArray, or a
        zero-argument callable returning one (called when needed; see the module docstring).
      metadata, value_types: the GGUF metadata to write (``general.file_type`` is set here;
        ``qjax.*`` keys are dropped). ``general.architecture`` selects the tensor names.
      ggml_type: type of float matrices and fallback of QArrays with no exact type.
      mix: a llama.cpp mix name (per-tensor types from :mod:`qjax.convert.gguf.mixes`); QArrays
        with an exact type keep it.
      tensor_order: GGUF tensor names in file order (default: embedding, blocks, output).
      near_exact, exact: see :func:`~qjax.convert.gguf.qarray_export.plan_tensor`.
      progress: a tqdm bar over the tensors as they are written.
    """
    arch = metadata.get("general.architecture")
    names = gguf_names(arch, params)
    by_name = {n: p for p, n in names.items()}
    if len(by_name) != len(names):
        raise FormatError("two params map to the same GGUF tensor")
    order = _order(list(by_name), tensor_order)

    def value(param: str) -> Any:
        v = params[param]
        return v() if callable(v) else v

    overrides: dict[str, GGMLType] = {}
    ftype = None
    if mix is not None:
        shapes = {}
        for n in order:
            v = value(by_name[n])
            shape = tuple(v.shape)
            shapes[n] = shape[::-1] if by_name[n].endswith("/kernel") else shape
            del v
        overrides, ftype = mix_types(mix, shapes, metadata)

    plans: list[qx.TensorPlan] = []
    for n in order:
        param = by_name[n]
        row_t, value_t = _transforms(arch, n, metadata)
        v = value(param)
        plan = qx.plan_tensor(
            n, v, transpose=param.endswith("/kernel"), ggml_type=overrides.get(n, ggml_type),
            row_transform=row_t, value_transform=value_t, near_exact=near_exact, exact=exact,
        )  # fmt: skip
        del v
        if callable(params[param]):  # re-load when written, to hold one tensor at a time

            def lazy(param=param, row_t=row_t, value_t=value_t, n=n, t=plan.ggml_type, p=plan):
                fresh = qx.plan_tensor(
                    n, value(param), transpose=param.endswith("/kernel"), ggml_type=t,
                    row_transform=row_t, value_transform=value_t, near_exact=True,
                    exact=p.how in ("exact", "near-exact"),
                )  # fmt: skip
                out = fresh.data()
                p.how, p.max_abs_error = fresh.how, fresh.max_abs_error
                return out

            plan.data = lazy
        plans.append(plan)

    matrices = [p for p in plans if len(p.shape) == 2]
    if (
        ftype is None
        and "general.file_type" in metadata
        and all(p.how == "exact" for p in matrices)
    ):  # every matrix keeps its source's codes: keep the source's file type
        ftype = int(metadata["general.file_type"])
    if ftype is None:
        weight: dict[GGMLType, int] = {}
        for p in plans:
            if len(p.shape) == 2:
                weight[p.ggml_type] = weight.get(p.ggml_type, 0) + int(np.prod(p.shape))
        main = max(weight, key=weight.get) if weight else GGMLType.F32
        ftype = FILE_TYPES.get(main, 1)
    md = {k: v for k, v in metadata.items() if not k.startswith("qjax.")}
    vt = {k: v for k, v in (value_types or {}).items() if not k.startswith("qjax.")}
    md["general.file_type"] = int(ftype)
    vt["general.file_type"] = (GGUFValueType.UINT32,)

    def tensors():
        bar = _bar(len(plans), progress, Path(path).name)
        try:
            for p in plans:
                yield p.name, p.ggml_type, _tick(p.data, bar, p.name), p.shape
        finally:
            bar.close()

    out = write_gguf(path, md, tensors(), alignment=alignment, value_types=vt)
    return out, plans


def _bar(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def _tick(fetch: Callable[[], Any], bar, name: str) -> Callable[[], Any]:
    def run():
        bar.set_postfix_str(name, refresh=False)
        trim_heap()  # the previous tensor's temporaries are garbage now
        out = fetch()
        bar.update(1)
        return out

    return run
