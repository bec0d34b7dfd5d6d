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


@pytest.fixture
def fresh_model(smollm2, model_cache):
    """A model instance of its own (StreamingCache switches a model's attention implementation)."""
    from streamattn.hf import load_model

    return load_model("smollm2", cache_dir=model_cache)[0]


@pytest.fixture(scope="session")
def emma_ids(smollm2):
    """Token ids of the first 4,000 characters of the shipped *Emma* (nothing outside the repo)."""
    import torch

    from streamattn.eval import read_text

    text = read_text()[:4000]
    return torch.tensor(smollm2[1](text, add_special_tokens=False).input_ids, dtype=torch.long)
