"""Probe: the skinny kernel (:mod:`qjax.kernels.gpu.mgpu_skinny`) adding a split tile's partial
sums in the kernel, through the distributed shared memory of a cluster of CTAs
(``Config.cluster``: at most 2, 4 or 8 CTAs per cluster, the schedule restricted to those),
against the XLA pass that adds them after it (the dispatch's config), at
decode sizes on the Llama-3-70B shapes the skinny kernel takes (and ``--shapes`` others).

Device checks first (unless ``--no-check``): the clustered configs and the dispatch's own against
``dequantize`` + float32 dot, each clustered case run twice (the sums are added in slot order:
the same bits whichever CTA finishes first). Times: median device µs per call, weights rotated
over > 150 MB (``mgpu_probe_lib.time_cases``), and the kernels of one call
(``kernel_bench.kernel_breakdown``).

    python -m experiments.skinny_cluster_probe --out DIR      # on the GPU
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from experiments import kernel_bench as kb
from experiments import mgpu_probe_lib as lib
from qjax.errors import ShapeError
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk

CHECKS = [(1, 8192, 10240), (16, 8192, 10240), (5, 8192, 8192), (1, 4096, 6144), (16, 576, 576),
          (7, 1536, 576), (13, 14336, 4096)]  # fmt: skip


def clustered(w, m: int, most: int = 2) -> mg.Config | None:
    """The dispatch's skinny config for ``w`` at ``m`` rows with the partial sums added in the
    kernel by clusters of at most ``most`` CTAs, or (``most=0``) by the XLA pass (``None`` where
    the dispatch does not take the skinny kernel)."""
    cfg = mg.config_for(w, m)
    if cfg.path != "skinny":
        return None
    n_p, k_p = w.codes.shape
    return sk.fit(dataclasses.replace(cfg, cluster=most, block_k=512), m, k_p, n_p,
                  mg.code_bits(w), mg.slice_codes(w))  # fmt: skip


def configs(w, m: int, forced=()) -> dict:
    """``pass`` (the skinny config whose sums an XLA pass adds; else the dispatch's) and ``cl2``
    / ``cl4`` / ``cl8`` (clusters of at most 2, 4, 8 CTAs) where they differ from each other and
    add the sums in the kernel; ``forced``: ``(L, C)`` pairs, ``pass`` with ``L`` steps per CTA
    in clusters of ``C`` (label ``L{L}c{C}``), where they are valid for ``w``."""
    out = {"pass": clustered(w, m, 0) or mg.config_for(w, m)}
    for most in (2, 4, 8):
        c = clustered(w, m, most)
        if c is not None and c.cluster and c not in out.values():
            out[f"cl{most}"] = c
    for length, c in forced if out["pass"].path == "skinny" else ():
        cfg = dataclasses.replace(out["pass"], cta_steps=length, cluster=c)
        try:
            sk.check_config(jax.ShapeDtypeStruct((m, w.codes.shape[1]), jax.numpy.bfloat16), w, cfg)
        except ShapeError:
            continue
        if cfg not in out.values():
            out[f"L{length}c{c}"] = cfg
    return out


def check(rows: list, fmts) -> None:
    for fmt, w, x, ref in lib.check_cases(fmts, CHECKS):
        for label, cfg in configs(w, x.shape[0]).items():
            if label == "pass":
                continue
            tags = {"L": cfg.cta_steps, "bk": cfg.block_k, "cluster": cfg.cluster}
            rows.append(lib.check_row_twice(fmt, w, x, ref, cfg, **tags))
        rows.append(lib.check_row(fmt, w, x, ref, None, dispatch=True))  # `qjax.matmul`'s pick


def main(argv=None) -> None:
    ap = lib.probe_parser(["w8cht", "fp8t", "w4g128t"], [1, 16], 420)
    ap.set_defaults(shapes=["qkv", "o", "down"])
    ap.add_argument("--force", nargs="*", default=[], metavar="L:C",
                    help="also time L steps per CTA, clusters of C (0: the XLA pass)")  # fmt: skip
    args = ap.parse_args(argv)
    forced = [tuple(int(v) for v in f.split(":")) for f in args.force]
    out = lib.start(args, lambda rows: check(rows, args.fmts + ["nf4t", "w4cht"]))

    def variants(w, m):
        return lib.jitted(configs(w, m, forced))

    def extra(label, w, m):
        cfg = configs(w, m, forced)[label]
        f = jax.jit(lambda x, w: mg.matmul(x, w, config=cfg))
        x = jax.random.normal(jax.random.key(m), (m, w.shape[0]), jax.numpy.bfloat16)
        ref = np.asarray(x, np.float32) @ np.asarray(w.dequantize(), np.float32)
        y = np.asarray(f(x, w), np.float32)  # the timed config's own numbers, this weight
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        return {f"{label}_cfg": kb.config_label(dataclasses.asdict(cfg)),
                f"{label}_rel_err": round(err, 5),
                f"{label}_kernels": kb.kernel_breakdown(f, (x, w))}  # fmt: skip

    cases = [(*lib.shape(s), m) for m in args.ms for s in args.shapes]
    path = os.path.join(args.out, "skinny_cluster_probe.json")
    lib.time_cases(out, path, cases, args.fmts, variants, extra, args.budget_s)


if __name__ == "__main__":
    main()
