"""W8A8: int8 weights *and* int8 activations, multiplied in integers (SmoothQuant's format).

Xiao et al., "SmoothQuant" (ICML 2023, arXiv:2211.10438). Weights: symmetric int8 per output
channel, ``s_w = max|w| / 127``, codes in ``[-127, 127]`` stored as ``int8``. Activations are
quantized at matmul time, per tensor with a *static* scale ``s_x`` measured on calibration data
(``aux["act_scale"]``), or *dynamically* per token (``s_x = max|x_t| / 127``). Then

    y = (Σ_k x_q[k] · w_q[k, n]) · s_x · s_w[n],   the sum in int32 (``preferred_element_type``).

``dequantize()`` returns the weights; :meth:`W8A8.matmul` is the format's reference product,
which :func:`qjax.ops.matmul` uses (a weight-only fallback would silently drop the activation
quantization).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.errors import SpecError
from qjax.formats.base import BlockFormat, register_format, stored_scale
from qjax.qarray import QArray

INT8_MAX = 127


@register_format
@dataclasses.dataclass(frozen=True)
class W8A8(BlockFormat):
    """int8 per-channel weights with int8 activations (``act``: ``"static"`` or ``"dynamic"``)."""

    name = "w8a8"
    act: str = "dynamic"
    axis: int = 0

    def __post_init__(self):
        if self.act not in ("static", "dynamic"):
            raise SpecError(f"W8A8 act must be 'static' or 'dynamic', got {self.act!r}")
        super().__post_init__()

    @property
    def group(self) -> str:
        return "channel"

    @property
    def code_bits(self) -> None:
        return None

    def label(self) -> str:
        return f"w8a8 ({self.act} act)"

    def encode_blocks(self, xb):
        scale = stored_scale(jnp.max(jnp.abs(xb), axis=-1) / INT8_MAX, jnp.float32)
        codes = jnp.clip(jnp.round(xb / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        return codes, scale, None, {"act_scale": jnp.ones((), jnp.float32)}

    def decode_blocks(self, codes, q: QArray):
        return codes.astype(jnp.float32) * q.scales[..., None]

    def matmul(self, x: jax.Array, q: QArray) -> jax.Array:
        """``x @ W`` with ``x`` quantized to int8 and an int32 accumulation."""
        if len(q.shape) != 2 or self.axis != 0:
            raise SpecError("W8A8 matmul needs a 2-D (K, N) weight quantized along axis 0")
        w = q.codes[0].T  # (1, N, K) blocks → (K, N) int8
        if self.act == "static":
            sx = q.aux["act_scale"]
        else:
            sx = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True) / INT8_MAX
            sx = jnp.where(sx > 0, sx, 1.0)
        xq = jnp.clip(jnp.round(x.astype(jnp.float32) / sx), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        acc = jnp.matmul(xq, w, preferred_element_type=jnp.int32)
        return (acc.astype(jnp.float32) * sx * q.scales[0]).astype(x.dtype)
