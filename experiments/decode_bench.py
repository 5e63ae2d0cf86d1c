"""End-to-end greedy decode speed of a real model: int4 weights vs bf16 (issue: kernels, item 5).

    python -m experiments.decode_bench --gguf smollm2.gguf --out DIR [--batches 1 16] [--profile]

The model (SmolLM2-135M by default, from its GGUF) runs in bf16. Variants:

* ``bf16``            — every weight bf16, XLA ``dot``;
* ``int4 g128 kernel`` — linear layers RTN int4 sym g128, repacked once to ``gpu_i4p`` so that
  ``qjax.ops.matmul`` dispatches to the Pallas (Triton) kernel (embeddings / tied head stay bf16);
* ``int4 g128 Mosaic GPU`` — the same weights repacked to ``gpu_i4t``: the Mosaic GPU kernel;
* ``int4 g128 XLA``    — the same QArrays in the canonical layout: XLA dequantize + ``dot``;
* ``nf4 Mosaic GPU`` / ``fp8 e4m3 Mosaic GPU`` — NF4 (block 64) / per-channel FP8 linear layers
  (``gpu_nf4t`` / ``gpu_f8t``) on the Mosaic GPU kernel.

Each variant prefills a real prompt (``--prompt`` tokens of the Wikipedia test text, repeated across
the batch) and then decodes ``--steps`` tokens greedily. The decode loop is one jitted ``lax.scan``
(no host round trip per token), compiled and run once before timing. The time of a decode step is
the difference of the median wall times (over ``--repeats`` runs) of the whole program with
``--steps`` and with ``steps // 2`` tokens, divided by the tokens between: the prefill, the cache
set-up and the dispatch cancel out (subtracting a separately timed prefill did not: it varied by ±30
ms between runs at batch 16); tokens/s is ``batch`` over it. That estimate is reported beside
``(total − prefill) / (steps − 1)`` of the long run alone: where the two disagree (NF4 at batch 1 on
the H100: 0.91 against 1.18 ms, the short program slower per step than the long one), trust neither;
the profile's ``span`` is the device's own step time. The prefill alone is timed for its own column.
The variants also report whether their greedy tokens match bf16's (they need not: quantization
changes the model). ``--profile`` adds, per variant and batch, from one traced run of each length:
the summed kernel time per step, the time per step the device ran at least one kernel (``busy``; XLA
may run kernels side by side, so this can be below the sum) and the device's own step time
(``span``: first kernel start to last kernel end, free of the host clock's noise; ``span − busy`` is
time the device ran no kernel) — a step whose kernels take far less than its wall time is bound by
launches and latency, not by the GPU — and the kernels that take most of it.
Writes ``DIR/decode_bench.json`` and ``DIR/decode_bench.md`` after every row.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qjax
from experiments.kernel_bench import is_copy, traced_kernels
from qjax import assets, data
from qjax.convert.gguf.load import load_gguf_model
from qjax.kernels import repack
from qjax.tokenizer import tokenizer_from_gguf

LINEARS = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"


@functools.partial(jax.jit, static_argnums=(0, 4))
def _decode(graphdef, state, prompt, caches, steps: int):
    """Prefill ``prompt (B, T)`` then ``steps`` greedy tokens in one program; returns the tokens."""
    model = nnx.merge(graphdef, state)
    logits, caches = model.forward(prompt, caches=caches)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    def step(carry, _):
        tok, caches = carry
        logits, caches = model.forward(tok[:, None], caches=caches)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        return (nxt, caches), nxt

    _, toks = jax.lax.scan(step, (first, caches), None, length=steps - 1)
    return jnp.concatenate([first[None], toks], axis=0).T


@functools.partial(jax.jit, static_argnums=0)
def _prefill_only(graphdef, state, prompt, caches):
    model = nnx.merge(graphdef, state)
    logits, _ = model.forward(prompt, caches=caches)
    return jnp.argmax(logits[:, -1], axis=-1)


def _time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def busy_and_span(events) -> tuple[float, float]:
    """``(busy, span)`` in ms of kernel events ``(start_ns, duration_ns, name)``: the time at
    least one kernel ran (overlapping kernels counted once), and the time from the first
    kernel's start to the last one's end. ``span − busy`` is device time with no kernel running
    (launch gaps, host round trips, copies)."""
    busy, end, first = 0, None, None
    for start, dur, _ in sorted(events):
        first = start if first is None else first
        if end is None or start >= end:
            busy += dur
            end = start + dur
        elif start + dur > end:
            busy += start + dur - end
            end = start + dur
    return busy / 1e6, ((end - first) / 1e6 if events else 0.0)


def idle_gaps(events, top: int = 5) -> dict:
    """Where the device waits: the gaps in which no event of ``events`` (kernels and copies,
    ``(start_ns, duration_ns, name)``) runs, summed in ms by ``"before → after"`` (the names of
    the event that ended last before the gap and of the one after it, numbers stripped), the
    ``top`` largest."""
    by_pair: dict = {}
    end, last = None, None
    for start, dur, name in sorted(events):
        short = _base_name(name, 50)
        if end is not None and start > end:
            key = f"{last} → {short}"
            by_pair[key] = by_pair.get(key, 0.0) + (start - end) / 1e6
        if end is None or start + dur >= end:
            end, last = start + dur, short
    ranked = sorted(by_pair.items(), key=lambda kv: -kv[1])[:top]
    return {k: round(v, 4) for k, v in ranked}


def _base_name(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters, its trailing instance number dropped."""
    return re.sub(r"[._]?\d+$", "", name[:width])


