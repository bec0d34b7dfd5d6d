"""Retrieval on a real model (SmolLM2), with small blocks and window so that blocks enter memory.

In float64, as for Compressed: retrieval compares relevances, and in float32 the model's own
projections round differently with the chunk shape (so two near-equal relevances may swap).
"""

from __future__ import annotations

import pytest
import torch

import streamattn as sa
from streamattn.hf import Stream, StreamingCache

TOL = 1e-5  # fp64 model; Stream returns log-probs as float32

RETRIEVAL = sa.Retrieval(sinks=4, window=8, block=4, topk=2)
BOUNDED = sa.Retrieval(sinks=4, window=8, block=4, topk=2, max_blocks=3)
QUERY_BLOCKS = sa.Retrieval(sinks=4, window=8, block=4, topk=2, max_blocks=3, every=6)


@pytest.fixture
def model64(fresh_model):
    return fresh_model.double()


@pytest.mark.parametrize(
    ("policy", "sizes"),
    [(RETRIEVAL, (1, 7, 60)), (BOUNDED, (5, 60)), (QUERY_BLOCKS, (1, 13, 60))],
    ids=["all", "max3", "every6"],
)
def test_any_chunking_equals_token_by_token(model64, emma_ids, policy, sizes):
    ids = emma_ids[:60]  # blocks enter at 15, 19, ..., 59: 12 blocks, 3 kept when bounded
    first, *others = (Stream(model64, policy=policy, chunk_size=size) for size in sizes)
    want = first.feed(ids)
    for size, stream in zip(sizes[1:], others, strict=True):
        assert (stream.feed(ids)[1:] - want[1:]).abs().max().item() < TOL, size
    held = policy.blocks_in_memory(59) if policy.max_blocks is None else policy.max_blocks
    assert first.cache.layers[0].attn.cached == [4 + 12 + held * 4]


def test_retrieval_is_not_sinks_and_window(fresh_model, emma_ids):
    """Past the first entry the retrieved blocks change the model's predictions."""
    ids = emma_ids[:60]
    ours = Stream(fresh_model, policy=RETRIEVAL, chunk_size=16).feed(ids)
    plain = Stream(fresh_model, policy=sa.SinkWindow(4, 8), chunk_size=16).feed(ids)
    assert (ours[1:16] - plain[1:16]).abs().max().item() < 1e-4  # no block in memory before index 15
    assert (ours[16:] - plain[16:]).abs().max().item() > 1e-2


def test_batched_streams_equal_each_stream_alone(model64, emma_ids):
    texts = [emma_ids[:50], emma_ids[100:133], emma_ids[200:241]]
    alone = [Stream(model64, policy=RETRIEVAL, chunk_size=16).feed(x) for x in texts]
    batch = Stream(model64, policy=RETRIEVAL, chunk_size=16)
    first = batch.feed([texts[0][:30], texts[1][:5], torch.tensor([], dtype=torch.long)])
    second = batch.feed([texts[0][30:], texts[1][5:], texts[2]])
    got = [torch.cat((first[0], second[0])), torch.cat((first[1], second[1])), second[2]]
    for mine, want in zip(got, alone, strict=True):
        assert (mine[1:] - want[1:]).abs().max().item() < TOL


def test_state_round_trip_includes_the_memory(fresh_model, emma_ids):
    a = Stream(fresh_model, policy=BOUNDED, chunk_size=16)
    a.feed(emma_ids[:50])
    b = Stream(fresh_model, policy=BOUNDED, chunk_size=16)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.feed(emma_ids[50:90]), b.feed(emma_ids[50:90]))
    other = Stream(fresh_model, policy=RETRIEVAL)
    with pytest.raises(ValueError, match="another configuration"):
        other.load_state_dict(a.state_dict())


def test_cache_takes_the_policy(fresh_model, emma_ids):
    with torch.no_grad(), StreamingCache(fresh_model, RETRIEVAL) as cache:
        out = fresh_model(input_ids=emma_ids[None, :40], past_key_values=cache, use_cache=True)
        assert out.logits.shape[1] == 40
        assert cache.layers[0].attn.seen == [40]
