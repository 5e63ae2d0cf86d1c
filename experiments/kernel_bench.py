"""Benchmark of the GPU int matmul kernels against XLA's bf16 ``dot`` (REFERENCE §7).

For each weight shape ``N×K`` (Llama-3-8B / 70B linear layers), token count ``M`` and format, it
times ``y = x @ Ŵ`` with bf16 ``x`` on the device and reports:

* median device time over many calls (kernel time from the profiler trace, summed per call, so
  split-K's reduction counts; launch gaps do not), weights rotated over buffers totalling > 150 MB
  so that L2 (50 MB on H100) does not flatter small shapes;
* effective bandwidth ``(weight bytes incl. scales + 2MK + 2MN) / t``;
* % of the §7 roofline ``T(M) = max(bytes / BW, 2MNK / P)`` with ``BW = 3.35 TB/s`` and
  ``P = 989 TFLOP/s`` (H100 SXM datasheet: HBM3 bandwidth, dense bf16; W8A8: ``P = 1979 TOP/s``,
  dense int8 / fp8);
* the speed-up over XLA's bf16 ``dot`` timed the same way in the same run.

Usage (on the GPU machine)::

    python -m experiments.kernel_bench --out DIR [--shapes 70b 8b] [--ms 1 16 ...]
    python -m experiments.kernel_bench --check --out DIR     # correctness on the device
    python -m experiments.kernel_bench --check --check-parts mgpu --out DIR   # one part of it
    python -m experiments.kernel_bench --tune --out DIR      # block-size sweep
    python -m experiments.kernel_bench --smoke --out DIR     # tiny, CPU, interpret mode

Writes ``DIR/kernel_bench.json`` and ``DIR/README.md`` (the table, with the command).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import qjax
from qjax.kernels import repack
from qjax.kernels.gpu import configs, mgpu_matmul, mgpu_skinny
from qjax.kernels.gpu.int_matmul import int_matmul
from qjax.kernels.gpu.table_matmul import XLA_FROM_M, table_matmul
from qjax.kernels.gpu.table_matmul import pick as table_pick

HBM_BW = 3.35e12  # bytes/s, H100 SXM5 HBM3 datasheet peak
PEAK_BF16 = 989e12  # FLOP/s, H100 SXM5 dense bf16 datasheet peak
PEAK_8BIT = 1979e12  # OP/s, H100 SXM5 dense int8 / fp8 datasheet peak (W8A8's tensor-core rate)
L2_ROTATE_BYTES = 160e6  # > 150 MB of weight buffers per case

SHAPES = {  # (N, K) per REFERENCE §7
    "70b": [(10240, 8192), (8192, 8192), (57344, 8192), (8192, 28672)],
    "8b": [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)],
}
M_SWEEP = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048, 8192)
FORMATS = {
    "w4g128": (qjax.Int(4, group=128), "gpu_i4p"),
    # the same weights for the Mosaic GPU kernel (Hopper wgmma, qjax.kernels.gpu.mgpu_matmul)
    "w4g128t": (qjax.Int(4, group=128), "gpu_i4t"),
    "w4g128ta": (qjax.Int(4, group=128, symmetric=False), "gpu_i4t"),
    "w4cht": (qjax.Int(4, group="channel"), "gpu_i4t"),
    "w8cht": (qjax.Int(8, group="channel"), "gpu_i8t"),
    "w8g128ta": (qjax.Int(8, group=128, symmetric=False), "gpu_i8t"),
    "nf4t": (qjax.NF4(), "gpu_nf4t"),  # block 64, bf16 absmax, Mosaic GPU kernel
    "fp8t": (qjax.FP8("e4m3", group="channel"), "gpu_f8t"),
    "w4g128a": (qjax.Int(4, group=128, symmetric=False), "gpu_i4p"),
    "w4g32": (qjax.Int(4, group=32), "gpu_i4p"),
    "w8ch": (qjax.Int(8, group="channel"), "gpu_i8"),
    "w8g128": (qjax.Int(8, group=128), "gpu_i8"),
    "nf4": (qjax.NF4(), "gpu_nf4"),  # block 64, float32 absmax (table_matmul)
    "fp8": (qjax.FP8("e4m3", group="channel"), "gpu_f8"),
    # W8A8: activations quantized per token at call time (Pallas row kernel), XLA int8 / fp8 GEMM
    "w8a8": (qjax.W8A8(act="dynamic"), None),
    "w8a8f8": (qjax.W8A8(act="dynamic", dtype="e4m3"), None),
}
TABLE_LAYOUTS = ("gpu_nf4", "gpu_f8")  # served by qjax.kernels.gpu.table_matmul


# -- inputs ------------------------------------------------------------------------------------
def random_weight(fmt: str, k: int, n: int, seed: int):
    """A repacked QArray of the right shapes with random codes, scales and zeros (not zeros)."""
    spec, layout = FORMATS[fmt]
    if fmt == "bf16":
        raise ValueError("bf16 has no QArray")
    if layout is None:
        abstract = jax.eval_shape(lambda: spec.quantize(jnp.zeros((k, n), jnp.bfloat16)))
    else:
        abstract = jax.eval_shape(lambda q: repack.repack(q, layout), spec.abstract((k, n)))
    key = jax.random.key(seed)
    kc, ks, kz = jax.random.split(key, 3)
    c = abstract.codes
    if c.dtype == jnp.int32:
        codes = jax.random.bits(kc, c.shape, jnp.uint32).view(jnp.int32)
    elif c.dtype == jnp.int4:
        codes = jax.random.randint(kc, c.shape, -8, 8, jnp.int32).astype(jnp.int4)
    elif c.dtype in (jnp.uint8, jnp.float8_e4m3fn):  # fp8 bit patterns, finite, any sign
        codes = jax.random.randint(kc, c.shape, 0, 0x7F, jnp.int32)
        codes = (codes | (128 * jax.random.bernoulli(kz, 0.5, c.shape))).astype(jnp.uint8)
        if c.dtype != jnp.uint8:
            codes = jax.lax.bitcast_convert_type(codes, c.dtype)
    else:
        codes = jax.random.randint(kc, c.shape, -128, 128, jnp.int32).astype(c.dtype)
    s = abstract.scales
    scales = (0.01 * (1.0 + jax.random.uniform(ks, s.shape))).astype(s.dtype)
    zeros = None
    if abstract.zeros is not None:
        hi = 1 << spec.bits
        zeros = jax.random.randint(kz, s.shape, 0, hi).astype(abstract.zeros.dtype)
    aux = {name: jnp.ones(a.shape, a.dtype) for name, a in abstract.aux.items()}  # W8A8 act scale
    return abstract.replace(codes=codes, scales=scales, zeros=zeros, aux=aux)


def n_buffers(nbytes: int) -> int:
    return int(min(24, max(2, math.ceil(L2_ROTATE_BYTES / nbytes))))


# compile / lowering failures a sweep records and moves past
FAILURES = (ValueError, RuntimeError, NotImplementedError, TypeError)


# -- timing ------------------------------------------------------------------------------------
def is_copy(name: str) -> bool:
    """Whether a trace event named ``name`` is a memcpy / memset rather than a kernel."""
    return any(word in name.lower() for word in ("memcpy", "memset"))


def _trace(trace_dir: str):
    """The profile written under ``trace_dir`` (``jax.profiler.ProfileData``), or ``None``."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    return jax.profiler.ProfileData.from_file(files[0]) if files else None


