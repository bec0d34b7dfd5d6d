"""Streaming recall: can a stream still retrieve a fact stated ``d`` tokens ago?

A *trial* hides a needle sentence, ``" The magic word of <name> is <word>."``, in a long
public-domain text (the haystack), lets ``d`` haystack tokens go by, then asks
``"What is the magic word of <name>? The magic word of <name> is"``. Names and words are
drawn (seeded) from the fixed lists below; each trial has ``K`` candidate words, the answer among
them exactly once (chance = 1/K). Two metrics per question:

- **rank**: the candidates are ranked by the total log-probability of their continuation
  (the tokens of ``" <word>"``) after the question; correct when the answer ranks first (ties
  count against it);
- **exact**: a few greedy tokens after the question; correct when the first word of the generated
  text (stripped, lowercased, punctuation removed) is the answer.

Layout of one question at distance ``d`` (token ids, built in token space so distances are exact)::

    prefix (P haystack tokens) | needle | d haystack tokens | question | candidate / greedy tokens

``d`` counts the tokens between the *end* of the needle and the *start* of the question.

**How it is fast.** Everything before the needle is the same for all trials of a policy: it is
fed once and saved (``Stream.state_dict``). A trial restores it, feeds its needle and then the
haystack that follows the prefix, and at each distance ``d`` (in increasing order) it saves the
stream, asks the question (each multi-token candidate scored from a restored snapshot of the
question; greedy generation too), restores the saved stream and feeds on to the next distance.
One pass per trial covers every distance (cost ~ the largest distance per trial, not the sum).
This is exact because every question is asked on a restored snapshot: the question, the
candidates and the generated tokens never enter the stream that continues, so the stream at
distance ``d`` is token for token the stream of ``prefix | needle | d tokens`` fed from scratch
(tested against that, ``tests/hf/test_recall.py``). Unscored feeds (``feed(..., scores=False)``)
run the output head only on the last token of each model call.

Full attention is only meaningful within the model's trained length: a question whose tokens
would need positions beyond ``max_position_embeddings`` (only possible when the policy keeps more
keys than that, e.g. ``Full``) is not asked; its distance is reported as n/a.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

import streamattn as sa

# common English first names and concrete nouns; each is one token after a space for SmolLM2's
# tokenizer (multi-token words work too: a candidate is scored by the sum over its tokens)
_NAMES = (
    "Alice Anna Ben Charles Daniel David Edward Emily George Grace Harry Henry Jack James John Kate Laura "
    "Lucy Mary Michael Paul Peter Robert Sarah Thomas William Oliver Sophie Rose Tom"
)
_WORDS = (
    "apple table chair river mountain garden window pencil bottle hammer candle basket button carpet castle "
    "cloud coin crown desk door drum egg feather flower glove guitar hat horse island jacket kettle key ladder "
    "lamp lemon mirror needle orange piano pillow rabbit ring rope shell ship shoe spoon star stone sugar "
    "sword tiger tower train tree umbrella violin wagon whale wheel"
)
NAMES, WORDS = tuple(_NAMES.split()), tuple(_WORDS.split())
NEEDLE = " The magic word of {name} is {word}."
QUESTION = "\n\nWhat is the magic word of {name}? The magic word of {name} is"

_SUFFIX = {"K": 1024, "M": 1024**2}


def parse_distance(text: str) -> int:
    """``"256"`` -> 256, ``"1K"`` -> 1024, ``"64K"`` -> 65536, ``"1M"`` -> 1048576 (binary suffixes)."""
    s = str(text).strip().upper()
    scale = _SUFFIX.get(s[-1:], 1)
    digits = s[:-1] if scale > 1 else s
    if not digits.isdigit() or int(digits) * scale < 1:
        raise ValueError(f"bad distance {text!r}: expected a positive integer, optionally with K (1024) or M (1024^2)")
    return int(digits) * scale


def parse_distances(spec: str) -> tuple[int, ...]:
    """``"256,1K,4K"`` -> ``(256, 1024, 4096)``: sorted, duplicates dropped."""
    parts = [p for p in str(spec).split(",") if p.strip()]
    if not parts:
        raise ValueError(f"bad distances {spec!r}: give at least one, e.g. '256,1K,4K'")
    return tuple(sorted({parse_distance(p) for p in parts}))


def format_distance(d: int) -> str:
    """The inverse of ``parse_distance`` for display: 1024 -> ``"1K"``, 300 -> ``"300"``."""
    for suffix, scale in (("M", 1024**2), ("K", 1024)):
        if d % scale == 0:
            return f"{d // scale}{suffix}"
    return str(d)


def policy_label(policy: sa.Policy) -> str:
    """A policy as the CLI spells it: ``"full"``, ``"window=1024"``, ``"sinks=4,window=1020"``, ..."""
    from streamattn.policies.spec import policy_spec

    return policy_spec(policy)


@dataclass(frozen=True)
class RecallConfig:
    """What to measure; validated on construction (``ValueError``), before any model is loaded."""

    distances: tuple[int, ...] = (256, 1024, 4096, 16384, 65536)
    trials: int = 10
    candidates: int = 10
    seed: int = 0
    prefix: int = 1000

    def __post_init__(self):
        for name, low in (("trials", 1), ("candidates", 2), ("prefix", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if self.candidates > len(WORDS):
            raise ValueError(f"candidates must be <= {len(WORDS)} (the words shipped), got {self.candidates}")
        if not self.distances or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in self.distances):
            raise ValueError(f"distances must be positive ints, got {self.distances!r}")
        if list(self.distances) != sorted(set(self.distances)):
            raise ValueError(f"distances must be increasing without repeats, got {self.distances!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @property
    def haystack_tokens(self) -> int:
        """Haystack tokens a trial reads: the prefix, then the largest distance after the needle."""
        return self.prefix + self.distances[-1]


def check_haystack(n_tokens: int, config: RecallConfig, what: str = "the haystack", at_most: bool = False) -> None:
    """``ValueError`` unless ``n_tokens`` cover the prefix and the largest distance.

    ``at_most``: ``n_tokens`` is only an upper bound (e.g. the text's byte count, checked before a
    tokenizer is loaded).
    """
    if n_tokens < config.haystack_tokens:
        has = f"at most {n_tokens:,} tokens (its bytes)" if at_most else f"{n_tokens:,} tokens"
        raise ValueError(
            f"{what} has {has}; --prefix {config.prefix:,} + the largest distance "
            f"{config.distances[-1]:,} need {config.haystack_tokens:,}: use a longer text or smaller distances"
        )


@dataclass(frozen=True)
class Trial:
    index: int
    name: str
    word: str
    candidates: tuple[str, ...]  # K distinct words, ``word`` among them once


def make_trials(config: RecallConfig) -> list[Trial]:
    """The trials of a run: the same for every policy, a function of ``config.seed`` only."""
    rng = random.Random(config.seed)
    trials = []
    for i in range(config.trials):
        name = rng.choice(NAMES)
        candidates = tuple(rng.sample(WORDS, config.candidates))  # distinct, in random order
        trials.append(Trial(i, name, candidates[rng.randrange(config.candidates)], candidates))
    return trials


@dataclass(frozen=True)
class TrialTokens:
    """A trial's text pieces as token ids (1-D int64)."""

    needle: torch.Tensor
    question: torch.Tensor
    candidates: tuple[torch.Tensor, ...]  # " <word>" per candidate, in ``Trial.candidates`` order

    @property
    def gen_tokens(self) -> int:
        """Greedy tokens per question: the longest candidate, a line break the model may put first,
        and one more token to see where the word ends."""
        return max(c.numel() for c in self.candidates) + 2

    def span(self, distance: int, prefix: int) -> int:
        """Tokens (= positions) a question at ``distance`` uses, up to the last candidate/greedy token."""
        return prefix + self.needle.numel() + distance + self.question.numel() + self.gen_tokens


