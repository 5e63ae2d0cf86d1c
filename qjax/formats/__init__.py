"""Number formats: each a frozen spec with a pure ``quantize`` / reference ``dequantize`` pair.

Adding a format is one new module plus its import line here (``register_format`` does the rest).
"""

from qjax.formats.base import BlockFormat, QSpec, available_formats, spec_from_config
from qjax.formats.fp4 import FP4, MXFP4, NVFP4
from qjax.formats.fp8 import FP8
from qjax.formats.nf4 import NF4
from qjax.formats.uniform import Int
from qjax.formats.w8a8 import W8A8

__all__ = [
    "BlockFormat",
    "QSpec",
    "available_formats",
    "spec_from_config",
    "FP4",
    "MXFP4",
    "NVFP4",
    "FP8",
    "NF4",
    "Int",
    "W8A8",
]
