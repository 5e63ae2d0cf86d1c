"""Our llama.cpp mixes (``qjax.convert.gguf.mixes``) against llama.cpp's own quantizer.

    python experiments/gguf_mixes_vs_llamacpp.py                       # all mixes, both models
    python experiments/gguf_mixes_vs_llamacpp.py --models smollm2 --mixes Q4_K_M
    python experiments/gguf_mixes_vs_llamacpp.py --write-golden \
        tests/convert/data/gguf_mix_types.json           # also the CI golden types

Needs llama-cpp-python. For each model (SmolLM2-135M, Gemma 3 270M) the original GGUF is first
dequantized to an all-F32 GGUF with our writer (``quantize_model_gguf(..., "F32")``); then for each
mix both quantizers read that same F32 file:

* llama.cpp: ``llama_cpp.llama_model_quantize(f32, out, params)`` with
  ``llama_model_quantize_default_params()``, ``ftype`` = the mix and ``nthread`` = 2;
* qjax: ``quantize_model_gguf(f32, out, mix)``.

Both outputs are read back with our reader and compared tensor by tensor: the GGML type, the
shape and the raw bytes must be identical (tensor *order* differs: llama.cpp writes tensors sorted
by layer then name, we keep the source order), and the metadata values must be equal (key order
aside). ``--write-golden`` stores llama.cpp's chosen types (per mix, per tensor name) for the CI
test ``tests/convert/test_gguf_mixes.py``.

Writes ``experiments/results/gguf_mixes/mixes_vs_llamacpp.{json,md}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from qjax import assets
from qjax.convert.gguf import read_gguf
from qjax.convert.gguf.mixes import MIXES, quantize_model_gguf

OUT = Path(__file__).parent / "results" / "gguf_mixes"
DEFAULT_MIXES = ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M", "Q6_K", "Q8_0", "Q4_0"]
EXTRA_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_L", "Q5_K_S", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16"]
WORK = Path.home() / ".cache" / "qjax" / "work" / "gguf_mixes"


def quiet_llama_logs() -> None:
    """Silence llama.cpp's per-tensor log lines (kept alive in a module global)."""
    import llama_cpp

    global _LOG_CB
    _LOG_CB = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(_LOG_CB, ctypes.c_void_p(0))


def llamacpp_quantize(src: Path, dst: Path, mix: str, nthread: int = 2) -> float:
    """Run llama.cpp's quantizer; return its wall time in seconds."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = MIXES[mix].ftype
    params.nthread = nthread
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({mix}) failed with {rc}")
    return time.perf_counter() - t0


def f32_gguf(model: str, work: Path) -> Path:
    """The model's original GGUF, every quantizable tensor dequantized to F32 (cached)."""
    path = work / f"{model}_f32.gguf"
    if not path.exists():
        quantize_model_gguf(assets.path(model), path, "F32")
    return path


