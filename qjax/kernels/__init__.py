"""Quantized-matmul kernels, registered with :func:`qjax.ops.register_kernel`.

Weights reach a kernel in the layout it loads fastest, made once, offline, by
``qjax.kernels.repack.repack(q, layout)`` (``"gpu_i4p"``: int4, ``"gpu_i8"``: int8, ``"gpu_nf4"``:
NF4, ``"gpu_f8"``: FP8 e4m3/e5m2; ``"tpu_i4"`` / ``"tpu_i8"`` for the TPU kernels).
``qjax.ops.matmul`` dispatches on ``(backend, format, layout)``; a case a kernel's ``supports``
rejects takes the reference ``dequantize`` + ``dot`` path, logged once with the reason.
"""

from qjax import ops
from qjax.kernels import repack
from qjax.kernels.gpu import int_matmul, table_matmul
from qjax.kernels.tpu import int_matmul as tpu_int_matmul

for _layout in int_matmul.LAYOUTS:
    ops.register_kernel(
        "gpu",
        "int",
        _layout,
        ops.Kernel(f"pallas_triton_{_layout}", int_matmul.int_matmul, int_matmul.supports),
    )

for _layout, _fmt in zip(table_matmul.LAYOUTS, ("nf4", "fp8"), strict=True):
    ops.register_kernel(
        "gpu",
        _fmt,
        _layout,
        ops.Kernel(f"pallas_triton_{_layout}", table_matmul.table_matmul, table_matmul.supports),
    )

for _layout in tpu_int_matmul.LAYOUTS:
    ops.register_kernel(
        "tpu",
        "int",
        _layout,
        ops.Kernel(f"pallas_mosaic_{_layout}", tpu_int_matmul.int_matmul, tpu_int_matmul.supports),
    )

__all__ = ["int_matmul", "repack", "table_matmul", "tpu_int_matmul"]
