"""Quantization methods by name, for configs and the CLI.

A method config is a dict ``{"method": NAME, "preset": PRESET, **options}``: ``PRESET`` names the
grid (:mod:`qjax.presets`, reduction axis 0 for Flax kernels) and ``options`` go to the method's
dataclass, e.g. ``{"method": "gptq", "preset": "int4-g128", "act_order": True}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qjax.algorithms import RTN
from qjax.errors import SpecError
from qjax.presets import spec as preset_spec
from qjax.ptq.awq import AWQ
from qjax.ptq.gptq import GPTQ
from qjax.ptq.hqq import HQQ
from qjax.ptq.smoothquant import SmoothQuant

METHODS: dict[str, Any] = {"rtn": RTN, "gptq": GPTQ, "hqq": HQQ, "awq": AWQ}


def method_from_config(config: dict) -> Any:
    """Builds the algorithm a method config names (see the module docstring)."""
    options = dict(config)
    name = options.pop("method", None)
    if name == "smoothquant":  # W8A8 by definition: no grid preset
        return SmoothQuant(**options)
    if name not in METHODS:
        raise SpecError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    preset = options.pop("preset", None)
    if preset is None:
        raise SpecError(f"method {name!r} needs a 'preset' naming its grid")
    spec = preset_spec(preset)
    if name == "hqq" and spec.symmetric:  # HQQ optimizes a zero point: asymmetric twin
        spec = dataclasses.replace(spec, symmetric=False, scale_dtype="float16")
    return METHODS[name](spec, **options)
