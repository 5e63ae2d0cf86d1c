"""GGUF (llama.cpp) files: a zero-copy reader and NumPy GGML block (de)quantizers.

>>> r = read_gguf(path)                      # doctest: +SKIP
>>> r.metadata["general.architecture"]       # doctest: +SKIP
>>> w = r.dequantize("blk.0.attn_q.weight")  # float32, NumPy-order shape  # doctest: +SKIP
>>> raw = quantize(w, GGMLType.Q4_K, imatrix=None)  # llama.cpp's exact bytes  # doctest: +SKIP

Encoders: F32/F16/BF16, Q8_0, Q4_0/Q4_1/Q5_0/Q5_1 (reference, or imatrix-weighted), and the
K-quants Q2_K..Q6_K and IQ4_NL (:mod:`qjax.convert.gguf.kquants`), all byte-identical to
llama.cpp's ``ggml_quantize_chunk`` with or without an importance matrix.
"""

from qjax.convert.gguf.constants import BLOCK_SIZES, GGMLType, GGUFValueType
from qjax.convert.gguf.quants import DEQUANTIZABLE, QUANTIZABLE, dequantize, quantize, row_bytes
from qjax.convert.gguf.reader import GGUFReader, TensorInfo, read_gguf
from qjax.convert.gguf.writer import copy_gguf, export_llama_params, infer_value_types, write_gguf

__all__ = [
    "BLOCK_SIZES",
    "DEQUANTIZABLE",
    "GGMLType",
    "GGUFReader",
    "GGUFValueType",
    "QUANTIZABLE",
    "TensorInfo",
    "copy_gguf",
    "dequantize",
    "export_llama_params",
    "infer_value_types",
    "quantize",
    "read_gguf",
    "row_bytes",
    "write_gguf",
]
