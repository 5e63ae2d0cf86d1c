"""Our GGUF K-quant / IQ4_NL encoders against llama.cpp's own ``ggml_quantize_chunk``.

    python experiments/kquants_vs_llamacpp.py                 # all eligible tensors, both GGUFs
    python experiments/kquants_vs_llamacpp.py --max-tensors 2 # a quick look
    python experiments/kquants_vs_llamacpp.py --write-golden tests/convert/data/kquants_golden.npz

Needs llama-cpp-python (its wheel ships ggml's shared libraries; we load ``libggml-base`` with
ctypes and call ``ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix)``). For every
type in {Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL} x {no imatrix, imatrix} and every 2-D weight of the
SmolLM2 and Gemma3 GGUFs whose row length fits the block (256 for K-quants, 32 for IQ4_NL), it
encodes the dequantized float32 weights with both, and reports the share of byte-identical blocks
and both reconstruction errors: mean squared error weighted per column by the imatrix (plain MSE
without one), decoded by ``qjax.convert.gguf.dequantize``.

The imatrix is a synthetic one (no activations needed): per tensor, a log-normal positive vector
(``exp(N(0, 1))``, seeded from the tensor name), the heavy-tailed shape of real mean squared
activations, with 2% of the columns set to 0 (dead channels).

``--write-golden`` writes the small golden file the CI tests compare against: a few synthetic and
adversarial rows (zero, constant, outlier, tiny, negative-only, ties ...) and 4 real rows, an
imatrix, and llama.cpp's bytes for every type and variant (also the imatrix variants of
Q4_0/Q4_1/Q5_0/Q5_1).

Writes ``experiments/results/gguf_kquants/kquants_vs_llamacpp.{json,md}``.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from qjax import assets
from qjax.convert.gguf import GGMLType, dequantize, quantize, read_gguf, row_bytes

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
TYPES = [*K_TYPES, "IQ4_NL"]
LEGACY_WEIGHTED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]
OUT = Path(__file__).parent / "results" / "gguf_kquants"


# ---------------------------------------------------------------------------------------------
# llama.cpp oracle


def load_ggml() -> ctypes.CDLL:
    """``libggml-base`` from the installed llama-cpp-python wheel, with ``ggml_quantize_chunk``."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise RuntimeError("llama-cpp-python is not installed (pip install llama-cpp-python)")
    libdir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "libggml.so", "libllama.so"):
        path = libdir / name
        if path.exists():
            lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            if hasattr(lib, "ggml_quantize_chunk"):
                break
    else:
        raise RuntimeError(f"no ggml library exporting ggml_quantize_chunk in {libdir}")
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


