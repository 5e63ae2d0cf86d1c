"""RTN baselines of the real models (issue: real models and evaluation).

Run: python experiments/quality.py --config configs/baselines.py
"""

import ml_collections

LINEARS = r"layers/\d+/(attn|mlp)/\w+_proj/kernel"


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "baselines"
    c.models = ["smollm2", "gemma3"]
    c.contexts = [2048, 512]
    c.corpus = "wikipedia"
    c.batch_size = 1
    c.max_windows = -1  # -1: the whole test split
    c.linears = LINEARS  # quantized; embeddings, norms and the (tied) head stay in float32
    c.calibration = {"samples": 0, "length": 0, "seed": 0}
    c.methods = [
        {"method": "rtn", "preset": p}
        for p in ["int8-channel", "int4-g128", "int4-asym-g32", "int3-g128", "nf4", "fp8-e4m3"]
    ]
    return c
