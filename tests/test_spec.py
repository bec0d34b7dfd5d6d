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
    ],
)
def test_specs(spec, want):
    assert sa.parse_policy(spec) == want


def test_round_trip_through_the_policy_name_fields():
    for policy in (sa.SinkWindow(sinks=4, window=60), sa.SinkWindow(sinks=0, window=7)):
        assert sa.parse_policy(f"sinks={policy.sinks},window={policy.window}") == policy


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sinks=4", "'window=W' is required"),
        ("", "expected 'sinks=S,window=W', 'window=W' or 'full'"),
        ("window=", "expected"),
        ("window=1k", "expected"),
        ("window=--3", "expected"),
        ("window=²", "expected"),
        ("width=4", "expected"),
        ("Sinks=4,window=8", "expected"),  # names are lower case
        ("sinks=4;window=8", "expected"),
        ("sinks=4,window=0", "window must be >= 1"),  # the policy's own range check
        ("sinks=-1,window=8", "sinks must be >= 0"),
    ],
)
def test_bad_specs_are_value_errors_naming_the_forms(spec, message):
    with pytest.raises(ValueError) as info:
        sa.parse_policy(spec)
    assert message in str(info.value)


def test_non_string_is_a_type_error():
    with pytest.raises(TypeError, match="policy spec is a str"):
        sa.parse_policy(4)