def ggml_quantize(
    lib: ctypes.CDLL, x: np.ndarray, ggml_type: GGMLType, imatrix: np.ndarray | None
) -> np.ndarray:
    """llama.cpp's bytes for the rows of ``x`` (2-D float32), shape ``(rows, row_bytes)``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, n = x.shape
    out = np.zeros((rows, row_bytes(ggml_type, n)), dtype=np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    size = lib.ggml_quantize_chunk(
        int(ggml_type),
        x.ctypes.data,
        out.ctypes.data,
        0,
        rows,
        n,
        None if qw is None else qw.ctypes.data,
    )
    assert size == out.size, (size, out.size)
    return out


# ---------------------------------------------------------------------------------------------
# comparison on the real GGUFs


def synthetic_imatrix(name: str, n: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    qw = np.exp(rng.standard_normal(n)).astype(np.float32)
    qw[rng.random(n) < 0.02] = 0
    return qw


def weighted_mse(x: np.ndarray, y: np.ndarray, qw: np.ndarray | None) -> float:
    """``sum_c qw_c mean_r (y - x)^2 / sum_c qw_c`` (plain MSE without ``qw``), in float64."""
    err = np.zeros(x.shape[-1], np.float64)
    for r in range(0, x.shape[0], 4096):
        d = y[r : r + 4096].astype(np.float64) - x[r : r + 4096]
        err += np.square(d).sum(axis=0)
    err /= x.shape[0]
    if qw is None:
        return float(err.mean())
    return float((err * qw).sum() / qw.sum())


def eligible(model: str, max_tensors: int | None) -> list[tuple[str, str]]:
    r = read_gguf(assets.path(model))
    names = [t.name for t in r.tensors.values() if len(t.shape) == 2 and t.shape[-1] % 32 == 0]
    if max_tensors is not None:
        names = names[:max_tensors]
    return [(model, n) for n in names]


def compare(args: argparse.Namespace) -> None:
    lib = load_ggml()
    rows_out = []
    readers = {m: read_gguf(assets.path(m)) for m in ("smollm2", "gemma3")}
    todo = eligible("smollm2", args.max_tensors) + eligible("gemma3", args.max_tensors)
    types = args.types.split(",") if args.types else TYPES
    t_start = time.time()
    for model, name in todo:
        w = readers[model].dequantize(name)
        if args.max_rows is not None:
            w = w[: args.max_rows]
        n = w.shape[-1]
        qw_full = synthetic_imatrix(name, n)
        for tname in types:
            t = GGMLType[tname]
            if n % (256 if tname in K_TYPES else 32):
                continue
            if name == "token_embd.weight" and args.no_embeddings:
                continue
            for qw in (None, qw_full):
                t0 = time.perf_counter()
                ours = quantize(w, t, imatrix=qw)
                t1 = time.perf_counter()
                ref = ggml_quantize(lib, w, t, qw)
                t2 = time.perf_counter()
                nbytes = row_bytes(t, 256 if tname in K_TYPES else 32)
                same = (ours.reshape(-1, nbytes) == ref.reshape(-1, nbytes)).all(axis=1)
                mse_ours = weighted_mse(w, dequantize(ours, t, w.shape), qw)
                mse_ref = weighted_mse(w, dequantize(ref, t, w.shape), qw)
                row = {
                    "model": model,
                    "tensor": name,
                    "shape": list(w.shape),
                    "type": tname,
                    "imatrix": qw is not None,
                    "blocks": int(same.size),
                    "identical_blocks": int(same.sum()),
                    "identical_pct": 100.0 * float(same.mean()),
                    "mse_ours": mse_ours,
                    "mse_llamacpp": mse_ref,
                    "seconds_ours": round(t1 - t0, 3),
                    "seconds_llamacpp": round(t2 - t1, 3),
                }
                rows_out.append(row)
                print(
                    f"{model:8s} {name:28s} {tname:6s} imatrix={qw is not None!s:5s} "
                    f"identical {row['identical_pct']:7.3f}%  mse {mse_ours:.4e} vs {mse_ref:.4e}"
                    f"  ({t1 - t0:.1f}s / {t2 - t1:.2f}s)",
                    flush=True,
                )
    write_results(args, rows_out, time.time() - t_start)


def write_results(
    args: argparse.Namespace, rows: list[dict], seconds: float, command: str | None = None
) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if command is None:
        command = " ".join(["python experiments/kquants_vs_llamacpp.py", *sys.argv[1:]])
    llama_version = _llama_cpp_version()
    summary = []
    for tname in sorted({r["type"] for r in rows}, key=TYPES.index):
        for im in (False, True):
            sel = [r for r in rows if r["type"] == tname and r["imatrix"] == im]
            if not sel:
                continue
            blocks = sum(r["blocks"] for r in sel)
            same = sum(r["identical_blocks"] for r in sel)
            worse = [r for r in sel if r["mse_ours"] > r["mse_llamacpp"]]
            ratio = [r["mse_ours"] / r["mse_llamacpp"] for r in sel if r["mse_llamacpp"] > 0]
            summary.append(
                {
                    "type": tname,
                    "imatrix": im,
                    "tensors": len(sel),
                    "blocks": blocks,
                    "identical_blocks": same,
                    "identical_pct": 100.0 * same / blocks,
                    "tensors_identical": sum(r["identical_blocks"] == r["blocks"] for r in sel),
                    "tensors_ours_worse": len(worse),
                    "max_mse_ratio_ours_over_llamacpp": max(ratio) if ratio else None,
                    "mean_mse_ours": float(np.mean([r["mse_ours"] for r in sel])),
                    "mean_mse_llamacpp": float(np.mean([r["mse_llamacpp"] for r in sel])),
                    "seconds_ours": round(sum(r["seconds_ours"] for r in sel), 1),
                    "seconds_llamacpp": round(sum(r["seconds_llamacpp"] for r in sel), 1),
                }
            )
    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "llama_cpp_python": llama_version,
        "machine": platform.machine(),
        "cpus": __import__("os").cpu_count(),
    }
    result = {
        "command": command,
        "environment": env,
        "seconds": round(seconds, 1),
        "summary": summary,
        "rows": rows,
    }
    (OUT / "kquants_vs_llamacpp.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# GGUF K-quant / IQ4_NL encoders: qjax vs llama.cpp",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min on {env['cpus']} CPU cores; "
        f"llama-cpp-python {llama_version}, NumPy {np.__version__}).",
        "",
        "Every 2-D weight of SmolLM2-135M and Gemma-3-270M whose row length is a multiple of the "
        "block (256 for K-quants: SmolLM2 `ffn_down`, Gemma3 `attn_output` and `ffn_down`; 32 for "
        "IQ4_NL: every linear and the token embeddings), dequantized to float32 "
        "and encoded by `qjax.convert.gguf.quantize` and by llama.cpp's `ggml_quantize_chunk`. "
        "'imatrix' = a synthetic log-normal per-column importance vector (2% zeros). MSE is "
        "weighted per column by the imatrix (plain MSE without one), decoded by our dequantizer.",
        "",
        "| type | imatrix | tensors | blocks | identical blocks | tensors identical | "
        "tensors where ours is worse | max MSE ours / llama.cpp | mean MSE | "
        "time ours / llama.cpp |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        ratio = s["max_mse_ratio_ours_over_llamacpp"]
        lines.append(
            f"| {s['type']} | {'yes' if s['imatrix'] else 'no'} | {s['tensors']} | {s['blocks']} | "
            f"{s['identical_pct']:.4f}% | {s['tensors_identical']}/{s['tensors']} | "
            f"{s['tensors_ours_worse']} | {'-' if ratio is None else f'{ratio:.6f}'} | "
            f"{s['mean_mse_ours']:.4e} | {s['seconds_ours']} s / {s['seconds_llamacpp']} s |"
        )
    differing = [r for r in rows if r["identical_blocks"] != r["blocks"]]
    total = sum(r["blocks"] for r in rows)
    if not differing:
        verdict = (
            f"**Verdict: all {total} blocks of all {len(rows)} (tensor, type, imatrix) encodings "
            "are byte-identical to llama.cpp**, so the reconstruction errors are equal too."
        )
    else:
        worse = [r for r in differing if r["mse_ours"] > r["mse_llamacpp"]]
        verdict = (
            f"**Verdict: {len(differing)} of {len(rows)} encodings differ from llama.cpp in some "
            f"blocks; ours has a higher error on {len(worse)} of them:** "
            + ", ".join(
                f"{r['model']}/{r['tensor']} {r['type']} imatrix={r['imatrix']} "
                f"({r['identical_pct']:.4f}% identical)"
                for r in differing[:20]
            )
        )
    lines += ["", verdict, "", NOTES, ""]
    (OUT / "kquants_vs_llamacpp.md").write_text("\n".join(lines))
    print(f"wrote {OUT}/kquants_vs_llamacpp.{{json,md}}")


def _llama_cpp_version() -> str:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


# ---------------------------------------------------------------------------------------------
# golden file for the CI tests


GOLDEN_SEED = 1234

NOTES = """Notes.

