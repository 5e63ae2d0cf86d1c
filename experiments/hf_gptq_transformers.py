"""qjax GPTQ export of SmolLM2, loaded by transformers' real GPTQ path (gptqmodel), vs qjax.

    python experiments/hf_gptq_transformers.py --hf-python /tmp/gptqvenv/bin/python \\
        --out experiments/results/hf_export

transformers loads GPTQ checkpoints only through ``gptqmodel`` (+ ``optimum``), whose
requirements (numpy pinned, torchao, datasets, ...) do not belong in qjax's environment. So this
script runs in two environments and exchanges files on disk (safetensors / npz / JSON, no
pickle):

* the qjax side (this interpreter): SmolLM2 from its GGUF asset, quantized with qjax GPTQ (every
  decoder linear, calibration windows from the calibration split), exported with
  :func:`qjax.convert.hf_export.export_hf_quantized`; qjax's own logits of the quantized model on
  the first ``--tokens`` tokens of the Wikipedia test text, and a few kernels dequantized from
  the exported files (:func:`~qjax.convert.hf_export.read_hf_quantized`, float16 scales);
* the transformers side (``--hf-python``, an interpreter with gptqmodel + optimum; no qjax):
  ``AutoModelForCausalLM.from_pretrained(dir)`` once per (kernel backend, dtype). It asserts that
  every decoder linear is one of gptqmodel's quantized linear classes, records their class
  names, compares the backend's dequantized weights with ours where it has a
  ``dequantize_weight`` and writes the logits; a backend that fails is recorded with its error.

For scale it also runs qjax's own bfloat16 model (the export read back in bfloat16). Writes
``<out>/hf_gptq_transformers.json`` (cases, runs, versions, command) and ``.md``; how to make the
transformers environment: ``experiments/results/hf_export/README.md``.
The transformers side alone: ``python experiments/hf_gptq_transformers.py --hf-side DIR``
(``DIR/ref.npz`` in, ``DIR/hf_result.json`` + ``DIR/hf_logits.npz`` out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

#: the decoder linears of a Llama, as transformers names them (one entry per layer)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
#: a few modules whose dequantized weights are compared exactly (transformers names)
WEIGHT_CHECKS = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                 "model.layers.14.mlp.down_proj", "model.layers.29.self_attn.o_proj")  # fmt: skip
#: (backend, dtype) runs of the transformers side; "auto" = no quantization_config override
DEFAULT_RUNS = [("auto", "float32"), ("gptq_torch", "float32"), ("gptq_torch_fused", "float32"),
                ("gptq_torch_int8", "float32"), ("gptq_torch", "bfloat16")]  # fmt: skip
HF_PACKAGES = ("gptqmodel", "optimum", "transformers", "torch", "numpy", "safetensors",
               "accelerate", "torchao", "tokenizers")  # fmt: skip


# ------------------------------------------------------------------ transformers side (no qjax)


def _versions(names) -> dict[str, str | None]:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _load_hf(directory: Path, backend: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, GPTQConfig

    kw = {} if backend == "auto" else {"quantization_config": GPTQConfig(bits=4, backend=backend)}
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype), **kw)
    return model.eval()


def _linear_classes(model) -> dict[str, str]:
    """``{module name: class}`` of every decoder linear; raises unless all are gptqmodel's."""
    out = {}
    for name, mod in model.named_modules():
        m = re.fullmatch(r"model\.layers\.\d+\.(.+)", name)
        if m and m[1] in LINEARS:
            out[name] = f"{type(mod).__module__}.{type(mod).__qualname__}"
    bad = {n: c for n, c in out.items() if not c.startswith("gptqmodel.nn_modules.qlinear.")}
    n_layers = model.config.num_hidden_layers
    if bad or len(out) != n_layers * len(LINEARS):
        raise AssertionError(f"not gptqmodel quantized linears: {len(bad)}/{len(out)}, {bad}")
    return out


