"""Gemma 3 270M streamed equals its own dense transformers forward (the real model, no stand-ins).

Gemma 3 interleaves 5 sliding-window layers (window 512, RoPE theta 1e4) with 1 global layer
(theta 1e6), three times. ``Stream`` keeps each sliding layer at exactly its trained window and runs
the streaming policy on the 3 global layers only. With a policy whose capacity exceeds the text
(``SinkWindow(4, 2044)`` over ~1,200 tokens) nothing is evicted from the global layers, while the
sliding layers do evict (1,200 > 512): the streamed log-probs must equal the model's dense forward,
because those windows are the model's own.

The model is optional (`make gemma`); these tests skip without it. They load it from the usual cache
(``$STREAMATTN_CACHE`` or ``~/.cache/streamattn``): the first load ever dequantizes it (~2-3 min),
later ones take seconds. About 1-2 minutes on 2 free cores after that.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import streamattn as sa
from streamattn.hf import Stream, load_model, loading

GEMMA = "gemma3-270m"
POLICY = sa.SinkWindow(sinks=4, window=2044)  # capacity 2,048 > the text: no eviction on global layers
N_STREAMED = 1200  # fed in chunks of 256 (the sliding layers evict: 1,200 > 512)
N_DECODED = 16  # then fed one token at a time, past the eviction point
CHUNK = 256


def _gemma_installed() -> bool:
    return all(importlib.util.find_spec(package) is not None for package, _ in loading.SHIPPED_MODELS[GEMMA].parts)


pytestmark = pytest.mark.skipif(
    not _gemma_installed(), reason="Gemma 3 270M is optional and not installed (install it with `make gemma`)"
)


@pytest.fixture(scope="module")
def gemma():
    return load_model(GEMMA)


@pytest.fixture(scope="module")
def ids(gemma):
    """``<bos>`` + the first ~1,216 tokens of the shipped *Emma*."""
    from streamattn.eval import read_text

    tokenizer = gemma[1]
    text_ids = tokenizer(read_text()[:8000], add_special_tokens=False).input_ids
    n = N_STREAMED + N_DECODED
    assert len(text_ids) >= n - 1
    return torch.tensor([tokenizer.bos_token_id, *text_ids[: n - 1]], dtype=torch.long)


def _dense_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """The model's own forward (its default attention, its own masks): log p(ids[t] | ids[:t]), NaN at t=0."""
    assert model.config._attn_implementation != "streamattn"  # no Stream is attached
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float()  # [T, V]
        picked = logits[:-1].gather(1, ids[1:, None])[:, 0] - torch.logsumexp(logits[:-1], dim=-1)
    return torch.cat([torch.tensor([float("nan")]), picked])


def test_layer_pattern_is_the_models_own(gemma):
    model, tokenizer = gemma
    with Stream(model, tokenizer, POLICY) as stream:
        policies = stream.cache.layer_policies
        thetas = [layer.attn.rope.theta for layer in stream.cache.layers]
    assert len(policies) == 18
    global_layers = [i for i, p in enumerate(policies) if p == POLICY]
    assert global_layers == [5, 11, 17]
    assert [policies[i] for i in range(18) if i not in global_layers] == [sa.SinkWindow(sinks=0, window=512)] * 15
    assert [thetas[i] for i in global_layers] == [1e6] * 3
    assert {thetas[i] for i in range(18) if i not in global_layers} == {1e4}
    assert model.config._attn_implementation != "streamattn"  # closing gave the model its attention back


def test_streamed_equals_dense_forward(gemma, ids):
    model, tokenizer = gemma
    dense = _dense_logprobs(model, ids)
    with Stream(model, tokenizer, POLICY, chunk_size=CHUNK) as stream:
        chunked = stream.feed(ids[:N_STREAMED])  # chunks of 256
        cached = [layer.attn.cached[0] for layer in stream.cache.layers]
        decoded = torch.cat([stream.feed(ids[t : t + 1]) for t in range(N_STREAMED, len(ids))])  # token by token
        nbytes = stream.cache.nbytes
    streamed = torch.cat([chunked, decoded])
    assert torch.isnan(streamed[0]) and torch.isfinite(streamed[1:]).all()
    # the sliding layers evicted (they keep at most their window), the global ones kept everything
    assert max(cached[i] for i in range(18) if i % 6 != 5) <= 512
    assert [cached[i] for i in (5, 11, 17)] == [N_STREAMED] * 3
    assert nbytes > 0
    diff = (streamed[1:] - dense[1:]).abs()
    print(
        f"\nGemma 3 270M, {len(ids)} tokens: max |streamed - dense| log-prob = {diff.max():.2e} "
        f"(chunked {diff[: N_STREAMED - 1].max():.2e}, decoded {diff[N_STREAMED - 1 :].max():.2e}), "
        f"mean {diff.mean():.2e}; perplexity {(-dense[1:].mean()).exp():.3f}"
    )
    assert diff.max() < 1e-3


def test_token_by_token_equals_chunks_of_64(gemma, ids):
    model, tokenizer = gemma
    head = ids[:100]
    with Stream(model, tokenizer, POLICY, chunk_size=1) as stream:
        one = stream.feed(head)
    with Stream(model, tokenizer, POLICY, chunk_size=64) as stream:
        sixty_four = stream.feed(head)
    diff = (one[1:] - sixty_four[1:]).abs().max()
    print(f"\nGemma 3 270M, first 100 tokens: max |chunk 1 - chunk 64| log-prob = {diff:.2e}")
    assert torch.isnan(one[0]) and torch.isnan(sixty_four[0])
    assert diff < 1e-3
