"""Peak memory of ``qjax convert`` paths, against 2 × the largest tensor + a fixed overhead.

Each conversion runs in a fresh subprocess: it imports qjax and the converters, resets the peak
RSS (``echo 5 > /proc/self/clear_refs``), records the baseline RSS, runs
:func:`qjax.convert.cli_convert.convert`, and reports

* ``peak_rss``: ``VmHWM`` − baseline (all resident pages, the source file's memory-mapped pages
  included: reading a tensor through the map makes its pages resident);
* ``peak_anon``: the largest ``RssAnon`` − baseline seen by a 2 ms sampling thread (memory the
  process allocated; mapped file pages excluded, they are reclaimable page cache).

The bound is ``2 × largest tensor`` (float32 bytes when the path dequantizes it, its stored
bytes otherwise) ``+ OVERHEAD``.

    python experiments/convert_memory.py            # all cases
    python experiments/convert_memory.py --only smollm2_gguf_to_f16

writes ``experiments/results/convert_memory/memory.json`` and ``README.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results" / "convert_memory"
MiB = 1 << 20
OVERHEAD = 128 * MiB

_CHILD = r"""
import json, sys, threading, time
from qjax.convert import cli_convert  # noqa: F401
from qjax.convert.gguf import model_export, qarray_export  # noqa: F401
import jax, flax.nnx, orbax.checkpoint, numpy as np  # noqa: F401
jax.numpy.zeros(1).block_until_ready()

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")
base_rss, base_anon = status("VmRSS"), status("RssAnon")
peak_anon = [base_anon]
stop = False

def sample():
    while not stop:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.002)

t = threading.Thread(target=sample, daemon=True)
t.start()
kw = json.loads(sys.argv[3])
t0 = time.time()
_, summary = cli_convert.convert(sys.argv[1], sys.argv[2], **kw)
elapsed = time.time() - t0
stop = True
t.join()
peak_anon[0] = max(peak_anon[0], status("RssAnon"))
print("RESULT " + json.dumps({
    "baseline_rss": base_rss, "peak_rss": status("VmHWM") - base_rss,
    "peak_anon": peak_anon[0] - base_anon, "elapsed_s": round(elapsed, 2), "summary": summary,
}))
"""


def largest(path: Path, dequantized: bool) -> tuple[str, int]:
    from qjax.convert.gguf import read_gguf

    r = read_gguf(path)
    sizes = {n: (t.n_elements * 4 if dequantized else t.nbytes) for n, t in r.tensors.items()}
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def run(src: Path, dst: Path, kw: dict) -> dict:
    cmd = [sys.executable, "-c", _CHILD, str(src), str(dst), json.dumps(kw)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed:\n{p.stderr[-3000:]}")
    return json.loads(line[0][len("RESULT ") :])


def main(argv: list[str] | None = None) -> int:
    from qjax import assets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    smol, gemma = assets.path("smollm2"), assets.path("gemma3")
    work = Path(tempfile.mkdtemp(prefix="qjax-convert-mem-"))
    ck = work / "smollm2_ck"
    deq = {"to": "orbax", "dequantize": True}
    # name, src, dst, kwargs, bound tensor source, dequantized?
    cases = [
        ("smollm2_gguf_to_f16", smol, work / "s16.gguf", {"ggml_type": "F16"}, smol, True),
        ("smollm2_gguf_to_orbax", smol, ck, {"to": "orbax"}, smol, False),
        ("smollm2_gguf_to_orbax_f32", smol, work / "ck32", deq, smol, True),
        ("smollm2_orbax_to_gguf", ck, work / "back.gguf", {}, smol, False),
        ("smollm2_orbax_to_q8_0_gguf", ck, work / "q8.gguf", {"ggml_type": "Q8_0"}, smol, True),
        ("gemma3_gguf_to_f32", gemma, work / "g32.gguf", {"ggml_type": "F32"}, gemma, True),
    ]
    results = []
    for name, src, dst, kw, ref, deq in cases:
        if args.only and name not in args.only:
            continue
        t_name, t_bytes = largest(ref, deq)
        r = run(src, dst, kw)
        bound = 2 * t_bytes + OVERHEAD
        cmd = f"qjax convert {src} {dst} " + " ".join(
            f"--{k.replace('ggml_type', 'type')}" + ("" if v is True else f" {v}")
            for k, v in kw.items()
        )
        r.update(
            case=name, command=cmd, largest_tensor=t_name, largest_tensor_bytes=t_bytes,
            bound=bound, within_bound_anon=r["peak_anon"] <= bound,
            within_bound_rss=r["peak_rss"] <= bound,
        )  # fmt: skip
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "summary"}), flush=True)
        time.sleep(1)
    shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps({"overhead": OVERHEAD, "cases": results},
                                                     indent=2))  # fmt: skip
    rows = [
        "| case | largest tensor | 2×largest + 128 MiB | peak anon | peak RSS (incl. mapped file) "
        "| time |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r['case']} | {r['largest_tensor']} {r['largest_tensor_bytes'] / MiB:.0f} MiB | "
            f"{r['bound'] / MiB:.0f} MiB | {r['peak_anon'] / MiB:.0f} MiB "
            f"({'≤' if r['within_bound_anon'] else '>'} bound) | {r['peak_rss'] / MiB:.0f} MiB "
            f"({'≤' if r['within_bound_rss'] else '>'}) | {r['elapsed_s']} s |"
        )
    cmds = "\n".join(r["command"] for r in results)
    (args.out / "table.md").write_text(
        "\n".join(rows) + "\n\nCommands:\n\n```\n" + cmds + "\n```\n"
    )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
