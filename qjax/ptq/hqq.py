"""HQQ: calibration-free half-quadratic optimization of the zero point.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023,
mobiusml.github.io/hqq_blog). For a group ``w`` with scale ``s`` and real-valued zero ``z`` the
sparsity-promoting loss ``‖w − (q − z)·s‖_p^p`` (``p < 1``, robust to outliers) is minimized by
splitting off the error ``e`` and alternating closed-form steps (β grows by κ each iteration):

    e ← shrink_p(w − (q − z)·s, β),   shrink_p(x, β) = sign(x)·max(|x| − |x|^(p−1)/β, 0)
    q ← clip(round(w/s + z), 0, 2^b − 1)
    z ← mean(q − (w − e)/s)                        (over the group)

starting from the min/max grid; the iterate with the lowest ``‖w − ŵ‖_p`` is kept. Optionally
the scale is refined too (``optimize_scale``: a least-squares step ``s ← ⟨w−e, q−z⟩/‖q−z‖²``).
Only asymmetric :class:`~qjax.formats.Int` grids apply (the zero is the optimized variable); the
zero is stored in the spec's ``scale_dtype`` (use float16 for its finer resolution).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from qjax.errors import SpecError
from qjax.formats import layout, packing
from qjax.formats.uniform import Int
from qjax.qarray import QArray


def shrink_lp(x: jax.Array, beta: float, p: float) -> jax.Array:
    """Generalized soft-thresholding, the proximal step of the ``l_p`` loss (``p < 1``)."""
    mag = jnp.abs(x)
    return jnp.sign(x) * jax.nn.relu(mag - jnp.power(mag + 1e-12, p - 1.0) / beta)


@functools.partial(
    jax.jit, static_argnames=("spec", "p", "beta", "kappa", "iters", "optimize_scale")
)
def hqq_blocks(
    xb: jax.Array,
    spec: Int,
    *,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    iters: int = 20,
    optimize_scale: bool = False,
):
    """HQQ over blocks ``xb (*grid, B)``: returns codes ``(*grid, B)``, scale and zero ``(*grid)``.

    Scale and zero are returned already rounded to ``spec.scale_dtype`` (the codes are computed
    against the stored values, so dequantization reproduces the optimized error).
    """
    qmax = spec.qmax
    sdtype = jnp.dtype(spec.scale_dtype)
    scale, zero = spec.grid(xb)
    s = scale.astype(jnp.float32)[..., None]
    z = zero[..., None]

    def loss(s, z):
        q = jnp.clip(jnp.round(xb / s + z), 0, qmax)
        return jnp.sum(jnp.power(jnp.abs(xb - (q - z) * s) + 1e-12, p), axis=-1)

    def body(i, carry):
        s, z, best_s, best_z, best = carry
        b = beta * kappa**i
        q = jnp.clip(jnp.round(xb / s + z), 0, qmax)
        e = shrink_lp(xb - (q - z) * s, b, p)
        z = jnp.mean(q - (xb - e) / s, axis=-1, keepdims=True)
        if optimize_scale:
            c = q - z
            s_new = jnp.sum((xb - e) * c, -1, keepdims=True) / jnp.maximum(
                jnp.sum(c * c, -1, keepdims=True), 1e-20
            )
            s = jnp.where(s_new > 0, s_new, s)
        # evaluate with the values as they will be stored
        s_st = s.astype(sdtype).astype(jnp.float32)
        z_st = z.astype(sdtype).astype(jnp.float32)
        cur = loss(s_st, z_st)
        better = (cur < best)[..., None]
        return (
            s,
            z,
            jnp.where(better, s_st, best_s),
            jnp.where(better, z_st, best_z),
            jnp.minimum(cur, best),
        )

    init = (s, z, s, z, loss(s, z))
    _, _, s, z, _ = jax.lax.fori_loop(0, iters, body, init)
    codes = jnp.clip(jnp.round(xb / s + z), 0, qmax).astype(jnp.uint8)
    return codes, s[..., 0].astype(sdtype), z[..., 0].astype(sdtype)


@dataclasses.dataclass(frozen=True)
class HQQ:
    """Half-quadratic quantization onto an asymmetric :class:`~qjax.formats.Int` grid."""

    spec: Int = Int(4, group=64, symmetric=False, scale_dtype="float16")
    p: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    optimize_scale: bool = False
    needs_calibration: ClassVar[bool] = False

    def __post_init__(self):
        if not isinstance(self.spec, Int) or self.spec.symmetric:
            raise SpecError(
                f"HQQ optimizes a zero point: it needs an asymmetric Int spec, got {self.spec!r}"
            )

    def label(self) -> str:
        return f"HQQ {self.spec.label()}"

    def __call__(
        self, weight: jax.Array, stats: Any = None, key: Any = None, *, where: str = "tensor"
    ) -> QArray:
        spec = self.spec
        weight = jnp.asarray(weight)
        block = spec.block_for(weight.shape, where)
        xb = layout.blocked(weight.astype(jnp.float32), block)
        codes, scale, zero = hqq_blocks(
            xb,
            spec,
            p=self.p,
            beta=self.beta,
            kappa=self.kappa,
            iters=self.iters,
            optimize_scale=self.optimize_scale,
        )
        return QArray(
            packing.pack(codes, spec.bits),
            scale,
            zero,
            {},
            spec=spec,
            shape=tuple(weight.shape),
            dtype=weight.dtype,
        )
