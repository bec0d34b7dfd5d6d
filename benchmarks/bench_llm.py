"""SmolLM2 decode latency and chunked-feed throughput vs stream position (prints tables; not a test).

Methods, each driven the same way (``model(input_ids, position_ids, past_key_values=cache)``, fp32):

- ``streamattn``: ``StreamingCache``, sinks 4 + window 1020, cache positions (StreamingLLM);
- ``dense``: transformers ``DynamicCache`` (full attention, SDPA; the cache grows);
- ``window (built-in)``: transformers ``DynamicSlidingWindowLayer``, window 1024, absolute positions;
- ``cat + re-rotate``: a transformers 4.x ``SinkCache``-style cache (keys re-rotated and
  ``torch.cat``-ed on every eviction; sinks 4 + window 1020), see ``benchmarks/baselines.py``.

Each method streams *Emma* in 256-token chunks up to the largest position. At every position in
``--positions`` it times ``--decode`` single-token steps (median ms) and then ``--chunks`` chunks
(tokens/s); these tokens stay part of the stream. Dense is streamed up to ``--dense-max``; beyond,
its cache is padded with random keys/values to the position (its cost depends on the length only;
marked ``*``). ``--state FILE`` (written by ``long_stream.py --save-state``) adds decode at the
position where that stream ended (1.1M tokens by default) for ``streamattn``.

Before timing, a correctness check: 48 tokens fed one at a time through ``streamattn`` and through
``cat + re-rotate`` (same semantics token by token) after a prefix longer than the window must give
the same log-probs.

    python benchmarks/bench_llm.py [--quick] [--state runs/long_stream_state.pt] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console

import streamattn as sa
from benchmarks.baselines import cat_rerotate_hf_cache
from streamattn.eval import read_text
from streamattn.hf import Stream, StreamingCache, load_model

CHUNK = 256
console = Console(width=150)


class Driver:
    """Feeds a model through one kind of cache and times decode steps and chunks."""

    def __init__(self, name: str, model, cache, positions) -> None:
        self.name, self.model, self.cache, self.positions = name, model, cache, positions
        self.seen = 0

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids[None],
            position_ids=self.positions(self.seen, ids.numel()),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.seen += ids.numel()
        return out.logits[0]

    def cache_mib(self) -> float:
        if isinstance(self.cache, StreamingCache):
            return self.cache.nbytes / 2**20
        tensors = [t for layer in self.cache.layers for t in (layer.keys, layer.values)]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor)) / 2**20


def make_driver(name: str, model, window: int, sinks: int) -> Driver:
    from transformers.cache_utils import Cache, DynamicCache, DynamicSlidingWindowLayer

    layers = model.config.get_text_config().num_hidden_layers
    if name == "streamattn":
        cache = StreamingCache(model, sa.SinkWindow(sinks=sinks, window=window - sinks))  # sets 'streamattn'
        return Driver(name, model, cache, lambda seen, t: torch.zeros(1, t, dtype=torch.long))
    model.set_attn_implementation("sdpa")
    absolute = lambda seen, t: torch.arange(seen, seen + t)[None]  # noqa: E731
    if name == "dense":
        return Driver(name, model, DynamicCache(config=model.config), absolute)
    if name == "window (built-in)":
        return Driver(name, model, Cache(layers=[DynamicSlidingWindowLayer(window) for _ in range(layers)]), absolute)
    if name == "cat + re-rotate":
        cache = cat_rerotate_hf_cache(model, sinks, window - sinks)
        return Driver(name, model, cache, lambda seen, t: cache.next_positions(t))
    raise ValueError(name)


def pad_dense(driver: Driver, length: int) -> None:
    """Grow a DynamicCache to ``length`` keys with random keys/values (for its cost only)."""
    for layer in driver.cache.layers:
        extra = length - layer.keys.shape[2]
        if extra > 0:
            b, h, _, d = layer.keys.shape
            layer.keys = torch.cat((torch.randn(b, h, extra, d), layer.keys), dim=2)
            layer.values = torch.cat((torch.randn(b, h, extra, d), layer.values), dim=2)
    driver.seen = max(driver.seen, length)


def logprobs_one_by_one(driver: Driver, ids: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.log_softmax(driver.feed(t[None])[-1].float(), -1) for t in ids])


def check_same_semantics(model, ids: torch.Tensor, window: int, sinks: int) -> float:
    """streamattn (chunked prefix, then one by one) vs cat + re-rotate (one by one throughout)."""
    prefix, tail = ids[: window + 200], ids[window + 200 : window + 248]
    ours = make_driver("streamattn", model, window, sinks)
    for start in range(0, prefix.numel(), CHUNK):
        ours.feed(prefix[start : start + CHUNK])
    a = logprobs_one_by_one(ours, tail)
    theirs = make_driver("cat + re-rotate", model, window, sinks)
    for t in prefix:
        theirs.feed(t[None])
    b = logprobs_one_by_one(theirs, tail)
    return float((a - b).abs().max())


def measure(driver: Driver, ids: torch.Tensor, positions: list[int], args, dense_max: int) -> dict[int, tuple]:
    """position -> (decode ms, chunked tok/s, cache MiB, padded?)"""
    results = {}
    pos = 0
    for target in positions:
        padded = False
        while pos < target:
            if driver.name == "dense" and pos >= dense_max:
                pad_dense(driver, target)
                pos, padded = target, True
                break
            n = min(CHUNK, target - pos)
            driver.feed(ids[pos : pos + n])
            pos += n
        times = []
        for _ in range(args.decode):
            t0 = time.perf_counter()
            driver.feed(ids[pos : pos + 1])
            times.append(time.perf_counter() - t0)
            pos += 1
        t0 = time.perf_counter()
        for _ in range(args.chunks):
            driver.feed(ids[pos : pos + CHUNK])
            pos += CHUNK
        rate = args.chunks * CHUNK / (time.perf_counter() - t0)
        results[target] = (1e3 * statistics.median(times), rate, driver.cache_mib(), padded)
        console.print(
            f"  {driver.name:<18} @ {target:>7,}: decode {results[target][0]:7.1f} ms   "
            f"chunked {rate:6.1f} tok/s   cache {results[target][2]:8.1f} MiB" + ("  (padded)" if padded else "")
        )
    return results


def decode_from_state(model, tokenizer, path: Path, ids: torch.Tensor, steps: int) -> tuple[int, float]:
    state = torch.load(path, weights_only=False)
    stream = Stream(model, tokenizer, sa.policy_from_config(state["config"]["policy"]))
    stream.load_state_dict(state)
    driver = Driver("streamattn", model, stream.cache, lambda seen, t: torch.zeros(1, t, dtype=torch.long))
    times = []
    for t in ids[:steps]:
        t0 = time.perf_counter()
        driver.feed(t[None])
        times.append(time.perf_counter() - t0)
    return stream.seen, 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="positions 1K-8K, fewer steps")
    parser.add_argument("--positions", default="1024,4096,16384,32768,65536")
    parser.add_argument("--dense-max", type=int, default=16384, help="dense is streamed up to here, padded beyond")
    parser.add_argument("--decode", type=int, default=16, help="decode steps timed per position")
    parser.add_argument("--chunks", type=int, default=2, help="chunks timed per position")
    parser.add_argument("--methods", default="streamattn,dense,window (built-in),cat + re-rotate")
    parser.add_argument("--state", type=Path, default=None, help="a long_stream.py --save-state file")
    parser.add_argument("--out", type=Path, default=None, help="write the tables as Markdown here")
    args = parser.parse_args()
    if args.quick:
        args.positions, args.decode, args.chunks = "1024,4096,8192", 8, 1
    positions = [int(p) for p in args.positions.split(",")]
    window, sinks = 1024, 4
    model, tokenizer = load_model("smollm2")
    ids = torch.tensor(tokenizer(read_text(None), add_special_tokens=False).input_ids)
    if ids.numel() < max(positions) + 2 * CHUNK * args.chunks + args.decode:
        raise SystemExit(f"Emma has {ids.numel():,} tokens; positions up to {max(positions):,} need more")
    console.print(
        f"[bold]bench_llm[/]: SmolLM2-135M fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}"
    )
    diff = check_same_semantics(model, ids, window, sinks)
    console.print(
        f"check: streamattn vs cat + re-rotate, 48 tokens one by one past the window: max |Δ log-prob| {diff:.1e}"
    )
    if diff > 1e-3:
        raise SystemExit("the baseline and streamattn disagree: not comparing speeds of different things")

    results = {}
    for name in [m.strip() for m in args.methods.split(",")]:
        gc.collect()
        driver = make_driver(name, model, window, sinks)
        results[name] = measure(driver, ids, positions, args, args.dense_max)
        del driver
    long = None
    if args.state is not None and "streamattn" in results:
        gc.collect()
        long = decode_from_state(model, tokenizer, args.state, ids, args.decode)
        console.print(f"  streamattn @ {long[0]:,} (restored long stream): decode {long[1]:.1f} ms")
    report = tables(results, positions, long, diff)
    console.print(report)
    if args.out:
        args.out.write_text(report + "\n")
        console.print(f"wrote {args.out}")


def tables(results: dict, positions: list[int], long, diff: float) -> str:
    heads = [f"{p // 1024}K" for p in positions] + ([f"{long[0] / 1e6:.2f}M"] if long else [])
    lines = ["Decode, ms per token (median):", "", "| method | " + " | ".join(heads) + " |"]
    lines += ["|---|" + "---|" * len(heads)]

    def cell(r, fmt):
        return fmt(r) + ("*" if r[3] else "")

    for name, res in results.items():
        cells = [cell(res[p], lambda r: f"{r[0]:.1f}") for p in positions]
        cells += [f"{long[1]:.1f}" if name == "streamattn" else "-"] if long else []
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Chunked feed (256-token chunks), tokens/s:",
        "",
        "| method | " + " | ".join(heads[: len(positions)]) + " |",
    ]
    lines += ["|---|" + "---|" * len(positions)]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(res[p], lambda r: f"{r[1]:.0f}") for p in positions) + " |")
    lines += ["", "Cache memory, MiB:", "", "| method | " + " | ".join(heads[: len(positions)]) + " |"]
    lines += ["|---|" + "---|" * len(positions)]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(cell(res[p], lambda r: f"{r[2]:.0f}") for p in positions) + " |")
    ours = results.get("streamattn")
    if ours:
        lines += [""]
        if "dense" in results:
            base = results["dense"][positions[0]]
            worst = max(ours[p][0] for p in positions)
            lines.append(
                f"streamattn decode, slowest position / dense at {positions[0] // 1024}K: {worst / base[0]:.2f}; "
                f"chunked feed, slowest position / dense at {positions[0] // 1024}K: "
                f"{min(ours[p][1] for p in positions) / base[1]:.2f} (throughput ratio)"
            )
        if "cat + re-rotate" in results:
            cat = results["cat + re-rotate"]
            ratios = [cat[p][0] / ours[p][0] for p in positions if p >= 1024]
            lines.append(f"cat + re-rotate decode / streamattn decode: {min(ratios):.2f}-{max(ratios):.2f}x")
    lines += [
        "",
        f"`*` dense cache padded with random keys/values beyond its streamed length. Check: streamattn == cat + re-rotate token by token to {diff:.1e}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
