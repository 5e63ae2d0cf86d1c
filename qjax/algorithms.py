"""Quantization algorithms: frozen dataclasses that turn one weight into a ``QArray``.

Every algorithm is a pure function ``(weight, stats | None, key | None) -> QArray`` with its output
format in ``.spec``. :class:`RTN` (round-to-nearest) needs no calibration; calibration-based
methods (GPTQ, AWQ, ...) set ``needs_calibration = True`` and are driven by ``qjax.ptq``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from qjax.formats.base import QSpec
from qjax.qarray import QArray


@dataclasses.dataclass(frozen=True)
class RTN:
    """Round-to-nearest onto ``spec``'s grid, no calibration. A bare spec in a rule means RTN."""

    spec: QSpec
    needs_calibration: ClassVar[bool] = False

    def __call__(
        self, weight: jax.Array, stats: Any = None, key: Any = None, *, where: str = "tensor"
    ) -> QArray:
        return self.spec.quantize(weight, where=where)

    def label(self) -> str:
        return f"RTN {self.spec.label()}"


def as_algorithm(method: Any):
    """A rule's method as an algorithm: ``None`` stays ``None``, a bare spec becomes ``RTN``."""
    if method is None or not isinstance(method, QSpec):
        return method
    return RTN(method)