def _weight_diffs(model, ref) -> dict[str, dict[str, float]] | None:
    """Per checked module, max |w_hf - w_qjax| (``exact``) and max |w_hf - fp16(w_qjax)|
    (``fp16``: gptqmodel's torch kernels dequantize in the float16 scales' dtype); None if the
    backend cannot dequantize."""
    import torch

    mods = dict(model.named_modules())
    out = {}
    for name in WEIGHT_CHECKS:
        key = f"weight:{name}"
        if key not in ref or name not in mods:
            continue
        fn = getattr(mods[name], "dequantize_weight", None)
        if fn is None:
            return None
        try:
            with torch.no_grad():
                w = fn().float().numpy()  # (in, out), as the kernel multiplies
        except Exception:  # noqa: BLE001 - a kernel with its own layout (int4pack) has none
            return None
        want = ref[key]
        if w.shape != want.shape:
            raise AssertionError(f"{name}: dequantized weight {w.shape}, expected {want.shape}")
        fp16 = want.astype(np.float16).astype(np.float32)
        out[name] = {"exact": float(np.abs(w - want).max()), "fp16": float(np.abs(w - fp16).max())}
    return out


def hf_side(directory: Path, runs=DEFAULT_RUNS) -> dict:
    """Loads ``directory`` in transformers once per (backend, dtype); see the module docstring.

    Reads ``directory/ref.npz`` (``ids``, and ``weight:<module>`` arrays ``(in, out)``), writes
    ``hf_logits.npz`` (``<backend>/<dtype>`` -> logits) and returns (and writes) the result dict.
    """
    import collections

    import torch

    directory = Path(directory)
    ref = dict(np.load(directory / "ref.npz"))
    ids = torch.as_tensor(ref["ids"][None], dtype=torch.long)
    result = {"versions": _versions(HF_PACKAGES), "python": platform.python_version(), "runs": []}
    logits = {}
    for backend, dtype in runs:
        row: dict = {"backend": backend, "dtype": dtype}
        t0 = time.perf_counter()
        try:
            model = _load_hf(directory, backend, dtype)
            row["load_s"] = round(time.perf_counter() - t0, 2)
            classes = _linear_classes(model)
            row["classes"] = dict(collections.Counter(classes.values()))
            row["lm_head"] = f"{type(model.lm_head).__module__}.{type(model.lm_head).__qualname__}"
            row["weight_max_abs_diff"] = _weight_diffs(model, ref)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model(ids).logits[0].float().numpy()
            row["forward_s"] = round(time.perf_counter() - t0, 2)
            logits[f"{backend}/{dtype}"] = out
            row["ok"] = True
        except Exception as e:  # noqa: BLE001 - a failing backend is a result, recorded
            row["ok"] = False
            row["error"] = f"{type(e).__name__}: {e}"[:500]
        result["runs"].append(row)
    np.savez(directory / "hf_logits.npz", **logits)
    (directory / "hf_result.json").write_text(json.dumps(result, indent=2))
    return result


