"""Stream a long synthetic sequence through the engine and check it against the reference.

Feeds ``--tokens`` tokens (default 1M) of random q/k/v with SmolLM2's attention shape (9 query heads,
3 kv heads, head_dim 64, RoPE theta 1e5) in chunks, then finishes token by token. Shows throughput,
the cache size (constant, same buffers throughout) and the largest deviation from the float64
reference on sampled queries. Exits non-zero if that deviation exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import time
from collections import deque

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import streamattn as sa
from streamattn import reference


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=1_000_000, help="stream length (default 1,000,000)")
    p.add_argument("--chunk", type=int, default=256, help="tokens per call in the chunked phase")
    p.add_argument("--decode", type=int, default=512, help="final tokens fed one at a time")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=1020)
    p.add_argument("--positions", choices=["cache", "absolute"], default="cache")
    p.add_argument("--check-every", type=int, default=128, help="compare with the reference every N chunks")
    p.add_argument("--tol", type=float, default=1e-4, help="max allowed |ours - reference| (fp32)")
    p.add_argument("--seed", type=int, default=0)


HQ, HKV, D, THETA = 9, 3, 64, 1e5


def _chunk(seed: int, index: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return tuple(torch.randn(1, h, n, D, generator=g) for h in (HQ, HKV, HKV))


def run(args: argparse.Namespace) -> int:
    if args.tokens < 1 or args.chunk < 1 or args.decode < 0 or args.check_every < 1:
        raise ValueError("--tokens and --chunk must be >= 1, --decode >= 0, --check-every >= 1")
    console = Console()
    policy, rope = sa.SinkWindow(sinks=args.sinks, window=args.window), sa.RoPE(D, THETA)
    attn = sa.StreamingAttention(policy, rope, args.positions)
    console.print(
        f"[bold]streamattn engine demo[/]: {args.tokens:,} tokens, {policy}, positions={args.positions!r}, "
        f"heads {HQ}/{HKV}, head_dim {D}, fp32, {torch.get_num_threads()} threads"
    )
    sinks_k: list[torch.Tensor] = []  # raw first tokens and recent chunks: what the reference needs
    sinks_v: list[torch.Tensor] = []
    recent: deque = deque()
    worst, checks, buffers, fed = 0.0, 0, None, 0
    plan = [args.chunk] * ((args.tokens - args.decode) // args.chunk)
    plan += [(args.tokens - args.decode) % args.chunk] if (args.tokens - args.decode) % args.chunk else []
    plan += [1] * min(args.decode, args.tokens)
    chunked_s = decode_s = 0.0
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} tok"),
        TextColumn("{task.fields[rate]:>8,.0f} tok/s"),
        TextColumn("cache {task.fields[cache]:,} keys"),
        TextColumn("max dev {task.fields[dev]:.1e}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with torch.inference_mode(), Progress(*columns, console=console) as progress:
        task = progress.add_task("streaming", total=args.tokens, rate=0.0, cache=0, dev=0.0)
        start = time.perf_counter()
        for index, n in enumerate(plan):
            q, k, v = _chunk(args.seed, index, n)
            t0 = time.perf_counter()
            out = attn(q, k, v)
            elapsed = time.perf_counter() - t0
            if n == 1:
                decode_s += elapsed
            else:
                chunked_s += elapsed
            recent.append((fed, k, v))
            while recent[0][0] + recent[0][1].shape[2] <= fed - args.window:  # older than any window
                recent.popleft()
            if fed < args.sinks:  # the first tokens stay visible forever
                sinks_k.append(k[:, :, : args.sinks - fed])
                sinks_v.append(v[:, :, : args.sinks - fed])
            if index % args.check_every == 0 or index == len(plan) - 1:
                worst = max(worst, _deviation(policy, rope, args, q, out, fed, sinks_k, sinks_v, recent))
                checks += 1
            fed += n
            if buffers is None:  # allocated at full capacity by the first call, never again
                buffers = (attn.state.k.data_ptr(), attn.state.v.data_ptr(), tuple(attn.state.k.shape))
            progress.update(task, advance=n, rate=fed / (time.perf_counter() - start), cache=attn.cached[0], dev=worst)
    total_s = time.perf_counter() - start
    same = buffers == (attn.state.k.data_ptr(), attn.state.v.data_ptr(), tuple(attn.state.k.shape))
    n_chunked, n_decode = sum(n for n in plan if n > 1), sum(1 for n in plan if n == 1)
    table = Table(title="engine demo summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("tokens streamed", f"{fed:,}")
    table.add_row("wall time (incl. data generation, checks)", f"{total_s:.1f} s")
    table.add_row(f"chunked attention ({args.chunk}/call)", f"{n_chunked / max(chunked_s, 1e-9):,.0f} tok/s")
    if n_decode:
        table.add_row("decode, token by token", f"{1e3 * decode_s / n_decode:.3f} ms/token")
    table.add_row("cache keys (constant)", f"{attn.cached[0]:,} of {policy.capacity:,}")
    state_bytes = sum(
        t.numel() * t.element_size() for t in (attn.state.k, attn.state.v, attn.state.sink_k) if t is not None
    )
    table.add_row("state size", f"{state_bytes / 2**20:.2f} MiB")
    table.add_row("same buffers since the first call", "yes" if same else "NO")
    table.add_row(f"max |ours - fp64 reference| ({checks} checks)", f"{worst:.2e}")
    console.print(table)
    ok = worst <= args.tol and same
    console.print("[green]OK[/]" if ok else f"[red]FAILED[/] (tolerance {args.tol:g})")
    return 0 if ok else 1


def _deviation(policy, rope, args, q, out, fed, sinks_k, sinks_v, recent) -> float:
    """Max |out - reference| over up to 4 queries of this chunk (stream indices fed + i)."""
    n = q.shape[2]
    picks = sorted({0, n // 3, (2 * n) // 3, n - 1})
    first = recent[0][0]  # recent chunks are contiguous from here to the end of this chunk
    k_recent = torch.cat([c[1] for c in recent], dim=2)
    v_recent = torch.cat([c[2] for c in recent], dim=2)
    n_sinks = min(args.sinks, first)  # sinks not already inside the recent chunks
    k_all = torch.cat((*sinks_k, k_recent), dim=2) if n_sinks else k_recent
    v_all = torch.cat((*sinks_v, v_recent), dim=2) if n_sinks else v_recent
    k_all = torch.cat((k_all[:, :, :n_sinks], k_all[:, :, -k_recent.shape[2] :]), dim=2)
    v_all = torch.cat((v_all[:, :, :n_sinks], v_all[:, :, -v_recent.shape[2] :]), dim=2)
    kv_idx = list(range(n_sinks)) + list(range(first, first + k_recent.shape[2]))
    want = reference.attention(
        q[:, :, picks],
        k_all,
        v_all,
        policy,
        rope=rope,
        positions=args.positions,
        q_idx=[fed + i for i in picks],
        kv_idx=kv_idx,
    )
    return (out[:, :, picks].double() - want).abs().max().item()
