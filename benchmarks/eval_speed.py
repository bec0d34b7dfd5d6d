"""Evaluation speed on *Emma* with SmolLM2: chunked vs token by token vs sliding-window recomputation.

Scores the first ``--tokens`` tokens with sinks 4 + window 1020 (cache positions) twice — in
256-token chunks and one token at a time — and checks both give the same log-probs. Then scores the
last ``--recompute`` of those tokens with sliding-window *recomputation* (StreamingLLM's quality
baseline: every token re-encodes its last 1024 tokens from scratch) and compares speed and
perplexity on exactly those tokens.

    python benchmarks/eval_speed.py [--tokens 3072] [--recompute 64] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from rich.console import Console

import streamattn as sa
from streamattn.eval import read_text
from streamattn.hf import Stream, load_model

console = Console(width=150)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--recompute", type=int, default=64)
    parser.add_argument("--window", type=int, default=1024, help="cache size: sinks 4 + window-4; recompute window")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not 0 < args.recompute <= args.tokens - args.window:
        raise SystemExit("--recompute must be in [1, tokens - window] (recomputed tokens need a full window)")
    model, tokenizer = load_model("smollm2")
    ids = torch.tensor(tokenizer(read_text(None), add_special_tokens=False).input_ids[: args.tokens])
    policy = sa.SinkWindow(sinks=4, window=args.window - 4)

    def timed(fn):
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0

    chunked, t_chunked = timed(lambda: Stream(model, tokenizer, policy, chunk_size=256).feed(ids))
    console.print(f"chunked (256):   {args.tokens / t_chunked:8.1f} tok/s")
    single, t_single = timed(lambda: Stream(model, tokenizer, policy, chunk_size=1).feed(ids))
    console.print(f"token by token:  {args.tokens / t_single:8.1f} tok/s")
    diff = float((chunked - single)[1:].abs().max())

    positions = range(args.tokens - args.recompute, args.tokens)
    model.set_attn_implementation("sdpa")  # a plain transformers model, no streaming cache
    recomputed, t_recompute = [], 0.0
    with torch.no_grad():
        for t in positions:
            context = ids[t - args.window : t][None]
            logits, dt = timed(lambda context=context: model(context).logits[0, -1].float())
            t_recompute += dt
            recomputed.append(float(torch.log_softmax(logits, -1)[ids[t]]))
    console.print(f"recompute (W={args.window}): {args.recompute / t_recompute:8.2f} tok/s")

    def ppl(lp) -> float:
        return math.exp(-sum(lp) / len(lp))

    tail = list(positions)
    per_token = {
        "chunked": t_chunked / args.tokens,
        "token by token": t_single / args.tokens,
        "recompute": t_recompute / args.recompute,
    }
    lines = [
        f"SmolLM2-135M fp32, {torch.get_num_threads()} threads; sinks 4 + window {args.window - 4} vs recomputation "
        f"over the last {args.window} tokens; *Emma* tokens 0-{args.tokens - 1}.",
        "",
        "| method | ms / token | speedup vs recompute | ppl on tokens " + f"{tail[0]}-{tail[-1]} |",
        "|---|---|---|---|",
        f"| recompute (W={args.window}) | {1e3 * per_token['recompute']:.1f} | 1.0 | {ppl(recomputed):.2f} |",
        f"| streamattn, token by token | {1e3 * per_token['token by token']:.1f} | "
        f"{per_token['recompute'] / per_token['token by token']:.1f} | {ppl(single[tail].tolist()):.2f} |",
        f"| streamattn, chunks of 256 | {1e3 * per_token['chunked']:.2f} | "
        f"{per_token['recompute'] / per_token['chunked']:.0f} | {ppl(chunked[tail].tolist()):.2f} |",
        "",
        f"Chunked vs token by token over all {args.tokens} tokens: {t_single / t_chunked:.1f}x faster, "
        f"max |Δ log-prob| = {diff:.1e}.",
    ]
    report = "\n".join(lines)
    console.print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
