"""``QArray``: a quantized tensor as a JAX pytree.

A ``QArray`` holds the *stored* arrays of a quantized tensor — packed codes, per-block scales,
optional zero points and any format-specific extras (``aux``, e.g. the double-quantized absmax
statistics of NF4 or the fp32 tensor scale of NVFP4) — plus static metadata: the format ``spec``,
the logical ``shape`` and ``dtype`` of the original tensor, and the ``layout`` tag of the codes
(``"canonical"`` unless a kernel repacked them).

``q.dequantize()`` is the reference semantics that every kernel and converter is tested against.
Because the arrays are pytree children and the metadata is static aux data, a ``QArray`` passes
through ``jit``, ``vmap``-free tree maps, ``device_put`` and checkpointing unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from qjax.formats.base import QSpec


def _bits(dtype) -> int:
    """Storage bits of one element: 4 for ``int4`` / ``uint4`` / ``float4`` (two per byte)."""
    dt = np.dtype(dtype)
    for info in (jnp.iinfo, jnp.finfo):
        try:
            return int(info(dt).bits)
        except ValueError:
            pass
    return 8 * dt.itemsize


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True, eq=False)
class QArray:
    """A quantized tensor. See the module docstring."""

    codes: Any
    scales: Any
    zeros: Any = None
    aux: dict = dataclasses.field(default_factory=dict)
    spec: QSpec = None  # type: ignore[assignment]
    shape: tuple = ()
    dtype: Any = jnp.float32
    layout: str = "canonical"

    # -- pytree protocol ---------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        gk = jax.tree_util.GetAttrKey
        children = [(gk("codes"), self.codes), (gk("scales"), self.scales)]
        children += [(gk("zeros"), self.zeros), (gk("aux"), self.aux)]
        return children, (self.spec, self.shape, np.dtype(self.dtype).name, self.layout)

    def tree_flatten(self):
        children, static = self.tree_flatten_with_keys()
        return [c for _, c in children], static

    @classmethod
    def tree_unflatten(cls, static, children):
        spec, shape, dtype, layout = static
        codes, scales, zeros, aux = children
        return cls(codes, scales, zeros, aux, spec, shape, jnp.dtype(dtype), layout)

    # -- array-like API ----------------------------------------------------------------------
    def dequantize(self) -> jax.Array:
        """The tensor this QArray represents, in its original ``dtype`` and ``shape``.

        A QArray repacked into a kernel's layout is first converted back to the canonical one.
        """
        if self.layout != "canonical":
            from qjax.kernels.repack import unrepack

            return unrepack(self).dequantize()
        return self.spec.dequantize(self)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def stored_arrays(self) -> list:
        """Every array this QArray stores (codes, scales, zeros, aux)."""
        leaves = jax.tree_util.tree_leaves([self.codes, self.scales, self.zeros, self.aux])
        return [leaf for leaf in leaves if hasattr(leaf, "dtype")]

    @property
    def nbytes(self) -> int:
        """Exact storage in bytes: the sum over every stored array."""
        return sum(-(-int(math.prod(a.shape)) * _bits(a.dtype) // 8) for a in self.stored_arrays())

    @property
    def bits_per_weight(self) -> float:
        """``8 * nbytes / size``: storage bits per logical element, scales and zeros included."""
        return 8.0 * self.nbytes / self.size

    def replace(self, **changes) -> QArray:
        return dataclasses.replace(self, **changes)

    def __repr__(self) -> str:
        label = self.spec.label() if self.spec is not None else "?"
        dtype = np.dtype(self.dtype).name
        try:
            bpw = f", {self.bits_per_weight:.3f} bpw"
        except TypeError:
            bpw = ""
        layout = "" if self.layout == "canonical" else f", layout={self.layout}"
        return f"QArray({label}, shape={self.shape}, dtype={dtype}{bpw}{layout})"


def is_qarray(x: Any) -> bool:
    return isinstance(x, QArray)
