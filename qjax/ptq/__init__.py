"""Post-training quantization: GPTQ, AWQ (+GPTQ), SmoothQuant W8A8, HQQ, and the calibration engine.

Each method is a frozen dataclass used in rules like a format spec; methods that need calibration
statistics run through :func:`quantize_model`, which walks a model block by block.
"""

from qjax.ptq.awq import AWQ
from qjax.ptq.calibrate import LayerStats, calibration_tokens, quantize_model
from qjax.ptq.gptq import GPTQ, HessianError
from qjax.ptq.hqq import HQQ
from qjax.ptq.smoothquant import SmoothQuant

__all__ = [
    "AWQ",
    "GPTQ",
    "HQQ",
    "HessianError",
    "LayerStats",
    "SmoothQuant",
    "calibration_tokens",
    "quantize_model",
]