def run_hf_side(directory: Path, python: str | None, runs=DEFAULT_RUNS) -> tuple[dict, dict]:
    """``(result, {run: logits})`` of :func:`hf_side`, in ``python`` (a subprocess) or here."""
    directory = Path(directory)
    if python is None:
        result = hf_side(directory, runs)
    else:
        cmd = [python, str(Path(__file__).resolve()), "--hf-side", str(directory),
               "--runs", json.dumps(runs)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": ""}  # nothing of qjax's environment leaks in
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(
                f"transformers side failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        result = json.loads((directory / "hf_result.json").read_text())
    with np.load(directory / "hf_logits.npz") as f:
        logits = {k: f[k] for k in f.files}
    return result, logits


def gptqmodel_python() -> str | None:
    """An interpreter for the transformers side: ``QJAX_GPTQMODEL_PYTHON`` if set, else None."""
    return os.environ.get("QJAX_GPTQMODEL_PYTHON") or None


# --------------------------------------------------------------------------------- qjax side


def agreement(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """max|Δlogits| / max|logits|, top-1 agreement and the largest per-token relative error."""
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    per_token = np.abs(got - want).max(-1) / np.abs(want).max(-1)
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    return {"max_rel": rel, "top1": top1, "max_rel_per_token": float(per_token.max())}


def cases():
    """name -> (rules for the decoder linears, export format, description)."""
    import qjax
    from qjax.ptq.gptq import GPTQ

    lin = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"
    sym, asym = qjax.Int(4, group=128), qjax.Int(4, group=128, symmetric=False)
    return {
        "w4g128-sym-actorder-v1": (
            [(lin, GPTQ(sym, act_order=True))], "gptq",
            "GPTQ act-order, Int4 g128 sym, checkpoint_format gptq (v1)"),
        "w4g128-asym-actorder-v2": (
            [(lin, GPTQ(asym, act_order=True))], "gptq_v2",
            "GPTQ act-order, Int4 g128 asym, checkpoint_format gptq_v2"),
        "w4g128-sym-v1": (
            [(lin, GPTQ(sym))], "gptq", "GPTQ (no act-order), Int4 g128 sym, gptq (v1)"),
        "w4g64-sym-v1": (
            [(lin, GPTQ(qjax.Int(4, group=64)))], "gptq",
            "GPTQ (no act-order), Int4 g64 sym, gptq (v1): 576 / 1536 are whole groups of 64"),
    }  # fmt: skip


def _jit_logits(model, ids: np.ndarray) -> np.ndarray:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    return np.asarray(fn(state, jnp.asarray(ids)[None])[0], np.float32)


def qjax_bfloat16_logits(directory: Path, ids: np.ndarray) -> np.ndarray:
    """Logits of the exported checkpoint loaded back into qjax as a bfloat16 model."""
    import jax.numpy as jnp

    from qjax.convert.hf_export import load_hf_quantized

    return _jit_logits(load_hf_quantized(directory, dtype=jnp.bfloat16)[1], ids)


def reference(directory: Path, model, qstate, ids: np.ndarray) -> np.ndarray:
    """Writes ``directory/ref.npz`` (ids, checked weights from the files); returns our logits."""
    from flax import nnx

    from qjax.convert.hf_export import read_hf_quantized

    _, flat = read_hf_quantized(directory)
    weights = {}
    for name in WEIGHT_CHECKS:
        _, _, layer, block, proj = name.split(".")
        path = f"layers/{layer}/{'attn' if block == 'self_attn' else 'mlp'}/{proj}/kernel"
        weights[f"weight:{name}"] = np.asarray(flat[path].dequantize(), np.float32)  # (in, out)
    np.savez(directory / "ref.npz", ids=ids, **weights)
    qmodel = nnx.clone(model)
    nnx.update(qmodel, qstate)
    return _jit_logits(qmodel, ids)


def smollm2_inputs(n_tokens: int):
    """``(config, model, tokenizer, ids)``: SmolLM2 and the first tokens of the test text."""
    from qjax import assets, data
    from qjax.convert.gguf.load import load_gguf_model
    from qjax.tokenizer import tokenizer_from_gguf

    gguf = assets.path("smollm2")
    config, model = load_gguf_model(gguf)
    tok = tokenizer_from_gguf(gguf)
    ids = np.asarray(tok.encode(data.test_text()[: 20 * n_tokens])[:n_tokens], np.int32)
    assert len(ids) == n_tokens
    return config, model, tok, ids


def _weights_cell(diffs: dict | None) -> str:
    if diffs is None:
        return "n/a"
    exact = max(d["exact"] for d in diffs.values())
    fp16 = max(d["fp16"] for d in diffs.values())
    if exact == 0:
        return "identical"
    return "= ours in fp16" if fp16 == 0 else f"{exact:.1e} (fp16: {fp16:.1e})"


def markdown(res: dict) -> str:
    hf = res["hf_versions"]
    lines = [
        "# qjax GPTQ export of SmolLM2 in transformers (gptqmodel kernels, CPU)",
        "",
        f"Command: `{res['command']}`",
        "",
        f"qjax side: jax {res['jax']}, numpy {res['numpy']}, Python {res['python']}. "
        f"transformers side: " + ", ".join(f"{k} {v}" for k, v in hf.items() if v) + ".",
        "",
        "Model: SmolLM2-135M-Instruct (GGUF asset, dequantized to float32); every decoder "
        f"linear quantized by qjax GPTQ with {res['calibration']} calibration windows; logits on "
        "the first "
        f"{res['tokens']} tokens of the Wikipedia test text. `max rel` = max|Δlogits| / "
        f"max|logits_qjax|; `top-1` = argmax agreement with qjax's float32 logits of the same "
        f"quantized params; `weights` = max |Δw| of gptqmodel's `dequantize_weight()` vs the "
        f"kernels read back by qjax from the same files ({len(WEIGHT_CHECKS)} modules).",
        "",
        "| case | backend | dtype | kernel class (× modules) | max rel | top-1 | weights | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in res["cases"]:
        for r in case["runs"]:
            if r["ok"]:
                cls = ", ".join(f"`{c.rsplit('.', 1)[1]}` ×{n}" for c, n in r["classes"].items())
                w = _weights_cell(r["weight_max_abs_diff"])
                lines.append(
                    f"| {case['name']} | {r['backend']} | {r['dtype']} | {cls} | "
                    f"{r['max_rel']:.2e} | {r['top1']:.2%} | {w} | |"
                )
            else:
                lines.append(
                    f"| {case['name']} | {r['backend']} | {r['dtype']} | — | — | — | — | "
                    f"fails: `{r['error'][:160]}` |"
                )
    lines += [
        "",
        "For scale, per case: qjax's own bfloat16 model (the export loaded back with "
        "`load_hf_quantized(dir, dtype=bfloat16)`) vs the same float32 reference — what bfloat16 "
        "alone costs — and the quantization itself (qjax quantized vs qjax float32 unquantized):",
        "",
        "| case | description | qjax bf16: max rel | top-1 | W4 vs float: max rel | top-1 "
        "| GPTQ s |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        b, q = c["qjax_bf16"], c["vs_float"]
        lines.append(
            f"| {c['name']} | {c['description']} | {b['max_rel']:.2e} | {b['top1']:.2%} | "
            f"{q['max_rel']:.3f} | {q['top1']:.2%} | {c['quantize_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-side", type=Path, help="run only the transformers side on this dir")
    p.add_argument("--runs", type=json.loads, default=DEFAULT_RUNS, help="JSON [[backend, dtype]]")
    hf_help = "a Python with gptqmodel + optimum (default: $QJAX_GPTQMODEL_PYTHON)"
    p.add_argument("--hf-python", default=gptqmodel_python(), help=hf_help)
    p.add_argument("--out", type=Path, default=Path("experiments/results/hf_export"))
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-length", type=int, default=256)
    p.add_argument("--cases", default=".*", help="regex over the case names")
    p.add_argument("--keep", type=Path, help="keep the exported checkpoints under this dir")
    a = p.parse_args(argv)
    if a.hf_side is not None:
        hf_side(a.hf_side, [tuple(r) for r in a.runs])
        return 0

    import jax

    from qjax.convert.hf_export import export_hf_quantized
    from qjax.ptq import calibration_tokens, quantize_model

    config, model, tok, ids = smollm2_inputs(a.tokens)
    bos = tok.bos_id if tok.add_bos else None
    calib = calibration_tokens(tok.encode, n=a.calib_samples, length=a.calib_length, bos_id=bos)
    reference_float = _jit_logits(model, ids)
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="hf_gptq_"))
    res = {
        "command": "python " + " ".join(sys.argv),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "tokens": a.tokens,
        "calibration": f"{a.calib_samples} × {a.calib_length}",
        "cases": [],
    }
    try:
        for name, (rules, fmt, desc) in cases().items():
            if not re.search(a.cases, name):
                continue
            print(f"== {name}: {desc}", flush=True)
            t0 = time.perf_counter()
            qstate, _ = quantize_model(model, rules, calib, default=None, progress=False)
            quantize_s = time.perf_counter() - t0
            d = export_hf_quantized(work / name, qstate, config, format=fmt, tokenizer=tok,
                                    overwrite=True)  # fmt: skip
            qc = json.loads((d / "config.json").read_text())["quantization_config"]
            ours = reference(d, model, qstate, ids)
            hf, logits = run_hf_side(d, a.hf_python, [tuple(r) for r in a.runs])
            res["hf_versions"] = hf["versions"]
            for r in hf["runs"]:
                if r["ok"]:
                    r.update(agreement(logits[f"{r['backend']}/{r['dtype']}"], ours))
                print(json.dumps(r), flush=True)
            res["cases"].append({
                "name": name, "description": desc, "quantization_config": qc,
                "quantize_s": round(quantize_s, 1), "vs_float": agreement(ours, reference_float),
                "qjax_bf16": agreement(qjax_bfloat16_logits(d, ids), ours),
                "runs": hf["runs"],
            })  # fmt: skip
            if not a.keep:
                shutil.rmtree(d)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "hf_gptq_transformers.json").write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "hf_gptq_transformers.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
