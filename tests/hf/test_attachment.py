"""Attaching a StreamingCache changes the model only while the cache is open: reversible."""

from __future__ import annotations

import gc

import pytest
import torch

import streamattn as sa
from streamattn.hf import Stream, StreamingCache

IDS = torch.tensor([[1, 20, 300, 4000, 50, 6]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _hooks(model):
    return len(model._forward_pre_hooks) + len(model.base_model._forward_pre_hooks)


def test_open_cache_switches_the_model_and_close_puts_it_back(smollm2, fresh_model):
    before, impl, hooks = _logits(fresh_model), fresh_model.config._attn_implementation, _hooks(fresh_model)
    cache = StreamingCache(fresh_model, sa.SinkWindow(sinks=4, window=16))
    assert fresh_model.config._attn_implementation == "streamattn" and _hooks(fresh_model) == hooks + 2
    with pytest.raises(RuntimeError, match="StreamingCache"), torch.no_grad():
        fresh_model(IDS)  # a switched model needs a streaming cache
    cache.close()
    assert fresh_model.config._attn_implementation == impl and _hooks(fresh_model) == hooks
    assert torch.equal(_logits(fresh_model), before)
    out = fresh_model.generate(IDS, max_new_tokens=3, do_sample=False)  # plain generate works again
    assert out.shape == (1, IDS.shape[1] + 3)
    with pytest.raises(RuntimeError, match="closed"), torch.no_grad():
        fresh_model(IDS, past_key_values=cache, use_cache=True)
    cache.close()  # idempotent


def test_with_block_dropped_reference_and_shared_model(smollm2, fresh_model):
    impl = fresh_model.config._attn_implementation
    with StreamingCache(fresh_model) as cache, torch.no_grad():
        fresh_model(IDS, past_key_values=cache, use_cache=True)
        assert fresh_model.config._attn_implementation == "streamattn"
    assert fresh_model.config._attn_implementation == impl
    first, second = Stream(fresh_model), StreamingCache(fresh_model)
    del first
    gc.collect()
    assert fresh_model.config._attn_implementation == "streamattn"  # the second cache still uses it
    del second  # the last reference: put back at once (no cycle keeps a cache alive)
    assert fresh_model.config._attn_implementation == impl
    assert _hooks(fresh_model) == 0
