"""`streamattn stream`: a short real run writes its CSV and plot; bad arguments are one clear line."""

from __future__ import annotations

import csv
import math

import pytest

from streamattn.cli import main
from streamattn.eval import segment_stats


def test_stream_command_runs_and_writes_results(smollm2, model_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAMATTN_CACHE", str(model_cache))
    out = tmp_path / "run"
    args = ["stream", "--max-tokens", "300", "--policy", "sinks=4,window=60", "--compare", "window,dense,recompute"]
    assert main([*args, "--recompute-tokens", "3", "--chunk", "64", "--segment", "100", "--out", str(out)]) == 0
    with (out / "tokens.csv").open() as f:
        rows = list(csv.DictReader(f))
    by_policy = {}
    for row in rows:
        by_policy.setdefault(row["policy"], []).append(row)
    assert sorted(by_policy) == ["dense (full)", "recompute (window 64)", "sinks 4 + window 60", "window only"]
    assert len(by_policy["sinks 4 + window 60"]) == 300 and len(by_policy["recompute (window 64)"]) == 3
    recompute = by_policy["recompute (window 64)"]
    assert [int(r["position"]) for r in recompute] == [64, 65, 66]  # each with a full window of context
    assert all(int(r["cache_keys"]) == 64 for r in recompute)
    assert math.isnan(float(by_policy["dense (full)"][0]["nll"]))  # the stream's first token has no context
    assert int(by_policy["sinks 4 + window 60"][-1]["cache_keys"]) == 64
    assert int(by_policy["dense (full)"][-1]["cache_keys"]) == 300
    assert (out / "stream.png").stat().st_size > 10_000
    assert "stream summary" in capsys.readouterr().out


def test_stream_command_takes_a_compressed_policy(smollm2, model_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMATTN_CACHE", str(model_cache))
    out = tmp_path / "run"
    policy = "sinks=4,window=8,budget=24,score=h2o,every=8"
    assert main(["stream", "--max-tokens", "100", "--policy", policy, "--chunk", "32", "--out", str(out)]) == 0
    with (out / "tokens.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["policy"] for r in rows} == {policy} and len(rows) == 100
    assert int(rows[-1]["cache_keys"]) == 24 + 100 % 8  # budget + tokens since the last eviction point


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "sinks=4"], "window=W"),
        (["--policy", "window=8,budget=64,score=qfilters"], "needs a calibration profile"),
        (["--policy", "window=8,budget=64,score=qfilters", "--profile", "/no/such.json"], "cannot read the profile"),
        (["--policy", "heads=0.2|window=8,budget=64|window=8"], "needs a calibration profile"),
        (["--policy", "sinks=4,window=0"], "window must be >= 1"),
        (["--compare", "bogus"], "unknown --compare"),
        (["/no/such/file.txt"], "cannot read"),
        (["--model", "gpt-17"], "never downloaded"),
        (["--chunk", "0"], "--chunk must be >= 1"),
    ],
)
def test_stream_command_bad_arguments(args, message, capsys):
    assert main(["stream", *args]) == 2
    assert message in capsys.readouterr().err


def test_segment_stats():
    positions, nll = [0, 1, 2, 3, 4], [float("nan"), 1.0, 3.0, 2.0, 2.0]
    stats = segment_stats(positions, nll, [9.0, 1.0, 1.0, 2.0, 2.0], [5.0, 6.0, 7.0, 8.0, 1.0], size=2)
    assert list(stats) == [0, 2, 4]  # the unscored first token is left out, not its segment's neighbour
    assert stats[0] == (math.exp(1.0), 1000.0, 6.0)
    assert stats[2] == (math.exp(2.5), 2000.0 / 3.0, 8.0)
    assert stats[4] == (math.exp(2.0), 500.0, 1.0)
