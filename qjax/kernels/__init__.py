"""Quantized-matmul kernels, registered with :func:`qjax.ops.register_kernel`.

Weights reach a kernel in the layout it loads fastest, made once, offline, by
``qjax.kernels.repack.repack(q, layout)``: ``"gpu_i4t"`` / ``"gpu_i8t"`` / ``"gpu_nf4t"`` /
``"gpu_f8t"`` (int4 / int8 with groups of 128·j or per channel, NF4 with blocks of 64·j, per-channel
FP8, for the Mosaic GPU kernel on Hopper), ``"gpu_i4p"`` / ``"gpu_i8"`` (int4 / int8 for the
Triton kernels, any group), ``"gpu_nf4"`` (NF4), ``"gpu_f8"`` (FP8 e4m3/e5m2, any group);
``"tpu_i4"`` / ``"tpu_i8"`` / ``"tpu_nf4"`` / ``"tpu_f8"`` for the TPU kernels. W8A8 weights stay
canonical: their GPU kernel quantizes the activations in one fused pass, then multiplies the
8-bit codes by a Mosaic GPU GEMM with the scales in its epilogue (Hopper, prefill sizes) or by
XLA's.
``qjax.ops.matmul`` dispatches on ``(backend, format, layout)``; a case a kernel's ``supports``
rejects takes the reference ``dequantize`` + ``dot`` path, logged once with the reason.
"""

from qjax import ops
from qjax.kernels import repack
from qjax.kernels.gpu import int_matmul, mgpu_matmul, table_matmul, w8a8_matmul
from qjax.kernels.tpu import int_matmul as tpu_int_matmul
from qjax.kernels.tpu import table_matmul as tpu_table_matmul

_REGISTRY = [  # (backend, format, module, kernel function, kernel name prefix)
    ("gpu", "int", int_matmul, int_matmul.int_matmul, "pallas_triton"),
    ("gpu", "int", mgpu_matmul, mgpu_matmul.matmul, "pallas_mosaic_gpu"),
    ("gpu", "nf4", mgpu_matmul, mgpu_matmul.matmul, "pallas_mosaic_gpu"),
    ("gpu", "fp8", mgpu_matmul, mgpu_matmul.matmul, "pallas_mosaic_gpu"),
    ("gpu", "nf4", table_matmul, table_matmul.table_matmul, "pallas_triton"),
    ("gpu", "fp8", table_matmul, table_matmul.table_matmul, "pallas_triton"),
    ("tpu", "int", tpu_int_matmul, tpu_int_matmul.int_matmul, "pallas_mosaic"),
    ("tpu", "nf4", tpu_table_matmul, tpu_table_matmul.table_matmul, "pallas_mosaic"),
    ("tpu", "fp8", tpu_table_matmul, tpu_table_matmul.table_matmul, "pallas_mosaic"),
    ("gpu", "w8a8", w8a8_matmul, w8a8_matmul.w8a8_matmul, "pallas_triton"),
]
for _backend, _fmt, _module, _fn, _prefix in _REGISTRY:
    for _layout in _module.LAYOUTS:
        if _layout == "canonical" or repack.FORMATS[_layout].name == _fmt:
            ops.register_kernel(
                _backend, _fmt, _layout, ops.Kernel(f"{_prefix}_{_layout}", _fn, _module.supports)
            )

__all__ = [
    "int_matmul",
    "mgpu_matmul",
    "repack",
    "table_matmul",
    "tpu_int_matmul",
    "tpu_table_matmul",
    "w8a8_matmul",
]
