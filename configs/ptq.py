"""PTQ methods on the real models (issue: PTQ algorithms).

Run: python experiments/quality.py --config configs/ptq.py
"""

import ml_collections

from configs.baselines import LINEARS

GRIDS = ["int4-g128", "int4-channel", "int3-g128", "int3-channel"]


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "ptq"
    c.models = ["smollm2", "gemma3"]
    c.contexts = [2048]
    c.corpus = "wikipedia"
    c.batch_size = 1
    c.max_windows = -1
    c.linears = LINEARS
    c.calibration = {"samples": 128, "length": 2048, "seed": 0}
    methods = []
    for g in GRIDS:
        methods += [
            {"method": "rtn", "preset": g},
            {"method": "hqq", "preset": g},
            {"method": "gptq", "preset": g},
            {"method": "gptq", "preset": g, "act_order": True, "static_groups": True},
            {"method": "awq", "preset": g},
            {"method": "awq", "preset": g, "then": "gptq"},
        ]
    methods.append({"method": "smoothquant", "alpha": 0.5, "act": "static"})
    methods.append({"method": "smoothquant", "alpha": 0.5, "act": "dynamic"})
    c.methods = methods
    return c