def _ms_by_name(events, name_of) -> dict:
    """Summed ms of ``events`` ``(start_ns, duration_ns, name)`` by ``name_of(name)``."""
    out: dict = {}
    for _, ns, name in events:
        out[name_of(name)] = out.get(name_of(name), 0.0) + ns / 1e6
    return out


def kernel_profile(fn) -> dict:
    """One traced call of ``fn`` (after a warm-up): ``total`` (summed kernel ms), ``by_name``
    (each kernel name's ms), ``busy`` / ``span`` (:func:`busy_and_span` of the kernels),
    ``copies`` (ms of memcpy / memset), ``gaps`` (:func:`idle_gaps` over kernels and copies,
    all of them) and ``host`` (ms of the host's events by name, numbers stripped)."""
    jax.block_until_ready(fn())
    host: list = []
    events = traced_kernels(fn, copies=True, host=host)
    kernels = [e for e in events if not is_copy(e[2])]
    by_name = _ms_by_name(kernels, lambda name: name[:70])
    busy, span = busy_and_span(kernels)
    copies = sum(ns for _, ns, name in events if is_copy(name)) / 1e6
    return dict(total=sum(by_name.values()), by_name=by_name, busy=busy, span=span,
                copies=copies, gaps=idle_gaps(events, top=10**6),
                host=_ms_by_name(host, lambda name: _base_name(name, 60)))  # fmt: skip


def step_profile(run_long, run_short, steps: int, top: int = 6) -> dict:
    """Per decode step (``run_long`` minus ``run_short``, which decodes ``steps`` fewer
    tokens): the summed kernel ms, the ms the device ran a kernel (``busy``), the device's own
    step time (``span``, first kernel start to last kernel end: no host clock in it), the ms
    of copies, the ``top`` kernels by their ms, the ``top`` idle gaps by the kernels around
    them (:func:`idle_gaps`) and the ``top`` host events (the runtime launching the step)."""
    long, short = kernel_profile(run_long), kernel_profile(run_short)

    def per_step(key):
        a, b = long[key], short[key]
        if isinstance(a, dict):
            diff = {k: (v - b.get(k, 0.0)) / steps for k, v in a.items()}
            ranked = sorted(diff.items(), key=lambda kv: -kv[1])[:top]
            return {k: round(v, 4) for k, v in ranked}
        return (a - b) / steps

    return {
        "device_ms_per_step": per_step("total"),
        "busy_ms_per_step": per_step("busy"),
        "span_ms_per_step": per_step("span"),
        "copies_ms_per_step": per_step("copies"),
        "top_kernels_ms_per_step": per_step("by_name"),
        "top_gaps_ms_per_step": per_step("gaps"),
        "top_host_events_ms_per_step": per_step("host"),
    }


def variants(model) -> dict:
    """name -> param State (bf16 / int4 in a kernel layout / int4 canonical)."""
    state = nnx.state(model, nnx.Param)
    q = qjax.quantize(state, [(LINEARS, qjax.Int(4, group=128))], default=None)

    def packed(layout, spec=None):
        qs = q if spec is None else qjax.quantize(state, [(LINEARS, spec)], default=None)
        return jax.tree_util.tree_map(
            lambda x: repack.repack(x, layout) if isinstance(x, qjax.QArray) else x,
            qs,
            is_leaf=lambda x: isinstance(x, qjax.QArray),
        )

    return {
        "bf16": state,
        "int4 g128 kernel": packed("gpu_i4p"),
        "int4 g128 Mosaic GPU": packed("gpu_i4t"),
        "int4 g128 XLA": q,
        "nf4 Mosaic GPU": packed("gpu_nf4t", qjax.NF4()),
        "fp8 e4m3 Mosaic GPU": packed("gpu_f8t", qjax.FP8("e4m3", group="channel")),
    }


