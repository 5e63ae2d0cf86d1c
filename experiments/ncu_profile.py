"""Nsight Compute on the Mosaic GPU kernel: where the time goes.

Runs each case once — the table's config of :func:`qjax.kernels.gpu.mgpu_matmul.matmul` on a
random repacked weight — under ``ncu`` (real clocks, the :data:`SECTIONS` and the warp-stall
reasons, :data:`STALLS`; kernels filtered by name, so XLA's own kernels are left out), and
writes the ``--csv --page details`` report and its summary (:func:`summarize`); ``--source``
cases get the SASS with each instruction's stall samples, summarized by
:func:`summarize_source` (the compute warps' K-step loop):

    python -m experiments.ncu_profile --out DIR --cases w4g128t:57344x8192:1 ... \\
        [--source w4g128t:8192x8192:128]                                            # on the GPU

A case is ``FORMAT:NxK:M[:field=value,...]`` (``FORMAT`` of ``kernel_bench.FORMATS``; the fields
override the table's :class:`~qjax.kernels.gpu.mgpu_matmul.Config`); the kernels of the report
come in the order of the cases (printed ``case i: ...`` lines name them). Results:
``experiments/results/kernels/ncu_profile.json``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import io
import json
import os
import shutil
import subprocess
import sys

SECTIONS = (
    "SpeedOfLight",
    "MemoryWorkloadAnalysis",
    "MemoryWorkloadAnalysis_Tables",
    "ComputeWorkloadAnalysis",
    "WarpStateStats",
    "SchedulerStats",
    "LaunchStats",
    "Occupancy",
    "SourceCounters",
)


def parse_case(text: str) -> tuple[str, int, int, int, dict]:
    """``FORMAT:NxK:M[:field=value,...]`` → its parts; the fields (ints where they are digits)
    override the table's config."""
    fmt, shape, m, *extra = text.split(":")
    n, k = (int(v) for v in shape.split("x"))
    fields = dict(kv.split("=") for e in extra for kv in e.split(","))
    return fmt, n, k, int(m), {key: int(v) if v.isdigit() else v for key, v in fields.items()}


def run_cases(cases: list[str]) -> None:
    """One launch per case, after its compilation (compiling launches nothing)."""
    import jax
    import jax.numpy as jnp

    from experiments import kernel_bench as kb
    from qjax.kernels.gpu import mgpu_matmul as mg

    for i, text in enumerate(cases):
        fmt, n, k, m, fields = parse_case(text)
        x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
        w = kb.random_weight(fmt, k, n, 0)
        cfg = dataclasses.replace(mg.table_config(w, m), **fields)
        f = jax.jit(lambda x, w, cfg=cfg: mg.matmul(x, w, config=cfg))
        label = kb.config_label(dataclasses.asdict(cfg))
        compiled = f.lower(x, w).compile()
        jax.block_until_ready((x, w))
        jax.block_until_ready(compiled(x, w))
        print(f"case {i}: {text} {label}", flush=True)


def summarize(report: str) -> list[dict]:
    """``ncu --csv --page details`` text → one dict per profiled kernel: its name, grid, block
    and every metric as ``"Section: Metric": "value unit"``."""
    rows: dict[str, dict] = {}
    lines = [ln for ln in report.splitlines() if ln.startswith('"')]
    for r in csv.DictReader(io.StringIO("\n".join(lines))):
        head = {"id": int(r["ID"]), "kernel": r["Kernel Name"][:80]}
        d = rows.setdefault(r["ID"], {**head, "grid": r["Grid Size"], "block": r["Block Size"]})
        if r.get("Metric Name"):
            value = f"{r['Metric Value']} {r['Metric Unit']}".strip()
            d.setdefault(f"{r['Section Name']}: {r['Metric Name']}", value)
    return sorted(rows.values(), key=lambda d: d["id"])


