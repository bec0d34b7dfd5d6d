"""Retrieval cost vs store size, every size timed in the same interleaved rounds (a table, not a test).

``bench_retrieval.py`` streams up to 1M tokens, so its positions are measured minutes apart, under
whatever the machine was doing then. This script isolates what depends on the store's size: it
builds one ``Retrieval(4, 1020, 128, 4, every=E)`` state per size and query block ``E`` (the engine's own layout, loaded through
``MemorySpec.load``: a local ring from a real 2K-token prefix, then ``C`` blocks of random keys with
their bounds, as a stream of ``4 + 1020 + 128 C`` tokens would hold) and times, round after round,
each size and the ``SinkWindow(4, 1020)`` floor from the same saved state: 64 decode steps (one query
block of 64: the mean per token and the slowest step, where a query block chooses) and one chunk of
256 tokens. One attention layer of SmolLM2's shape (9/3 heads, D 64), fp32, B=1, 1 thread.

    python -m benchmarks.bench_retrieval_scan [--blocks 32,512,2048,8192] [--every 1,64] [--rounds 9] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

import streamattn as sa
from benchmarks.bench_engine import machine
from streamattn.core.memory import NO_BLOCK

HQ, HKV, D, CHUNK, DECODE = 9, 3, 64, 256, 64


def build(policy: sa.Policy, blocks: int | None, rope: sa.RoPE) -> tuple[sa.StreamingAttention, dict]:
    """An operator and a saved state of ``blocks`` blocks in memory (None: the policy's own state)."""
    attn = sa.StreamingAttention(policy, rope, "cache")
    with torch.inference_mode():
        attn(torch.randn(1, HQ, 2048, D), torch.randn(1, HKV, 2048, D), torch.randn(1, HKV, 2048, D))
    raw = attn.state.to_dict()
    if blocks is None:
        return attn, raw
    seen = -(-(policy.entry(blocks - 1) + 1) // 64) * 64  # past block ``blocks - 1``'s entry, a multiple of 64
    raw["local"]["seen"], raw["local"]["base"] = [seen], [seen - 2048]
    cap = blocks + 64  # room for the blocks a timed chunk adds (no growth copy inside a timing)
    raw["mem_k"] = torch.randn(1, HKV, cap, policy.block, D)
    raw["mem_v"] = torch.randn(1, HKV, cap, policy.block, D)
    raw["lo"], raw["hi"] = raw["mem_k"].amin(3), raw["mem_k"].amax(3)
    ids = torch.arange(cap).expand(1, HKV, cap).clone()
    raw["block_id"] = ids.masked_fill(ids >= blocks, NO_BLOCK)
    raw["stamp"] = torch.arange(cap).expand(1, HKV, cap).clone()
    raw["choice"] = torch.full((1, HKV, policy.topk), -1)  # the first step chooses (seen is a multiple of 64)
    return attn, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="32,512,2048,8192", help="store sizes in blocks of 128 tokens")
    parser.add_argument("--every", default="1,64", help="query blocks (Retrieval's every) to compare")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rope = sa.RoPE(D, 1e4)
    sizes = [int(x) for x in args.blocks.split(",")]
    ops = {"sinks 4 + window 1020 | -": build(sa.SinkWindow(4, 1020), None, rope)}
    for c in sizes:
        for every in (int(x) for x in args.every.split(",")):
            policy = sa.Retrieval(4, 1020, 128, 4, every=every)
            ops[f"retrieval, {c:,} blocks ({c * policy.block // 1024:,}K tokens) | {every}"] = build(policy, c, rope)
    one = [torch.randn(1, h, 1, D) for h in (HQ, HKV, HKV)]
    chunk = [torch.randn(1, h, CHUNK, D) for h in (HQ, HKV, HKV)]
    decode: dict[str, list[float]] = {name: [] for name in ops}
    worst: dict[str, list[float]] = {name: [] for name in ops}
    chunked: dict[str, list[float]] = {name: [] for name in ops}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, (attn, raw) in ops.items():
                attn.state = attn.engine.spec.load(raw)
                steps = []
                for _ in range(DECODE):
                    t0 = time.perf_counter()
                    attn(*one)
                    steps.append(time.perf_counter() - t0)
                decode[name].append(sum(steps) / DECODE)
                worst[name].append(max(steps))
                attn.state = attn.engine.spec.load(raw)
                t0 = time.perf_counter()
                attn(*chunk)
                chunked[name].append(time.perf_counter() - t0)
    lines = [
        f"Machine: {machine()}. One attention layer of SmolLM2's shape (9/3 heads, D 64), fp32, "
        f"B=1, cache positions; synthetic stores (random keys); medians of {args.rounds} interleaved rounds "
        f"of {DECODE} decode steps and one chunk of {CHUNK}.",
        "",
        "| store | every | decode, mean per token (ms) | decode, slowest step (ms) | chunk of 256 (tok/s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ops:
        mean, slow = 1e3 * statistics.median(decode[name]), 1e3 * statistics.median(worst[name])
        lines.append(f"| {name} | {mean:.2f} | {slow:.2f} | {CHUNK / statistics.median(chunked[name]):,.0f} |")
    text = "\n".join(lines)
    Console(width=150).print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
