"""Probe: the skinny kernel's 8-bit codes loaded from HBM straight into registers
(``Config.ldg``) against the same kernel fed by TMA through shared memory, same run.

Stops 23 – 25 located what separates the skinny kernel from a plain read of the weight's bytes
(``read_floor_probe``, ``stream_cost_probe``): its TMA stream costs ≈ 1.15 µs more per call than
XLA's row reduction over the same bytes, and 1.6 – 2.7 µs of decode and ``wgmma`` are not hidden
behind it. ``Config.ldg`` drops that path for the codes: the 8-bit layouts store each 64-row ×
128-code block fragment-major (:func:`qjax.kernels.gpu.mgpu_decode.to_fragments`), so every thread
loads exactly its fragments with 128-bit global loads (each warp group load reads 2 KiB of
consecutive bytes), issued at the start of the step before; a thread then waits only for its own
registers, not for the whole step. ``x`` and the scale rows keep their TMA pipeline.

Variants per case: ``tma``, the dispatch's skinny config with the codes copied by TMA (the step's
blocks as one box, then one 128-bit shared-memory load per thread and 16 codes), and ``ldg``, the
same config with the codes loaded into registers one step ahead by
``ld.global.nc.L1::no_allocate.v4.u32`` (``mgpu_decode.LDG_PTX``). Stop 32's runs (before the
layout stored the fragments: the kernels then took a repack made by the probe, and int4 too; code
at 2211cfc) also timed loads that lost (code at b741b39): Mosaic GPU's generic vector load
(``ldg_probe_first``, ``_nc``: 3 – 6 % slower than the read-only load), two steps ahead
(``_nc``), 256-code steps and four CTAs per SM (``_nc``, ``_rows``) and the codes loaded a 32-bit
word per register from the old layout (``_rows``: 1.31× the TMA kernel's time).

Device checks first: each variant against the float32 reference and against the TMA path bit for
bit (the sums are added in the same order), and run twice with the same bits.

    python -m experiments.ldg_probe --out DIR [--budget-s 420]      # on the GPU
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import kernel_bench as kb
from experiments import mgpu_probe_lib as lib
from qjax.kernels.gpu import mgpu_matmul as mg
from qjax.kernels.gpu import mgpu_skinny as sk


def variants(w, m: int) -> dict:
    """``label: Config`` of the case (empty where the dispatch takes the main kernel)."""
    base = mg.config_for(w, m)
    if base.path != "skinny":
        return {}
    return {"tma": dataclasses.replace(base, ldg=False), "ldg": dataclasses.replace(base, ldg=True)}


def product(cfg: mg.Config):
    """``(x, w) ↦ x @ Ŵ`` by the skinny kernel with ``cfg``."""
    return jax.jit(lambda x, w: sk.matmul_rows(x, w, cfg))


def check(fmt: str, w, x, ref, cfgs: dict) -> list[dict]:
    """Each config's product against ``ref`` (relative error < 1e-2), twice (same bits), and
    where it shares ``tma``'s K step and schedule, against ``tma``'s bits."""
    rows, bits = [], {}
    for label, cfg in cfgs.items():
        row = {"fmt": fmt, "M": x.shape[0], "K": x.shape[1], "N": ref.shape[1], "variant": label}
        try:
            f = product(cfg)
            a, b = (np.asarray(f(x, w)) for _ in range(2))
            y = a.astype(np.float32)
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            bits[label] = a.view(np.uint16)
            row.update(rel_err=err, same_bits=bool(np.array_equal(a.view(np.uint16),
                                                                  b.view(np.uint16))))  # fmt: skip
            same_schedule = dataclasses.replace(cfg, ldg=False) == cfgs["tma"]
            if label != "tma" and same_schedule and "tma" in bits:
                row["same_as_tma"] = bool(np.array_equal(bits[label], bits["tma"]))
            row["ok"] = bool(np.isfinite(y).all() and err < 1e-2 and row["same_bits"]
                             and row.get("same_as_tma", True))  # fmt: skip
        except Exception as e:  # noqa: BLE001  (recorded; the others still run)
            row["error"] = repr(e)[:2000]
        print("check", row, flush=True)
        rows.append(row)
    return rows


def reference(w, x) -> np.ndarray:
    return np.asarray(x, np.float32) @ np.asarray(w.dequantize(), np.float32)


def time_case(fmt: str, n: int, k: int, m: int, t_bf16: float) -> dict | None:
    """One row: XLA's bf16 time and each variant's median µs over rotating weights (> 150 MB)."""
    w0 = kb.random_weight(fmt, k, n, 0)
    cfgs = variants(w0, m)
    if not cfgs:
        return None
    x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
    ws = [w0] + [kb.random_weight(fmt, k, n, i) for i in range(1, kb.n_buffers(w0.nbytes))]
    row = {"fmt": fmt, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16, 2), "bytes": w0.nbytes}
    checks = check(fmt, w0, x, reference(w0, x), cfgs)
    row["checks_ok"] = all(c.get("ok") for c in checks)
    for label, cfg in cfgs.items():
        try:
            sets = [(x, w) for w in ws]
            us = kb.device_time(product(cfg), sets, 40)["us"]
            row[f"{label}_us"] = round(us, 2)
            row[f"{label}_x_bf16"] = round(t_bf16 / us, 3)
            row[f"{label}_cfg"] = dict(bk=cfg.block_k, L=cfg.cta_steps, C=cfg.cluster,
                                       per_sm=cfg.ctas_per_sm)  # fmt: skip
            del sets
        except Exception as e:  # noqa: BLE001
            row[f"{label}_error"] = repr(e)[:500]
    if "tma_us" in row:
        for label in cfgs:
            if f"{label}_us" in row:
                row[f"{label}_vs_tma"] = round(row[f"{label}_us"] / row["tma_us"], 4)
    del ws
    print(row, flush=True)
    return row


def main(argv=None) -> None:
    ap = lib.probe_parser(["w8cht", "fp8t"], [1, 16], 420)
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "ldg_probe.json")
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": []}
    t0 = time.time()
    if not args.no_check:
        for fmt, w, x, ref in lib.check_cases(args.fmts, [(1, 2048, 384), (16, 1024, 640)]):
            cfgs = variants(w, x.shape[0])
            out["checks"] += check(fmt, w, x, ref, cfgs) if cfgs else []
        bad = [r for r in out["checks"] if not r.get("ok")]
        print(f"checks: {len(out['checks'])}, failed: {len(bad)}", flush=True)
    cases = [(fmt, *lib.shape(s), m) for m in args.ms for s in args.shapes for fmt in args.fmts]
    bf16: dict = {}
    for fmt, n, k, m in cases:
        if time.time() - t0 > args.budget_s:
            break
        if (n, k, m) not in bf16:
            bf16[n, k, m] = kb.time_bf16(n, k, m)["us"]
        out["times"] += [row] if (row := time_case(fmt, n, k, m, bf16[n, k, m])) else []
        save(out, path)
    save(out, path)


def save(out: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
