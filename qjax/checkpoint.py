"""Orbax save/restore of pytrees that contain ``QArray`` leaves.

The arrays (codes, scales, zeros, aux, plain params) are written by orbax; the structure and every
QArray's static metadata (its spec as a config, logical shape, dtype, layout) go to ``qjax.json``
beside them, so :func:`load` needs no target tree and returns bit-identical arrays with identical
metadata. Writing goes to a temporary directory that is renamed into place at the end: a failed
save leaves nothing behind. No pickle anywhere.

Supported containers: dicts with str or int keys, lists, tuples, ``None`` and Python scalars; a
Flax NNX ``State`` is saved as its pure dict (put it back with ``nnx.replace_by_pure_dict``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from qjax.errors import FormatError
from qjax.formats.base import spec_from_config
from qjax.qarray import QArray

_META = "qjax.json"
_ARRAYS = "arrays"
_VERSION = 1


def _encode(node: Any, arrays: dict, where: str) -> Any:
    if isinstance(node, QArray):
        fields = {"codes": node.codes, "scales": node.scales, "zeros": node.zeros, "aux": node.aux}
        return {
            "t": "qarray",
            "spec": node.spec.to_config().to_dict(),
            "shape": list(node.shape),
            "dtype": np.dtype(node.dtype).name,
            "layout": node.layout,
            "fields": _encode(fields, arrays, where),
        }
    if hasattr(node, "to_pure_dict"):  # flax.nnx.State
        return _encode(node.to_pure_dict(), arrays, where)
    if isinstance(node, dict):
        bad = [k for k in node if not isinstance(k, str | int) or isinstance(k, bool)]
        if bad:
            raise FormatError(f"{where}: checkpoint dict keys must be str or int, got {bad[:3]}")
        return {  # [key, value] pairs: JSON keeps int keys (NNX list indices) as ints
            "t": "dict",
            "items": [[k, _encode(v, arrays, f"{where}/{k}")] for k, v in node.items()],
        }
    if isinstance(node, list | tuple):
        return {
            "t": type(node).__name__,
            "items": [_encode(v, arrays, f"{where}/{i}") for i, v in enumerate(node)],
        }
    if node is None or isinstance(node, bool | int | float | str):
        return {"t": "value", "v": node}
    if hasattr(node, "shape") and hasattr(node, "dtype"):
        key = f"a{len(arrays):06d}"
        arrays[key] = np.asarray(node)
        return {"t": "array", "key": key, "dtype": np.dtype(node.dtype).name}
    raise FormatError(f"{where}: cannot checkpoint a leaf of type {type(node).__name__}")


def _decode(node: dict, arrays: dict) -> Any:
    t = node["t"]
    if t == "qarray":
        f = _decode(node["fields"], arrays)
        return QArray(
            f["codes"],
            f["scales"],
            f["zeros"],
            f["aux"],
            spec=spec_from_config(node["spec"]),
            shape=tuple(node["shape"]),
            dtype=jnp.dtype(node["dtype"]),
            layout=node["layout"],
        )
    if t == "dict":
        return {k: _decode(v, arrays) for k, v in node["items"]}
    if t in ("list", "tuple"):
        items = [_decode(v, arrays) for v in node["items"]]
        return items if t == "list" else tuple(items)
    if t == "value":
        return node["v"]
    if t == "array":
        return jnp.asarray(np.asarray(arrays[node["key"]]).astype(node["dtype"]))
    raise FormatError(f"unknown node type {t!r} in {_META}")


def save(path: str | os.PathLike, tree: Any, *, overwrite: bool = False) -> Path:
    """Saves ``tree`` (arrays and QArrays) to directory ``path``; atomic (temp dir + rename)."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FormatError(f"{path}: already exists (pass overwrite=True to replace it)")
    arrays: dict = {}
    skeleton = _encode(tree, arrays, where=str(path))
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        ocp.PyTreeCheckpointer().save(tmp / _ARRAYS, arrays)
        (tmp / _META).write_text(json.dumps({"version": _VERSION, "tree": skeleton}))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load(path: str | os.PathLike) -> Any:
    """Restores what :func:`save` wrote, QArrays with their metadata included."""
    path = Path(path)
    meta_file = path / _META
    if not meta_file.is_file():
        raise FormatError(f"{path}: not a qjax checkpoint (no {_META})")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise FormatError(f"{meta_file}: corrupt metadata: {err}") from err
    if meta.get("version") != _VERSION:
        raise FormatError(f"{meta_file}: unsupported checkpoint version {meta.get('version')!r}")
    arrays = (
        ocp.PyTreeCheckpointer().restore(path.absolute() / _ARRAYS)
        if any((path / _ARRAYS).iterdir())
        else {}
    )
    return _decode(meta["tree"], jax.tree_util.tree_map(np.asarray, arrays))
