"""Shared test helpers: hypothesis strategies for awkward tensors, per-block views, and a log of
the Mosaic GPU kernels' shared-memory tilings."""

from unittest import mock

import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from qjax.formats import layout
from qjax.kernels.gpu import mgpu_matmul as mg


@st.composite
def awkward_tensors(draw, group: int = 32):
    """A float32 ``(K, N)`` tensor, ``K`` a multiple of ``group``, with outliers, constant and
    all-zero groups, denormals (1e-42, 1e-39) and large magnitudes (1e30) drawn by flags."""
    # few distinct shapes: every new shape costs XLA compilations
    k = group * draw(st.sampled_from([1, 3]))
    n = draw(st.sampled_from([1, 4]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    magnitude = 10.0 ** draw(st.sampled_from([-42, -39, -20, -3, 0, 2, 15, 30]))
    x = rng.standard_normal((k, n)) * magnitude
    if draw(st.booleans()):  # outliers
        idx = rng.integers(0, x.size, size=max(1, x.size // 50))
        x.flat[idx] *= draw(st.sampled_from([20.0, 1e3]))
    if draw(st.booleans()):  # an all-zero group and a constant group
        g = rng.integers(0, k // group)
        x[g * group : (g + 1) * group, 0] = 0.0
        x[g * group : (g + 1) * group, -1] = draw(st.sampled_from([-3.5, 1e-3, 7.0]))
    return x.astype(np.float32)


def per_element(spec, shape, per_block):
    """Broadcasts a per-block array (shape ``grid``) to one value per element of ``shape``."""
    block = spec.block_for(shape)
    grid = layout.grid_shape(shape, block)
    values = jnp.asarray(per_block, jnp.float32).reshape(grid)[..., None]
    expanded = jnp.broadcast_to(values, (*grid, int(np.prod(block))))
    return layout.unblocked(expanded, shape, block)


def matmul_case(spec, m: int, k: int, n: int, seed: int):
    """Fresh random ``(q, x, ref)`` for kernel tests: ``q = spec.quantize(W (k, n))``, bf16
    ``x (m, k)`` and the float32 oracle ``x @ dequantize(q)``; never zeros."""
    import jax

    kx, kw = jax.random.split(jax.random.key(seed))
    q = spec.quantize(jax.random.normal(kw, (k, n)) * 0.05)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    ref = np.asarray(x, np.float32) @ np.asarray(q.dequantize(), np.float32)
    return q, x, ref


def rel_error(y, ref) -> float:
    """Relative Frobenius error of a kernel output (asserting it is finite)."""
    y = np.asarray(y, np.float32)
    assert np.isfinite(y).all()
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def jit_forward(model):
    """``fwd(tokens, caches=None) -> (logits, caches)``: ``model.forward``, jitted (one compile
    per shape is much faster than eager op-by-op dispatch)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).forward(t, caches=c))
    return lambda tokens, caches=None: fn(state, jnp.asarray(tokens), caches)


def jit_logits(model, ids) -> np.ndarray:
    """Logits ``(T, vocab)`` of one sequence ``ids``."""
    return np.asarray(jit_forward(model)(jnp.asarray(ids)[None])[0])[0]


def max_rel(a, b) -> float:
    """``max|a − b| / max|b|``: the relative logit difference the model tests bound."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def gguf_py_value(value):
    """Our GGUF metadata value in gguf-py's ``contents()`` form (flat lists, Python scalars)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list) and value and isinstance(value[0], list | np.ndarray):
        return [x for item in value for x in gguf_py_value(item)]
    return value


def logged_tilings(tiles: list):
    """A patch (for ``experiments.mgpu_probe_lib.retraced``) under which every shared-memory
    tiling the Mosaic GPU kernels make is appended to ``tiles`` as ``(elements per row, bits,
    operand)``."""
    tiled = mg._tiled

    def logged(minor, bits, what):
        tiles.append((minor, bits, what))
        return tiled(minor, bits, what)

    return mock.patch.object(mg, "_tiled", logged)
