"""Endless generation is incremental and bounded: O(1) work and memory per token, however long."""

from __future__ import annotations

import torch
import transformers

import streamattn as sa
from streamattn.hf import Stream


def test_endless_generate_is_bounded_and_decodes_exactly(smollm2):
    tokenizer = smollm2[1]
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with Stream(model, tokenizer, sa.SinkWindow(sinks=2, window=30)) as stream:
        stream.feed("Once upon a time")
        fed: list[int] = []
        feed = stream.feed
        stream.feed = lambda ids, **kw: (fed.extend(ids.tolist()), feed(ids, **kw))[1]
        n = 4200  # past the 4,096 ids kept in last_generated
        text = "".join(stream.generate(n, temperature=1.0, seed=0, stop_at_eos=False))
        assert len(fed) == n and stream.seen == 4 + n
        assert text == tokenizer.decode(fed, skip_special_tokens=True)  # incremental == one decode
        assert stream.last_generated == fed[-4096:]  # bounded: the last 4,096 ids
        assert stream.cache.layers[0].attn.cached == [32]  # the cache too
