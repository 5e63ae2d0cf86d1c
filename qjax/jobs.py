"""The main job behind ``qjax run``: quantize a real model and measure what it cost.

Default: SmolLM2-135M-Instruct (real weights, from its GGUF), GPTQ W4 symmetric group 128 on
every linear layer, calibrated on windows of the Wikipedia calibration split, then perplexity,
KL divergence from the unquantized model and top-1 agreement on the Wikipedia *test* split
(REFERENCE §2 protocol, ``qjax.eval``). The defaults are sized for a 2-core CPU (a few minutes):
16 calibration windows of 512 tokens and the first 16 test windows of 512 tokens; ``--samples
128 --length 2048 --context 2048 --windows -1`` is the full GPTQ-paper protocol (use a GPU).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

from qjax import assets, data
from qjax.convert.gguf.load import load_gguf_model
from qjax.eval import eval_windows, evaluate
from qjax.methods import method_from_config
from qjax.ptq.calibrate import calibration_tokens, quantize_model
from qjax.rules import explain
from qjax.tokenizer import tokenizer_from_gguf

LINEARS = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2"
    method: str = "gptq"
    preset: str = "int4-g128"
    samples: int = 16
    length: int = 512
    context: int = 512
    windows: int = 16  # -1: the whole test split
    seed: int = 0


def _test_windows(tok, cfg: RunConfig, bos):
    test = np.asarray(tok.encode(data.test_text(), add_bos=False), np.int32)
    return eval_windows(test, cfg.context, bos, None if cfg.windows < 0 else cfg.windows)


def run(cfg: RunConfig) -> dict:
    """Quantizes ``cfg.model`` with ``cfg.method`` and returns before/after metrics.

    ``method="none"`` only evaluates the unquantized model (``qjax eval``).
    """
    method = None
    if cfg.method != "none":  # a bad method or preset fails before anything is loaded
        method = method_from_config({"method": cfg.method, "preset": cfg.preset})
    path = assets.path(cfg.model)
    _, model = load_gguf_model(path)
    tok = tokenizer_from_gguf(path)
    bos = tok.bos_id if tok.add_bos else None
    graphdef, ref_params, rest = nnx.split(model, nnx.Param, ...)

    def apply(params, tokens):
        return nnx.merge(graphdef, params, rest)(tokens)

    if cfg.method == "none":
        res = evaluate(apply, ref_params, _test_windows(tok, cfg, bos), desc="evaluating")
        print(
            f"\n{cfg.model} (unquantized): perplexity {res.ppl:.3f} on {res.tokens} test "
            f"tokens ({res.windows} windows of {res.context}), {res.seconds:.0f} s"
        )
        return {"model": cfg.model, "method": "none", **res.as_dict()}
    rules = [(LINEARS, method)]
    explain(nnx.state(model, nnx.Param), rules, default=None)

    def encode(text):
        return tok.encode(text, add_bos=False)

    t0 = time.perf_counter()
    calib = calibration_tokens(encode, cfg.samples, cfg.length, cfg.seed, bos_id=bos)
    qparams, _ = quantize_model(model, rules, calib, default=None, batch_size=4)
    jax.block_until_ready(qparams)
    quantize_s = time.perf_counter() - t0

    windows = _test_windows(tok, cfg, bos)
    res = evaluate(apply, qparams, windows, ref_params=ref_params, desc="evaluating")
    out = {"model": cfg.model, "method": method.label(), "quantize_s": quantize_s, **res.as_dict()}
    print(
        f"\n{cfg.model}, {method.label()} (calibration {cfg.samples} × {cfg.length} tokens, "
        f"{quantize_s:.0f} s)\n"
        f"  test split: {res.tokens} tokens in {res.windows} windows of {res.context}\n"
        f"  perplexity  {res.ref_ppl:.3f} (reference) → {res.ppl:.3f} (quantized)\n"
        f"  KL divergence from the reference: mean {res.kld_mean:.4f}, p99 {res.kld_p99:.3f}\n"
        f"  top-1 agreement with the reference: {100 * res.top1_agreement:.2f}%"
    )
    return out
