"""Named quantization settings for the CLI and experiment configs.

Each preset maps a short name to a format spec for linear weights in the PyTorch/GGUF ``(out, in)``
orientation (reduction axis 1); :func:`spec` returns it for any reduction axis.
"""

from __future__ import annotations

import dataclasses

from qjax.errors import SpecError
from qjax.formats import FP8, MXFP4, NF4, NVFP4, Int, QSpec

PRESETS: dict[str, QSpec] = {
    "int8-channel": Int(8, group="channel"),
    "int4-g128": Int(4, group=128),
    "int4-asym-g32": Int(4, group=32, symmetric=False),
    "int4-channel": Int(4, group="channel"),
    "int3-g128": Int(3, group=128),
    "int3-channel": Int(3, group="channel"),
    "int2-g64": Int(2, group=64, symmetric=False),
    "nf4": NF4(),
    "nf4-dq": NF4(double_quant=True),
    "fp8-e4m3": FP8("e4m3", group="channel"),
    "mxfp4": MXFP4(),
    "nvfp4": NVFP4(),
}


def spec(name: str, axis: int = 0) -> QSpec:
    """The preset ``name`` with its reduction axis set to ``axis``."""
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], axis=axis)