def summarize_source(report: str, top: int = 12) -> dict:
    """``ncu --page source --print-source sass --csv`` text → the compute warp groups' K-step
    loop (the instructions executed as often as the fewest-executed ``HGMMA``): instructions per
    trip by opcode with their warp-stall samples, the stall reasons in and outside the loop (%
    of samples), and the ``top`` instructions by samples."""
    lines = report.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('"Address"'))
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[start:]))))
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]

    def opcode(src: str) -> str:
        words = src.split()
        return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]

    def executed(r) -> int:
        return int(r["Instructions Executed"] or 0)

    def samples(r) -> int:
        return int(r["Warp Stall Sampling (All Samples)"] or 0)

    trips = min(executed(r) for r in rows if opcode(r["Source"]) == "HGMMA")
    loop = [r for r in rows if executed(r) == trips]
    by_op: dict[str, list[int]] = {}
    for r in loop:
        entry = by_op.setdefault(opcode(r["Source"]), [0, 0])
        entry[0] += 1
        entry[1] += samples(r)

    def stalls(sel) -> dict:
        tot = {k[6:]: sum(int(r[k] or 0) for r in sel) for k in reasons}
        n = sum(tot.values()) or 1
        ranked = sorted(tot.items(), key=lambda kv: -kv[1])
        return {k: round(100 * v / n, 1) for k, v in ranked if v}

    all_samples = sum(samples(r) for r in rows) or 1
    ranked = sorted(rows, key=samples, reverse=True)[:top]
    return {
        "loop_trips": trips,
        "loop_instructions_per_trip": len(loop),
        "loop_samples_pct": round(100 * sum(samples(r) for r in loop) / all_samples, 1),
        "loop_by_opcode": dict(sorted(by_op.items(), key=lambda kv: -kv[1][0])),
        "stalls_in_loop_pct": stalls(loop),
        "stalls_outside_loop_pct": stalls([r for r in rows if executed(r) != trips]),
        "top_instructions": [
            [r["Source"].strip(), round(100 * samples(r) / all_samples, 2), executed(r)]
            for r in ranked
        ],
    }


def find_ncu() -> str:
    """``ncu`` on the PATH, else the newest under the CUDA / Nsight Compute install folders."""
    installed = sorted(
        glob.glob("/usr/local/cuda*/bin/ncu") + glob.glob("/opt/nvidia/nsight-compute/*/ncu")
    )
    found = shutil.which("ncu") or (installed[-1] if installed else None)
    if found is None:
        raise SystemExit("ncu_profile: no ncu on this machine")
    return found


STALLS = "regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio$"


def profile(out: str, name: str, cases: list[str], kernels: str, source=False) -> None:
    """``ncu`` around this script's ``--inner`` run of ``cases``: ``out/name.csv`` (the report),
    ``.log`` (the script's output) and ``.json`` (:func:`summarize`). ``source``: instead, the
    SASS with each instruction's warp-stall samples (``--page source``), summarized by
    :func:`summarize_source`."""
    cmd = [find_ncu(), "--clock-control", "none", "--csv"]
    if source:
        cmd += ["--section", "SourceCounters", "--page", "source", "--print-source", "sass"]
    else:
        cmd += ["--page", "details"] + [a for s in SECTIONS for a in ("--section", s)]
        cmd += ["--metrics", STALLS]  # the warp-stall reasons, in cycles per issued instruction
    cmd += ["-k", f"regex:{kernels}"]
    cmd += [sys.executable, "-m", "experiments.ncu_profile", "--inner", "--cases", *cases]
    run = subprocess.run(cmd, capture_output=True, text=True)
    with open(os.path.join(out, f"{name}.csv"), "w") as fh:
        fh.write(run.stdout)
    with open(os.path.join(out, f"{name}.log"), "w") as fh:
        fh.write(run.stderr)
    print(run.stderr[-3000:], flush=True)
    with open(os.path.join(out, f"{name}.json"), "w") as fh:
        json.dump((summarize_source if source else summarize)(run.stdout), fh, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--cases", nargs="*", default=[])
    ap.add_argument("--source", nargs="*", default=[], help="cases whose SASS stalls to report")
    ap.add_argument("--inner", action="store_true", help="run the cases (ncu runs this)")
    ap.add_argument("--summarize", help="an ncu --csv report (details or source): its summary")
    args = ap.parse_args(argv)
    if args.summarize:
        with open(args.summarize) as fh:
            text = fh.read()
        source = '"Address"' in text
        print(json.dumps((summarize_source if source else summarize)(text), indent=1))
    elif args.inner:
        run_cases(args.cases)
    else:
        os.makedirs(args.out, exist_ok=True)
        if args.cases:
            profile(args.out, "ncu_mgpu", args.cases, "mosaic")
        for i, case in enumerate(args.source):
            profile(args.out, f"ncu_sass_{i}", [case], "mosaic", source=True)


if __name__ == "__main__":
    main()