def _plain(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def compare(ours: Path, theirs: Path) -> dict:
    a, b = read_gguf(ours), read_gguf(theirs)
    rows = []
    for name, tb in b.tensors.items():
        ta = a.tensors.get(name)
        row = {"name": name, "llamacpp": tb.ggml_type.name, "shape": list(tb.shape)}
        if ta is None:
            row.update(qjax=None, same_type=False, same_bytes=False)
        else:
            ra, rb = a.raw(name), b.raw(name)
            same = ta.ggml_type == tb.ggml_type and ta.shape == tb.shape and ra.shape == rb.shape
            row.update(
                qjax=ta.ggml_type.name,
                same_type=ta.ggml_type == tb.ggml_type,
                same_bytes=bool(same and np.array_equal(ra, rb)),
            )
        rows.append(row)
    extra = sorted(set(a.tensors) - set(b.tensors))
    ma = {k: _plain(v) for k, v in a.metadata.items()}
    mb = {k: _plain(v) for k, v in b.metadata.items()}
    meta_diff = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
    vt_diff = sorted(
        k for k in set(a.value_types) & set(b.value_types) if a.value_types[k] != b.value_types[k]
    )
    return {
        "tensors": len(rows),
        "same_type": sum(r["same_type"] for r in rows),
        "same_bytes": sum(r["same_bytes"] for r in rows),
        "mismatches": [r for r in rows if not (r["same_type"] and r["same_bytes"])],
        "extra_in_qjax": extra,
        "metadata_differences": meta_diff,
        "value_type_differences": vt_diff,
        "types": {r["name"]: r["llamacpp"] for r in rows},
        "type_counts": _counts(r["llamacpp"] for r in rows),
        "file_bytes": {"qjax": ours.stat().st_size, "llamacpp": theirs.stat().st_size},
    }


def _counts(names) -> dict:
    out: dict[str, int] = {}
    for n in names:
        out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    ap.add_argument("--mixes", nargs="+", default=DEFAULT_MIXES + EXTRA_MIXES)
    ap.add_argument("--work", type=Path, default=WORK, help="scratch directory for the GGUFs")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--write-golden", type=Path, default=None)
    ap.add_argument("--nthread", type=int, default=2)
    args = ap.parse_args(argv)

    import llama_cpp

    quiet_llama_logs()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for model in args.models:
        src = f32_gguf(model, args.work)
        for mix in args.mixes:
            theirs = args.work / f"{model}_{mix}_llamacpp.gguf"
            ours = args.work / f"{model}_{mix}_qjax.gguf"
            row = {"model": model, "mix": mix, "ftype": MIXES[mix].ftype}
            try:
                row["llamacpp_s"] = llamacpp_quantize(src, theirs, mix, args.nthread)
            except RuntimeError as e:
                row["error"] = str(e)
                results.append(row)
                print(f"{model} {mix}: llama.cpp failed: {e}", flush=True)
                continue
            t0 = time.perf_counter()
            quantize_model_gguf(src, ours, mix)
            row["qjax_s"] = time.perf_counter() - t0
            row.update(compare(ours, theirs))
            ok = (
                row["same_type"] == row["same_bytes"] == row["tensors"] and not row["extra_in_qjax"]
            )
            row["identical"] = bool(ok and not row["metadata_differences"])
            results.append(row)
            print(
                f"{model:8s} {mix:7s} tensors {row['tensors']:4d}  same type "
                f"{row['same_type']:4d}  same bytes {row['same_bytes']:4d}  metadata diffs "
                f"{row['metadata_differences']}  llama.cpp {row['llamacpp_s']:.1f}s  "
                f"qjax {row['qjax_s']:.1f}s  {row['type_counts']}",
                flush=True,
            )
            for p in (ours, theirs):
                p.unlink(missing_ok=True)

    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "llama_cpp_python": llama_cpp.__version__,
        "numpy": np.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python experiments/gguf_mixes_vs_llamacpp.py " + " ".join(argv or sys.argv[1:])
    slim = [{k: v for k, v in r.items() if k != "types"} for r in results]
    payload = {"command": cmd.strip(), "env": env, "results": slim}
    (args.out / "mixes_vs_llamacpp.json").write_text(json.dumps(payload, indent=1) + "\n")
    write_md(args.out / "mixes_vs_llamacpp.md", payload)
    if args.write_golden:
        source = (
            f"llama.cpp's quantizer (llama-cpp-python {llama_cpp.__version__}) on the all-F32 "
            f"GGUFs; {cmd.strip()}"
        )
        readers = {m: read_gguf(f32_gguf(m, args.work)) for m in args.models}
        golden = golden_payload(source, readers, results)
        args.write_golden.write_text(json.dumps(golden, indent=1) + "\n")
    return 0 if all(r.get("identical") for r in results) else 1


def golden_payload(source: str, readers: dict, results: list[dict]) -> dict:
    """The CI golden file: per model its facts, tensors (source order) and, per mix, llama.cpp's
    type names in that order, space-separated."""
    from dataclasses import asdict

    from qjax.convert.gguf.mixes import ModelInfo

    out: dict = {"source": source, "models": {}}
    for model, r in readers.items():
        names = list(r.tensors)
        out["models"][model] = {
            "info": asdict(ModelInfo.from_metadata(r.metadata)),
            "tensors": [[n, list(r.tensors[n].shape)] for n in names],
            "mixes": {
                row["mix"]: " ".join(row["types"][n] for n in names)
                for row in results
                if row["model"] == model and "types" in row
            },
        }
    return out


def write_md(path: Path, payload: dict) -> None:
    lines = [
        "# llama.cpp mixes: qjax vs llama.cpp's quantizer",
        "",
        f"Command: `{payload['command']}`  ",
        f"Environment: {payload['env']}",
        "",
        "Both quantizers read the same all-F32 GGUF (the original GGUF dequantized by qjax); per",
        "tensor the GGML type and the raw bytes are compared (llama.cpp writes tensors in its",
        "sorted order, qjax keeps the source order; metadata compared by value).",
        "",
        "| model | mix | ftype | tensors | same type | same bytes | metadata diffs "
        "| llama.cpp s | qjax s | types (llama.cpp) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["results"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mix']} | {r['ftype']} | error: {r['error']} |")
            continue
        counts = ", ".join(f"{k} {v}" for k, v in r["type_counts"].items())
        lines.append(
            f"| {r['model']} | {r['mix']} | {r['ftype']} | {r['tensors']} | {r['same_type']} "
            f"| {r['same_bytes']} | {len(r['metadata_differences'])} "
            f"| {r['llamacpp_s']:.1f} | {r['qjax_s']:.1f} | {counts} |"
        )
    res = payload["results"]
    n_ok = sum(bool(r.get("identical")) for r in res)
    lines += [
        "",
        f"**{n_ok} of {len(res)} (model, mix) runs identical** (every tensor's type and bytes, all "
        "metadata values incl. `general.file_type` and `general.quantization_version`).",
        "",
        "Notes: tensors whose row length (576 in SmolLM2, 640 in Gemma 3) is not a multiple of "
        "256 take llama.cpp's fallbacks: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0 and, in this "
        "llama.cpp version, Q2_K/Q3_K → Q4_0 (older versions used IQ4_NL). The tied token "
        "embedding follows the output rule (Q6_K → Q8_0 fallback; Q8_0 stays). Timings: "
        "llama.cpp with nthread=2, qjax single-process NumPy, 2-core CPU.",
    ]
    bad = [r for r in res if r.get("mismatches")]
    for r in bad:
        lines += ["", f"Mismatches {r['model']} {r['mix']}:", ""]
        lines += [f"- {m}" for m in r["mismatches"][:20]]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
