"""Other RoPE decoder families on tiny random configs: same checks as SmolLM2, plus a clear refusal."""

from __future__ import annotations

import pytest
import torch
import transformers

import streamattn as sa
from streamattn.hf import Stream, StreamingCache

COMMON = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.5,  # sharp random weights: outputs depend strongly on what attention sees
    "eos_token_id": 1,
    "bos_token_id": 0,
    "pad_token_id": 0,
}
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**COMMON),
    "gemma": lambda: transformers.GemmaConfig(**COMMON, head_dim=16),
}


def _models(name):
    torch.manual_seed(0)
    plain = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    streaming = transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    streaming.load_state_dict(plain.state_dict())
    return plain, streaming


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_architecture_streams_exactly(name):
    plain, streaming = _models(name)
    ids = torch.randint(2, 128, (80,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logprobs = torch.log_softmax(plain(ids[None]).logits[0].float(), dim=-1)
    want = logprobs[:-1].gather(1, ids[1:, None])[:, 0]
    full = Stream(streaming, policy=sa.SinkWindow(sinks=4, window=200), chunk_size=16).feed(ids)[1:]
    assert (full - want).abs().max().item() < 1e-4  # no eviction: transformers' own result
    by_token = Stream(streaming, policy=sa.SinkWindow(sinks=2, window=8), chunk_size=1).feed(ids)[1:]
    chunked = Stream(streaming, policy=sa.SinkWindow(sinks=2, window=8), chunk_size=13).feed(ids)[1:]
    assert (chunked - by_token).abs().max().item() < 1e-4  # eviction: any chunking, same result
    assert (by_token - full).abs().max().item() > 1e-2  # and eviction visibly matters (the test can fail)


def test_model_without_rope_is_refused():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="RoPE"):
        StreamingCache(model)
