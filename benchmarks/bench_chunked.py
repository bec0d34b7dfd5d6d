"""Chunked feed at the model level, interleaved: streamattn vs the bounded transformers caches.

SmolLM2-135M fp32 streams *Emma* in 256-token chunks through three caches at once, chunk by chunk:

- ``streamattn``: ``StreamingCache`` with sinks 4 + window 1020, cache positions (StreamingLLM);
- ``window (built-in)``: transformers' ``DynamicSlidingWindowLayer``, window 1024, absolute positions;
- ``cat + re-rotate``: a transformers 4.x ``SinkCache``-style cache (sinks 4 + window 1020; keys
  re-rotated and concatenated at every eviction), ``benchmarks/baselines.py``.

Every chunk is fed to the three methods back to back (the order rotates from chunk to chunk), each
call timed, so the methods see the same tokens at the same position under the same machine load.
At each reported position the table gives each method's tokens/s (median over the ``--span``
chunks starting there) and streamattn's speed relative to each baseline: the median over those
chunks of the per-chunk ratio ``baseline seconds / streamattn seconds`` (> 1: streamattn faster).

streamattn runs on its own copy of the model (the caches of transformers need its SDPA attention;
streamattn's cache switches its model to the streamattn implementation).

Exactness, checked first: streamattn fed the stream's first ``window + 200`` tokens in chunks and
then 48 tokens one at a time gives the log-probs of ``cat + re-rotate`` fed everything one token at a
time (the semantics both implement; cat + re-rotate is exact only token by token).

    python -m benchmarks.bench_chunked [--tokens 65536] [--out benchmarks/results/chunked_cpu.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

from benchmarks.bench_engine import machine
from benchmarks.bench_llm import CHUNK, logprobs_one_by_one, make_driver
from streamattn.eval import read_text
from streamattn.hf import load_model

console = Console(width=150)
METHODS = ("streamattn", "window (built-in)", "cat + re-rotate")
WINDOW, SINKS = 1024, 4


def check(ids: torch.Tensor, models: dict) -> float:
    """streamattn (chunked prefix, then one by one) vs cat + re-rotate (one by one throughout)."""
    prefix, tail = ids[: WINDOW + 200], ids[WINDOW + 200 : WINDOW + 248]
    ours = make_driver("streamattn", models["streamattn"], WINDOW, SINKS)
    for start in range(0, prefix.numel(), CHUNK):
        ours.feed(prefix[start : start + CHUNK])
    theirs = make_driver("cat + re-rotate", models["cat + re-rotate"], WINDOW, SINKS)
    for t in prefix:
        theirs.feed(t[None])
    return float((logprobs_one_by_one(ours, tail) - logprobs_one_by_one(theirs, tail)).abs().max())


def run(ids: torch.Tensor, tokens: int, models: dict) -> dict[str, list[float]]:
    """Seconds per chunk of each method, chunk by chunk (methods interleaved, order rotating)."""
    drivers = {name: make_driver(name, models[name], WINDOW, SINKS) for name in METHODS}
    seconds: dict[str, list[float]] = {name: [] for name in METHODS}
    t_start = time.perf_counter()
    for i, start in enumerate(range(0, tokens, CHUNK)):
        chunk = ids[start : start + CHUNK]
        order = METHODS[i % 3 :] + METHODS[: i % 3]
        for name in order:
            t0 = time.perf_counter()
            drivers[name].feed(chunk)
            seconds[name].append(time.perf_counter() - t0)
        if (i + 1) % 32 == 0:
            rates = "  ".join(f"{n} {CHUNK / statistics.median(seconds[n][-32:]):.0f}" for n in METHODS)
            console.print(f"{start + CHUNK:>7,} tokens ({time.perf_counter() - t_start:.0f} s): tok/s {rates}")
    return seconds


def table(seconds: dict[str, list[float]], positions: list[int], span: int, diff: float) -> str:
    heads = [f"{p // 1024}K" for p in positions]
    lines = [
        f"Machine: {machine()}. SmolLM2-135M fp32, chunks of {CHUNK}, methods interleaved chunk by chunk; "
        f"at each position the {span} chunks starting there (medians). Exactness check: streamattn "
        f"(chunked, then one by one) vs cat + re-rotate (one by one), 48 tokens past the window: "
        f"max |d log-prob| {diff:.1e}.",
        "",
        "| chunked feed, tokens/s | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    windows = {p: slice(p // CHUNK, p // CHUNK + span) for p in positions}
    for name in METHODS:
        cells = [f"{CHUNK / statistics.median(seconds[name][w]):.0f}" for w in windows.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| streamattn speed / baseline speed | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for base in METHODS[1:]:
        cells = []
        for w in windows.values():
            ratios = [b / s for b, s in zip(seconds[base][w], seconds["streamattn"][w], strict=True)]
            cells.append(f"{statistics.median(ratios):.2f}x")
        lines.append(f"| vs {base} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=65_536 + 8 * CHUNK, help="stream length")
    parser.add_argument("--positions", default="1024,4096,16384,32768,65536")
    parser.add_argument("--span", type=int, default=8, help="chunks per reported position")
    parser.add_argument("--out", type=Path, default=None, help="write the table as Markdown here")
    args = parser.parse_args()
    positions = [int(p) for p in args.positions.split(",")]
    if max(positions) + args.span * CHUNK > args.tokens:
        raise SystemExit(f"--tokens {args.tokens:,} does not reach the last position + {args.span} chunks")
    streaming_model, tokenizer = load_model("smollm2")
    sdpa_model, _ = load_model("smollm2")
    ids = torch.tensor(tokenizer(read_text(None), add_special_tokens=False).input_ids)
    if ids.numel() < args.tokens:
        raise SystemExit(f"Emma has {ids.numel():,} tokens, {args.tokens:,} asked for")
    models = {"streamattn": streaming_model, "window (built-in)": sdpa_model, "cat + re-rotate": sdpa_model}
    diff = check(ids, models)
    console.print(f"check: streamattn vs cat + re-rotate, 48 tokens one by one: max |d log-prob| {diff:.1e}")
    if diff > 1e-3:
        raise SystemExit("the baseline and streamattn disagree: not comparing speeds of different things")
    seconds = run(ids, args.tokens, models)
    text = table(seconds, positions, args.span, diff)
    console.print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
