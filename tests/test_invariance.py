"""Streaming == offline == token by token, and training masks that stream with the same outputs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import streamattn as sa
from streamattn import reference
from tests.conftest import POLICIES, chunk_sizes, make_qkv, max_err, stream

D = 16


def offline_absolute(q, k, v, policy, rope):
    """What a model trained with the dense mask computes: RoPE at absolute index + masked SDPA."""
    t = q.shape[2]
    pos = torch.arange(t)
    mask = sa.masks.dense_mask(policy, t)
    return F.scaled_dot_product_attention(rope.rotate(q, pos), rope.rotate(k, pos), v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("policy", POLICIES)
def test_any_chunking_equals_token_by_token_equals_offline(policy):
    rope = sa.RoPE(D, 10000.0)
    q, k, v = make_qkv(2, 6, 2, 120, D, torch.float64, seed=5)
    offline = offline_absolute(q, k, v, policy, rope)
    by_token = stream(sa.StreamingAttention(policy, rope, "absolute"), q, k, v, [1] * 120)
    assert max_err(by_token, offline) < 1e-12
    for spec in (3, 7, 64, 120, "random"):
        chunked = stream(sa.StreamingAttention(policy, rope, "absolute"), q, k, v, chunk_sizes(spec, 120, seed=9))
        assert max_err(chunked, by_token) < 1e-12, spec


@pytest.mark.parametrize("policy", POLICIES)
def test_dense_mask_is_the_policy(policy):
    mask = sa.masks.dense_mask(policy, 10, 30, q_offset=20)
    for i in range(10):
        for j in range(30):
            assert bool(mask[i, j]) == reference.is_visible(policy, 20 + i, j)


def test_named_mask_factories():
    mod = sa.masks.generate_sink_window(4, 16)
    assert mod.__name__ == "sink4_window16"
    assert sa.masks.generate_sliding_window(8).__name__ == "sink0_window8"
    q_idx, kv_idx = torch.arange(40)[:, None], torch.arange(40)[None, :]
    b = h = torch.tensor(0)
    assert torch.equal(mod(b, h, q_idx, kv_idx), sa.masks.dense_mask(sa.SinkWindow(4, 16), 40))


@pytest.mark.parametrize("policy", [sa.SinkWindow(sinks=4, window=16), sa.SinkWindow(sinks=0, window=24)], ids=str)
def test_flex_attention_trained_model_streams_identically(policy):
    """A model trained with the FlexAttention mask gets the same outputs streaming (absolute mode)."""
    from torch.nn.attention.flex_attention import flex_attention

    rope = sa.RoPE(D, 10000.0)
    q, k, v = make_qkv(1, 4, 4, 256, D, torch.float64, seed=6)
    pos = torch.arange(256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is not compiled
        trained = flex_attention(
            rope.rotate(q, pos), rope.rotate(k, pos), v, block_mask=sa.masks.block_mask(policy, 256, block_size=64)
        )
    streamed = stream(sa.StreamingAttention(policy, rope, "absolute"), q, k, v, chunk_sizes("random", 256))
    assert max_err(streamed, trained) < 1e-12


@settings(max_examples=60, deadline=None)
@given(
    sinks=st.integers(0, 4),
    window=st.integers(1, 12),
    full=st.booleans(),
    positions=st.sampled_from(["cache", "absolute"]),
    use_rope=st.booleans(),
    heads=st.sampled_from([(1, 1), (2, 1), (6, 3), (4, 2)]),
    b=st.integers(1, 3),
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=8),
)
def test_property_random_policies_and_chunkings(sinks, window, full, positions, use_rope, heads, b, sizes):
    policy = sa.Full() if full else sa.SinkWindow(sinks=sinks, window=window)
    rope = sa.RoPE(8, 100.0) if use_rope else None
    total = sum(sizes)
    q, k, v = make_qkv(b, *heads, total, 8, torch.float64, seed=total)
    out = stream(sa.StreamingAttention(policy, rope, positions), q, k, v, sizes)
    want = reference.attention(q, k, v, policy, rope=rope, positions=positions)
    assert max_err(out, want) < 1e-10