def _kernel_events(trace_dir: str, copies: bool = False) -> list[tuple[int, int, str]]:
    """(start_ns, duration_ns, name) of every GPU kernel in the trace under ``trace_dir``
    (``copies``: and every memcpy / memset)."""
    data = _trace(trace_dir)
    if data is None:
        return []
    events = []
    for plane in data.planes:
        if "/device:GPU" not in plane.name:
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for ev in line.events:
                if copies or not is_copy(ev.name):
                    events.append((ev.start_ns, ev.duration_ns, ev.name))
    return sorted(events)


def host_events(trace_dir: str) -> list[tuple[int, int, str]]:
    """(start_ns, duration_ns, name) of every host (CPU) event in the trace under ``trace_dir``:
    the runtime's work to launch what the device runs."""
    data = _trace(trace_dir)
    if data is None:
        return []
    return sorted((ev.start_ns, ev.duration_ns, ev.name) for plane in data.planes
                  if plane.name.startswith("/host:") for line in plane.lines
                  for ev in line.events)  # fmt: skip


def traced_kernels(run, copies: bool = False, host: list | None = None):
    """:func:`_kernel_events` of ``run()`` (waited for) under the profiler; ``host``: a list
    that :func:`host_events` of the same trace is appended to."""
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            jax.block_until_ready(run())
        if host is not None:
            host.extend(host_events(tmp))
        return _kernel_events(tmp, copies)


