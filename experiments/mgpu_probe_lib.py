"""What the Mosaic GPU kernel probes share (``scale_acc_probe``, ``stream_k_probe``,
``row_step_probe``, ``fused_epilogue_probe``, ``lut_decode_probe``, ``large_m_mgpu_probe``): the
Llama-3-70B shapes, their command line and start (correctness checks first), one correctness row
against ``dequantize`` + float32 dot, and the timing of several jitted variants of one case
against XLA's bf16 ``dot``, weights rotated over > 150 MB of buffers (``kernel_bench``'s method);
kernels traced again under patches (:func:`retraced`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import kernel_bench as kb
from qjax.kernels.gpu import mgpu_matmul as mg

SHAPES = {"qkv": (10240, 8192), "o": (8192, 8192), "gate_up": (57344, 8192), "down": (8192, 28672)}
# (N, K) of smaller models, by name for `--shapes` (not in the default): Llama-3-8B's (REFERENCE
# §7) and SmolLM2-135M's (the model of `decode_bench`: q / o, k / v, gate / up, down)
MORE_SHAPES = {"8b_qkv": (6144, 4096), "8b_o": (4096, 4096), "8b_gate_up": (28672, 4096),
               "8b_down": (4096, 14336), "smol_qo": (576, 576), "smol_kv": (192, 576),
               "smol_up": (1536, 576), "smol_down": (576, 1536)}  # fmt: skip


def nothing(*args, **kwargs) -> None:
    """A patched-away op (:func:`retraced`): takes anything, does nothing."""
    return None


@contextlib.contextmanager
def retraced(*patches):
    """The context managers ``patches`` (``unittest.mock.patch…``) in force, with jax's caches
    cleared on entry and exit: jitted kernels (``mgpu_skinny.matmul_rows``) are traced again under
    them, and nothing traced under them is reused after."""
    jax.clear_caches()
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield
    finally:
        jax.clear_caches()


def compiled_under(context, w, m: int, cfg=None):
    """``mg.matmul(x, w, config=cfg)`` (``None``: the dispatch's config) for ``(m, K)`` bf16 x and
    ``w``, traced and compiled with ``context`` in force (e.g. :func:`retraced` patches)."""
    x = jax.ShapeDtypeStruct((m, w.shape[0]), jnp.bfloat16)
    with context:
        return jax.jit(lambda x, w: mg.matmul(x, w, config=cfg)).lower(x, w).compile()


def shape(name: str) -> tuple[int, int]:
    """``(N, K)`` of a shape named in :data:`SHAPES` or :data:`MORE_SHAPES`."""
    return {**SHAPES, **MORE_SHAPES}[name]


def probe_parser(fmts: list[str], ms: list[int], budget_s: float) -> argparse.ArgumentParser:
    """The options of a probe: ``--out`` (required), ``--fmts``, ``--shapes``, ``--ms``,
    ``--budget-s`` (defaults given) and ``--no-check``; a probe adds its own."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fmts", nargs="*", default=fmts)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=[*SHAPES, *MORE_SHAPES])
    ap.add_argument("--ms", nargs="*", type=int, default=ms)
    ap.add_argument("--budget-s", type=float, default=budget_s)
    ap.add_argument("--no-check", action="store_true")
    return ap


def start(args, check) -> dict:
    """Makes ``args.out`` and the results ``{"device", "checks", "times"}``; unless
    ``--no-check``, runs ``check(results["checks"])`` first and prints how many failed."""
    os.makedirs(args.out, exist_ok=True)
    out: dict = {"device": str(jax.devices()[0]), "checks": [], "times": []}
    if not args.no_check:
        check(out["checks"])
        bad = [r for r in out["checks"] if not r.get("ok")]
        print(f"checks: {len(out['checks'])}, failed: {len(bad)}", flush=True)
    return out


def jitted(cfgs: dict) -> dict:
    """``label: jit(x, w ↦ mg.matmul(x, w, config=cfg))`` for each ``label: cfg``."""
    return {label: jax.jit(lambda x, w, cfg=cfg: mg.matmul(x, w, config=cfg))
            for label, cfg in cfgs.items()}  # fmt: skip


