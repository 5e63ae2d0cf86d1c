"""Shared test settings (hypothesis profiles; CI runs the default one) and the real assets."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("QJAX_HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 (Q8_0 embedding, F32 norms); fetched if missing, never skips."""
    from qjax import assets

    return assets.path("smollm2")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma-3-270M, Q4_K_M (Q8_0 embedding, Q5_0 / Q4_K / Q6_K linears, F32 norms)."""
    from qjax import assets

    return assets.path("gemma3")
