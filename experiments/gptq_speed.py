"""End-to-end GPTQ speed: calibration + quantization of a whole model, with where time goes.

    python experiments/gptq_speed.py --shape llama2-7b            # random weights, on the GPU
    python experiments/gptq_speed.py --model smollm2 --samples 128 --length 2048

Times the calibration engine (``qjax.ptq.quantize_model``) from the first embedding to the last
quantized block, GPTQ W4 g128 on every linear layer, and splits it into per-layer GPTQ time
(the rest is the block forwards that capture statistics and propagate the quantized outputs).
Writes ``experiments/results/ptq/gptq_speed_<name>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qjax
from qjax.models.llama import Llama, LlamaConfig
from qjax.ptq.calibrate import quantize_model
from qjax.ptq.gptq import GPTQ

SHAPES = {
    "llama2-7b": LlamaConfig(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        d_ff=11008,
    ),
    "tiny": LlamaConfig(
        vocab_size=512, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=704
    ),
}
LINEARS = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES))
    p.add_argument("--model", help="a real model from qjax.assets (e.g. smollm2)")
    p.add_argument("--gguf", type=Path, help="path of the real model's GGUF")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", help="weights/activations of random models")
    p.add_argument("--out", type=Path, default=Path("experiments/results/ptq"))
    args = p.parse_args(argv)
    t_load = time.perf_counter()
    if args.shape:
        cfg = SHAPES[args.shape]
        model = Llama(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(args.dtype))
        name = args.shape
    else:
        from qjax import assets
        from qjax.convert.gguf.load import load_gguf_model

        cfg, model = load_gguf_model(args.gguf or assets.path(args.model))
        name = args.model
    jax.block_until_ready(nnx.state(model))
    load_s = time.perf_counter() - t_load
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.samples, args.length))
    rules = [(LINEARS, GPTQ(qjax.Int(4, group=128)))]
    t0 = time.perf_counter()
    qstate, report = quantize_model(
        model, rules, tokens.astype(np.int32), default=None, batch_size=args.batch
    )
    jax.block_until_ready(qstate)
    total = time.perf_counter() - t0
    gptq_s = sum(r["seconds"] for r in report)
    result = {
        "name": name,
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "samples": args.samples,
        "length": args.length,
        "layers": len(report),
        "total_s": total,
        "gptq_s": gptq_s,
        "forward_and_stats_s": total - gptq_s,
        "load_s": load_s,
        "command": "python " + " ".join(sys.argv),
        "slowest_layers": sorted(report, key=lambda r: -r["seconds"])[:5],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gptq_speed_{name}_{jax.default_backend()}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{stem}.md").write_text(
        f"# GPTQ W4 g128 end to end: {name} on {result['device']}\n\n"
        f"Command: `{result['command']}`\n\n"
        f"| calibration | linear layers | total | GPTQ math | block forwards + stats |\n"
        f"|---|---|---|---|---|\n| {args.samples} × {args.length} | {len(report)} "
        f"| {total:.1f} s | {gptq_s:.1f} s | {total - gptq_s:.1f} s |\n"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "slowest_layers"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
