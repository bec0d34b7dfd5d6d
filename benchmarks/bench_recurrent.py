"""Recurrent memories: decode step vs chunked throughput, and flatness vs stream length (prints a table).

For ``RecurrentAttention`` with B=1, H=4, Dk=Dv=64, fp32, CPU, at stream positions 1K, 32K and 1M
tokens (``--quick``: 1K, 8K), the cost per token of
- a decode step: one call of one token (the recurrent form), averaged over 128 consecutive calls (an
  Infini segment: every fill of the held segment and one memory write);
- a chunk: one call of 256 tokens (the chunked / parallel form), per token.
Operators: linear attention (elu + 1, normalised), linear attention with a fixed and a data-dependent
decay, Infini-attention (segment 128; linear update and delta rule). Each timed call starts from
the same saved state (states are values: restoring one is an assignment), so the position does not
drift while timing. Every (operator, position, mode) is timed in the same interleaved rounds
(``bench_engine.time_rounds``): each figure is the median over rounds, each ratio the median of
per-round ratios. No asserts.

    python -m benchmarks.bench_recurrent [--quick] [--out benchmarks/results/recurrent/bench_recurrent_cpu.md]
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import streamattn.recurrent as rec
from benchmarks.bench_engine import machine, median_ratio, time_rounds

H, D, CHUNK, FILL, SEGMENT = 4, 64, 256, 4096, 128
OUT = Path(__file__).resolve().parent / "results" / "recurrent" / "bench_recurrent_cpu.md"
MEMORIES = {
    "linear (elu+1, normalised)": rec.LinearMemory(normalize=True),
    "linear (decay 0.99 + gate)": rec.LinearMemory(decay=0.99, gated=True),
    "infini (segment 128)": rec.InfiniMemory(segment=SEGMENT),
    "infini (segment 128, delta)": rec.InfiniMemory(segment=SEGMENT, delta_rule=True),
}


def inputs(memory, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, t, D, generator=g) for _ in range(3))
    if isinstance(memory, rec.InfiniMemory):
        return q, k, v, {"beta": torch.zeros(H)}
    return q, k, v, ({"log_gate": -0.01 * torch.rand(1, H, t, generator=g)} if memory.gated else {})


def advance(attn, memory, tokens: int) -> None:
    """Stream ``tokens`` tokens through ``attn`` in chunks of ``FILL``."""
    q, k, v, kw = inputs(memory, FILL, seed=1)
    while tokens > 0:
        n = min(FILL, tokens)
        attn(q[:, :, :n], k[:, :, :n], v[:, :, :n], **{key: x if x.dim() == 1 else x[..., :n] for key, x in kw.items()})
        tokens -= n


def timed_call(attn, saved, args, size):
    """From ``saved``, feed ``args`` (T tokens) in calls of ``size`` tokens."""
    q, k, v, kw = args
    pieces = [
        (
            q[:, :, i : i + size],
            k[:, :, i : i + size],
            v[:, :, i : i + size],
            {n: x if x.dim() == 1 else x[..., i : i + size] for n, x in kw.items()},
        )
        for i in range(0, q.shape[2], size)
    ]

    def call():
        attn.state = saved  # every call starts at the same position
        for q_i, k_i, v_i, kw_i in pieces:
            attn(q_i, k_i, v_i, **kw_i)

    return call


@torch.no_grad()
def measure(positions, steps, rounds) -> list[dict]:
    """Fill each operator's stream to every position (keeping the state there), then time every
    (operator, position, mode) in the same interleaved rounds."""
    ops = {name: rec.RecurrentAttention(memory) for name, memory in MEMORIES.items()}
    saved, at = {}, 0
    for position in positions:
        for name, attn in ops.items():
            advance(attn, MEMORIES[name], position - at)
            saved[(name, position)] = attn.state
        at = position
    fns = {}
    for (name, position), state in saved.items():
        fns[(name, position, "step")] = timed_call(ops[name], state, inputs(MEMORIES[name], SEGMENT, seed=2), 1)
        fns[(name, position, "chunk")] = timed_call(ops[name], state, inputs(MEMORIES[name], CHUNK, seed=3), CHUNK)
    times = time_rounds(fns, steps, rounds)
    times = {key: [x / (CHUNK if key[2] == "chunk" else SEGMENT) for x in t] for key, t in times.items()}
    rows = []
    for name in ops:
        for position in positions:
            step, chunk = times[(name, position, "step")], times[(name, position, "chunk")]
            row = {
                "operator": name,
                "position": position,
                "step_us": statistics.median(step) * 1e6,
                "chunk_us": statistics.median(chunk) * 1e6,
                "speedup": median_ratio(step, chunk),
                "step_flat": median_ratio(step, times[(name, positions[0], "step")]),
                "chunk_flat": median_ratio(chunk, times[(name, positions[0], "chunk")]),
                "state_bytes": sum(x.numel() * x.element_size() for x in saved[(name, position)][:-1] if x is not None),
            }
            print(row, flush=True)
            rows.append(row)
    return rows


def render(rows, machine_line, rounds) -> str:
    lines = [
        "# Recurrent memories: decode step vs chunked, flat in stream length (CPU)",
        "",
        f"`python -m benchmarks.bench_recurrent`. Machine: {machine_line}. `RecurrentAttention`, B=1, H=4, "
        f"Dk=Dv=64, fp32. Step: one call of 1 token (recurrent form), per token over {SEGMENT} consecutive calls "
        f"(an Infini segment: every fill, one memory write). Chunk: one call of {CHUNK} tokens "
        "(chunked / parallel form), per token. Every timed call starts from the same saved state at the "
        f"position shown. All rows timed in the same {rounds} interleaved rounds: medians over rounds, ratios "
        "= medians of per-round ratios; 'vs first' = cost per token / cost at the first position.",
        "",
        "| operator | position | step us/token | chunk us/token | chunk speedup | step vs first | chunk vs first | state bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['operator']} | {r['position']:,} | {r['step_us']:.1f} | {r['chunk_us']:.2f} | "
            f"{r['speedup']:.0f}x | {r['step_flat']:.2f} | {r['chunk_flat']:.2f} | {r['state_bytes']:,} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="positions 1K and 8K, fewer rounds, no file")
    parser.add_argument("--out", type=Path, default=None, help=f"markdown table (default {OUT}; none for --quick)")
    args = parser.parse_args()
    positions, rounds = ([1_024, 8_192], 3) if args.quick else ([1_024, 32_768, 1_048_576], 7)
    rows = measure(positions, steps=200, rounds=rounds)
    text = render(rows, machine(), rounds)
    print(text)
    out = args.out or (None if args.quick else OUT)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
