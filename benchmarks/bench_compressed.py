"""Decode cost of score-based eviction (``Compressed``) vs sinks + window at the same kept keys.

For Hq=9, Hkv=3, D=64 (SmolLM2's attention shape), fp32, CPU, positions="cache":
1. per decode step (amortised over eviction points: every 64 steps one eviction), each scorer vs
   ``SinkWindow`` holding the same most keys: ``Compressed(4, 64, kept - 64, score, every=64)``
   holds at most ``kept`` keys, ``SinkWindow(4, kept - 4)`` exactly ``kept``; kept in {1K, 4K},
   B in {1, 8};
2. flatness: a TOVA stream's decode step after 4K, 64K and 1M tokens (the same kept keys).

Candidates are timed in interleaved rounds (``bench_engine.time_rounds``): figures are medians over
rounds, ratios medians of per-round ratios.

    python benchmarks/bench_compressed.py [--quick] [--out benchmarks/results/compressed_cpu.md]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

import streamattn as sa
from benchmarks.bench_engine import HKV, HQ, D, filled, machine, median_ratio, randn, time_rounds

console = Console()
SCORERS = {"knorm": sa.scores.KeyNorm(), "tova": sa.scores.TOVA(), "h2o": sa.scores.H2O(), "snapkv": sa.scores.SnapKV()}


def compressed(kept: int, score) -> sa.Compressed:
    return sa.Compressed(sinks=4, window=64, budget=kept - 64, score=score, every=64)


def decode_rows(kepts, batches, steps, rounds) -> list[dict]:
    rows = []
    for kept in kepts:
        for b in batches:
            ops = {"sinks+window": filled(sa.SinkWindow(4, kept - 4), "cache", b, 2 * kept)}
            ops |= {name: filled(compressed(kept, s), "cache", b, 2 * kept) for name, s in SCORERS.items()}
            q1, k1, v1 = randn(b, HQ, 1, D), randn(b, HKV, 1, D), randn(b, HKV, 1, D)
            x = (q1, k1, v1)
            t = time_rounds({name: (lambda a=a, x=x: a(*x)) for name, a in ops.items()}, steps, rounds)
            row = {"kept": kept, "B": b, "sinks+window_us": statistics.median(t["sinks+window"]) * 1e6}
            for name in SCORERS:
                row[f"{name}_us"] = statistics.median(t[name]) * 1e6
                row[f"{name}_ratio"] = median_ratio(t[name], t["sinks+window"])
            console.print(row)
            rows.append(row)
    return rows


def flatness(lengths, steps, rounds) -> tuple[list[dict], float]:
    policy = compressed(1024, sa.scores.TOVA())
    t0 = time.perf_counter()
    ops = {n: filled(policy, "cache", 1, n) for n in lengths}
    fill_s = time.perf_counter() - t0
    q1, k1, v1 = randn(1, HQ, 1, D), randn(1, HKV, 1, D), randn(1, HKV, 1, D)
    t = time_rounds({n: (lambda a=a: a(q1, k1, v1)) for n, a in ops.items()}, steps, rounds)
    first = lengths[0]
    rows = [{"tokens": n, "us": statistics.median(t[n]) * 1e6, "ratio": median_ratio(t[n], t[first])} for n in lengths]
    console.print(rows)
    return rows, fill_s


def render(rows, flat, fill_s, machine_line) -> str:
    lines = [
        "# Compressed decode vs sinks + window (CPU)",
        "",
        f"Machine: {machine_line}. Hq=9, Hkv=3, D=64, fp32, positions='cache'; Compressed(4, 64, kept - 64, "
        "score, every=64) vs SinkWindow(4, kept - 4). Per decode step, amortised over eviction points; "
        "medians of interleaved rounds, ratios = median of per-round ratios (x SinkWindow).",
        "",
        "| kept | B | sinks+window us | " + " | ".join(f"{n} us (x)" for n in SCORERS) + " |",
        "|---:|---:|---:|" + "---:|" * len(SCORERS),
    ]
    for r in rows:
        cells = [f"{r[f'{n}_us']:.0f} ({r[f'{n}_ratio']:.2f}x)" for n in SCORERS]
        lines.append(f"| {r['kept']} | {r['B']} | {r['sinks+window_us']:.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Flatness (TOVA, kept 1,024, B=1): decode step after N stream tokens (filling took {fill_s:.0f} s).",
        "",
        "| stream tokens | us per step | x first |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {r['tokens']:,} | {r['us']:.0f} | {r['ratio']:.2f} |" for r in flat]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown tables here")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.quick:
        rows = decode_rows([256], [1], steps=64, rounds=3)
        flat, fill_s = flatness([4096, 16384], steps=64, rounds=3)
    else:
        rows = decode_rows([1024, 4096], [1, 8], steps=256, rounds=9)
        flat, fill_s = flatness([4096, 65536, 2**20], steps=256, rounds=9)
    text = render(rows, flat, fill_s, machine())
    console.print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
