"""``matmul``: the single dispatch point between models and quantized-matmul kernels.

``matmul(x, w)`` computes ``x @ w`` for ``x: (..., K)`` and ``w: (K, N)``, where ``w`` is a plain
array or a :class:`~qjax.QArray`. Kernels register for a ``(backend, format, layout)`` key with a
``supports(x, w)`` predicate; the reference path — ``dequantize`` then ``dot`` with float32
accumulation — is both the oracle every kernel is tested against and the fallback. Taking the
fallback for a QArray is logged once per key, with the reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from qjax.errors import ShapeError
from qjax.qarray import QArray

log = logging.getLogger("qjax.ops")


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    fn: Callable  # (x, w: QArray) -> y
    supports: Callable = lambda x, w: True  # noqa: E731


_KERNELS: dict[tuple[str, str, str], list[Kernel]] = {}
_LOGGED: set = set()
_CAPTURE: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "qjax_capture", default=None
)


@contextlib.contextmanager
def capture_inputs(fn: Callable[[jax.Array, object], None]) -> Iterator[None]:
    """Within the block, every ``matmul(x, w)`` first calls ``fn(x, w)``.

    This is how calibration (``qjax.ptq.calibrate``) sees each linear layer's inputs: at the one
    dispatch point every model matmul goes through, with no change to the models.
    """
    token = _CAPTURE.set(fn)
    try:
        yield
    finally:
        _CAPTURE.reset(token)


def register_kernel(backend: str, fmt: str, layout: str, kernel: Kernel) -> None:
    """Registers ``kernel`` for QArrays of format ``fmt`` in ``layout`` on ``backend``."""
    _KERNELS.setdefault((backend, fmt, layout), []).append(kernel)


def reference_matmul(x: jax.Array, w) -> jax.Array:
    """``x @ dequantize(w)`` with float32 accumulation, result in ``x.dtype``.

    Formats whose product is not weight-only (W8A8 quantizes activations too) define
    ``spec.matmul(x, w)``, which is then the reference.
    """
    if isinstance(w, QArray) and hasattr(w.spec, "matmul"):
        return w.spec.matmul(x, w)
    wd = w.dequantize() if isinstance(w, QArray) else w
    y = jnp.matmul(x, wd.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _log_once(key: tuple, reason: str) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.warning("qjax.ops.matmul: reference dequantize+dot for %s: %s", key, reason)


def matmul(x: jax.Array, w) -> jax.Array:
    """``x @ w`` for a plain or quantized ``(K, N)`` weight; see the module docstring."""
    if len(w.shape) != 2 or x.shape[-1] != w.shape[0]:
        raise ShapeError(
            f"matmul: x {tuple(x.shape)} @ w {tuple(w.shape)} needs w of shape (K, N) "
            f"with K == x.shape[-1]"
        )
    capture = _CAPTURE.get()
    if capture is not None:
        capture(x, w)
    if not isinstance(w, QArray):
        return reference_matmul(x, w)
    key = (jax.default_backend(), w.spec.name, w.layout)
    kernels = _KERNELS.get(key, [])
    for kernel in kernels:
        if kernel.supports(x, w):
            return kernel.fn(x, w)
    reason = "no kernel registered" if not kernels else "no registered kernel supports this case"
    _log_once((*key, w.spec.label()), reason)
    return reference_matmul(x, w)
