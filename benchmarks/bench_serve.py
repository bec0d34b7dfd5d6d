"""The server under load: a long conversation and many concurrent sessions (tables and a plot).

Starts `streamattn serve` processes on 127.0.0.1 (this script is the separate load-generating
process; it talks HTTP only, with the official async `openai` client) and measures:

1. **A long conversation** (``--turns``, default 200): one session, each turn a short user message
   and a ``--reply``-token greedy reply, streamed; time to first token and the whole turn's latency
   per turn. Against what a stateless OpenAI-style server does: resend the whole history every turn
   and re-encode it (the same server, requests without a session, full attention: transformers'
   own attention over the whole transcript). The stateless side is timed at a few turns
   (``--baseline-turns``) with the transcript the session produced (every turn would take hours).
2. **Concurrency** (``--sessions 1,4,16,64``): N sessions at once, each one turn of ``--reply``
   tokens (streamed) after a one-turn warm-up; aggregate generated tokens/s over the wall time,
   and the inter-token latency (time between streamed pieces) p50/p99 over all sessions.

    python -m benchmarks.bench_serve [--turns 200] [--sessions 1,4,16,64] [--reply 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI
from rich.console import Console

from benchmarks.bench_engine import machine

MESSAGES = [
    "Tell me something about {}.",
    "What else do you know about {}?",
    "Give me one more fact about {}.",
    "Summarise what we said about {}.",
]
TOPICS = ["Emma", "Bath", "Highbury", "letters", "dancing", "the weather", "Mr. Knightley", "a picnic"]


class Server:
    def __init__(self, policy: str, state_dir: Path | None, max_batch: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        args = [sys.executable, "-m", "streamattn.cli", "serve", "--port", str(self.port), "--policy", policy]
        args += ["--max-batch", str(max_batch), "--max-queue", "256"]
        if state_dir is not None:
            args += ["--state-dir", str(state_dir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("server did not start")

    def client(self) -> AsyncOpenAI:
        return AsyncOpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=3600)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


async def turn(client: AsyncOpenAI, messages: list[dict], reply: int, session: str | None) -> dict:
    """One streamed request: time to first content, whole latency, the times between pieces, text."""
    extra = {} if session is None else {"session_id": session}
    t0 = time.perf_counter()
    first, stamps, pieces = None, [], []
    stream = await client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=reply, stream=True, extra_body=extra
    )
    async for chunk in stream:
        content = chunk.choices[0].delta.content if chunk.choices else None
        if content:
            now = time.perf_counter()
            first = first or now
            stamps.append(now)
            pieces.append(content)
    end = time.perf_counter()
    return {
        "ttft": (first or end) - t0,
        "latency": end - t0,
        "gaps": [b - a for a, b in itertools.pairwise(stamps)],
        "text": "".join(pieces),
        "pieces": len(pieces),
    }


async def conversation(args, out: Path, console: Console) -> tuple[list[dict], list[dict]]:
    ours = Server(args.policy, out / "sessions", 16)
    history: list[dict] = []
    rows = []
    try:
        client = ours.client()
        for i in range(args.turns):
            user = MESSAGES[i % len(MESSAGES)].format(TOPICS[i // len(MESSAGES) % len(TOPICS)])
            r = await turn(client, [{"role": "user", "content": user}], args.reply, "long")
            history += [{"role": "user", "content": user}, {"role": "assistant", "content": r["text"]}]
            tokens = httpx.get(f"{ours.url}/v1/sessions/long").json()["tokens"]
            rows.append({"turn": i + 1, "tokens": tokens, "ttft": r["ttft"], "latency": r["latency"]})
            if (i + 1) % 20 == 0:
                console.print(
                    f"turn {i + 1}: {tokens:,} tokens, ttft {r['ttft'] * 1e3:.0f} ms, turn {r['latency']:.2f} s"
                )
        await client.close()
    finally:
        ours.stop()
    base = Server("full", None, 16)
    baseline = []
    try:
        client = base.client()
        for n in sorted({t for t in args.baseline_turns if t <= args.turns}):
            r = await turn(client, history[: 2 * n - 1], args.reply, None)
            baseline.append({"turn": n, "tokens": rows[n - 1]["tokens"], "ttft": r["ttft"], "latency": r["latency"]})
            console.print(f"stateless, turn {n}: ttft {r['ttft']:.2f} s, turn {r['latency']:.2f} s")
        await client.close()
    finally:
        base.stop()
    return rows, baseline


async def concurrency(args, out: Path, console: Console) -> list[dict]:
    results = []
    for n in args.sessions:
        server = Server(args.policy, None, max(n, 1))
        try:
            client = server.client()
            names = [f"s{n}_{i}" for i in range(n)]
            await asyncio.gather(*(turn(client, [{"role": "user", "content": "Hello!"}], 4, s) for s in names))
            t0 = time.perf_counter()
            done = await asyncio.gather(
                *(
                    turn(
                        client,
                        [{"role": "user", "content": f"Tell me a story about {TOPICS[i % len(TOPICS)]}."}],
                        args.reply,
                        s,
                    )
                    for i, s in enumerate(names)
                )
            )
            wall = time.perf_counter() - t0
            await client.close()
        finally:
            server.stop()
        metrics_tokens = sum(r["pieces"] for r in done)
        gaps = sorted(g for r in done for g in r["gaps"])
        row = {
            "sessions": n,
            "tok_s": n * args.reply / wall,
            "pieces": metrics_tokens,
            "p50": statistics.median(gaps) if gaps else float("nan"),
            "p99": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else float("nan"),
            "wall": wall,
        }
        results.append(row)
        console.print(
            f"{n} sessions: {row['tok_s']:.1f} tok/s, inter-token p50 {row['p50'] * 1e3:.0f} ms, p99 {row['p99'] * 1e3:.0f} ms"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="sinks=4,window=1020")
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--baseline-turns", default="1,25,50,100,150,200")
    parser.add_argument("--sessions", default="1,4,16,64")
    parser.add_argument("--reply", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_serve"))
    args = parser.parse_args()
    args.baseline_turns = [int(x) for x in args.baseline_turns.split(",") if x]
    args.sessions = [int(x) for x in args.sessions.split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sessions").mkdir(exist_ok=True)
    console = Console(width=150)
    rows, baseline = asyncio.run(conversation(args, args.out, console)) if args.turns else ([], [])
    conc = asyncio.run(concurrency(args, args.out, console)) if args.sessions else []
    lines = [
        f"Machine: {machine()}; server threads: torch default; `{args.policy}`, SmolLM2-135M fp32, greedy, "
        f"replies of {args.reply} tokens, streamed; load from a separate process over 127.0.0.1.",
        "",
    ]
    if rows:
        lines += [
            f"A {args.turns}-turn conversation (one session) vs a stateless server re-encoding the history (full attention):",
            "",
            "| turn | tokens in the session | ours: time to first token (s) | ours: turn (s) | stateless: time to first token (s) | stateless: turn (s) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        base = {b["turn"]: b for b in baseline}
        for r in rows:
            if r["turn"] in base or r["turn"] % 25 == 0 or r["turn"] == 1:
                b = base.get(r["turn"])
                theirs = f"{b['ttft']:.2f} | {b['latency']:.2f}" if b else "- | -"
                lines.append(f"| {r['turn']} | {r['tokens']:,} | {r['ttft']:.3f} | {r['latency']:.2f} | {theirs} |")
        ttft = [r["ttft"] for r in rows]
        lines += [
            "",
            f"Ours over all {len(rows)} turns: time to first token median {statistics.median(ttft):.3f} s, "
            f"first 20 turns {statistics.median(ttft[:20]):.3f} s, last 20 {statistics.median(ttft[-20:]):.3f} s.",
            "",
        ]
    if conc:
        one = conc[0]["tok_s"]
        lines += [
            "| concurrent sessions | aggregate tok/s | vs 1 session | inter-token p50 (ms) | inter-token p99 (ms) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for c in conc:
            lines.append(
                f"| {c['sessions']} | {c['tok_s']:.1f} | {c['tok_s'] / one:.2f}x | {c['p50'] * 1e3:.0f} | {c['p99'] * 1e3:.0f} |"
            )
    text = "\n".join(lines)
    console.print(text)
    (args.out / "results.md").write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        if rows:
            axes[0].plot([r["turn"] for r in rows], [r["ttft"] for r in rows], label="ours (session)")
            axes[0].plot(
                [b["turn"] for b in baseline], [b["ttft"] for b in baseline], "o-", label="stateless (history resent)"
            )
            axes[0].set(xlabel="turn", ylabel="time to first token (s)", yscale="log", title="a long conversation")
            axes[0].legend()
        if conc:
            axes[1].plot([c["sessions"] for c in conc], [c["tok_s"] for c in conc], "o-")
            axes[1].set(xlabel="concurrent sessions", ylabel="aggregate tokens/s", xscale="log", title="batched decode")
        fig.tight_layout()
        fig.savefig(args.out / "serve.png", dpi=120)
    except ImportError:
        pass
    os.sync()


if __name__ == "__main__":
    main()
