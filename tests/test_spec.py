"""Policy spec strings (`streamattn.parse_policy`): the grammar and its errors."""

from __future__ import annotations

import pytest

import streamattn as sa


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("sinks=4,window=1020", sa.SinkWindow(sinks=4, window=1020)),
        ("window=1020,sinks=4", sa.SinkWindow(sinks=4, window=1020)),
        (" sinks = 0 , window = 16 ", sa.SinkWindow(sinks=0, window=16)),
        ("window=1024", sa.SinkWindow(sinks=0, window=1024)),
        ("window=8,window=9", sa.SinkWindow(sinks=0, window=9)),  # the last one wins
        ("full", sa.Full()),
        (" Dense ", sa.Full()),
        ("sinks=4,window=64,budget=1024", sa.Compressed(4, 64, 1024, sa.scores.TOVA(), 64)),
        ("sinks=4,window=64,budget=512,score=h2o,every=32", sa.Compressed(4, 64, 512, sa.scores.H2O(), 32)),
        ("window=8,budget=100,score=KNorm", sa.Compressed(0, 8, 100, sa.scores.KeyNorm(), 64)),
        ("window=8,budget=100,score=snapkv", sa.Compressed(0, 8, 100, sa.scores.SnapKV(32, 7), 64)),
        ("window=8,budget=100,score=snapkv:16:5,every=16", sa.Compressed(0, 8, 100, sa.scores.SnapKV(16, 5), 16)),
        ("sinks=4,window=1020,block=128", sa.Retrieval(4, 1020, 128, 4)),
        ("sinks=4,window=1020,block=128,topk=2,every=64", sa.Retrieval(4, 1020, 128, 2, every=64)),
        ("window=16,block=4,max_blocks=8,every=8", sa.Retrieval(0, 16, 4, 4, 8, every=8)),
    ],
)
def test_specs(spec, want):
    assert sa.parse_policy(spec) == want


@pytest.mark.parametrize(
    "policy",
    [
        sa.Full(),
        sa.SinkWindow(4, 60),
        sa.SinkWindow(0, 7),
        sa.Compressed(4, 64, 960, sa.scores.SnapKV(16, 3), 64),
        sa.Compressed(0, 8, 100, sa.scores.H2O(), 4),
        sa.Compressed(2, 8, 100, sa.scores.KeyNorm(), 4),
        sa.Retrieval(4, 1020, 128, 4),
        sa.Retrieval(2, 60, 16, 2, 9, every=32, store="cpu"),
    ],
    ids=str,
)
def test_policy_spec_round_trips(policy):
    from streamattn.policies.spec import policy_spec

    assert sa.parse_policy(policy_spec(policy)) == policy


def test_round_trip_through_the_policy_name_fields():
    for policy in (sa.SinkWindow(sinks=4, window=60), sa.SinkWindow(sinks=0, window=7)):
        assert sa.parse_policy(f"sinks={policy.sinks},window={policy.window}") == policy


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sinks=4", "'window=W' is required"),
        ("", "expected 'sinks=S,window=W', 'window=W', 'sinks=S,window=W,budget=B"),
        ("window=", "expected"),
        ("window=1k", "expected"),
        ("window=--3", "expected"),
        ("window=²", "expected"),
        ("width=4", "expected"),
        ("Sinks=4,window=8", "expected"),  # names are lower case
        ("sinks=4;window=8", "expected"),
        ("sinks=4,window=0", "window must be >= 1"),  # the policy's own range check
        ("sinks=-1,window=8", "sinks must be >= 0"),
        ("window=8,score=tova", "needs 'budget=B'"),
        ("window=8,every=8", "needs 'budget=B'"),
        ("window=8,budget=100,score=lru", "expected one of knorm, tova"),
        ("window=8,budget=100,score=snapkv:x", "expected one of"),
        ("window=8,budget=100,score=qfilters", "needs a calibration profile"),
        ("heads=0.25|window=8|window=4", "needs a calibration profile"),
        ("heads=x|window=8|window=4", "heads must be a fraction"),
        ("heads=0.25|window=8", "expected 'heads=F|RETRIEVAL POLICY|STREAMING POLICY'"),
        ("sinks=4,window=64,budget=10", "budget must be >= 68"),
        ("window=8,budget=100,score=snapkv:128", "use every >= 128"),
        ("window=8,block=4,topk=2,max_blocks=2,every=4", "every > 1 needs max_blocks > topk"),
    ],
)
def test_bad_specs_are_value_errors_naming_the_forms(spec, message):
    with pytest.raises(ValueError) as info:
        sa.parse_policy(spec)
    assert message in str(info.value)


def test_non_string_is_a_type_error():
    with pytest.raises(TypeError, match="policy spec is a str"):
        sa.parse_policy(4)