def device_time(fn, arg_sets: list, n_calls: int) -> dict:
    """Median per-call device time (µs) of ``fn`` over ``n_calls`` calls rotating ``arg_sets``."""
    for args in arg_sets:
        jax.block_until_ready(fn(*args))

    def calls():
        for i in range(n_calls):
            y = fn(*arg_sets[i % len(arg_sets)])
        return y

    events = traced_kernels(calls)
    if events and len(events) % n_calls == 0:
        per = len(events) // n_calls
        sums = [sum(d for _, d, _ in events[i : i + per]) for i in range(0, len(events), per)]
        names = sorted({e[2][:60] for e in events[:per]})
        return {"us": float(np.median(sums)) / 1e3, "method": "profiler", "kernels": names}
    # no GPU trace (CPU smoke run) or an odd event count: host wall clock, one call at a time
    times = []
    for i in range(max(5, n_calls // 2)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
        times.append(time.perf_counter() - t0)
    return {"us": float(np.median(times)) * 1e6, "method": "wall", "events": len(events)}


def kernel_breakdown(fn, args, n_calls=20) -> dict:
    """Median device µs per kernel name over ``n_calls`` calls (profiler trace)."""
    jax.block_until_ready(fn(*args))

    def calls():
        for _ in range(n_calls):
            y = fn(*args)
        return y

    per: dict = {}
    events = traced_kernels(calls)
    for _, d, name in events:
        per.setdefault(name[:70], []).append(d / 1e3)
    return {k: round(float(np.median(v)), 2) for k, v in per.items()}


def calls_for(est_us: float) -> int:
    return int(min(60, max(8, 200_000 / max(est_us, 1.0))))


# -- one case ----------------------------------------------------------------------------------
def roofline_us(n, k, m, weight_bytes, peak=PEAK_BF16) -> float:
    return 1e6 * max((weight_bytes + 2 * m * k + 2 * m * n) / HBM_BW, 2 * m * n * k / peak)


def time_bf16(n, k, m, interpret=False) -> dict:
    nbytes = 2 * n * k
    bufs = [
        jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(n_buffers(nbytes))
    ]
    x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
    fn = jax.jit(lambda x, w: jnp.dot(x, w))
    r = device_time(fn, [(x, w) for w in bufs], calls_for(roofline_us(n, k, m, nbytes)))
    del bufs
    return {**r, "weight_bytes": nbytes}


def time_quant(fmt, n, k, m, cfg=None, interpret=False) -> dict:
    w0 = random_weight(fmt, k, n, 0)
    bufs = [w0] + [random_weight(fmt, k, n, i) for i in range(1, n_buffers(w0.nbytes))]
    x = jax.random.normal(jax.random.key(99), (m, k), jnp.bfloat16)
    if w0.layout == "canonical":  # W8A8: qjax.matmul → fused row quantization + 8-bit GEMM
        from qjax.kernels.gpu import mgpu_w8a8

        fn = jax.jit(qjax.matmul)
        used = "mgpu_w8a8" if mgpu_w8a8.takes(m, k, n, w0.spec.dtype, x.dtype) else "xla"
    elif w0.layout in mgpu_matmul.LAYOUTS:
        cfg = cfg and mgpu_matmul.config_for(w0, m, cfg)
        fn = jax.jit(lambda x, w: mgpu_matmul.matmul(x, w, config=cfg))
        used = cfg or mgpu_matmul.config_for(w0, m)
    elif w0.layout in TABLE_LAYOUTS:
        fn = jax.jit(lambda x, w: table_matmul(x, w, config=cfg, interpret=interpret))
        used = cfg or (table_pick(m, k, n, w0.layout) if m < XLA_FROM_M else "xla")
    else:
        fn = jax.jit(lambda x, w: int_matmul(x, w, config=cfg, interpret=interpret))
        used = cfg or configs.pick(w0.spec.bits, m, k, n)
    est = roofline_us(n, k, m, w0.nbytes)
    r = device_time(fn, [(x, w) for w in bufs], calls_for(est))
    del bufs
    used = used if isinstance(used, str) else dataclasses.asdict(used)
    return {**r, "weight_bytes": w0.nbytes, "config": used}


def summarize(n, k, m, r: dict, t_bf16: float | None, peak=PEAK_BF16) -> dict:
    """Speed-up, effective TB/s and % of the roofline (compute bound at ``peak``: the 8-bit
    tensor-core rate for W8A8, whose multiplies are 8-bit) of a timed case."""
    t = r["us"]
    total = r["weight_bytes"] + 2 * m * k + 2 * m * n
    out = {
        "us": round(t, 2),
        "tb_s": round(total / (t * 1e-6) / 1e12, 3),
        "pct_roofline": round(100 * roofline_us(n, k, m, r["weight_bytes"], peak) / t, 1),
    }
    if t_bf16:
        out["speedup_vs_bf16"] = round(t_bf16 / t, 3)
    return {**r, **out}


# -- modes -------------------------------------------------------------------------------------
def _c(path, bm, bn, split, warps, stages, planes=True):
    return configs.Config(path, bm, bn, split, warps, stages, planes=planes)


def candidates(m: int, bits: int) -> list:
    """Configs a bench case tries with ``--autotune`` (the fastest is reported, with its config)."""
    if m <= 16:
        if bits == 8:
            return [
                _c("decode", 16, 128, 2, 4, 4),
                _c("swap", 16, 128, 8, 4, 3),
                _c("swap", 16, 128, 4, 4, 4),
            ]
        return [
            _c("swap", 16, 128, 8, 4, 3),
            _c("swap", 16, 128, 4, 4, 4),
            _c("decode", 16, 64, 4, 4, 4),
        ]
    if m <= 32:
        return [_c("swap", 32, 128, 8, 4, 3), _c("decode", 32, 64, 4, 4, 4)]
    if m <= 64:
        return [
            _c("swap", 64, 128, 4, 4, 3),
            _c("decode", 64, 64, 1, 4, 3, False),
        ]
    if m <= 128:
        return [
            _c("tiled", 64, 64, 1, 4, 4),
            _c("swap", 128, 128, 2, 8, 3),
            _c("swap", 64, 128, 2, 4, 3),
        ]
    if m <= 1024:
        return [
            _c("tiled", 128, 128, 1, 8, 3),
            _c("tiled", 128, 256, 1, 8, 3),
            configs.Config("xla"),
        ]
    return [_c("tiled", 128, 256, 1, 8, 3), configs.Config("xla")]


def mgpu_candidates(m: int) -> list:
    """Mosaic GPU int4 configs ``--autotune`` tries (``None``: the table's ``pick``)."""
    if m > mgpu_matmul.MAX_BLOCK_M:
        return [None]
    c = mgpu_matmul.Config
    tries = [(512, 2), (512, 3), (512, 4), (256, 4), (256, 6), (128, 4), (128, 8), (1024, 2)]
    return [None] + [c("mgpu", bk, None, st, scale_acc=m <= 32) for bk, st in tries]


def table_candidates(m: int, n: int, k: int, layout: str) -> list:
    """NF4 / FP8 kernel configs ``--autotune`` tries (``None``: the untuned ``pick``)."""
    if m >= XLA_FROM_M:
        return [None]
    from qjax.kernels.gpu.table_matmul import Config as TableConfig

    d = table_pick(m, k, n, layout)
    return [
        None,
        TableConfig(d.block_m, 64, max(1, 2 * d.split_k), 4, 4),
        TableConfig(d.block_m, 128, d.split_k, 4, 4),
        TableConfig(d.block_m, 256, d.split_k, 8, 3),
    ]


def run_bench(args, results: list, deadline: float) -> None:
    for group in args.shapes:
        for n, k in SHAPES[group]:
            for m in args.ms:
                if time.time() > deadline:
                    print("time budget reached; stopping", flush=True)
                    return
                base = summarize(n, k, m, time_bf16(n, k, m), None)
                row = {"model": group, "N": n, "K": k, "M": m, "bf16": base}
                for fmt in args.formats:
                    if fmt.startswith("w8") and args.w8_ms and m not in args.w8_ms:
                        continue
                    tried = []
                    layout = FORMATS[fmt][1]
                    if not args.autotune or layout is None:
                        tries = [None]
                    elif layout in TABLE_LAYOUTS:
                        tries = table_candidates(m, n, k, layout)
                    elif layout in mgpu_matmul.LAYOUTS:
                        tries = mgpu_candidates(m)
                    else:
                        tries = candidates(m, FORMATS[fmt][0].bits)
                    for cfg in tries:
                        try:
                            tried.append(time_quant(fmt, n, k, m, cfg))
                        except FAILURES as err:
                            print(f"  {fmt} {cfg}: {type(err).__name__}: {str(err)[:200]}")
                    best = min(tried, key=lambda r: r["us"])
                    peak = PEAK_8BIT if layout is None else PEAK_BF16  # W8A8: 8-bit multiplies
                    row[fmt] = summarize(n, k, m, best, base["us"], peak)
                    row[fmt]["tried"] = [(t["config"], round(t["us"], 2)) for t in tried]
                results.append(row)
                quant = "  ".join(
                    f"{f} {row[f]['us']:8.1f}us {row[f]['speedup_vs_bf16']:5.2f}x "
                    f"{row[f]['tb_s']:5.2f}TB/s"
                    for f in args.formats
                    if f in row
                )
                print(
                    f"{group} N={n:6d} K={k:6d} M={m:5d} bf16 {base['us']:8.1f}us  {quant}",
                    flush=True,
                )


TUNE_DECODE = [
    configs.Config("decode", 16, bn, split, warps, stages)
    for bn, split, warps, stages in [
        (32, 1, 4, 4),
        (64, 1, 4, 4),
        (128, 1, 4, 4),
        (64, 2, 4, 4),
        (128, 2, 4, 4),
        (64, 1, 2, 4),
        (64, 1, 4, 6),
        (32, 2, 2, 4),
        (128, 4, 8, 4),
        (256, 2, 8, 4),
    ]
]
TUNE_TILED = [
    configs.Config("tiled", bm, bn, 1, warps, stages)
    for bm, bn, warps, stages in [
        (64, 128, 4, 3),
        (64, 64, 4, 4),
        (128, 128, 8, 3),
        (128, 128, 4, 4),
        (128, 256, 8, 3),
        (64, 256, 8, 3),
        (256, 128, 8, 3),
        (32, 128, 4, 4),
    ]
] + [configs.Config("xla")]


def best_configs(tune: list) -> list[str]:
    """One line per (shape, M, format): the fastest config tried."""
    best: dict = {}
    for r in tune:
        key = (r["N"], r["K"], r["M"], r["fmt"])
        if "us" in r and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    return [
        f"best N={n} K={k} M={m} {f}: {r['us']:.1f}us {r.get('speedup_vs_bf16')}x "
        f"{r['tb_s']}TB/s {r['config']}"
        for (n, k, m, f), r in sorted(best.items())
    ]


def run_tune(args, results: list, deadline: float) -> None:
    for n, k in [s for g in args.shapes for s in SHAPES[g]]:
        for m in args.ms:
            base = time_bf16(n, k, m)["us"]
            if m <= 32:
                cands = TUNE_DECODE + [dataclasses.replace(c, block_m=32) for c in TUNE_DECODE[:3]]
            else:
                bm = min(128, max(64, m))
                cands = TUNE_TILED + [
                    configs.Config("decode", bm, bn, 1, w, 3) for bn, w in ((64, 4), (128, 8))
                ] * (m <= 128)
            for fmt in args.formats:
                for cfg in cands:
                    if time.time() > deadline:
                        return
                    if cfg.path == "decode" and cfg.block_m < m:
                        continue
                    try:
                        r = summarize(n, k, m, time_quant(fmt, n, k, m, cfg), base)
                    except FAILURES as err:
                        r = {
                            "error": f"{type(err).__name__}: {str(err)[:300]}",
                            "config": dataclasses.asdict(cfg),
                        }
                    results.append({"N": n, "K": k, "M": m, "fmt": fmt, "bf16_us": base, **r})
                    print(
                        f"tune N={n} K={k} M={m} {fmt} {cfg} -> "
                        f"{r.get('us', r.get('error'))} {r.get('speedup_vs_bf16', '')}",
                        flush=True,
                    )


GEMV = configs.Config("gemv", 16, 64, 2, 4, 3)
SWAP = configs.Config("swap", 16, 128, 4, 4, 3)


def check_case(spec, layout: str, m: int, k: int, n: int, seed: int):
    """A fresh random ``(k, n)`` weight quantized by ``spec`` and repacked to ``layout``, bf16
    ``x: (m, k)``, and the float32 reference ``x @ dequantize(q)``."""
    kx, kw = jax.random.split(jax.random.key(seed))
    q = spec.quantize(jax.random.normal(kw, (k, n)))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    ref = np.asarray(x, np.float32) @ np.asarray(q.dequantize(), np.float32)
    return repack.repack(q, layout), x, ref


CHECK_PARTS = ("triton", "dispatched", "mgpu", "w8a8")  # `--check-parts`; the last two: device only


def run_check(args, results: list, interpret: bool) -> None:
    """Kernel vs ``dequantize`` + float32 dot on fresh random weights, every path and format, in
    the parts ``args.check_parts`` names (the whole check outlasts one 10-minute device call)."""
    parts = set(getattr(args, "check_parts", None) or CHECK_PARTS)
    cases = [(3, 200, 96), (16, 1024, 320), (100, 640, 384), (1, 4096, 4096)][: args.check_cases]
    if interpret:
        cases = cases[:1]
    for fmt, (spec, layout) in FORMATS.items():
        if "triton" not in parts:
            break
        if layout in TABLE_LAYOUTS or layout is None or layout in mgpu_matmul.LAYOUTS:
            continue  # run_check_dispatched / run_check_mgpu, tests/kernels, tests/formats
        for m, k, n in cases:
            w, x, ref = check_case(spec, layout, m, k, n, seed=m * 7 + k)
            checked = [configs.pick(spec.bits, m, k, n), TUNE_DECODE[3], TUNE_TILED[0], GEMV, SWAP]
            for cfg in checked:
                if cfg.path in ("decode", "swap", "gemv") and m > cfg.block_m:
                    continue
                try:
                    y = np.asarray(int_matmul(x, w, config=cfg, interpret=interpret), np.float32)
                except FAILURES as e:
                    print(f"check {fmt} M={m} {cfg}: {type(e).__name__}: {str(e)[:2000]}")
                    results.append(
                        {
                            "fmt": fmt,
                            "M": m,
                            "config": dataclasses.asdict(cfg),
                            "error": str(e)[:2000],
                            "ok": False,
                        }
                    )
                    continue
                err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                ok = bool(np.isfinite(y).all() and err < 1e-2)
                results.append(
                    {
                        "fmt": fmt,
                        "M": m,
                        "K": k,
                        "N": n,
                        "path": cfg.path,
                        "config": dataclasses.asdict(cfg),
                        "rel_err": err,
                        "ok": ok,
                    }
                )
                print(
                    f"check {fmt} M={m} K={k} N={n} {cfg.path}: rel err {err:.2e} "
                    f"{'ok' if ok else 'FAIL'}",
                    flush=True,
                )
    if "dispatched" in parts:
        run_check_dispatched(cases, results, interpret)
    if not interpret and "mgpu" in parts:
        run_check_mgpu(results, getattr(args, "check_formats", None) or MGPU_FORMATS)
    if not interpret and "w8a8" in parts:
        run_check_w8a8_mgpu(results)


MGPU_FORMATS = ("w4g128t", "w4g128ta", "w4cht", "w8cht", "w8g128ta", "nf4t", "fp8t")


def run_check_mgpu(results: list, formats=MGPU_FORMATS) -> None:
    """The Mosaic GPU kernel (no interpret mode for its warp-specialized pipeline) vs
    ``dequantize`` + float32 dot: each of ``formats``, every table config, ragged K / N, M from
    1 to 5000 (128- and 256-row blocks of ``x``, grouped jobs), both epilogues
    (``Config.fused``), the skinny kernel's scale placements, shares and clusters (8-bit codes
    also loaded straight into registers, ``Config.ldg``), through ``qjax.matmul``'s dispatch as
    well."""
    mg = mgpu_matmul
    cases = [(1, 8192, 1024), (16, 640, 384), (100, 4096, 256), (128, 1024, 512), (37, 300, 200),
             (300, 1024, 384), (2048, 2048, 4096), (5000, 1024, 640)]  # fmt: skip
    table = [c for cands in mg.TABLE.values() for c in cands]
    for fmt in formats:
        spec, layout = FORMATS[fmt]
        for m, k, n in cases:
            w, x, ref = check_case(spec, layout, m, k, n, seed=m * 13 + k)
            tries = [None, *(mg.config_for(w, m, c) for c in table)]
            both = dataclasses.replace(tries[1], fused=not tries[1].fused)  # the other epilogue
            if mgpu_skinny.eligible(w, m):  # the skinny kernel, both scale placements and shares
                tries += [mg.config_for(w, m, mg.Config("skinny", 512, scale_acc=s, ctas_per_sm=c,
                                                        cluster=cl))
                          for s in (False, True) for c in (2, 3) for cl in (0, 2)]  # fmt: skip
                if mg.code_bits(w) == 8:
                    tries += [dataclasses.replace(c, ldg=True) for c in tries[-8:-4]]
            for cfg in [*tries, both]:
                if cfg is None:
                    y = np.asarray(qjax.matmul(x, w), np.float32)
                else:
                    y = np.asarray(mg.matmul(x, w, config=cfg), np.float32)
                err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
                row = {"fmt": fmt, "M": m, "K": k, "N": n, "rel_err": err,
                       "config": "dispatch" if cfg is None else dataclasses.asdict(cfg),
                       "ok": bool(np.isfinite(y).all() and err < 1e-2)}  # fmt: skip
                results.append(row)
                print(f"check {row}", flush=True)


def run_check_w8a8_mgpu(results: list, cfgs: dict | None = None) -> None:
    """The W8A8 Mosaic GPU GEMM (:mod:`qjax.kernels.gpu.mgpu_w8a8`, device only) against a
    float64 product of the same codes and scales (``rel_err``, bf16 output) and the whole
    ``w8a8_matmul(gemm="mgpu")`` against the format's reference (``vs_format``), int8 and e4m3,
    ragged M and N, each of ``cfgs`` (default: the kernel's two configs); then
    ``qjax.matmul``'s dispatch at and below the rows where it takes the kernel."""
    from qjax.kernels.gpu import mgpu_w8a8 as k8
    from qjax.kernels.gpu.w8a8_matmul import quantize_rows, w8a8_matmul

    cfgs = cfgs or {"wide": k8.WIDE, "narrow": k8.NARROW}
    cases = [(300, 1024, 512), (8, 256, 256), (1, 512, 128), (4096, 2048, 1024),
             (37, 8192, 768), (2050, 4096, 384)]  # fmt: skip
    for fmt in ("w8a8", "w8a8f8"):
        for m, k, n in cases:
            w = random_weight(fmt, k, n, m + k)
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            xq, sx = quantize_rows(x, dtype=w.spec.dtype)
            x64 = np.asarray(xq.astype(jnp.float32), np.float64)
            w64 = np.asarray(w.codes[0].astype(jnp.float32), np.float64)
            s_w = np.asarray(w.scales[0], np.float64).reshape(1, -1)
            want = (x64 @ w64.T) * np.asarray(sx, np.float64) * s_w
            ref = np.asarray(w.spec.matmul(x, w), np.float64)
            tries = {**{lbl: c for lbl, c in cfgs.items() if n % c.block_n == 0}, "dispatch": None}
            for label, cfg in tries.items():
                row = {"fmt": fmt, "M": m, "K": k, "N": n, "config": label}
                try:
                    if cfg is None:
                        row["path"] = "mgpu" if k8.takes(m, k, n, w.spec.dtype, x.dtype) else "xla"
                        yf = np.asarray(qjax.matmul(x, w), np.float64)
                    else:
                        y = k8.gemm(xq, w.codes[0], sx, w.scales[0], x.dtype, cfg)
                        y = np.asarray(y, np.float64)
                        row["rel_err"] = float(np.linalg.norm(y - want) / np.linalg.norm(want))
                        yf = np.asarray(w8a8_matmul(x, w, gemm="mgpu", config=cfg), np.float64)
                    row["vs_format"] = float(np.linalg.norm(yf - ref) / np.linalg.norm(ref))
                    row["ok"] = bool(row.get("rel_err", 0.0) < 4e-3 and row["vs_format"] < 8e-3)
                except Exception as e:  # noqa: BLE001
                    row["error"] = repr(e)[:1500]
                print("check", row, flush=True)
                results.append(row)


def run_check_dispatched(cases, results: list, interpret: bool) -> None:
    """NF4 / FP8 (vs dequantize + float32 dot) and W8A8 (vs the format's reference product,
    whose activation codes it must reproduce) through ``qjax.matmul``'s registered kernel."""
    from qjax.kernels.gpu.w8a8_matmul import quantize_rows

    for fmt in ("nf4", "fp8", "w8a8", "w8a8f8"):
        spec, layout = FORMATS[fmt]
        for m, k, n in cases:
            if layout is None and k % 128:
                continue  # the W8A8 kernel takes K % 128 == 0 (else the logged reference)
            kx, kw = jax.random.split(jax.random.key(m * 11 + k))
            q = spec.quantize(jax.random.normal(kw, (k, n)))
            x = (3 * jax.random.normal(kx, (m, k))).astype(jnp.bfloat16)
            row = {"fmt": fmt, "M": m, "K": k, "N": n}
            if layout is None:
                y = w8a8_kernel(x, q, interpret)
                ref = np.asarray(spec.matmul(x, q), np.float32)
                codes, sx = quantize_rows(x, dtype=spec.dtype, interpret=interpret)
                want = spec._cast(x.astype(jnp.float32) / sx)
                same = np.asarray(codes).view(np.uint8) == np.asarray(want).view(np.uint8)
                row["code_mismatch_rate"] = float(1 - same.mean())
            else:
                w = repack.repack(q, layout)
                y = np.asarray(table_matmul(x, w, interpret=interpret), np.float32)
                ref = np.asarray(x, np.float32) @ np.asarray(q.dequantize(), np.float32)
            err = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
            row.update(rel_err=err, ok=bool(np.isfinite(y).all() and err < 1e-2))
            results.append(row)
            print(f"check {row}", flush=True)


def w8a8_kernel(x, q, interpret):
    from qjax.kernels.gpu.w8a8_matmul import w8a8_matmul

    return np.asarray(w8a8_matmul(x, q, interpret=interpret), np.float32)


# -- report ------------------------------------------------------------------------------------
def targets(rows: list) -> list[str]:
    """The issue's targets, measured (70B shapes)."""
    out = []

    def pick(fmt, pred):
        return [r[fmt] for r in rows if r["model"] == "70b" and fmt in r and pred(r["M"])]

    for fmt, label, pred, goal in [
        ("w4g128", "W4 g128, M<=16", lambda m: m <= 16, 3.3),
        ("w4g128", "W4 g128, M=64", lambda m: m == 64, 2.5),
        ("w4g128", "W4 g128, M=128", lambda m: m == 128, 1.8),
        ("w4g128", "W4 g128, M>=2048", lambda m: m >= 2048, 0.9),
        ("w4g128t", "W4 g128 Mosaic GPU, M<=16", lambda m: m <= 16, 3.3),
        ("w4g128t", "W4 g128 Mosaic GPU, M=64", lambda m: m == 64, 2.5),
        ("w4g128t", "W4 g128 Mosaic GPU, M=128", lambda m: m == 128, 1.8),
        ("w4g128t", "W4 g128 Mosaic GPU, M>=2048", lambda m: m >= 2048, 0.9),
        ("w8ch", "W8 per-channel, M<=16", lambda m: m <= 16, 1.8),
        ("w8cht", "W8 per-channel Mosaic GPU, M<=16", lambda m: m <= 16, 1.8),
        ("fp8", "FP8 e4m3 weights, M<=16", lambda m: m <= 16, 1.8),
        ("fp8t", "FP8 e4m3 weights Mosaic GPU, M<=16", lambda m: m <= 16, 1.8),
        ("w8a8", "W8A8 int8, M>=4096", lambda m: m >= 4096, 1.5),
        ("w8a8f8", "W8A8 fp8, M>=4096", lambda m: m >= 4096, 1.5),
    ]:
        got = pick(fmt, pred)
        if not got:
            continue
        sp = [g["speedup_vs_bf16"] for g in got]
        tb = [g["tb_s"] for g in got]
        out.append(
            f"| {label} | ≥ {goal}× | {min(sp):.2f}× – {max(sp):.2f}× (mean {np.mean(sp):.2f}×) "
            f"| {min(tb):.2f} – {max(tb):.2f} TB/s | {'met' if min(sp) >= goal else 'missed'} |"
        )
    for nf4, int4 in (("nf4", "w4g128"), ("nf4t", "w4g128t")):  # NF4 within 15 % of int4
        pairs = [
            r[int4]["us"] / r[nf4]["us"]
            for r in rows
            if r["model"] == "70b" and r["M"] <= 16 and nf4 in r and int4 in r
        ]
        if pairs:
            ok = min(pairs) >= 1 / 1.15
            out.append(
                f"| {nf4} vs {int4}, M<=16 | t(int4)/t(NF4) ≥ 0.87 | {min(pairs):.2f} – "
                f"{max(pairs):.2f} | | {'met' if ok else 'missed'} |"
            )
    return out


def config_label(c: dict) -> str:
    """Short label of a config dict, e.g. ``decode 16×64 k4 w4 s4`` (table kernels: ``pallas``)."""
    if isinstance(c, str):  # "xla" | "mgpu_w8a8" (W8A8's GEMM, chosen by `mgpu_w8a8.takes`)
        return c
    if c.get("path") == "xla":
        return "xla"
    if c.get("path") in ("mgpu", "skinny"):  # Mosaic GPU: K step, steps per CTA, depth, scales,
        acc = " sacc" if c.get("scale_acc") else ""  # epilogue, the NF4 pair table, rows of x
        fused = " fused" if c.get("fused") else ""  # per CTA, CTAs per SM (the skinny kernel)
        lut = " lut" if c.get("lut") else ""
        rows = f" bm{c['block_m']}" if c.get("block_m", 128) != 128 else ""
        per_sm = f" {c['ctas_per_sm']}/SM" if c.get("ctas_per_sm", 1) != 1 else ""
        cluster = f" cl{c['cluster']}" if c.get("cluster") else ""
        tags = f"{acc}{fused}{lut}{rows}{per_sm}{cluster}"
        return f"{c['path']} bk{c['block_k']} L{c['cta_steps']} st{c['stages']}{tags}"
    unpack = "" if c.get("planes", True) else " reshape"
    return (
        f"{c.get('path', 'pallas')} {c['block_m']}×{c['block_n']} k{c['split_k']} "
        f"w{c['num_warps']} "
        f"s{c['num_stages']}{unpack}"
    )


def write_report(out_dir: str, payload: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernel_bench.json"), "w") as f:
        json.dump(payload, f, indent=1)
    rows = payload.get("bench", [])
    lines = [
        "# GPU int matmul kernels vs XLA bf16 dot",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Device: {payload['device']}; jax {payload['jax']}. Roofline constants: HBM "
        f"{HBM_BW / 1e12:.2f} TB/s, bf16 {PEAK_BF16 / 1e12:.0f} TFLOP/s dense, int8 / fp8 (W8A8) "
        f"{PEAK_8BIT / 1e12:.0f} TOP/s dense (H100 SXM datasheet). Times: median device "
        "(kernel) time per call from the profiler trace, weights rotated over > 150 MB of buffers.",
        "",
    ]
    if rows:
        met = targets(rows)
        if met:
            lines += [
                "## Targets (70B shapes)",
                "",
                "| case | target | measured speed-up | effective bandwidth | |",
                "|---|---|---|---|---|",
                *met,
                "",
            ]
        fmts = [f for f in FORMATS if any(f in r for r in rows)]
        head = "| model | N×K | M | bf16 µs | " + " | ".join(
            f"{f} µs | {f} × | {f} TB/s | {f} % roof | {f} config" for f in fmts
        )
        lines += ["## All cases", "", head + " |", "|" + "---|" * (4 + 5 * len(fmts))]
        for r in rows:
            cells = [r["model"], f"{r['N']}×{r['K']}", str(r["M"]), f"{r['bf16']['us']:.1f}"]
            for f in fmts:
                if f in r:
                    g = r[f]
                    cells += [
                        f"{g['us']:.1f}",
                        f"{g['speedup_vs_bf16']:.2f}",
                        f"{g['tb_s']:.2f}",
                        f"{g['pct_roofline']:.0f}",
                        config_label(g["config"]),
                    ]
                else:
                    cells += ["", "", "", "", ""]
            lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(out_dir, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/results/kernels")
    p.add_argument("--shapes", nargs="+", default=["70b", "8b"], choices=sorted(SHAPES))
    p.add_argument("--ms", nargs="+", type=int, default=list(M_SWEEP))
    p.add_argument("--formats", nargs="+", default=["w4g128", "w8ch"], choices=sorted(FORMATS))
    p.add_argument("--w8-ms", nargs="*", type=int, default=None, help="M values for w8 formats")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop starting cases after this")
    p.add_argument("--autotune", action="store_true", help="try candidates(M), report the best")
    p.add_argument("--check", action="store_true")
    p.add_argument("--check-cases", type=int, default=4)
    p.add_argument(
        "--check-parts",
        nargs="+",
        choices=CHECK_PARTS,
        default=list(CHECK_PARTS),
        help="which checks --check runs (one device call is limited to 10 minutes)",
    )
    p.add_argument("--check-formats", nargs="+", choices=MGPU_FORMATS, help="--check's mgpu part")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    args = p.parse_args(argv)
    deadline = time.time() + args.budget_s
    payload = {
        "command": "python -m experiments.kernel_bench " + shlex.join(argv or sys.argv[1:]),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "constants": {
            "hbm_bw": HBM_BW,
            "peak_bf16": PEAK_BF16,
            "peak_8bit": PEAK_8BIT,
            "rotate_bytes": L2_ROTATE_BYTES,
        },
    }
    try:
        if args.check or args.smoke:
            payload["check"] = []
            run_check(args, payload["check"], interpret=args.smoke)
        if args.tune:
            payload["tune"] = []
            run_tune(args, payload["tune"], deadline)
            print("\n".join(best_configs(payload["tune"])))
        elif not args.check and not args.smoke:
            payload["bench"] = []
            run_bench(args, payload["bench"], deadline)
    finally:
        write_report(args.out, payload)


if __name__ == "__main__":
    main()
