"""Probe: how much of the skinny kernel's time at decode sizes is the weight stream itself — the
kernel (:mod:`qjax.kernels.gpu.mgpu_skinny`) with its decode and ``wgmma`` removed (``stream``:
the same TMA pipeline, schedule, barriers, epilogue and partial sums, of zeros), against the
kernel as the dispatch runs it (``real``) and XLA's bf16 ``dot``, same run; both also with what
shapes the stream varied (``_2sm`` … CTAs per SM, ``_bk1024`` the K step, ``_st3`` pipeline
depth, ``_cl0`` the XLA pass instead of clusters).

If ``stream`` is as slow as ``real``, the decode and the tensor cores are hidden and what is
left is the memory pipeline (and the W4 / W8 targets at M ≤ 16 on the small Llama-3-70B shapes
need a faster stream, not a cheaper decode); the fastest ``stream`` is the floor of this design.

The ablation patches Mosaic GPU's ``load`` / ``wgmma`` and our decoder in this process while a
variant is traced (``ablated``); timing numbers only — its output is zeros.

    python -m experiments.stream_floor_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from unittest import mock

import jax.experimental.pallas.mosaic_gpu as plgpu

from experiments import kernel_bench as kb
from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_decode as dec
from qjax.kernels.gpu import mgpu_matmul as mg

VARIANTS = {  # suffix -> Config fields replaced in the dispatch's skinny config, then fitted
    "": {},
    "_2sm": {"ctas_per_sm": 2, "block_k": 512},
    "_4sm": {"ctas_per_sm": 4, "block_k": 512},
    "_1sm": {"ctas_per_sm": 1, "block_k": 1024},
    "_bk1024": {"block_k": 1024},
    "_cl0": {"cluster": 0},
}
DEPTHS = {"_st3": 3, "_st4": 4}  # stages set after fitting (an SM then holds fewer CTAs)


class _Nothing:
    """What the ablated decoder returns: absorbs the scale multiplications."""

    def __mul__(self, other):
        return self

    __rmul__ = __mul__


@contextlib.contextmanager
def ablated():
    """No operand loads from shared memory, no decode, no ``wgmma``: the stream alone (8-bit
    codes loaded into registers, ``Config.ldg``, still are: that load is their stream)."""
    with lib.retraced(
        mock.patch.multiple(plgpu, load=lib.nothing, wgmma=lib.nothing),
        mock.patch.multiple(dec, load_block=lib.nothing, decode=lambda *a, **k: _Nothing()),
    ):
        yield


def configs(w, m: int) -> dict:
    """``real{suffix}`` and ``stream{suffix}`` (the same config, ablated) for each variant of the
    dispatch's skinny config that make a different kernel (only ``real``: the dispatch takes the
    main kernel)."""
    base = mg.config_for(w, m)
    if base.path != "skinny":
        return {"real": base}
    cfgs = {sfx: mg.config_for(w, m, dataclasses.replace(base, **f)) for sfx, f in VARIANTS.items()}
    cfgs.update({sfx: dataclasses.replace(base, stages=st) for sfx, st in DEPTHS.items()})
    seen, kept = set(), {}
    for sfx, cfg in cfgs.items():  # `ctas_per_sm` only fits the config: the same kernel
        if (key := dataclasses.replace(cfg, ctas_per_sm=0)) not in seen:
            seen.add(key)
            kept[sfx] = cfg
    cfgs = kept
    return {f"{kind}{sfx}": cfg for sfx, cfg in cfgs.items() for kind in ("real", "stream")}


def main(argv=None) -> None:
    ap = lib.probe_parser(["w4g128t", "w8cht"], [1], 420)
    ap.set_defaults(shapes=["qkv", "o", "down"], no_check=True)
    args = ap.parse_args(argv)
    out = lib.start(args, lambda rows: None)

    def variants(w, m):
        fns = {}
        for label, cfg in configs(w, m).items():
            try:
                ctx = ablated() if label.startswith("stream") else contextlib.nullcontext()
                fns[label] = lib.compiled_under(ctx, w, m, cfg)
            except Exception as e:  # noqa: BLE001  (a depth that does not fit: recorded)
                print(label, "failed:", repr(e)[:300], flush=True)
        return fns

    def extra(label, w, m):
        return {f"{label}_cfg": kb.config_label(dataclasses.asdict(configs(w, m)[label]))}

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "stream_floor_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, extra, args.budget_s)


if __name__ == "__main__":
    main()
