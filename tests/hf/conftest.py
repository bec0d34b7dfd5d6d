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
    import gzip
    from pathlib import Path

    import torch

    path = Path(__file__).resolve().parents[3] / "shared" / "data" / "austen" / "emma.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read(4000)
    return torch.tensor(smollm2[1](text, add_special_tokens=False).input_ids, dtype=torch.long)
