"""Speed of two source trees of streamattn, interleaved: did a change cost speed? (prints a table)

Each round runs every probe once per tree, alternating which tree goes first, each in a fresh
process that imports that tree's ``streamattn`` (``PYTHONPATH``). A figure is the median over
rounds, a ratio the median of per-round ratios new / old, so the drift of a shared 2-core VM hits
both trees alike. Probes use only the API both trees share.

    python -m benchmarks.compare_revisions --old 208cb94 [--rounds 7] [--llm] [--out FILE]

``--old`` is a git revision (exported with ``git archive`` to a temporary directory); the new tree
is the working tree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ENGINE_PROBE = r"""
import json, sys, time, torch
import streamattn as sa
torch.manual_seed(0)
HQ, HKV, D = 9, 3, 64
def timed(fn, n):
    for _ in range(20): fn()
    t0 = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t0) / n
out = {}
with torch.inference_mode():
    for b in (1, 8):
        for positions in ("cache", "absolute"):
            attn = sa.StreamingAttention(sa.SinkWindow(4, 1020), sa.RoPE(D, 1e5), positions)
            attn(torch.randn(b, HQ, 2048, D), torch.randn(b, HKV, 2048, D), torch.randn(b, HKV, 2048, D))
            q, k, v = torch.randn(b, HQ, 1, D), torch.randn(b, HKV, 1, D), torch.randn(b, HKV, 1, D)
            out[f"decode B={b} {positions} (us)"] = 1e6 * timed(lambda: attn(q, k, v), 400 if b == 1 else 100)
    attn = sa.StreamingAttention(sa.SinkWindow(4, 1020), sa.RoPE(D, 1e5), "cache")
    attn(torch.randn(3, HQ, 40, D), torch.randn(3, HKV, 40, D), torch.randn(3, HKV, 40, D), lengths=[40, 17, 3])
    q, k, v = torch.randn(3, HQ, 1, D), torch.randn(3, HKV, 1, D), torch.randn(3, HKV, 1, D)
    out["decode B=3 ragged fills (us)"] = 1e6 * timed(lambda: attn(q, k, v), 200)
    attn = sa.StreamingAttention(sa.SinkWindow(4, 1020), sa.RoPE(D, 1e5), "cache")
    q, k, v = torch.randn(1, HQ, 256, D), torch.randn(1, HKV, 256, D), torch.randn(1, HKV, 256, D)
    out["chunks of 256, B=1 (tok/s)"] = 256 / timed(lambda: attn(q, k, v), 40)
print(json.dumps(out))
"""

LLM_PROBE = r"""
import json, os, time, torch
from streamattn.hf import Stream, load_model
import streamattn as sa
from streamattn.eval import read_text
model, tok = load_model("smollm2")
ids = torch.tensor(tok(read_text()[:20000], add_special_tokens=False).input_ids[:2048])
out = {}
with torch.inference_mode():
    stream = Stream(model, tok, sa.SinkWindow(4, 1020), chunk_size=256)
    stream.feed(ids[:1024])
    t0 = time.perf_counter(); stream.feed(ids[1024:2048]); dt = time.perf_counter() - t0
    out["SmolLM2 chunked feed, 256/call (tok/s)"] = 1024 / dt
    times = []
    for i in range(48):
        t0 = time.perf_counter(); stream.feed(ids[i : i + 1]); times.append(time.perf_counter() - t0)
    out["SmolLM2 decode step (ms)"] = 1e3 * sorted(times[8:])[len(times[8:]) // 2]
print(json.dumps(out))
"""


def export(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "streamattn"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def probe(tree: Path, code: str) -> dict[str, float]:
    env = {"PYTHONPATH": f"{tree}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    for key in ("STREAMATTN_CACHE", "XDG_CACHE_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    if done.returncode:
        raise RuntimeError(f"probe failed in {tree}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", default="208cb94", help="git revision to compare with (default: before issue 8)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--llm", action="store_true", help="also time SmolLM2 (chunked feed, decode)")
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    args = p.parse_args()
    probes = [ENGINE_PROBE] + ([LLM_PROBE] if args.llm else [])
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"old": export(args.old, Path(tmp)), "new": ROOT}
        rows: dict[str, dict[str, list[float]]] = {}
        for r in range(args.rounds):
            order = ["old", "new"] if r % 2 == 0 else ["new", "old"]
            for code in probes:
                for name in order:
                    for key, value in probe(trees[name], code).items():
                        rows.setdefault(key, {"old": [], "new": []})[name].append(value)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    lines = [
        f"Interleaved: {args.rounds} rounds, each probe in a fresh process per tree; old = {args.old}, new = working tree.",
        "",
        "| probe | old (median) | new (median) | new / old (median of per-round ratios) |",
        "|---|---|---|---|",
    ]
    for key, v in rows.items():
        ratio = statistics.median(n / o for n, o in zip(v["new"], v["old"], strict=True))
        lines.append(
            f"| {key} | {statistics.median(v['old']):,.1f} | {statistics.median(v['new']):,.1f} | {ratio:.3f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
