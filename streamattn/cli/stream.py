"""Stream a text through an LLM with bounded memory and measure it (the main job).

Feeds FILE (default: the shipped *Emma*) through the model (default: the shipped SmolLM2) in
chunks, under ``--policy`` and each ``--compare`` policy in turn, with a live progress bar (tokens/s,
running perplexity, cache keys, RSS). Writes ``tokens.csv`` (per token: NLL, latency, memory) and
``stream.png`` (perplexity per segment, tokens/s and memory vs position) to ``--out`` and prints a
summary. ``--compare``: ``window`` (no sinks, same cache size), ``dense`` (full attention: the cache
grows), ``recompute`` (sliding window re-encoded for every token: the quality reference of
StreamingLLM, slow; ``--recompute-tokens`` of them, from the first position with a full window).
"""

from __future__ import annotations

import argparse
import csv
import gc
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import streamattn as sa
from streamattn.cli.common import add_model_args, needs_hf, parse_policy
from streamattn.eval import read_text, segment_stats
from streamattn.policies.spec import policy_spec

COMPARE = ("window", "dense", "recompute")


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", nargs="?", type=Path, default=None, help="text file (.txt or .gz); default: Emma")
    add_model_args(p)
    p.add_argument("--compare", default="", help=f"comma-separated extra runs: {', '.join(COMPARE)}")
    p.add_argument("--max-tokens", type=int, default=20_000, help="tokens of the text to stream")
    p.add_argument("--chunk", type=int, default=256, help="tokens per model call")
    p.add_argument("--segment", type=int, default=1024, help="tokens per perplexity segment (plot, summary)")
    p.add_argument("--recompute-tokens", type=int, default=64, help="tokens scored by --compare recompute")
    p.add_argument("--out", type=Path, default=Path("runs/stream"), help="directory for tokens.csv, stream.png")


@dataclass
class Run:
    name: str
    positions: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    ms_per_token: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    cache_keys: list[int] = field(default_factory=list)
    seconds: float = 0.0


@needs_hf
def run(args: argparse.Namespace) -> int:
    import psutil

    from streamattn.hf import Stream, load_model

    for name in ("max_tokens", "chunk", "segment", "recompute_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    policy = parse_policy(args.policy, args.profile)
    extra = [c.strip() for c in args.compare.split(",") if c.strip()]
    unknown = sorted(set(extra) - set(COMPARE))
    if unknown:
        raise ValueError(f"unknown --compare {unknown}; choose from {', '.join(COMPARE)}")
    text = read_text(args.file)
    console = Console() if Console().is_terminal else Console(width=150)
    model, tokenizer = load_model(args.model)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids[: args.max_tokens], dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError("the text has fewer than 2 tokens")
    trained = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    size = policy.capacity or 1024
    policies = [(_label(policy), policy)]
    policies += [("window only", sa.SinkWindow(sinks=0, window=size))] if "window" in extra else []
    policies += [("dense (full)", sa.Full())] if "dense" in extra else []
    console.print(
        f"[bold]streamattn stream[/]: {ids.numel():,} tokens of {args.file or 'Emma (shipped)'} through {args.model}"
    )
    process = psutil.Process()
    runs = []
    for label, pol in policies:  # one model, a fresh cache per policy: RSS differences are the caches
        stream = Stream(model, tokenizer, pol, chunk_size=args.chunk)
        runs.append(_stream_one(console, label, stream, ids, args.chunk, process))
        del stream
        gc.collect()
    if "recompute" in extra:  # a model that was never switched to streaming attention
        runs.append(_recompute(console, load_model(args.model)[0], ids, size, args.recompute_tokens, process))
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / "tokens.csv", runs)
    _plot(args.out / "stream.png", runs, args.segment, trained)
    console.print(_summary(runs, trained))
    console.print(f"wrote {args.out / 'tokens.csv'} and {args.out / 'stream.png'}")
    return 0


def _label(policy: sa.Policy) -> str:
    if isinstance(policy, sa.Full):
        return "dense (full)"
    if not isinstance(policy, sa.SinkWindow):
        return policy_spec(policy)
    return f"sinks {policy.sinks} + window {policy.window}" if policy.sinks else f"window {policy.window}"


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<24}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tok"),
        TextColumn("{task.fields[rate]:>6,.0f} tok/s"),
        TextColumn("ppl {task.fields[ppl]:>7.2f}"),
        TextColumn("cache {task.fields[cache]:>6,}"),
        TextColumn("RSS {task.fields[rss]:>6,.0f} MB"),
        TimeElapsedColumn(),
        console=console,
    )


