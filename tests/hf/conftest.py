"""Real-model fixtures: SmolLM2 is dequantized once per test session into a temporary cache."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("streamattn-cache")


@pytest.fixture(scope="session")
def smollm2(model_cache):
    from streamattn.hf import load_model

    return load_model("smollm2", cache_dir=model_cache)
