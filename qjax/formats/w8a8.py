"""W8A8: 8-bit weights *and* 8-bit activations, multiplied in 8 bits (SmoothQuant's format).

Xiao et al., "SmoothQuant" (ICML 2023, arXiv:2211.10438). Weights: symmetric int8 per output
channel, ``s_w = max|w| / 127``, codes in ``[-127, 127]`` stored as ``int8``. Activations are
quantized at matmul time, per tensor with a *static* scale ``s_x`` measured on calibration data
(``aux["act_scale"]``), or *dynamically* per token (``s_x = max|x_t| / 127``). Then

    y = (Σ_k x_q[k] · w_q[k, n]) · s_x · s_w[n],   the sum in int32 (``preferred_element_type``).

``dequantize()`` returns the weights; :meth:`W8A8.matmul` is the format's reference product,
which :func:`qjax.ops.matmul` uses (a weight-only fallback would silently drop the activation
quantization).

``dtype="e4m3"`` is the FP8 variant (Micikevicius et al., "FP8 Formats for Deep Learning",
arXiv:2209.05433; the usual FP8 serving recipe): weights per output channel and activations per
tensor (static) or per token (dynamic) are scaled to the e4m3 range (``s = amax / 448``) and cast
with saturation; the product ``x_f8 @ w_f8`` accumulates in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qjax.errors import SpecError
from qjax.formats.base import BlockFormat, register_format, stored_scale
from qjax.formats.fp8 import fp8_dtype, fp8_max, saturating_cast
from qjax.qarray import QArray

INT8_MAX = 127


@register_format
@dataclasses.dataclass(frozen=True)
class W8A8(BlockFormat):
    """8-bit weights and activations: ``dtype`` int8 | e4m3, ``act`` static | dynamic."""

    name = "w8a8"
    act: str = "dynamic"
    axis: int = 0
    dtype: str = "int8"

    def __post_init__(self):
        if self.act not in ("static", "dynamic"):
            raise SpecError(f"W8A8 act must be 'static' or 'dynamic', got {self.act!r}")
        if self.dtype not in ("int8", "e4m3"):
            raise SpecError(f"W8A8 dtype must be 'int8' or 'e4m3', got {self.dtype!r}")
        super().__post_init__()

    @property
    def qmax(self) -> float:
        """The largest code magnitude: 127 (int8) or 448 (e4m3)."""
        return INT8_MAX if self.dtype == "int8" else fp8_max("e4m3")

    def _cast(self, v: jax.Array) -> jax.Array:
        """Scaled values → stored codes (round + clip to int8, or saturating e4m3 cast)."""
        if self.dtype == "int8":
            return jnp.clip(jnp.round(v), -INT8_MAX, INT8_MAX).astype(jnp.int8)
        return saturating_cast(v, fp8_dtype("e4m3"))

    @property
    def group(self) -> str:
        return "channel"

    @property
    def code_bits(self) -> None:
        return None

    def label(self) -> str:
        kind = "" if self.dtype == "int8" else " fp8 e4m3"
        return f"w8a8{kind} ({self.act} act)"

    def encode_blocks(self, xb):
        scale = stored_scale(jnp.max(jnp.abs(xb), axis=-1) / self.qmax, jnp.float32)
        codes = self._cast(xb / scale[..., None])
        return codes, scale, None, {"act_scale": jnp.ones((), jnp.float32)}

    def decode_blocks(self, codes, q: QArray):
        return codes.astype(jnp.float32) * q.scales[..., None]

    def matmul(self, x: jax.Array, q: QArray) -> jax.Array:
        """``x @ W`` with ``x`` quantized to 8 bits; int32 (int8) or float32 (e4m3) accumulation."""
        if len(q.shape) != 2 or self.axis != 0:
            raise SpecError("W8A8 matmul needs a 2-D (K, N) weight quantized along axis 0")
        w = q.codes[0].T  # (1, N, K) blocks → (K, N) 8-bit codes
        if self.act == "static":
            sx = q.aux["act_scale"]
        else:
            sx = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1, keepdims=True) / self.qmax
            sx = jnp.where(sx > 0, sx, 1.0)
        xq = self._cast(x.astype(jnp.float32) / sx)
        acc_type = jnp.int32 if self.dtype == "int8" else jnp.float32
        acc = jnp.matmul(xq, w, preferred_element_type=acc_type)
        return (acc.astype(jnp.float32) * sx * q.scales[0]).astype(x.dtype)