def encode_trial(tokenizer, trial: Trial) -> TrialTokens:
    def ids(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    return TrialTokens(
        ids(NEEDLE.format(name=trial.name, word=trial.word)),
        ids(QUESTION.format(name=trial.name)),
        tuple(ids(" " + w) for w in trial.candidates),
    )


def context_ids(haystack: torch.Tensor, prefix: int, tokens: TrialTokens, distance: int) -> torch.Tensor:
    """The whole text a question at ``distance`` is asked after: prefix | needle | distance tokens | question."""
    return torch.cat([haystack[:prefix], tokens.needle, haystack[prefix : prefix + distance], tokens.question])


def rank_of_answer(logprobs: Sequence[float], answer: int) -> int:
    """1 + the number of other candidates scoring at least as high as the answer (ties count against it)."""
    return 1 + sum(lp >= logprobs[answer] for i, lp in enumerate(logprobs) if i != answer)


def first_word(text: str) -> str:
    """``" Apple. The"`` -> ``"apple"``: stripped, lowercased, punctuation removed, first word."""
    words = re.sub(r"[^\w\s]", "", text.strip().lower()).split()
    return words[0] if words else ""


@dataclass
class Row:
    """One question: a trial at a distance under a policy."""

    policy: str
    distance: int
    trial: int
    name: str
    word: str
    rank: int
    correct_rank: bool
    exact: bool
    generated: str
    kv_bytes: int  # stream.cache.nbytes after the question (buffers allocated for the keys kept)
    seconds: float  # this step of the trial: feeding since the previous distance, asking, restoring
    tokens: int  # tokens through the model in this step (haystack, needle, question, candidates, greedy)
    logprobs: tuple[float, ...] = ()  # per candidate, in ``Trial.candidates`` order (not in the CSV)


CSV_FIELDS = tuple(f.name for f in fields(Row) if f.name != "logprobs")


@dataclass
class PolicyResult:
    label: str
    policy: sa.Policy
    rows: list[Row] = field(default_factory=list)
    skipped: tuple[int, ...] = ()  # distances not asked: beyond the model's trained length
    seconds: float = 0.0  # prefix included
    tokens: int = 0

    def cell(self, distance: int) -> tuple[float, float, int] | None:
        """(rank accuracy, exact accuracy, questions) at ``distance``; ``None`` when not asked."""
        rows = [r for r in self.rows if r.distance == distance]
        if not rows:
            return None
        return sum(r.correct_rank for r in rows) / len(rows), sum(r.exact for r in rows) / len(rows), len(rows)

    @property
    def kv_bytes(self) -> int:
        return max((r.kv_bytes for r in self.rows), default=0)


def trained_length(model) -> int | None:
    return getattr(model.config.get_text_config(), "max_position_embeddings", None)


def ask(stream, tokens: TrialTokens) -> tuple[list[float], str, int]:
    """Ask the trial's question on ``stream`` (which it changes: restore it afterwards).

    Returns (total log-prob of each candidate's tokens after the question, greedy text, tokens fed).
    A candidate's first token is read from the distribution after the question; a multi-token
    candidate is fed from a snapshot of the question (restored for each).
    """
    stream.feed(tokens.question, scores=False)
    after = stream.next_logprobs.float().cpu()  # [V]: the distribution after the question
    logprobs = [float(after[c[0]]) for c in tokens.candidates]
    fed = tokens.question.numel()
    longer = [i for i, c in enumerate(tokens.candidates) if c.numel() > 1]
    question = stream.state_dict() if longer else None
    for i in longer:
        stream.load_state_dict(question)
        logprobs[i] = float(stream.feed(tokens.candidates[i]).sum())  # its first score is after[c[0]]
        fed += tokens.candidates[i].numel()
    if question is not None:
        stream.load_state_dict(question)
    generated = "".join(stream.generate(tokens.gen_tokens, 0.0, stop_at_eos=True))
    return logprobs, generated, fed + len(stream.last_generated)


def run_trial(
    stream,
    prefix_state: dict,
    haystack: torch.Tensor,
    prefix: int,
    trial: Trial,
    tokens: TrialTokens,
    distances: Sequence[int],
    label: str,
) -> list[Row]:
    """One pass of a trial over increasing ``distances`` (see the module docstring); a row per distance."""
    rows = []
    start = time.perf_counter()
    stream.load_state_dict(prefix_state)
    stream.feed(tokens.needle, scores=False)
    fed, step_tokens = 0, tokens.needle.numel()
    for d in distances:
        if d > fed:
            stream.feed(haystack[prefix + fed : prefix + d], scores=False)
            step_tokens += d - fed
            fed = d
        here = stream.state_dict()
        logprobs, generated, asked = ask(stream, tokens)
        kv = stream.cache.nbytes
        stream.load_state_dict(here)
        answer = trial.candidates.index(trial.word)
        rank = rank_of_answer(logprobs, answer)
        now = time.perf_counter()
        rows.append(
            Row(
                policy=label,
                distance=d,
                trial=trial.index,
                name=trial.name,
                word=trial.word,
                rank=rank,
                correct_rank=rank == 1,
                exact=first_word(generated) == trial.word,
                generated=generated,
                kv_bytes=kv,
                seconds=now - start,
                tokens=step_tokens + asked,
                logprobs=tuple(logprobs),
            )
        )
        start, step_tokens = now, 0
    return rows


def run_recall(
    model,
    tokenizer,
    policies: Sequence[tuple[str, sa.Policy]],
    haystack: torch.Tensor,
    config: RecallConfig,
    on_row: Callable[[PolicyResult, Row], None] | None = None,
    chunk_size: int = 256,
) -> list[PolicyResult]:
    """Every trial of ``config`` under each policy; ``on_row`` is called after each question."""
    from streamattn.hf import Stream

    check_haystack(haystack.numel(), config)
    labels = [label for label, _ in policies]
    if len(set(labels)) != len(labels):
        raise ValueError(f"each policy may be measured once, got {labels}")
    trials = make_trials(config)
    encoded = [encode_trial(tokenizer, t) for t in trials]
    trained = trained_length(model)
    results = []
    for label, policy in policies:
        result = PolicyResult(label, policy)
        t0 = time.perf_counter()
        stream = Stream(model, tokenizer, policy, chunk_size=chunk_size)
        stream.feed(haystack[: config.prefix], scores=False)
        prefix_state = stream.state_dict()
        result.seconds, result.tokens = time.perf_counter() - t0, config.prefix
        skipped: set[int] = set()
        for trial, tokens in zip(trials, encoded, strict=True):
            usable = [d for d in config.distances if _fits(policy, tokens.span(d, config.prefix), trained)]
            skipped |= set(config.distances) - set(usable)
            if not usable:
                continue
            for row in run_trial(stream, prefix_state, haystack, config.prefix, trial, tokens, usable, label):
                result.rows.append(row)
                result.seconds += row.seconds
                result.tokens += row.tokens
                if on_row is not None:
                    on_row(result, row)
        result.skipped = tuple(sorted(skipped))
        results.append(result)
        del stream, prefix_state
    return results


def _fits(policy: sa.Policy, span: int, trained: int | None) -> bool:
    """Whether every position a question needs is within the trained length.

    With ``positions="cache"`` a bounded policy's positions stop at its capacity; ``Full`` uses
    one position per token.
    """
    if trained is None:
        return True
    return min(span, policy.capacity or span) <= trained


def summary_markdown(results: Sequence[PolicyResult], config: RecallConfig, trained: int | None) -> str:
    """A table: a row per policy (with its KV bytes), a column per distance, cells "rank exact (n)"."""
    head = ["policy", "KV bytes", *[format_distance(d) for d in config.distances]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(config.distances)) + "|"]
    for r in results:
        cells = []
        for d in config.distances:
            c = r.cell(d)
            cells.append("n/a" if c is None else f"{c[0]:.2f} {c[1]:.2f} ({c[2]})")
        lines.append("| " + " | ".join([r.label, format_bytes(r.kv_bytes), *cells]) + " |")
    chance = 1 / config.candidates
    notes = [
        "",
        f"Cells: rank accuracy (answer ranked first among {config.candidates} candidates by total log-prob; "
        f"chance {chance:.2f}), greedy exact-match accuracy, (questions). KV bytes: the most the stream's "
        "cache held at a question (buffers allocated; full attention grows them by doubling).",
    ]
    if any(r.skipped for r in results):
        notes.append(
            f"n/a: not asked, the question would need positions beyond the model's trained length "
            f"({trained:,} tokens, `max_position_embeddings`)."
        )
    throughput = ", ".join(f"{r.label}: {r.tokens / max(r.seconds, 1e-9):,.0f} tok/s" for r in results)
    notes.append(f"Prefix {config.prefix:,} tokens, seed {config.seed}. Throughput ({throughput}).")
    return "\n".join(lines + notes) + "\n"


def format_bytes(n: int) -> str:
    if n <= 0:
        return "-"
    unit = min(int(math.log(n, 1024)), 3)
    return f"{n / 1024**unit:.1f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def write_csv(path, results: Sequence[PolicyResult]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_FIELDS)
        for r in results:
            for row in r.rows:
                values = [getattr(row, name) for name in CSV_FIELDS]
                writer.writerow([f"{v:.3f}" if isinstance(v, float) else v for v in values])


def plot(path, results: Sequence[PolicyResult], config: RecallConfig) -> None:
    """Accuracy vs distance per policy (log x): rank metric and greedy exact match, chance 1/K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for r in results:
        asked = [d for d in config.distances if r.cell(d) is not None]
        for ax, column in zip(axes, (0, 1), strict=True):
            ax.plot(asked, [r.cell(d)[column] for d in asked], marker="o", label=r.label)
    titles = (f"rank accuracy (answer first of {config.candidates})", "greedy exact match")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(config.distances), [format_distance(d) for d in config.distances])
        ax.set_xlabel("distance: tokens between the needle and the question")
        ax.set_title(title)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].axhline(
        1 / config.candidates, color="gray", linestyle="--", linewidth=1, label=f"chance (1/{config.candidates})"
    )
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
