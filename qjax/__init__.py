"""qjax: quantization research for JAX/Flax.

The public API lives here; users never import private modules.
"""

from qjax import formats, kernels, ptq
from qjax.algorithms import RTN
from qjax.checkpoint import load, save
from qjax.errors import (
    AssetError,
    FormatError,
    NonFiniteError,
    QjaxError,
    RuleError,
    ShapeError,
    SpecError,
)
from qjax.formats import (
    FP4,
    FP8,
    MXFP4,
    NF4,
    NVFP4,
    W8A8,
    Int,
    QSpec,
    available_formats,
    spec_from_config,
)
from qjax.metrics import max_abs_error, relative_frobenius_error, sqnr_db
from qjax.ops import matmul
from qjax.ptq import AWQ, GPTQ, HQQ, SmoothQuant, quantize_model
from qjax.qarray import QArray
from qjax.rules import explain, plan, quantize

__version__ = "0.1.0"

__all__ = [
    "kernels",
    "ptq",
    "W8A8",
    "AWQ",
    "GPTQ",
    "HQQ",
    "SmoothQuant",
    "quantize_model",
    "formats",
    "RTN",
    "load",
    "save",
    "AssetError",
    "FormatError",
    "NonFiniteError",
    "QjaxError",
    "RuleError",
    "ShapeError",
    "SpecError",
    "FP4",
    "FP8",
    "MXFP4",
    "NF4",
    "NVFP4",
    "Int",
    "QSpec",
    "available_formats",
    "spec_from_config",
    "max_abs_error",
    "relative_frobenius_error",
    "sqnr_db",
    "matmul",
    "QArray",
    "explain",
    "plan",
    "quantize",
]
