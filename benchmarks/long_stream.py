"""An endless-stream run: 1M+ tokens of Austen through SmolLM2 with a bounded cache.

Streams the six Austen novels (cycled when ``--tokens`` asks for more) in ``--chunk``-token calls
and records, per ``--segment`` tokens: perplexity, chunked tokens/s, peak RSS, cache keys and cache
bytes. At stream positions 1K, 4K, 16K, 64K, 256K, 1M (2^20, just before the engine's first frame
rebase) and at the end it measures decode latency: the next ``--decode-steps`` tokens are fed one at
a time (they stay part of the stream; chunking does not change results). At the end it checks
exactness where positions are largest: the next ``--check-tokens`` tokens are scored once as one
chunk and once token by token from the same saved state, and the log-probs compared.

python benchmarks/long_stream.py                      # 1.1M tokens, ~1 h on 2 cores
python benchmarks/long_stream.py --tokens 50000       # a quick look

Writes ``segments.csv``, ``long_stream.md`` and ``long_stream.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

from streamattn import parse_policy
from streamattn.eval import read_text
from streamattn.hf import Stream, load_model

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = (2**10, 2**12, 2**14, 2**16, 2**18, 2**20)


@dataclass
class Segment:
    start: int
    tokens: int = 0
    nll: float = 0.0
    scored: int = 0
    chunk_tokens: int = 0
    chunk_seconds: float = 0.0
    rss_mb: float = 0.0
    cache_keys: int = 0
    cache_mib: float = 0.0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.scored) if self.scored else float("nan")

    @property
    def tok_s(self) -> float:
        return self.chunk_tokens / self.chunk_seconds if self.chunk_seconds else float("nan")


def corpus_ids(tokenizer, data: Path, total: int) -> torch.Tensor:
    """Token ids of the novels in ``data`` (sorted by name), cycled until ``total`` tokens."""
    files = sorted(data.glob("*.txt.gz"))
    if not files:
        raise SystemExit(f"no *.txt.gz novels in {data} (pass --data DIR)")
    parts = []
    for f in files:
        parts.append(torch.tensor(tokenizer(read_text(f), add_special_tokens=False).input_ids))
    ids = torch.cat(parts)
    return ids.repeat(math.ceil(total / ids.numel()))[:total]


def one_by_one(stream: Stream, ids: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Feed ``ids`` one token per call (decode steps): their log-probs and each call's seconds."""
    logprobs, times = [], []
    for token in ids:
        t0 = time.perf_counter()
        logprobs.append(stream.feed(token[None]))
        times.append(time.perf_counter() - t0)
    return torch.cat(logprobs), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_100_000)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--policy", default="sinks=4,window=1020")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--segment", type=int, default=16384)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--check-tokens", type=int, default=256)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "austen")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "long_stream")
    parser.add_argument("--save-state", type=Path, default=None, help="torch.save the stream state at the end")
    args = parser.parse_args()

    console = Console(width=120)
    model, tokenizer = load_model(args.model)
    policy = parse_policy(args.policy)
    ids = corpus_ids(tokenizer, args.data, args.tokens + args.check_tokens)
    stream_ids, check_ids = ids[: args.tokens], ids[args.tokens :]
    stream = Stream(model, tokenizer, policy, chunk_size=args.chunk)
    process = psutil.Process()
    args.out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]long stream[/]: {args.tokens:,} tokens, {args.policy}, chunk {args.chunk}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    segments: dict[int, Segment] = {}
    decode: dict[int, float] = {}  # stream position -> median ms per decoded token
    pending = [c for c in CHECKPOINTS if c < args.tokens]
    started = time.perf_counter()
    pos = 0
    while pos < args.tokens:
        at_checkpoint = bool(pending) and pos >= pending[0]
        if at_checkpoint:
            pending.pop(0)
            while pending and pos >= pending[0]:
                pending.pop(0)
        n = min(args.decode_steps if at_checkpoint else args.chunk, args.tokens - pos)
        seg = segments.setdefault(pos // args.segment * args.segment, Segment(pos // args.segment * args.segment))
        n = min(n, seg.start + args.segment - pos)  # never straddle a segment
        piece = stream_ids[pos : pos + n]
        if at_checkpoint:
            lp, times = one_by_one(stream, piece)
            decode[pos] = 1e3 * statistics.median(times)
        else:
            t0 = time.perf_counter()
            lp = stream.feed(piece)
            seg.chunk_seconds += time.perf_counter() - t0
            seg.chunk_tokens += n
        valid = lp[~lp.isnan()]
        seg.nll -= float(valid.double().sum())
        seg.scored += valid.numel()
        seg.tokens += n
        seg.rss_mb = max(seg.rss_mb, process.memory_info().rss / 2**20)
        seg.cache_keys = stream.cache.layers[0].attn.cached[0]
        seg.cache_mib = stream.cache.nbytes / 2**20
        pos += n
        if seg.tokens == args.segment or pos == args.tokens:
            elapsed = time.perf_counter() - started
            console.print(
                f"{pos:>9,} tok  ppl {seg.ppl:6.2f}  {seg.tok_s:6.1f} tok/s  RSS {seg.rss_mb:6.0f} MB  "
                f"cache {seg.cache_keys:,} keys {seg.cache_mib:.1f} MiB  "
                + (f"decode {decode[max(decode)]:.1f} ms @ {max(decode):,}  " if decode else "")
                + f"{elapsed / 60:5.1f} min"
            )
            _write(args.out, segments, decode)
    # exactness at the largest positions: one chunk vs token by token, from the same state; the first
    # --decode-steps of the token-by-token pass time decode where the stream ends
    saved = stream.state_dict()
    if args.save_state is not None:
        torch.save(saved, args.save_state)
    chunked = stream.feed(check_ids)
    stream.load_state_dict(saved)
    single, times = one_by_one(stream, check_ids)
    if args.tokens not in decode:
        decode[args.tokens] = 1e3 * statistics.median(times[: args.decode_steps])
    diff = float((chunked - single).abs().max())
    console.print(
        f"positions {args.tokens:,}..{args.tokens + check_ids.numel() - 1:,}: one chunk of {check_ids.numel()} "
        f"vs token by token, max |Δ log-prob| = {diff:.2e}"
    )
    _write(args.out, segments, decode, check=(args.tokens, check_ids.numel(), diff))
    _plot(args.out / "long_stream.png", segments, decode)
    console.print(_table(segments, decode))
    console.print(f"wrote {args.out}/segments.csv, long_stream.md, long_stream.png")


def _write(out: Path, segments: dict[int, Segment], decode: dict[int, float], check=None) -> None:
    with (out / "segments.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["start", "tokens", "ppl", "chunked_tok_s", "peak_rss_mb", "cache_keys", "cache_mib"])
        for s in segments.values():
            writer.writerow(
                [
                    s.start,
                    s.tokens,
                    f"{s.ppl:.3f}",
                    f"{s.tok_s:.1f}",
                    f"{s.rss_mb:.0f}",
                    s.cache_keys,
                    f"{s.cache_mib:.2f}",
                ]
            )
    lines = ["| decode at position | " + " | ".join(f"{p:,}" for p in decode) + " |"]
    lines += ["|---|" + "---|" * len(decode)]
    lines += ["| ms / token (median) | " + " | ".join(f"{ms:.1f}" for ms in decode.values()) + " |"]
    if check is not None:
        lines += [
            "",
            f"Exactness at positions {check[0]:,}+: one {check[1]}-token chunk vs token by token: "
            f"max |Δ log-prob| = {check[2]:.2e}",
        ]
    (out / "long_stream.md").write_text("\n".join(lines) + "\n")


def _plot(path: Path, segments: dict[int, Segment], decode: dict[int, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    segs = [s for s in segments.values() if s.tokens]
    x = [s.start + s.tokens / 2 for s in segs]
    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    axes[0].plot(x, [s.ppl for s in segs], marker=".")
    axes[0].set_ylabel("perplexity per segment")
    axes[1].plot(x, [s.tok_s for s in segs], marker=".")
    axes[1].set_ylabel("chunked tokens/s")
    axes[1].set_ylim(bottom=0)
    axes[2].plot(x, [s.rss_mb for s in segs], marker=".", label="peak RSS (MB)")
    axes[2].plot(x, [s.cache_mib for s in segs], marker=".", label="cache (MiB)")
    axes[2].set_ylabel("memory")
    axes[2].set_ylim(bottom=0)
    axes[2].legend()
    axes[3].plot(list(decode), list(decode.values()), marker="o")
    axes[3].set_ylabel("decode ms / token")
    axes[3].set_ylim(bottom=0)
    axes[3].set_xlabel("stream position (tokens)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(segments: dict[int, Segment], decode: dict[int, float]) -> Table:
    table = Table(title="long stream")
    for col in ("positions", "ppl", "tok/s", "peak RSS MB", "cache keys", "cache MiB"):
        table.add_column(col, justify="right")
    segs = list(segments.values())
    step = max(1, len(segs) // 16)
    for s in segs[::step] + ([segs[-1]] if (len(segs) - 1) % step else []):
        table.add_row(
            f"{s.start:,}-{s.start + s.tokens:,}",
            f"{s.ppl:.2f}",
            f"{s.tok_s:.1f}",
            f"{s.rss_mb:.0f}",
            f"{s.cache_keys:,}",
            f"{s.cache_mib:.2f}",
        )
    return table


if __name__ == "__main__":
    main()
