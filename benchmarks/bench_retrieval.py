"""Retrieval memory cost vs stream length, at the operator level (one SmolLM2 attention layer).

One ``StreamingAttention`` per policy (9 query heads, 3 kv heads, head dim 64, fp32, RoPE, cache
positions) streams random q/k/v in chunks of 256 up to each position; there every policy is timed
on the same inputs, interleaved (``--rounds`` rounds, medians): a decode step (one token, from a
snapshot of the state so that every round sees the same state) and a chunk of 256 tokens. Also the
state bytes (store bytes per token streamed), and at the last position the time to save the
state (``torch.save`` of ``state_dict``) and to load it back (``load_state_dict``, validated).

Policies: ``SinkWindow(4, 1020)`` (no memory: the floor), ``Retrieval(4, 1020, 128, 4)`` (every
block kept: the store grows) and ``Retrieval(4, 1020, 128, 4, max_blocks=64)`` (bounded), their
stores where ``--store`` says (``disk``: memory-mapped files in the temp directory).

    python -m benchmarks.bench_retrieval [--positions 4K,16K,64K,256K,1M] [--store disk] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

import streamattn as sa
from benchmarks.bench_engine import machine
from streamattn.eval.recall import format_distance, parse_distances

HQ, HKV, D, CHUNK = 9, 3, 64, 256


def policies(store: str) -> dict[str, sa.Policy]:
    return {
        "sinks 4 + window 1020": sa.SinkWindow(4, 1020),
        "retrieval, every block": sa.Retrieval(4, 1020, 128, 4, store=store),
        "retrieval, max_blocks 64": sa.Retrieval(4, 1020, 128, 4, max_blocks=64, store=store),
    }


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", default="4K,16K,64K,256K,1M")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--store", choices=["device", "cpu", "disk"], default="device", help="where stores live")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    console = Console(width=150)
    torch.manual_seed(0)
    rope = sa.RoPE(D, 1e4)
    ops = {name: sa.StreamingAttention(p, rope, "cache") for name, p in policies(args.store).items()}
    rows = []
    fed = 0
    with torch.inference_mode():
        for pos in parse_distances(args.positions):
            while fed < pos:
                q, k, v = torch.randn(1, HQ, CHUNK, D), torch.randn(1, HKV, CHUNK, D), torch.randn(1, HKV, CHUNK, D)
                for op in ops.values():
                    op(q, k, v)
                fed += CHUNK
            one = [torch.randn(1, h, 1, D) for h in (HQ, HKV, HKV)]
            chunk = [torch.randn(1, h, CHUNK, D) for h in (HQ, HKV, HKV)]
            snaps = {name: op.state.to_dict() for name, op in ops.items()}
            decode = {name: [] for name in ops}
            chunked = {name: [] for name in ops}
            for _ in range(args.rounds):
                for name, op in ops.items():
                    op.state = op.engine.spec.load(snaps[name])
                    decode[name].append(timed(lambda op=op, x=one: op(*x)))
                    op.state = op.engine.spec.load(snaps[name])
                    chunked[name].append(timed(lambda op=op, x=chunk: op(*x)))
            for name, op in ops.items():
                op.state = op.engine.spec.load(snaps[name])
                rows.append(
                    (
                        pos,
                        name,
                        1e3 * statistics.median(decode[name]),
                        CHUNK / statistics.median(chunked[name]),
                        op.state.nbytes,
                    )
                )
                console.print(
                    f"{format_distance(pos):>5} {name:<26} decode {rows[-1][2]:7.2f} ms   chunk {rows[-1][3]:8.0f} tok/s   state {rows[-1][4] / 2**20:9.1f} MiB"
                )
            del snaps
        save = {}
        for name, op in ops.items():
            buf = io.BytesIO()
            t_save = timed(lambda op=op, buf=buf: torch.save(op.state_dict(), buf))
            fresh = sa.StreamingAttention(op.policy, rope, "cache")
            t_load = timed(
                lambda fresh=fresh, buf=buf: fresh.load_state_dict(
                    torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
                )
            )
            save[name] = (t_save, t_load, len(buf.getvalue()))
    lines = [
        f"Machine: {machine()}. One attention layer of SmolLM2's shape (9/3 heads, D 64), fp32, B=1, random "
        f"inputs streamed in chunks of {CHUNK}; medians of {args.rounds} interleaved rounds from the same state; "
        f"retrieval stores on {args.store}.",
        "",
        "| position | policy | decode step (ms) | chunk of 256 (tok/s) | state MiB | state bytes / token |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for pos, name, dec, tps, nbytes in rows:
        lines.append(
            f"| {format_distance(pos)} | {name} | {dec:.2f} | {tps:,.0f} | {nbytes / 2**20:.1f} | {nbytes / pos:,.0f} |"
        )
    last = format_distance(fed)
    lines += [
        "",
        f"| save / restore at {last} tokens | save (s) | load + validate (s) | bytes |",
        "|---|---:|---:|---:|",
    ]
    for name, (ts, tl, n) in save.items():
        lines.append(f"| {name} | {ts:.2f} | {tl:.2f} | {n / 2**20:,.1f} MiB |")
    text = "\n".join(lines)
    console.print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
