"""Quality of quantization methods on the real models: perplexity, KLD, top-1, bits/weight, time.

    python experiments/quality.py --config configs/baselines.py   # RTN baselines
    python experiments/quality.py --config configs/ptq.py         # RTN / HQQ / GPTQ ...

Protocol (REFERENCE §2, ``qjax.eval``): the Wikipedia test split joined with "\\n\\n", tokenized
once, non-overlapping windows (BOS first where the model's tokenizer adds one), every token after
the first scored. The reference is the model's own GGUF weights dequantized to float32; every
quantized row reports KL divergence from it and top-1 agreement. Linear layers matched by
``config.linears`` are quantized; embeddings, norms and the tied head stay float32. Calibration
windows (GPTQ) come from the disjoint calibration split.

Writes ``<out>/<name>.json`` (config, command, environment, rows) and ``<out>/<name>.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

import qjax
from qjax import assets, data
from qjax.convert.gguf.load import load_gguf_model
from qjax.eval import eval_windows, evaluate
from qjax.methods import method_from_config
from qjax.ptq.calibrate import calibration_tokens, quantize_model
from qjax.tokenizer import tokenizer_from_gguf


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).resolve().parent.parent))
    spec.loader.exec_module(module)
    return module.get_config()


def token_ids(name: str, gguf: Path, cfg, cache: Path | None):
    """Test ids, calibration windows and BOS id; cached as .npy in ``cache`` if given."""
    c = cfg.calibration
    files = None
    if cache is not None:
        calib_name = f"{name}_calib{c['samples']}x{c['length']}s{c['seed']}.npy"
        files = [cache / f"{name}_test.npy", cache / calib_name, cache / f"{name}_bos.npy"]
    if files and all(f.exists() for f in files):
        bos = int(np.load(files[2]))
        return np.load(files[0]), np.load(files[1]), (None if bos < 0 else bos)
    tok = tokenizer_from_gguf(gguf)
    bos = tok.bos_id if tok.add_bos else None
    test = np.asarray(tok.encode(data.test_text(cfg.corpus), add_bos=False), np.int32)
    calib = np.zeros((0, 0), np.int32)
    if c["samples"]:
        encode = lambda t: tok.encode(t, add_bos=False)  # noqa: E731
        calib = calibration_tokens(encode, c["samples"], c["length"], c["seed"], bos_id=bos)
    if files:
        cache.mkdir(parents=True, exist_ok=True)
        for f, arr in zip(files, (test, calib, np.int64(-1 if bos is None else bos)), strict=True):
            np.save(f, arr)
    return test, calib, bos


def run_model(name: str, cfg, gguf: Path, cache: Path | None, rows: list, log) -> None:
    _, model = load_gguf_model(gguf)
    test, calib, bos = token_ids(name, gguf, cfg, cache)
    graphdef, ref_state, rest = nnx.split(model, nnx.Param, ...)

    def apply(params, tokens):
        return nnx.merge(graphdef, params, rest)(tokens)

    max_w = None if cfg.max_windows < 0 else cfg.max_windows
    windows = {ctx: eval_windows(test, ctx, bos, max_w) for ctx in cfg.contexts}
    for ctx, w in windows.items():
        r = evaluate(apply, ref_state, w, batch_size=cfg.batch_size, desc=f"{name} ref {ctx}")
        rows.append(
            {
                "model": name,
                "method": "reference (GGUF → f32)",
                "context": ctx,
                "bits_per_weight": 32.0,
                "quantize_s": 0.0,
                **r.as_dict(),
            }
        )
        log(rows[-1])
    for mcfg in cfg.methods:
        method = method_from_config(dict(mcfg))
        rules = [(cfg.linears, method)]
        t0 = time.perf_counter()
        if getattr(method, "needs_calibration", False):
            qparams, _ = quantize_model(
                model, rules, calib, default=None, batch_size=max(1, 8 * 2048 // calib.shape[1])
            )
        else:
            qparams = qjax.quantize(nnx.state(model, nnx.Param), rules, default=None)
        jax.block_until_ready(qparams)
        qseconds = time.perf_counter() - t0
        qstate = qparams
        leaves = [
            q
            for q in jax.tree_util.tree_leaves(
                qparams, is_leaf=lambda x: isinstance(x, qjax.QArray)
            )
            if isinstance(q, qjax.QArray)
        ]
        bpw = 8 * sum(q.nbytes for q in leaves) / sum(q.size for q in leaves)
        for ctx, w in windows.items():
            r = evaluate(
                apply,
                qstate,
                w,
                ref_params=ref_state,
                batch_size=cfg.batch_size,
                desc=f"{name} {method.label()} {ctx}",
            )
            rows.append(
                {
                    "model": name,
                    "method": method.label(),
                    "context": ctx,
                    "bits_per_weight": bpw,
                    "quantize_s": qseconds,
                    **r.as_dict(),
                }
            )
            log(rows[-1])


def markdown(rows: list, title: str, command: str) -> str:
    head = (
        "| model | ctx | method | bits/w | ppl | Δppl | KLD mean | KLD p99 | top-1 | tokens "
        "| quantize s | eval s |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [f"# {title}", "", f"Command: `{command}`", "", head]
    for r in rows:
        ref = r.get("ref_ppl")
        dppl = "" if ref is None else f"{r['ppl'] - ref:+.3f}"
        kld = "" if r.get("kld_mean") is None else f"{r['kld_mean']:.4f}"
        p99 = "" if r.get("kld_p99") is None else f"{r['kld_p99']:.3f}"
        top1 = "" if r.get("top1_agreement") is None else f"{100 * r['top1_agreement']:.2f}%"
        lines.append(
            f"| {r['model']} | {r['context']} | {r['method']} | {r['bits_per_weight']:.3f} "
            f"| {r['ppl']:.3f} | {dppl} | {kld} | {p99} | {top1} | {r['tokens']} "
            f"| {r['quantize_s']:.1f} | {r['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


_METHOD_ORDER = ("RTN", "HQQ", "GPTQ", "AWQ", "AWQ+GPTQ", "SmoothQuant")


def _row_order(row: dict) -> tuple:
    """Reference first, then by bits (high → low), grouped before per-channel, then method."""
    label = row["method"]
    if label.startswith("reference"):
        return (row["model"], row["context"], 0)
    bits = re.search(r"int(\d)", label)
    first = label.split()[0]
    return (
        row["model"],
        row["context"],
        1,
        -int(bits.group(1)) if bits else -8,
        "per-channel" in label,
        _METHOD_ORDER.index(first) if first in _METHOD_ORDER else len(_METHOD_ORDER),
        "act-order" in label,
    )


def merge(paths: list[Path], name: str, out: Path) -> Path:
    """Joins the JSON results of several runs (e.g. parallel processes) into ``out/name.*``.

    Reference rows of the same model and context must agree (they are the same computation);
    each row keeps the command that made it.
    """
    rows, refs, metas = [], {}, []
    for path in paths:
        res = json.loads(Path(path).read_text())
        metas.append({k: res[k] for k in ("command", "jax", "device", "config")})
        for row in res["rows"]:
            row = {**row, "command": res["command"]}
            if row["method"].startswith("reference"):
                key = (row["model"], row["context"])
                if key in refs:  # GPU reductions differ slightly between processes
                    dev = abs(refs[key]["ppl"] - row["ppl"]) / row["ppl"]
                    if dev > 1e-3:
                        raise ValueError(f"reference rows differ for {key}: {path}")
                    refs[key]["ppl_spread"] = max(refs[key].get("ppl_spread", 0.0), dev)
                    continue
                refs[key] = row
            rows.append(row)
    rows.sort(key=_row_order)
    out.mkdir(parents=True, exist_ok=True)
    commands = sorted({m["command"] for m in metas})
    (out / f"{name}.json").write_text(json.dumps({"runs": metas, "rows": rows}, indent=1))
    devices = ", ".join(sorted({m["device"] for m in metas}))
    md = markdown(rows, f"{name} ({devices})", commands[0])
    if len(commands) > 1:
        md = md.replace(
            f"Command: `{commands[0]}`",
            "Commands (one process each, merged with `--merge`):\n\n"
            + "\n".join(f"- `{c}`" for c in commands),
        )
    (out / f"{name}.md").write_text(md)
    return out / f"{name}.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="an ml_collections config file (configs/*.py)")
    p.add_argument("--merge", type=Path, nargs="*", help="JSON results to join into --out/--name")
    p.add_argument("--models", nargs="*", help="override config.models")
    p.add_argument("--max-windows", type=int, help="override config.max_windows (smoke tests)")
    p.add_argument("--gguf-dir", type=Path, help="<dir>/<model>.gguf instead of qjax.assets")
    p.add_argument("--token-cache", type=Path, help="directory for precomputed token ids")
    p.add_argument("--methods", help="regex: keep only method configs whose JSON matches it")
    p.add_argument("--calib-length", type=int, help="override calibration window length")
    p.add_argument("--calib-samples", type=int, help="override the number of calibration windows")
    p.add_argument("--contexts", type=int, nargs="*", help="override config.contexts")
    p.add_argument("--name", help="override config.name (the results file name)")
    p.add_argument("--out", type=Path, default=Path("experiments/results"))
    args = p.parse_args(argv)
    if args.merge:
        print(merge(args.merge, args.name or "merged", args.out))
        return 0
    if not args.config:
        p.error("--config is required unless --merge is given")
    cfg = load_config(args.config)
    if args.max_windows is not None:
        cfg.max_windows = args.max_windows
    if args.methods:
        cfg.methods = [m for m in cfg.methods if re.search(args.methods, json.dumps(dict(m)))]
    if args.calib_length:
        cfg.calibration["length"] = args.calib_length
    if args.calib_samples:
        cfg.calibration["samples"] = args.calib_samples
    if args.contexts:
        cfg.contexts = args.contexts
    if args.name:
        cfg.name = args.name
    models = args.models or list(cfg.models)
    out = args.out / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)
    rows: list = []

    def log(row):
        print(
            json.dumps(
                {
                    k: row[k]
                    for k in (
                        "model",
                        "method",
                        "context",
                        "ppl",
                        "kld_mean",
                        "top1_agreement",
                        "bits_per_weight",
                    )
                }
            ),
            flush=True,
        )
        write()

    def write():
        meta = {
            "config": cfg.to_dict(),
            "command": command,
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "python": platform.python_version(),
        }
        (out / f"{cfg.name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
        (out / f"{cfg.name}.md").write_text(
            markdown(rows, f"{cfg.name} ({meta['device']})", command)
        )

    for name in models:
        gguf = args.gguf_dir / f"{name}.gguf" if args.gguf_dir else assets.path(name)
        run_model(name, cfg, gguf, args.token_cache, rows, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
