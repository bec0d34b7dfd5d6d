"""Compressed and PerHead on a real model (SmolLM2), with a small budget so that eviction happens.

In float64: eviction decisions compare scores, and in float32 the model's own projections round
differently with the chunk shape, so two near-equal scores can swap (measured: K-norm at chunk 7
moved a log-prob by 1e-2 in fp32). In float64 every chunking takes the same decisions, so chunk
invariance and batched == alone are checked exactly there.
"""

from __future__ import annotations

import json

import pytest
import torch

import streamattn as sa
from streamattn.hf import Stream, StreamingCache

TOL = 1e-5  # fp64 model; Stream returns log-probs as float32 (a flipped decision moves them by ~1e-2)

SNAPKV = sa.Compressed(sinks=4, window=8, budget=16, score=sa.scores.SnapKV(window=8, kernel=3), every=8)
KNORM = sa.Compressed(sinks=4, window=8, budget=16, score=sa.scores.KeyNorm(), every=8)


@pytest.fixture
def model64(fresh_model):
    return fresh_model.double()


@pytest.mark.parametrize(("policy", "sizes"), [(SNAPKV, (1, 7, 44)), (KNORM, (5, 44))], ids=["snapkv", "knorm"])
def test_any_chunking_equals_token_by_token(model64, emma_ids, policy, sizes):
    ids = emma_ids[:44]  # eviction points at 24, 32, 40 tokens
    first, *others = (Stream(model64, policy=policy, chunk_size=size) for size in sizes)
    want = first.feed(ids)
    for size, stream in zip(sizes[1:], others, strict=True):
        assert (stream.feed(ids)[1:] - want[1:]).abs().max().item() < TOL, size
    assert first.cache.layers[0].attn.cached == [policy.held(44)] == [16 + 44 % 8]


def _per_head(layers: int) -> sa.PerLayer:
    streaming = sa.SinkWindow(sinks=4, window=12)
    heads = [sa.PerHead.split(3, [layer % 3], SNAPKV, streaming) for layer in range(layers)]
    return sa.PerLayer(tuple(heads), label="test per-head")


@pytest.mark.parametrize("which", ["compressed", "per_head"])
def test_batched_streams_equal_each_stream_alone(model64, emma_ids, which):
    policy = SNAPKV if which == "compressed" else _per_head(model64.config.num_hidden_layers)
    texts = [emma_ids[:50], emma_ids[100:133], emma_ids[200:241]]
    alone = [Stream(model64, policy=policy, chunk_size=16).feed(x) for x in texts]
    batch = Stream(model64, policy=policy, chunk_size=16)
    first = batch.feed([texts[0][:30], texts[1][:5], torch.tensor([], dtype=torch.long)])
    second = batch.feed([texts[0][30:], texts[1][5:], texts[2]])
    got = [torch.cat((first[0], second[0])), torch.cat((first[1], second[1])), second[2]]
    for mine, want in zip(got, alone, strict=True):
        assert (mine[1:] - want[1:]).abs().max().item() < TOL


def test_state_round_trip_continues_bitwise(smollm2, fresh_model, emma_ids):
    policy = sa.Compressed(sinks=4, window=8, budget=24, score=sa.scores.TOVA(), every=8)
    a = Stream(fresh_model, policy=policy, chunk_size=16)
    a.feed(emma_ids[:50])
    b = Stream(fresh_model, policy=policy, chunk_size=16)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.feed(emma_ids[50:90]), b.feed(emma_ids[50:90]))
    other = Stream(fresh_model, policy=sa.SinkWindow(4, 28))
    with pytest.raises(ValueError, match="another configuration"):
        other.load_state_dict(a.state_dict())


def test_per_layer_of_the_wrong_length_is_refused(fresh_model):
    with pytest.raises(ValueError, match="has 2 layers; the model has 30"):
        StreamingCache(fresh_model, sa.PerLayer((SNAPKV, KNORM)))


def test_calibrate_writes_a_profile_that_builds_policies(smollm2, emma_ids, tmp_path):
    from streamattn.hf.calibrate import calibrate
    from streamattn.policies.profile import load_profile

    model, tokenizer = smollm2
    profile = calibrate(model, tokenizer, emma_ids, trials=1, distance=48, prefix=16, qfilter_tokens=64)
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    profile = load_profile(path)
    assert (profile["layers"], profile["kv_heads"], profile["head_dim"]) == (30, 3, 64)
    assert all(0.0 <= x <= 1.0 for row in profile["retrieval"] for x in row)
    assert max(max(row) for row in profile["retrieval"]) > 0.05  # some head does look at the needle
    for layer in profile["qfilters"]:
        assert all(abs(sum(x * x for x in f) - 1.0) < 1e-9 for f in layer)  # unit directions
    per_head = sa.parse_policy("heads=0.1|sinks=4,window=8,budget=24,score=h2o,every=8|sinks=4,window=12", path)
    assert sum(isinstance(p, sa.PerHead) for p in per_head.layers) >= 1
    qfilters = sa.parse_policy("sinks=4,window=8,budget=24,score=qfilters,every=8", path)
    for policy in (per_head, qfilters):
        stream = Stream(model, tokenizer, policy, chunk_size=16)
        logprobs = stream.feed(emma_ids[:60])
        assert torch.isfinite(logprobs[1:]).all() and stream.cache.cached() == [24 + 60 % 8]  # PerHead: the larger
        stream.close()


def test_generated_tokens_are_appended_like_fed_ones(model64, smollm2, emma_ids):
    """generate() under eviction: the stream it leaves == the same tokens fed in chunks of 7."""
    tokenizer = smollm2[1]
    prompt = emma_ids[:30]  # eviction points at 24, 32, 40 while generating
    talker = Stream(model64, tokenizer, SNAPKV)
    talker.feed(prompt)
    list(talker.generate(max_new_tokens=12, temperature=0.0))
    reader = Stream(model64, tokenizer, SNAPKV, chunk_size=7)
    reader.feed(torch.cat((prompt, torch.tensor(talker.last_generated))))
    assert talker.seen == reader.seen == 42
    assert (talker.next_logprobs - reader.next_logprobs).abs().max().item() < TOL