def measure(name, gd, state, prompt_ids, b: int, args) -> tuple[dict, np.ndarray]:
    """One variant at batch ``b``: its row (module docstring) and its greedy tokens."""
    prompt = jnp.asarray(np.tile(prompt_ids, (b, 1)))
    max_len = args.prompt + args.steps

    def run(steps):
        def call():
            caches = nnx.merge(gd, state).init_cache(b, max_len)
            return _decode(gd, state, prompt, caches, steps)

        return call

    def prefill():
        caches = nnx.merge(gd, state).init_cache(b, max_len)
        return _prefill_only(gd, state, prompt, caches)

    short = args.steps // 2
    t_all = _time(run(args.steps), args.repeats)
    t_short = _time(run(short), args.repeats)
    step_s = max(t_all - t_short, 1e-9) / (args.steps - short)
    row = {
        "variant": name,
        "batch": b,
        "prompt": args.prompt,
        "steps": args.steps,
        "total_s": t_all,
        "prefill_s": _time(prefill, args.repeats),
        "decode_tok_s": b / step_s,
        "ms_per_step": 1e3 * step_s,
    }
    # the cross-check: the long run less a separately timed prefill, over its scan steps
    row["ms_per_step_total"] = 1e3 * (t_all - row["prefill_s"]) / (args.steps - 1)
    if args.profile:
        row.update(step_profile(run(args.steps), run(short), args.steps - short))
    return row, np.asarray(run(args.steps)())


DISAGREE = 0.1  # relative difference of the two ms/step estimates flagged in the report


def _disagree(row: dict) -> str:
    """`` (disagree)`` where the difference and long-run estimates of a row's ms/step differ
    by more than :data:`DISAGREE` (then neither is a step time to quote)."""
    a, b = row["ms_per_step"], row.get("ms_per_step_total")
    return " (disagree)" if b and abs(a - b) > DISAGREE * b else ""


def write_report(out: Path, model: str, command: str, rows: list, profile: bool) -> None:
    """``out/decode_bench.json`` and ``.md`` with the rows so far."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "jax": jax.__version__, "device": str(jax.devices()[0])}
    (out / "decode_bench.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    base = {r["batch"]: r["decode_tok_s"] for r in rows if r["variant"] == "bf16"}
    lines = [
        f"# Greedy decode, {model} ({meta['device']}, jax {jax.__version__})",
        "",
        f"Command: `{command}`",
        "",
        "| variant | batch | decode tok/s | ms/step (difference / total) | × bf16 | prefill ms "
        "| tokens = bf16 |"
        + (
            " kernels ms/step | busy / span ms/step | top kernels (ms/step) | largest idle gaps "
            "(ms/step) |"
            if profile
            else ""
        ),
        "|---|---|---|---|---|---|---|" + ("---|---|---|---|" if profile else ""),
    ]
    for r in rows:
        ratio = r["decode_tok_s"] / base[r["batch"]] if r["batch"] in base else float("nan")
        line = (
            f"| {r['variant']} | {r['batch']} | {r['decode_tok_s']:.0f} | {r['ms_per_step']:.3f} / "
            f"{r.get('ms_per_step_total', float('nan')):.3f}{_disagree(r)} "
            f"| {ratio:.2f} | {1e3 * r['prefill_s']:.1f} "
            f"| {100 * r['same_tokens_as_bf16']:.0f} % |"
        )
        if profile:
            top = ", ".join(f"`{k}` {v:.3f}" for k, v in r["top_kernels_ms_per_step"].items())
            span = f"{r['busy_ms_per_step']:.3f} / {r['span_ms_per_step']:.3f}"
            gaps = ", ".join(
                f"`{k}` {v:.3f}" for k, v in list(r.get("top_gaps_ms_per_step", {}).items())[:3]
            )
            line += f" {r['device_ms_per_step']:.3f} | {span} | {top} | {gaps} |"
        lines.append(line)
    (out / "decode_bench.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--gguf", type=Path, help="GGUF path (default: the qjax asset)")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 16])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--token-cache", type=Path, help="dir with <model>_test.npy (test-text ids)")
    p.add_argument("--out", type=Path, default=Path("experiments/results/kernels"))
    p.add_argument("--profile", action="store_true", help="device kernel time per step (trace)")
    p.add_argument("--variants", nargs="*", help="run only these variants (names as reported)")
    args = p.parse_args(argv)
    command = "python -m experiments.decode_bench " + shlex.join(argv or sys.argv[1:])
    gguf = args.gguf or assets.path(args.model)
    _, model = load_gguf_model(gguf, dtype=jnp.bfloat16)
    if args.token_cache:
        ids = np.load(args.token_cache / f"{args.model}_test.npy", allow_pickle=False)
    else:
        ids = tokenizer_from_gguf(gguf).encode(data.test_text("wikipedia"), add_bos=False)
    prompt_ids = np.asarray(ids[: args.prompt], np.int32)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rows, ref_tokens = [], {}
    for name, params in variants(model).items():
        if args.variants is not None and name not in args.variants:
            continue
        gd, state = nnx.split(nnx.merge(graphdef, params, rest))
        for b in args.batches:
            row, toks = measure(name, gd, state, prompt_ids, b, args)
            ref_tokens.setdefault(b, toks)
            row["same_tokens_as_bf16"] = float(np.mean(toks == ref_tokens[b]))
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_report(args.out, args.model, command, rows, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