def _stream_one(console, label, stream, ids, chunk, process) -> Run:
    result = Run(label)
    total_nll, counted = 0.0, 0
    with _progress(console) as progress:
        task = progress.add_task(label, total=ids.numel(), rate=0.0, ppl=float("nan"), cache=0, rss=0.0)
        for start in range(0, ids.numel(), chunk):
            piece = ids[start : start + chunk]
            t0 = time.perf_counter()
            lp = stream.feed(piece)
            elapsed = time.perf_counter() - t0
            result.seconds += elapsed
            rss = process.memory_info().rss / 2**20
            cache = stream.cache.cached()[0]
            for i, value in enumerate(lp.tolist()):
                result.positions.append(start + i)
                result.nll.append(-value)
                result.ms_per_token.append(1e3 * elapsed / piece.numel())
                result.rss_mb.append(rss)
                result.cache_keys.append(cache)
                if not math.isnan(value):
                    total_nll, counted = total_nll - value, counted + 1
            progress.update(
                task,
                advance=piece.numel(),
                rate=(start + piece.numel()) / result.seconds,
                ppl=math.exp(total_nll / max(counted, 1)),
                cache=cache,
                rss=rss,
            )
    return result


def _recompute(console, model, ids, window, count, process) -> Run:
    """Sliding window with re-computation: every token re-encodes its last ``window`` tokens.

    Scores the ``count`` tokens from position ``window`` on (each with a full window), or the last
    ``count`` tokens of a shorter text.
    """
    result = Run(f"recompute (window {window})")
    count = min(count, ids.numel() - 1)
    first = max(1, min(window, ids.numel() - count))
    with _progress(console) as progress, torch.no_grad():
        task = progress.add_task(result.name, total=count, rate=0.0, ppl=float("nan"), cache=window, rss=0.0)
        total_nll = 0.0
        for n, t in enumerate(range(first, first + count)):
            context = ids[max(0, t - window) : t][None]
            t0 = time.perf_counter()
            logits = model(context).logits[0, -1].float()
            elapsed = time.perf_counter() - t0
            result.seconds += elapsed
            nll = -torch.log_softmax(logits, dim=-1)[ids[t]].item()
            total_nll += nll
            result.positions.append(t)
            result.nll.append(nll)
            result.ms_per_token.append(1e3 * elapsed)
            result.rss_mb.append(process.memory_info().rss / 2**20)
            result.cache_keys.append(context.shape[1])
            progress.update(task, advance=1, rate=(n + 1) / result.seconds, ppl=math.exp(total_nll / (n + 1)))
    return result


def _write_csv(path: Path, runs: list[Run]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["policy", "position", "nll", "ms_per_token", "rss_mb", "cache_keys"])
        for r in runs:
            for row in zip(r.positions, r.nll, r.ms_per_token, r.rss_mb, r.cache_keys, strict=True):
                writer.writerow([r.name, row[0], f"{row[1]:.5f}", f"{row[2]:.3f}", f"{row[3]:.1f}", row[4]])


def _plot(path: Path, runs: list[Run], size: int, trained: int | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    last = max((r.positions[-1] for r in runs if r.positions), default=0)
    trained = trained if trained and last >= trained else None  # mark it only where the stream reaches it
    for r in runs:
        stats = segment_stats(r.positions, r.nll, r.ms_per_token, r.rss_mb, size)
        starts = list(stats)
        for ax, column in zip(axes, range(3), strict=True):
            ax.plot(starts, [stats[s][column] for s in starts], marker=".", label=r.name)
    for ax, title in zip(axes, (f"perplexity per {size}-token segment", "tokens/s", "peak RSS (MB)"), strict=True):
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        if trained:
            ax.axvline(trained, color="gray", linestyle="--", linewidth=1)
    axes[0].set_yscale("log")
    axes[0].legend()
    if trained:
        axes[0].text(trained, axes[0].get_ylim()[1], " trained length", va="top", color="gray")
    axes[2].set_xlabel("stream position (tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(runs: list[Run], trained: int | None) -> Table:
    table = Table(title="stream summary")
    for col in (
        "policy",
        "tokens",
        "ppl (all)",
        f"ppl < {trained}",
        f"ppl >= {trained}",
        "tok/s",
        "peak RSS MB",
        "cache keys",
    ):
        table.add_column(col, justify="right" if col != "policy" else "left")

    def ppl(r: Run, keep) -> str:
        values = [n for p, n in zip(r.positions, r.nll, strict=True) if keep(p) and not math.isnan(n)]
        return f"{math.exp(sum(values) / len(values)):.2f}" if values else "-"

    for r in runs:
        limit = trained or float("inf")
        table.add_row(
            r.name,
            f"{len(r.positions):,}",
            ppl(r, lambda p: True),
            ppl(r, lambda p, limit=limit: p < limit),
            ppl(r, lambda p, limit=limit: p >= limit),
            f"{len(r.positions) / max(r.seconds, 1e-9):,.1f}",
            f"{max(r.rss_mb, default=0):,.0f}",
            f"{r.cache_keys[-1]:,}" if r.cache_keys else "-",
        )
    return table
