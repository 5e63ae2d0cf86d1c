"""Probe: where the skinny kernel's weight stream spends its ≈ 1.15 µs per call beyond a plain
read of the same bytes — its parts removed one at a time, same run, int4 g128 (the W4 target's
format; other formats, ``--fmts``: the first two or three, :func:`variants_for`), against XLA's
row reduction over a buffer of the weight's bytes.

``read_floor_probe`` fitted XLA's read at 1.83 µs + bytes / 3.11 TB/s and this kernel's stream
(``stream_floor_probe``: decode, operand loads and ``wgmma`` removed) at 2.98 µs + bytes /
3.12 TB/s; ``fixed_cost_probe`` found the launch and one TMA round trip no dearer than XLA's.
The variants, each removing more of :mod:`qjax.kernels.gpu.mgpu_skinny`'s kernel:

* ``real`` — the dispatched kernel;
* ``no_decode`` — ``wgmma`` on a constant operand: no loads of the codes from shared memory, no
  decode (the ``wgmma`` chain, its waits and the per-slice scaling of the sums stay);
* ``stream`` — no decode, operand loads or ``wgmma`` (``stream_floor_probe.ablated``);
* ``no_y`` — and no store of ``y`` to HBM (its TMA; the transposing store to shared memory stays:
  without a consumer, Mosaic GPU's layout inference finds no layout for the sums);
* ``no_exchange`` — and no hand-off of a tile's partial sums between the CTAs of a cluster
  (no store to distributed shared memory, no wait for it);
* ``no_x`` — and no copy of ``x``'s K step with each weight step: the weight codes and their
  scale rows alone.

The differences between neighbours — ``real − no_decode`` (the decode), ``no_decode − stream``
(the ``wgmma`` chain), ``stream − no_y``, ``no_y − no_exchange``, ``no_exchange − no_x`` — are
each part's share of the call (the parts overlap the stream only where the difference is
small); what ``no_x`` keeps over ``xla_read`` is the TMA pipeline's own. Timing only: the
ablated kernels' outputs are garbage. The patches apply while a variant is traced
(``jax.clear_caches``), so nothing outside this process changes.

    python -m experiments.stream_cost_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from experiments import mgpu_probe_lib as lib
from experiments import read_floor_probe as rf
from experiments import stream_floor_probe as sf
from qjax.kernels.gpu import mgpu_decode as dec
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk

VARIANTS = ("real", "no_decode", "stream", "no_y", "no_exchange", "no_x")  # each removes more


def variants_for(w) -> tuple[str, ...]:
    """The variants that fit ``w``'s kernel: all for int4 g128; the first three for the other
    formats but NF4 (the later ones wait on no barrier but the weight's), whose kernel without
    ``wgmma`` leaves its pair table without a use, which Mosaic GPU's layout inference refuses:
    the first two."""
    if w.layout == "gpu_i4t":
        return VARIANTS
    return VARIANTS[:2] if w.layout == "gpu_nf4t" else VARIANTS[:3]


def _constant_operand(kind, codes, table=None):
    """``mgpu_decode.decode``'s stand-in: ones in the ``wgmma`` operand's layout, whatever the
    codes (their load from shared memory then has no use and goes too)."""
    return plgpu.layout_cast(jnp.ones(codes.shape, jnp.bfloat16), plgpu.Layout.WGMMA)


def _pipeline_without_x(emit):
    """``plgpu.emit_pipeline`` as the skinny kernel calls it, with its second input (``x``)
    dropped: the body gets the weight step's buffer in ``x``'s place (unused once ablated)."""

    def emit_pipeline(body, *, in_specs, **kwargs):
        inner = emit(
            lambda idx, w_smem, *scale_smem: body(idx, w_smem, w_smem, *scale_smem),
            in_specs=[in_specs[0], *in_specs[2:]],
            **kwargs,
        )
        return lambda w_gmem, x_gmem, *scale_gmem: inner(w_gmem, *scale_gmem)

    return emit_pipeline


@contextlib.contextmanager
def removed(variant: str):
    """The parts of the skinny kernel that ``variant`` removes, in force while it is traced."""
    level = VARIANTS.index(variant)
    with contextlib.ExitStack() as stack:
        if level == 1:
            stack.enter_context(lib.retraced(mock.patch.object(dec, "decode", _constant_operand)))
        if level >= 2:
            stack.enter_context(sf.ablated())  # clears jax's caches on entry and exit
        if level >= 3:
            stack.enter_context(
                mock.patch.multiple(plgpu, copy_smem_to_gmem=lib.nothing, commit_smem=lib.nothing)
            )
        if level >= 4:  # int4 g128 only: its kernel waits on no other barrier (no table, no
            #             per-channel scales)
            stack.enter_context(
                mock.patch.multiple(plgpu, async_store_smem=lib.nothing, barrier_wait=lib.nothing)
            )
        if level >= 5:
            emit = plgpu.emit_pipeline
            stack.enter_context(
                mock.patch.object(plgpu, "emit_pipeline", _pipeline_without_x(emit))
            )
        yield


def lowered(w, m: int, variant: str):
    """The skinny kernel with the dispatch's config for ``(m, K)`` x and ``w``, traced with
    ``variant``'s parts removed and lowered for CUDA (runs on any host)."""
    x = jax.ShapeDtypeStruct((m, w.shape[0]), jnp.bfloat16)
    f = jax.jit(lambda x, w: sk.matmul_rows(x, w, mg.config_for(w, m)))
    with removed(variant):
        return f.trace(x, w).lower(lowering_platforms=("cuda",))


def main(argv=None) -> None:
    ap = lib.probe_parser(["w4g128t"], [1, 16], 300)
    ap.set_defaults(shapes=["qkv", "o", "down"], no_check=True)
    args = ap.parse_args(argv)
    out = lib.start(args, lambda rows: None)

    def variants(w, m):
        if mg.config_for(w, m).path != "skinny":
            return {}
        fns = {}
        for v in variants_for(w):
            try:
                fns[v] = lib.compiled_under(removed(v), w, m)
            except Exception as e:  # noqa: BLE001  (recorded; the other variants still run)
                print(v, "failed:", repr(e)[:300], flush=True)
        return fns

    reads = {}

    def extra(label, w, m):
        if w.nbytes not in reads:
            reads[w.nbytes] = rf.time_reader(rf.xla_readers()["xla_rows"], w.nbytes)
        return {"xla_read_us": round(reads[w.nbytes], 2), "bytes": w.nbytes}

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "stream_cost_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, extra, args.budget_s)


if __name__ == "__main__":
    main()
