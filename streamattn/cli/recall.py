"""Streaming recall benchmark: can the stream still answer a question about a fact d tokens back?

Each trial hides "The magic word of <name> is <word>." in a haystack (default: the shipped
*Emma*; --haystack FILE), then asks "What is the magic word of <name>? ... is" after d tokens, for
each distance d. Two metrics: rank accuracy (the answer has the highest total log-prob among
--candidates K words; chance 1/K) and greedy exact match (the first generated word is the answer).

Fast and exact: the haystack before the needle (--prefix tokens) is fed once per policy and saved;
each trial restores it, feeds its needle and then the haystack, and at each distance saves the
stream, asks the question, restores, and feeds on. One pass per trial covers every distance (cost
~ the largest distance), and it is exact because each question is asked on a restored snapshot:
the question never enters the stream that continues.

Distances take K = 1024 and M = 1024^2 suffixes ("256,1K,4K" = 256, 1024, 4096 tokens between
the end of the needle and the start of the question). Policies: any `--policy` spec (sinks + window,
'full', compressed, retrieval); specs contain commas, so give each extra policy its own --compare flag (or separate them
with ';'). Full attention is asked only within the model's trained length (max_position_embeddings;
8192 for SmolLM2): beyond it the table says n/a. Writes recall.csv, recall.png and summary.md to
--out and prints the summary table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from streamattn.cli.common import POLICY_HELP, add_profile_arg, needs_hf
from streamattn.eval import read_text
from streamattn.eval.recall import (
    RecallConfig,
    check_haystack,
    format_bytes,
    format_distance,
    parse_distances,
    plot,
    policy_label,
    run_recall,
    summary_markdown,
    trained_length,
    write_csv,
)
from streamattn.policies.spec import parse_policy


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', a local HF model dir or a .gguf file")
    p.add_argument("--policy", default="sinks=4,window=1020", help=POLICY_HELP)
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="POLICY",
        help="another policy to measure; repeat the flag for each (specs contain commas): "
        "--compare window=1024 --compare full (or one flag: --compare 'window=1024;full')",
    )
    p.add_argument(
        "--distances",
        default="256,1K,4K,16K,64K",
        help="comma-separated tokens between needle and question; K = 1024, M = 1024^2 (default: %(default)s)",
    )
    add_profile_arg(p)
    p.add_argument("--trials", type=int, default=10, help="trials per policy (each covers every distance in one pass)")
    p.add_argument("--haystack", type=Path, default=None, help="text file (.txt or .gz); default: Emma (shipped)")
    p.add_argument("--out", type=Path, default=Path("runs/recall"), help="directory for recall.csv/png, summary.md")
    p.add_argument("--candidates", type=int, default=10, help="K candidate words per question (chance 1/K)")
    p.add_argument("--seed", type=int, default=0, help="seed of the names, words and candidates")
    p.add_argument("--prefix", type=int, default=1000, help="haystack tokens before the needle (shared, fed once)")


@needs_hf
def run(args: argparse.Namespace) -> int:
    # everything checkable is checked before the model loads (seconds to minutes)
    specs = [args.policy] + [s for flag in args.compare for s in flag.split(";") if s.strip()]
    policies = [parse_policy(s, args.profile) for s in specs]
    labelled = [(policy_label(p), p) for p in policies]
    labels = [label for label, _ in labelled]
    if len(set(labels)) != len(labels):
        raise ValueError(f"a policy is given twice: {', '.join(labels)}")
    config = RecallConfig(parse_distances(args.distances), args.trials, args.candidates, args.seed, args.prefix)
    text = read_text(args.haystack)
    source = str(args.haystack) if args.haystack else "Emma (shipped)"
    # a token covers >= 1 byte (byte-level BPE), so the byte count bounds the token count
    check_haystack(len(text.encode("utf-8")), config, source, at_most=True)
    args.out.mkdir(parents=True, exist_ok=True)

    from streamattn.hf import load_model

    out = _Output()
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    haystack = _tokenize(tokenizer, text, config.haystack_tokens)
    check_haystack(haystack.numel(), config, source)
    trained = trained_length(model)
    out.print(
        f"streamattn recall: {args.model}, {len(policies)} policies x {config.trials} trials x distances "
        f"{', '.join(format_distance(d) for d in config.distances)}; K={config.candidates}, prefix {config.prefix:,}, "
        f"haystack {source}; trained length {trained or '?'} (loaded in {time.perf_counter() - t0:.0f}s)"
    )
    start = time.perf_counter()
    with out.progress(labels, config) as on_row:
        results = run_recall(model, tokenizer, labelled, haystack, config, on_row=on_row)
    wall = time.perf_counter() - start
    write_csv(args.out / "recall.csv", results)
    plot(args.out / "recall.png", results, config)
    summary = summary_markdown(results, config, trained)
    (args.out / "summary.md").write_text(f"# streamattn recall ({args.model})\n\n{summary}")
    out.summary(results, config, summary)
    tokens = sum(r.tokens for r in results)
    out.print(
        f"{tokens:,} tokens in {wall:.0f}s ({tokens / wall:,.0f} tok/s); wrote recall.csv, recall.png, summary.md to {args.out}"
    )
    return 0


def _tokenize(tokenizer, text: str, needed: int):
    """The first ``needed`` tokens of ``text`` (all, if fewer), tokenizing only about as much text as that takes."""
    import torch

    chars = min(len(text), 8 * needed + 1000)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False).input_ids
        if len(ids) > needed or chars >= len(text):  # one token spare: the cut may split the last word
            return torch.tensor(ids[:needed], dtype=torch.long)
        chars = min(len(text), chars * 2)


class _Output:
    """Live progress and the final table with ``rich`` when it is installed, plain lines otherwise."""

    def __init__(self):
        try:
            from rich.console import Console
        except ImportError:
            self.console = None
        else:
            self.console = Console() if Console().is_terminal else Console(width=150)

    def print(self, line: str) -> None:
        if self.console is None:
            print(line, flush=True)
        else:
            self.console.print(line, markup=False, highlight=False)

    def progress(self, labels: list[str], config: RecallConfig):
        questions = config.trials * len(config.distances)
        if self.console is not None and self.console.is_terminal:
            return _RichProgress(self.console, labels, questions)
        return _PlainProgress(questions)  # a log file gets a line per question (a live bar would not show)

    def summary(self, results, config: RecallConfig, markdown: str) -> None:
        if self.console is None:
            print(markdown, flush=True)
            return
        from rich.table import Table

        table = Table(title=f"recall: rank-acc exact-acc (n); chance {1 / config.candidates:.2f}")
        table.add_column("policy")
        table.add_column("KV", justify="right")
        for d in config.distances:
            table.add_column(format_distance(d), justify="right")
        for r in results:
            cells = [
                (lambda c: "n/a" if c is None else f"{c[0]:.2f} {c[1]:.2f} ({c[2]})")(r.cell(d))
                for d in config.distances
            ]
            table.add_row(r.label, format_bytes(r.kv_bytes), *cells)
        self.console.print(table)
        for line in markdown.splitlines()[len(results) + 2 :]:
            if line:
                self.console.print(line, markup=False, highlight=False)


class _Tally:
    def __init__(self):
        self.rank = self.exact = self.n = 0

    def add(self, row) -> str:
        self.rank, self.exact, self.n = self.rank + row.correct_rank, self.exact + row.exact, self.n + 1
        return f"rank-acc {self.rank / self.n:.2f} exact-acc {self.exact / self.n:.2f}"


class _RichProgress:
    def __init__(self, console, labels, questions):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} questions"),
            TextColumn("{task.fields[acc]}"),
            TextColumn("{task.fields[rate]:>6,.0f} tok/s"),
            TimeElapsedColumn(),
            console=console,
        )
        self.questions = questions
        self.tasks = {label: self.progress.add_task(label, total=questions, acc="", rate=0.0) for label in labels}
        self.tallies = {label: _Tally() for label in labels}

    def __enter__(self):
        self.progress.__enter__()
        return self.on_row

    def on_row(self, result, row) -> None:
        acc = self.tallies[result.label].add(row)
        self.progress.update(
            self.tasks[result.label], advance=1, acc=acc, rate=result.tokens / max(result.seconds, 1e-9)
        )

    def __exit__(self, *exc):
        for task in self.tasks.values():  # questions beyond the trained length were never asked
            self.progress.update(task, completed=self.questions)
        return self.progress.__exit__(*exc)


class _PlainProgress:
    def __init__(self, questions):
        self.questions, self.tallies = questions, {}

    def __enter__(self):
        return self.on_row

    def on_row(self, result, row) -> None:
        tally = self.tallies.setdefault(result.label, _Tally())
        acc = tally.add(row)
        print(
            f"{result.label:<22} {tally.n:>3}/{self.questions} trial {row.trial} d={format_distance(row.distance):<5} "
            f"rank {row.rank:<2} exact {'yes' if row.exact else 'no '} {row.generated!r:<14} | {acc} | "
            f"{result.tokens / max(result.seconds, 1e-9):,.0f} tok/s",
            flush=True,
        )

    def __exit__(self, *exc):
        return False
