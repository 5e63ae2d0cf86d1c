"""Fuzz our GGUF reader with mutated files: the only exception allowed is ``FormatError``.

Seeds: a small valid GGUF written with :func:`qjax.convert.gguf.write_gguf` (every metadata value
type, nested arrays, tensors of every dequantizable GGML type) and the real SmolLM2 file's header
region (1.79 MB of metadata + tensor infos; the data section is a sparse zero extension to the
real size, so every tensor is still in bounds). Each case applies 1-4 seeded mutations:

* ``byte``/``word``: a random byte, or a u32/u64 set to an interesting value (0, 1, 2^31,
  2^32-1, 2^63, 2^64-1, the file size, ...), at a random position or at a *structural* field
  (tensor/kv counts, string lengths, value types, array element types and counts, n_dims, dims,
  GGML type ids, data offsets), found by walking the valid seed;
* ``truncate`` at a random or structural position; ``insert``/``delete`` a few bytes;
* ``dup``: copy one tensor name or metadata key over another of the same length (duplicates);
* ``splice``: copy a random slice of the file over another position.

Each case is written to a file in ``/dev/shm`` (tmpfs), parsed with ``read_gguf``, and every
tensor is read (``raw``) and dequantized. Outcomes: ``ok``, ``FormatError`` (its message must
name the file), or a failure — any other exception, a per-case timeout (SIGALRM, 10 s), or a
``MemoryError`` under the worker's ``RLIMIT_AS`` cap (baseline + 2 GiB: a giant allocation).
Workers are processes (2 at most); a batch that hangs past its deadline counts as a hang.

    python experiments/gguf_fuzz.py --cases 100000 --smollm2-cases 1000 --workers 2

writes ``experiments/results/gguf_fuzz/fuzz.json`` (+ ``README.md``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import signal
import struct
import sys
import time
import traceback
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "results" / "gguf_fuzz"
WORDS = [0, 1, 2, 3, 7, 31, 32, 255, 256, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
         2**62, 2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip
TIMEOUT_S = 10
AS_EXTRA = 2 << 30

# ----------------------------------------------------------------------------- seeds


def small_seed(path: Path) -> Path:
    from qjax.convert.gguf import quants, write_gguf
    from qjax.convert.gguf.constants import BLOCK_SIZES, GGUFValueType

    rng = np.random.default_rng(0)
    md = {
        "general.architecture": "llama",
        "general.name": "fuzz ünïcödé",
        "t.u8": np.uint8(200), "t.i8": np.int8(-100), "t.u16": np.uint16(60000),
        "t.i16": np.int16(-30000), "t.u32": np.uint32(4_000_000_000), "t.i32": -2_000_000_000,
        "t.f32": 0.1, "t.u64": np.uint64(2**63 + 5), "t.i64": -(2**62), "t.f64": np.float64(0.1),
        "t.bool": True, "t.strs": ["a", "", "ß"], "t.ints": [1, -2, 3],
        "t.floats": np.arange(100, dtype=np.float32) / 8, "t.bools": [True, False, True],
        "t.nested": [[1, 2], [3, 4]], "t.nested_str": [["x"], ["yz"]],
    }  # fmt: skip
    vt = {"t.nested_str": (GGUFValueType.ARRAY, GGUFValueType.ARRAY, GGUFValueType.STRING)}
    tensors = []
    for i, t in enumerate(sorted(quants.DEQUANTIZABLE, key=int)):
        elems = BLOCK_SIZES[t][0]
        shape = (2, max(elems, 32))
        name = f"t{i:02d}"  # equal-length names: 'dup' mutations can overwrite one with another
        if t in quants.QUANTIZABLE:
            x = rng.standard_normal(shape).astype(np.float32)
            data = quants.quantize(x, t)
        else:  # random blocks with sane float16 fields
            dt = quants.BLOCK_DTYPES[t]
            n = shape[0] * shape[1] // elems
            blocks = np.frombuffer(rng.bytes(n * dt.itemsize), dtype=dt).copy()
            for f in dt.names:
                if dt.fields[f][0] == np.dtype("<f2"):
                    blocks[f] = rng.uniform(1e-3, 0.1, n)
            data = blocks.view(np.uint8)
        tensors.append((name, t, data, shape))
    return write_gguf(path, md, tensors, value_types=vt)


def smollm2_seed(path: Path) -> tuple[Path, int, int]:
    """The real header region (up to the data section + 64 KiB); returns (path, header, size)."""
    from qjax import assets
    from qjax.convert.gguf import read_gguf

    src = assets.path("smollm2")
    r = read_gguf(src)
    head = min(r.data_offset + (64 << 10), src.stat().st_size)
    with open(src, "rb") as f:
        path.write_bytes(f.read(head))
    return path, head, src.stat().st_size


def structure(data: bytes) -> dict[str, list[tuple[int, int]]]:
    """(position, size) of the structural fields of a valid GGUF, by kind."""
    from qjax.convert.gguf.constants import SCALAR_STRUCT, GGUFValueType

    pos = 8
    out: dict[str, list[tuple[int, int]]] = {k: [] for k in (
        "count", "strlen", "vtype", "etype", "alen", "ndims", "dim", "ttype", "offset", "key",
        "tname")}  # fmt: skip
    out["count"] += [(8, 8), (16, 8)]
    n_t, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(kind: str | None = None):
        nonlocal pos
        n = struct.unpack_from("<Q", data, pos)[0]
        out["strlen"].append((pos, 8))
        if kind:
            out[kind].append((pos + 8, n))
        pos += 8 + n

    def value(vt: int):
        nonlocal pos
        t = GGUFValueType(vt)
        if t == GGUFValueType.STRING:
            string()
        elif t == GGUFValueType.ARRAY:
            et = struct.unpack_from("<I", data, pos)[0]
            out["etype"].append((pos, 4))
            n = struct.unpack_from("<Q", data, pos + 4)[0]
            out["alen"].append((pos + 4, 8))
            pos += 12
            for _ in range(n):
                value(et)
        else:
            pos += struct.calcsize(SCALAR_STRUCT[t])

    for _ in range(n_kv):
        string("key")
        vt = struct.unpack_from("<I", data, pos)[0]
        out["vtype"].append((pos, 4))
        pos += 4
        value(vt)
    for _ in range(n_t):
        string("tname")
        nd = struct.unpack_from("<I", data, pos)[0]
        out["ndims"].append((pos, 4))
        pos += 4
        for _ in range(nd):
            out["dim"].append((pos, 8))
            pos += 8
        out["ttype"].append((pos, 4))
        out["offset"].append((pos + 4, 8))
        pos += 12
    out["_header_end"] = [(pos, 0)]
    return out


# ----------------------------------------------------------------------------- mutations


def mutate(seed: bytes, fields: dict, rng: np.random.Generator) -> tuple[bytes, list[str]]:
    out = bytearray(seed)
    hdr = fields["_header_end"][0][0]
    kinds = [k for k in fields if not k.startswith("_") and fields[k]]
    ops = []
    for _ in range(int(rng.integers(1, 5))):
        op = rng.choice(["byte", "word", "word", "field", "field", "field", "truncate",
                         "insert", "delete", "dup", "splice"])  # fmt: skip
        n = len(out)
        if n == 0:
            break
        near = (
            int(rng.integers(0, min(n, hdr + 64)))
            if rng.random() < 0.8
            else int(rng.integers(0, n))
        )
        if op == "byte":
            out[near] = int(rng.integers(0, 256))
        elif op == "word" or op == "field":
            if op == "field":
                kind = str(rng.choice(kinds))
                p, size = fields[kind][int(rng.integers(0, len(fields[kind])))]
                size = size if size in (4, 8) else int(rng.choice([4, 8]))
            else:
                kind, p, size = "any", near, int(rng.choice([4, 8]))
            if rng.random() < 0.7:
                v = int(rng.choice(WORDS + [n, n - p, hdr]))
            elif rng.random() < 0.5:
                v = int(rng.integers(0, 64))  # small: type ids, dims, lengths
            else:
                old = int.from_bytes(out[p : p + size].ljust(size, b"\0"), "little")
                v = old + int(rng.choice([-2, -1, 1, 2, 32, -32]))
            v %= 1 << (8 * size)
            if p + size <= n:
                out[p : p + size] = v.to_bytes(size, "little")
            op = f"{op}:{kind}"
        elif op == "truncate":
            if rng.random() < 0.5:
                kind = str(rng.choice(kinds))
                near = fields[kind][int(rng.integers(0, len(fields[kind])))][0]
                near += int(rng.integers(0, 9))
            del out[near:]
        elif op == "insert":
            out[near:near] = rng.bytes(int(rng.integers(1, 9)))
        elif op == "delete":
            del out[near : near + int(rng.integers(1, 9))]
        elif op == "dup":
            kind = str(rng.choice(["key", "tname"]))
            items = fields[kind]
            a, b = (items[int(i)] for i in rng.integers(0, len(items), 2))
            if a[1] == b[1] and b[0] + b[1] <= len(out):
                out[b[0] : b[0] + b[1]] = seed[a[0] : a[0] + a[1]]
            op = f"dup:{kind}"
        elif op == "splice":
            a, b = (int(x) for x in rng.integers(0, n, 2))
            k = int(rng.integers(1, 65))
            out[b : b + k] = out[a : a + k]
        ops.append(op)
    return bytes(out), ops


# ----------------------------------------------------------------------------- worker

_STATE: dict = {}


def _alarm(signum, frame):
    raise TimeoutError("case timed out")


def _init(seeds: dict) -> None:
    import qjax.convert.gguf  # noqa: F401  (import before capping the address space)

    _STATE["seeds"] = {k: (v[0], structure(v[0]), v[1]) for k, v in seeds.items()}
    vm = 0
    for line in open("/proc/self/status"):
        if line.startswith("VmSize"):
            vm = int(line.split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + AS_EXTRA, vm + AS_EXTRA))
    signal.signal(signal.SIGALRM, _alarm)


def _run_case(seed_name: str, index: int, base_seed: int) -> tuple[str, list[str], str]:
    from qjax.convert.gguf import read_gguf
    from qjax.errors import FormatError

    data, fields, full_size = _STATE["seeds"][seed_name]
    rng = np.random.default_rng([base_seed, index, len(seed_name)])
    mutated, ops = mutate(data, fields, rng)
    path = Path(f"/dev/shm/qjax-fuzz-{os.getpid()}.gguf")
    path.write_bytes(mutated)
    if full_size and len(mutated) == len(data):  # real header: sparse data section after it
        os.truncate(path, full_size)
    signal.alarm(TIMEOUT_S)
    try:
        r = read_gguf(path)
        size = path.stat().st_size
        for name, info in r.tensors.items():
            assert info.offset + info.nbytes <= size, f"{name} out of bounds"
            r.raw(name)
            assert r.dequantize(name).shape == info.shape
        return "ok", ops, ""
    except FormatError as e:
        if str(path) not in str(e):
            return "fail:FormatError-without-path", ops, str(e)[:300]
        return "FormatError", ops, ""
    except TimeoutError:
        return "fail:timeout", ops, ""
    except MemoryError:
        return "fail:MemoryError", ops, traceback.format_exc(limit=4)[-800:]
    except BaseException as e:  # noqa: BLE001 - every other exception is a finding
        return f"fail:{type(e).__name__}", ops, traceback.format_exc(limit=6)[-1200:]
    finally:
        signal.alarm(0)
        path.unlink(missing_ok=True)


def _batch(args: tuple[str, int, int, int]) -> dict:
    seed_name, start, stop, base_seed = args
    counts: dict[str, int] = {}
    ops_count: dict[str, int] = {}
    failures = []
    for i in range(start, stop):
        outcome, ops, detail = _run_case(seed_name, i, base_seed)
        counts[outcome] = counts.get(outcome, 0) + 1
        for op in ops:
            ops_count[op] = ops_count.get(op, 0) + 1
        if outcome.startswith("fail") and len(failures) < 20:
            failures.append({"seed": seed_name, "case": i, "outcome": outcome, "ops": ops,
                             "detail": detail})  # fmt: skip
    return {"seed": seed_name, "counts": counts, "ops": ops_count, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=100_000, help="cases on the small seed")
    p.add_argument("--smollm2-cases", type=int, default=1000, help="cases on the real header")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.workers > 2:
        p.error("at most 2 workers")
    tmp = Path("/dev/shm")
    small = small_seed(tmp / "qjax-fuzz-seed-small.gguf").read_bytes()
    seeds = {"small": (small, 0)}
    if args.smollm2_cases:
        path, _, full = smollm2_seed(tmp / "qjax-fuzz-seed-smollm2.gguf")
        seeds["smollm2_header"] = (path.read_bytes(), full)
        path.unlink()
    (tmp / "qjax-fuzz-seed-small.gguf").unlink()
    tasks = []
    for name, n in (("small", args.cases), ("smollm2_header", args.smollm2_cases)):
        bs = args.batch if name == "small" else max(1, args.batch // 50)
        tasks += [(name, s, min(n, s + bs), args.seed) for s in range(0, n, bs)]
    t0 = time.time()
    totals: dict[str, dict[str, int]] = {}
    ops_total: dict[str, int] = {}
    failures: list = []
    hung = 0
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers, initializer=_init, initargs=(seeds,), maxtasksperchild=20) as pool:
        pending = [(t, pool.apply_async(_batch, (t,))) for t in tasks]
        for k, (task, res) in enumerate(pending):
            try:
                r = res.get(timeout=TIMEOUT_S * (task[2] - task[1]) + 600)
            except mp.TimeoutError:
                hung += 1
                failures.append({"seed": task[0], "batch": task[1:3], "outcome": "fail:hang"})
                continue
            seed_counts = totals.setdefault(r["seed"], {})
            for o, c in r["counts"].items():
                seed_counts[o] = seed_counts.get(o, 0) + c
            for o, c in r["ops"].items():
                ops_total[o] = ops_total.get(o, 0) + c
            failures += r["failures"][: max(0, 50 - len(failures))]
            if k % 20 == 0:
                done = sum(sum(c.values()) for c in totals.values())
                print(f"{done} cases, {time.time() - t0:.0f} s, {totals}", file=sys.stderr)
    elapsed = time.time() - t0
    n_cases = sum(sum(c.values()) for c in totals.values())
    n_fail = sum(c for s in totals.values() for o, c in s.items() if o.startswith("fail")) + hung
    result = {
        "command": "python experiments/gguf_fuzz.py " + " ".join(argv or sys.argv[1:]),
        "cases": n_cases,
        "failures": n_fail,
        "by_seed": totals,
        "mutation_ops": dict(sorted(ops_total.items())),
        "elapsed_s": round(elapsed, 1),
        "cases_per_s": round(n_cases / elapsed, 1),
        "workers": args.workers,
        "timeout_s": TIMEOUT_S,
        "rlimit_as_extra_bytes": AS_EXTRA,
        "failure_examples": failures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "failure_examples"}, indent=2))
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