def time_variant(f, fmt: str, n: int, k: int, m: int, x) -> float:
    """Median device µs of ``f(x, w)`` over freshly made ``fmt`` weights ``(k, n)``."""
    w0 = kb.random_weight(fmt, k, n, 0)
    bufs = [w0] + [kb.random_weight(fmt, k, n, i) for i in range(1, kb.n_buffers(w0.nbytes))]
    us = kb.device_time(f, [(x, w) for w in bufs], 40)["us"]
    del bufs
    return us


def check_cases(formats, cases):
    """``(fmt, w, x, ref)`` for each format and ``(m, k, n)`` case: a fresh random weight
    (:func:`kernel_bench.check_case`, seeded by the case) and its float32 reference."""
    for fmt in formats:
        spec, layout = kb.FORMATS[fmt]
        for m, k, n in cases:
            yield (fmt, *kb.check_case(spec, layout, m, k, n, seed=m * 31 + k))


def main_config(w, m: int) -> mg.Config:
    """The main kernel's config for a check case: the table's up to 128 rows of ``x``, 128-code
    steps of three stages above (every row count the probes check fits them)."""
    if m > 128:
        return mg.config_for(w, m, mg.Config("mgpu", 128, None, 3))
    return mg.table_config(w, m)


def check_row(fmt: str, w, x, ref, cfg=None, **tags) -> dict:
    """``mg.matmul(x, w, config=cfg)`` against ``ref``: relative error and ok (< 1e-2, finite),
    or the error it raised (a probe records the failure and goes on); printed."""
    m, k = x.shape
    try:
        y = np.asarray(mg.matmul(x, w, config=cfg), np.float32)
        err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        row = {"fmt": fmt, "M": m, "K": k, "N": ref.shape[1], **tags, "rel_err": err,
               "ok": bool(np.isfinite(y).all() and err < 1e-2)}  # fmt: skip
    except Exception as e:  # noqa: BLE001
        row = {"fmt": fmt, "M": m, **tags, "error": repr(e)[:2000]}
    print("check", row, flush=True)
    return row


def check_row_twice(fmt: str, w, x, ref, cfg=None, **tags) -> dict:
    """:func:`check_row`, and where it is ok the product run twice more: ``same_bits`` (and
    ``ok``) only if both runs give the same bits (sums added in a fixed order, whichever CTA
    finishes first)."""
    row = check_row(fmt, w, x, ref, cfg, **tags)
    if row.get("ok"):
        f = jax.jit(lambda x, w: mg.matmul(x, w, config=cfg))
        a, b = np.asarray(f(x, w)), np.asarray(f(x, w))
        row["same_bits"] = row["ok"] = bool(np.array_equal(a.view(np.uint16), b.view(np.uint16)))
    return row


def time_cases(out: dict, path: str, cases, fmts, variants, extra=None, budget_s=math.inf):
    """For each ``(n, k, m)`` in ``cases`` and format in ``fmts``: one row with XLA's bf16 time
    and, per ``label: f`` of ``variants(w, m)``, ``label_us`` and ``label_x_bf16`` (plus
    ``extra(label, w, m)``'s entries), appended to ``out["times"]``; ``out`` is written to
    ``path`` after each ``(n, k, m)``. No format starts after ``budget_s`` seconds."""
    t0 = time.time()
    for n, k, m in cases:
        t_bf16 = kb.time_bf16(n, k, m)["us"]
        x = jax.random.normal(jax.random.key(1), (m, k), jnp.bfloat16)
        for fmt in fmts:
            if time.time() - t0 > budget_s:
                break
            w = kb.random_weight(fmt, k, n, 0)
            row = {"fmt": fmt, "N": n, "K": k, "M": m, "bf16_us": round(t_bf16, 2)}
            for label, f in variants(w, m).items():
                us = time_variant(f, fmt, n, k, m, x)
                row[f"{label}_us"] = round(us, 2)
                row[f"{label}_x_bf16"] = round(t_bf16 / us, 3)
                row.update(extra(label, w, m) if extra else {})
            print(row, flush=True)
            out["times"].append(row)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as fh:
            json.dump(out, fh, indent=1)
