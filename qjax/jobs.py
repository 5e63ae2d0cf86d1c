"""The main job behind ``qjax run``: quantize a real GGUF model's weights and report the error.

Until the Flax models land this works on the weight tensors directly: every tensor of the GGUF is
dequantized (our reader), the linear weights (``blk/N/{attn,ffn}_*``, PyTorch ``(out, in)``
orientation, reduction axis 1) are quantized with the chosen preset through the rules engine, and
``explain`` plus per-tensor SQNR against the dequantized reference are printed.
"""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from qjax import assets, presets
from qjax.convert.gguf import read_gguf
from qjax.metrics import sqnr_db
from qjax.rules import explain, quantize


def gguf_tensors(name: str) -> dict:
    """All tensors of a real GGUF model as a nested dict ``{"blk": {"0": {"attn_q": ...}}}``."""
    reader = read_gguf(assets.path(name))
    tree: dict = {}
    for tname in tqdm(reader.tensors, desc=f"reading {name}", unit="tensor"):
        node = tree
        *parents, leaf = tname.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(reader.dequantize(tname))
    return tree


def quantize_gguf_model(name: str = "smollm2", preset: str = "int4-g128") -> dict:
    params = gguf_tensors(name)
    linear = r"blk/\d+/(attn|ffn)_(q|k|v|output|gate|up|down)/weight"
    rules = [(linear, presets.spec(preset, axis=1))]
    explain(params, rules, default=None)
    t0 = time.perf_counter()
    qparams = quantize(params, rules, default=None)
    seconds = time.perf_counter() - t0
    sq = []
    for i, block in qparams["blk"].items():
        for tname, t in block.items():
            if hasattr(t["weight"], "dequantize"):
                ref = params["blk"][i][tname]["weight"]
                sq.append(sqnr_db(np.asarray(ref), np.asarray(t["weight"].dequantize())))
    print(
        f"{name}: quantized {len(sq)} linear weights with {preset} in {seconds:.1f} s; "
        f"SQNR vs the dequantized GGUF: median {np.median(sq):.2f} dB, min {np.min(sq):.2f} dB"
    )
    return qparams
