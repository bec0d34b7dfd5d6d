"""`streamattn recall`: the pure parts, the snapshot trick against feeding from scratch, a tiny CLI run."""

from __future__ import annotations

import csv

import pytest
import torch

import streamattn as sa
import streamattn.eval.recall as recall
from streamattn.cli import main
from streamattn.eval import read_text
from streamattn.eval.recall import (
    RecallConfig,
    Trial,
    check_haystack,
    context_ids,
    encode_trial,
    first_word,
    make_trials,
    parse_distance,
    parse_distances,
    rank_of_answer,
)

# ---------------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("text", "tokens"), [("256", 256), (" 1K", 1024), ("4k", 4096), ("64K", 65536), ("1M", 2**20), ("3000", 3000)]
)
def test_parse_distance(text, tokens):
    assert parse_distance(text) == tokens


@pytest.mark.parametrize("text", ["0", "-5", "1.5K", "K", "", "abc", "0K", "4G"])
def test_parse_distance_refuses(text):
    with pytest.raises(ValueError, match="bad distance"):
        parse_distance(text)


def test_parse_distances_sorted_unique():
    assert parse_distances("4K,256,1K,256") == (256, 1024, 4096)
    with pytest.raises(ValueError, match="at least one"):
        parse_distances(" , ")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trials": 0}, "trials must be an int >= 1"),
        ({"candidates": 1}, "candidates must be an int >= 2"),
        ({"candidates": 1000}, "candidates must be <="),
        ({"prefix": 0}, "prefix must be an int >= 1"),
        ({"distances": ()}, "distances must be positive"),
        ({"distances": (64, 32)}, "increasing"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecallConfig(**kwargs)


def test_trials_are_seeded_and_fair():
    config = RecallConfig(distances=(8,), trials=50, candidates=7, seed=3)
    trials = make_trials(config)
    assert trials == make_trials(config)  # same seed, same trials
    assert trials != make_trials(RecallConfig(distances=(8,), trials=50, candidates=7, seed=4))
    for t in trials:
        assert len(t.candidates) == 7 and len(set(t.candidates)) == 7
        assert t.candidates.count(t.word) == 1
    # the answer is not always in the same slot (else position alone would give it away)
    assert len({t.candidates.index(t.word) for t in trials}) > 3


def test_rank_counts_ties_against_the_answer():
    assert rank_of_answer([-1.0, -2.0, -3.0], 0) == 1
    assert rank_of_answer([-1.0, -2.0, -3.0], 2) == 3
    assert rank_of_answer([-2.0, -2.0], 1) == 2  # a flat distribution is not a recall


def test_first_word():
    assert first_word(" Apple. The magic") == "apple"
    assert first_word('\n"window," he said') == "window"
    assert first_word("  ...  ") == ""


def test_check_haystack_says_what_it_has_and_needs():
    config = RecallConfig(distances=(256, 4096), prefix=1000)
    check_haystack(5096, config)
    with pytest.raises(ValueError, match=r"has 5,095 tokens.*need 5,096"):
        check_haystack(5095, config)


def test_the_needle_ends_exactly_d_tokens_before_the_question(smollm2):
    tokenizer = smollm2[1]
    config = RecallConfig(distances=(16,), trials=1, candidates=4, prefix=10)
    trial = make_trials(config)[0]
    tokens = encode_trial(tokenizer, trial)
    haystack = torch.arange(1000, 1100)
    for d in (1, 16, 50):
        ids = context_ids(haystack, 10, tokens, d)
        n = tokens.needle.numel()
        assert torch.equal(ids[:10], haystack[:10])
        assert torch.equal(ids[10 : 10 + n], tokens.needle)
        assert torch.equal(ids[10 + n : 10 + n + d], haystack[10 : 10 + d])  # d tokens, continuing the prefix
        assert torch.equal(ids[10 + n + d :], tokens.question)
    assert tokenizer.decode(tokens.needle) == f" The magic word of {trial.name} is {trial.word}."
    assert tokenizer.decode(tokens.question).endswith(f"The magic word of {trial.name} is")
    assert [tokenizer.decode(c) for c in tokens.candidates] == [" " + w for w in trial.candidates]


# ------------------------------------------------- the speed trick == feeding each question from scratch


@pytest.mark.parametrize("policy", [sa.SinkWindow(sinks=4, window=16), sa.Full()], ids=["sink4_window16", "full"])
def test_snapshots_equal_feeding_each_question_from_scratch(smollm2, fresh_model, policy):
    """One pass with snapshots (shared prefix, restored per question) gives the log-probs and greedy
    text of a fresh stream fed ``prefix | needle | d tokens | question`` whole, at every distance.

    The window evicts the needle by the second distance; a multi-token candidate takes the
    snapshot-per-candidate path. The check is sensitive: the same question asked one token later
    scores differently by far more than the tolerance (asserted too).
    """
    from streamattn.hf import Stream

    tokenizer = smollm2[1]
    haystack = torch.tensor(tokenizer(read_text()[:1000], add_special_tokens=False).input_ids[:80], dtype=torch.long)
    prefix, distances = 24, (4, 30)
    trial = Trial(0, "Anna", "kettle", ("xylophone", "kettle", "apple"))  # 2, 1 and 1 tokens
    tokens = encode_trial(tokenizer, trial)
    assert [c.numel() for c in tokens.candidates] == [2, 1, 1]

    stream = Stream(fresh_model, tokenizer, policy, chunk_size=16)  # the question takes two calls
    stream.feed(haystack[:prefix], scores=False)
    rows = recall.run_trial(stream, stream.state_dict(), haystack, prefix, trial, tokens, distances, "p")
    assert [r.distance for r in rows] == list(distances)

    def scratch(distance: int, generate: bool) -> tuple[list[float], str]:
        context = context_ids(haystack, prefix, tokens, distance)
        batch = Stream(fresh_model, tokenizer, policy, chunk_size=256)  # one call: batched, ragged
        scores = batch.feed([torch.cat([context, c]) for c in tokens.candidates])
        logprobs = [float(s[-c.numel() :].sum()) for s, c in zip(scores, tokens.candidates, strict=True)]
        if not generate:
            return logprobs, ""
        single = Stream(fresh_model, tokenizer, policy, chunk_size=256)
        single.feed(context, scores=False)
        return logprobs, "".join(single.generate(tokens.gen_tokens, 0.0))

    for row in rows:
        last = row is rows[-1]  # greedy text compared once: after a question was asked and undone
        want, generated = scratch(row.distance, generate=last)
        torch.testing.assert_close(torch.tensor(row.logprobs), torch.tensor(want), atol=5e-4, rtol=0)
        assert row.rank == rank_of_answer(want, 1)
        if last:
            assert row.generated == generated
    # sensitivity: one token later (the haystack continued by one), the scores move a lot
    later, _ = scratch(distances[0] + 1, generate=False)
    assert (torch.tensor(later) - torch.tensor(rows[0].logprobs)).abs().max() > 2e-2


# --------------------------------------------------------------------------------------- the CLI


def test_recall_command_writes_csv_plot_and_summary(smollm2, model_cache, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STREAMATTN_CACHE", str(model_cache))
    # pretend the model was trained on 200 positions: full attention's question at d=128 (~225
    # positions) is then beyond it and reported n/a, while the window's positions stay below 64
    monkeypatch.setattr(recall, "trained_length", lambda model: 200)
    monkeypatch.setattr("streamattn.cli.recall.trained_length", lambda model: 200)
    out = tmp_path / "recall"
    args = ["recall", "--distances", "32,128", "--trials", "2", "--prefix", "64", "--policy", "sinks=4,window=60"]
    assert main([*args, "--compare", "full", "--out", str(out)]) == 0
    with (out / "recall.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(recall.CSV_FIELDS)
    asked = sorted((r["policy"], int(r["distance"]), int(r["trial"])) for r in rows)
    window = [("sinks=4,window=60", d, t) for d in (32, 128) for t in (0, 1)]
    assert asked == sorted([("full", 32, 0), ("full", 32, 1), *window])
    trials = make_trials(RecallConfig(distances=(32, 128), trials=2, prefix=64))
    for r in rows:
        trial = trials[int(r["trial"])]
        assert (r["name"], r["word"]) == (trial.name, trial.word)
        assert 1 <= int(r["rank"]) <= 10 and (r["correct_rank"] == "True") == (r["rank"] == "1")
        assert float(r["seconds"]) > 0 and int(r["tokens"]) > 0
    kv = {r["policy"]: int(r["kv_bytes"]) for r in rows}
    assert kv["sinks=4,window=60"] == 30 * 2 * 3 * 64 * 64 * 4 + 30 * 3 * 4 * 64 * 4  # k, v [1, 3, 64, 64]; sinks
    assert (out / "recall.png").stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "| policy | KV bytes | 32 | 128 |" in summary
    assert "| full | " in summary and "| n/a |" in summary and "trained length (200 tokens" in summary
    printed = capsys.readouterr().out
    assert "recall: rank-acc exact-acc (n)" in printed and "tok/s" in printed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--distances", "0"], "bad distance '0'"),
        (["--distances", "1.5K"], "bad distance '1.5K'"),
        (["--trials", "0"], "trials must be an int >= 1"),
        (["--candidates", "1"], "candidates must be an int >= 2"),
        (["--prefix", "0"], "prefix must be an int >= 1"),
        (["--policy", "sinks=4"], "window=W"),
        (["--compare", "window=8;window=8"], "a policy is given twice"),
        (["--haystack", "/no/such/file.txt"], "cannot read"),
        (["--haystack", "SHORT", "--distances", "64"], "at most 13 tokens"),
    ],
)
def test_recall_command_bad_arguments(args, message, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("A short text.")
    args = [str(short) if a == "SHORT" else a for a in args]
    assert main(["recall", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamattn recall: error:") and message in err and err.count("\n") == 1