- The inputs are the GGUFs' own weights dequantized, i.e. already on a quantization grid
  (SmolLM2: Q4_1; Gemma3: `attn_output` Q4_K, `ffn_down` Q6_K / Q4_K, linears Q5_0 / Q8_0).
  Re-encoding onto the grid a tensor came from is nearly lossless, which is why Q4_K's mean MSE
  here is below Q5_K's: compare the MSE columns across implementations, not across types.
- Identity holds for the llama.cpp x86-64 build we compare with (llama-cpp-python 0.3.36 built
  from source with `CMAKE_ARGS=-DGGML_NATIVE=OFF`; `ggml-base`, which holds the encoders, uses no
  fused multiply-add). The imatrix variants of Q4_0/Q4_1/Q5_0/Q5_1 are checked on the golden file
  and in the slow test, not here.
- Times are single-threaded wall times on this 2-core machine; ours is NumPy vectorised over
  blocks (about 3x llama.cpp's scalar C for the K-quants, on par for IQ4_NL)."""


def golden_inputs(seed: int = GOLDEN_SEED) -> tuple[np.ndarray, np.ndarray]:
    """13 synthetic rows of 512 (2 super-blocks each) incl. adversarial ones, and an imatrix."""
    rng = np.random.default_rng(seed)
    n = 512
    g = lambda s=1.0: (rng.standard_normal(n) * s).astype(np.float32)
    rows = [
        g(),  # gaussian
        np.zeros(n, np.float32),  # all zero
        np.full(n, 0.37, np.float32),  # constant positive
        np.full(n, -1.25, np.float32),  # constant negative
        np.where(np.arange(n) == 77, np.float32(1e4), g(0.01)),  # one huge outlier
        g(1e-30),  # tiny: below ggml's 1e-15 group threshold
        -np.abs(g()),  # negative only
        np.concatenate([g(1e-3)[:256], g(10.0)[256:]]),  # mixed scales per super-block
        g(1e-8),  # small but above the threshold
        rng.random(n).astype(np.float32),  # positive only
        np.where(rng.random(n) < 0.9, 0, np.sign(g())).astype(np.float32),  # sparse +-1
        rng.integers(-8, 8, n).astype(np.float32),  # integers: rounding ties
        np.concatenate([np.zeros(128, np.float32), g()[128:]]),  # zero half blocks
    ]
    x = np.stack(rows).astype(np.float32)
    x[0, 5] = -x[0, 5]
    qw = np.exp(rng.standard_normal(n)).astype(np.float32)
    qw[rng.random(n) < 0.05] = 0
    return x, qw


def write_golden(path: Path) -> None:
    lib = load_ggml()
    x_synth, qw_synth = golden_inputs()
    w = read_gguf(assets.path("smollm2")).dequantize("blk.0.ffn_down.weight")
    x_real = np.ascontiguousarray(w[:4])
    qw_real = synthetic_imatrix("blk.0.ffn_down.weight", x_real.shape[1])
    arrays: dict[str, np.ndarray] = {
        "seed": np.array(GOLDEN_SEED),
        "x_synth": x_synth,
        "qw_synth": qw_synth,
        "x_real": x_real,
        "qw_real": qw_real,
    }
    for tname in [*TYPES, *LEGACY_WEIGHTED]:
        t = GGMLType[tname]
        for part, x, qw in (("synth", x_synth, qw_synth), ("real", x_real, qw_real)):
            variants = [("w", qw)] if tname in LEGACY_WEIGHTED else [("ref", None), ("w", qw)]
            for tag, q in variants:
                arrays[f"{tname}_{tag}_{part}"] = ggml_quantize(lib, x, t, q)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({path.stat().st_size} bytes, {len(arrays)} arrays)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max-tensors", type=int, default=None, help="first N tensors per model")
    p.add_argument("--max-rows", type=int, default=None, help="first N rows of each tensor")
    p.add_argument("--types", default=None, help="comma-separated subset of " + ",".join(TYPES))
    p.add_argument("--no-embeddings", action="store_true", help="skip token_embd (IQ4_NL only)")
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the .md (and summary) from the .json"
    )
    p.add_argument("--write-golden", type=Path, default=None, help="write the CI golden .npz")
    args = p.parse_args()
    if args.write_golden is not None:
        write_golden(args.write_golden)
    elif args.report_only:
        old = json.loads((OUT / "kquants_vs_llamacpp.json").read_text())
        write_results(args, old["rows"], old["seconds"], old["command"].strip())
    else:
        compare(args)


if __name__ == "__main__":
    main()
