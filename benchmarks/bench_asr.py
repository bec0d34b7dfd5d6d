"""Streaming Whisper tiny.en, measured: accuracy and latency, encoder compute per chunk, an hour-long stream.

Three parts (run any of them; ``long`` last, it takes ~15 min of CPU per hour of audio):

- ``grid``: the shipped LibriVox clip (44.4 s, ``streamattn/data/audio/two_cities.wav``) fed to
  ``StreamingTranscriber`` in pieces of ``chunk`` seconds, for chunk in {0.5, 1, 2} s x left in
  {2, 4, 8 s, full} (lookahead 0.2 s in every layer, the default), plus lookahead 0 / 0.4 s and
  ``lookahead_layers=1`` rows. Word error rate against the reference text and against offline
  Whisper (``transcribe_offline``: greedy, consecutive 30 s windows); emission latency of a word =
  audio seconds pushed when ``push`` returned it - its ``end`` as finally placed (words returned by
  ``finish()`` count at the clip's end; an audio-time latency, compute not included); real-time
  factor = wall / audio. The configurations run one after the other in each of ``--rounds`` rounds;
  RTF: the median and the best over rounds (transcripts are deterministic: checked equal).
- ``encoder``: compute per 1 s of audio, after the stream's first 30 s: the streaming encoder
  (``whisper_encoder(model, context_policy(1.0, 8.0, 0.2))`` fed 100 log-mel frames per push) vs
  re-encoding the buffer as whisper_streaming does (transformers' encoder on the buffer's features,
  padded to 3,000 frames, once per 1 s update). Interleaved, one push and one re-encode per round.
- ``long``: the clip repeated 81 times (81 x 44.4 s = 59.9 min of real speech, repeated) fed 1 s at
  a time through the whole transcriber (chunk 1, left 8, lookahead 0.2); every ``--every`` minutes:
  process RSS, the encoder's state bytes, the decoder window's frames, mean wall per chunk over the
  last span, cumulative RTF, and the WER of the clip repetitions that ended in the span (words
  assigned to a repetition by their estimated end).

torch threads = ``--threads`` (2). On a shared machine use ``--threads 1`` when another process holds a
core: two threads then wait on each other at every op (measured: RTF 5.0 with 2 threads vs 0.25 with
1 while another process used one of the 2 cores). Every table records the cores other processes used
while it was measured (``/proc/stat`` minus this process). Results: ``benchmarks/results/asr/{grid,encoder,long_stream}.md``
(and ``long_stream.png``, ``long_stream.csv``); the same tables are printed.

    python -m benchmarks.bench_asr [grid] [encoder] [long] [--rounds 3] [--minutes 60] [--every 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from benchmarks.bench_engine import machine
from streamattn.audio import (
    StreamingTranscriber,
    context_policy,
    load_audio,
    load_whisper,
    log_mel,
    transcribe_offline,
    wer,
    whisper_encoder,
)
from streamattn.audio.metrics import normalize

console = Console(width=160)
RATE = 16_000
CLIP = Path(__file__).resolve().parents[1] / "streamattn" / "data" / "audio"
OUT = Path(__file__).resolve().parent / "results" / "asr"
CHUNKS = (0.5, 1.0, 2.0)
CONTENDED = 0.3  # cores used by other processes during a grid run: above this it is done again
LEFTS = (2.0, 4.0, 8.0, None)


def load_clip() -> tuple[torch.Tensor, str]:
    return load_audio(CLIP / "two_cities.wav"), (CLIP / "two_cities.txt").read_text().strip()


def loadavg() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class Others:
    """CPU the *other* processes used since ``start()`` (cores, averaged over the wall time): the
    machine's busy time (``/proc/stat``) minus this process's own CPU time. The load average lags
    (it counts this process too, over minutes); this says how contended the measurement was."""

    def __init__(self) -> None:
        self.start()

    @staticmethod
    def _now() -> tuple[float, float, float]:
        try:
            ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError):
            busy = float("nan")
        own = sum(os.times()[:2])
        return time.monotonic(), busy, own

    def start(self) -> None:
        self.t0 = self._now()

    def cores(self) -> float:
        (w0, b0, o0), (w1, b1, o1) = self.t0, self._now()
        return max(0.0, (b1 - b0) - (o1 - o0)) / max(w1 - w0, 1e-9)


def wait_quiet(limit: float, busy: float = 0.2) -> float:
    """Wait (at most ``limit`` seconds) until other processes use less than ``busy`` cores over 5 s;
    returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        others = Others()
        time.sleep(5)
        if others.cores() < busy:
            break
    return time.monotonic() - t0


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


def fmt_left(left: float | None) -> str:
    return "full" if left is None else f"{left:g}"


def write(name: str, text: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(text + "\n")
    console.print(f"wrote {OUT / name}")


# ---------------------------------------------------------------------------------------------------
# 1. accuracy and latency grid


@dataclass(frozen=True)
class Config:
    chunk: float
    left: float | None
    lookahead: float
    lookahead_layers: int | None = None

    @property
    def label(self) -> str:
        layers = "all" if self.lookahead_layers is None else str(self.lookahead_layers)
        return f"| {self.chunk:g} | {fmt_left(self.left)} | {self.lookahead:g} | {layers} |"


@dataclass
class Run:
    text: str
    words: int
    latencies: list[float]
    encoder_lag: list[float]  # per push: audio pushed - audio the encoder has emitted (s)
    wall: float
    others: float = float("nan")  # cores other processes used during the run


def stream_clip(model, processor, audio: torch.Tensor, cfg: Config) -> Run:
    """Feed ``audio`` in pieces of ``cfg.chunk`` seconds; latencies from the words each push returns."""
    asr = StreamingTranscriber(
        model,
        processor,
        chunk=cfg.chunk,
        left=cfg.left,
        lookahead=cfg.lookahead,
        lookahead_layers=cfg.lookahead_layers,
    )
    step, total = round(cfg.chunk * RATE), audio.numel() / RATE
    at, lag = [], []  # audio pushed when each word was committed; encoder lag after each push
    t0 = time.perf_counter()
    for start in range(0, audio.numel(), step):
        words = asr.push(audio[start : start + step][None])[0]
        pushed = asr.samples[0] / RATE
        at += [pushed] * len(words)
        window = asr.windows[0]
        lag.append(pushed - (window.origin + window.frames.shape[0]) * 0.02)
    at += [total] * len(asr.finish()[0])  # the stream ended at the clip's end
    wall = time.perf_counter() - t0
    final = asr.committed[0]
    return Run(" ".join(w.text for w in final), len(final), latencies(final, at, total), lag, wall)


def latencies(final: list, at: list[float], total: float) -> list[float]:
    """Audio pushed when each word was committed minus its end as finally placed (from its closed window's
    timestamps; capped at the audio's end: ``finish()`` appends silence)."""
    if len(final) != len(at):
        raise RuntimeError(f"{len(final)} words committed but {len(at)} returned by push/finish")
    return [a - min(w.end, total) for w, a in zip(final, at, strict=True)]


def part_grid(model, processor, rounds: int, retries: int = 3) -> None:
    audio, reference = load_clip()
    seconds = audio.numel() / RATE
    configs = [Config(c, left, 0.2) for c in CHUNKS for left in LEFTS if left is None or left % c == 0]
    configs += [Config(1.0, 8.0, 0.0), Config(1.0, 8.0, 0.4), Config(1.0, 8.0, 0.2, 1), Config(0.5, 8.0, 0.2, 1)]
    load_start, whole, redone = loadavg(), Others(), 0
    offline_text, offline_walls = "", []
    runs: dict[Config, list[Run]] = {cfg: [] for cfg in configs}
    for r in range(rounds):
        t0 = time.perf_counter()
        offline_text = transcribe_offline(model, processor, audio)
        offline_walls.append(time.perf_counter() - t0)
        for cfg in configs:
            for attempt in range(retries + 1):
                others = Others()
                run = stream_clip(model, processor, audio, cfg)
                run.others = others.cores()
                if run.others < CONTENDED or attempt == retries:
                    break
                console.print(f"{cfg.label} disturbed (other processes: {run.others:.2f} cores): waiting, again")
                redone += 1
                wait_quiet(600)
            runs[cfg].append(run)
            console.print(
                f"round {r + 1}/{rounds} {cfg.label} WER {wer(reference, run.text):.3f} "
                f"RTF {run.wall / seconds:.3f} (other processes: {run.others:.2f} cores)"
            )
    lines = [
        f"Machine: {machine()}. 2 cores shared with other jobs: other processes used {whole.cores():.2f} cores "
        f"on average during this part (load average {load_start} at the start, {loadavg()} at the end).",
        "",
        f"Whisper tiny.en fp32 on the shipped LibriVox clip (*A Tale of Two Cities*, {seconds:.1f} s, "
        f"{len(normalize(reference))} reference words), fed in pieces of `chunk` seconds. WER: word error rate "
        "(lowercase, punctuation removed) against the reference text and against offline Whisper's transcript "
        "(`transcribe_offline`: greedy, consecutive 30 s windows). Latency of a word: audio seconds pushed when "
        "`push` returned it minus its end as finally placed (`committed`: its closed window's segment timestamps, "
        "interpolated by character; as `streamattn transcribe` reports it); words returned by `finish()` count "
        "at the clip's end; audio time only (add the compute per chunk: RTF x chunk). Encoder lag: audio pushed minus audio the encoder "
        f"has emitted, mean over pushes. RTF: wall / audio, median and best of {rounds} rounds (all configurations "
        "run one after the other in each round; a run during which other processes used more than "
        f"{CONTENDED} cores was done again after a pause, up to {retries} times: {redone} runs were; 'others': "
        "cores the other processes used during the best run); transcripts were "
        + (
            "identical in every round."
            if all(len({run.text for run in rs}) == 1 for rs in runs.values())
            else "NOT identical across rounds (see below)."
        ),
        "",
        "| chunk (s) | left (s) | lookahead (s) | lookahead layers | WER vs reference | WER vs offline | words "
        "| latency mean (s) | latency p90 (s) | encoder lag (s) | RTF median | RTF best | others |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| offline | - | - | - | {wer(reference, offline_text):.1%} | - | {len(offline_text.split())} "
        f"| - | - | - | {statistics.median(offline_walls) / seconds:.3f} | {min(offline_walls) / seconds:.3f} | - |",
    ]
    for cfg, rs in runs.items():
        run = rs[0]
        walls = [x.wall for x in rs]
        best = min(rs, key=lambda x: x.wall)
        lines.append(
            f"{cfg.label} {wer(reference, run.text):.1%} | {wer(offline_text, run.text):.1%} | {run.words} "
            f"| {statistics.mean(run.latencies):.2f} | {p90(run.latencies):.2f} "
            f"| {statistics.mean(run.encoder_lag):.2f} | {statistics.median(walls) / seconds:.3f} "
            f"| {best.wall / seconds:.3f} | {best.others:.2f} |"
        )
    lines += ["", "Transcripts (round 1):", "", f"- offline: {offline_text}"]
    for cfg, rs in runs.items():
        lines.append(
            f"- {cfg.label.strip('| ').replace(' | ', ' / ')} (chunk / left / lookahead / layers): {rs[0].text}"
        )
        for r, run in enumerate(rs[1:], start=2):
            if run.text != rs[0].text:
                lines.append(f"  - round {r} differs: {run.text}")
    text = "\n".join(lines)
    console.print(text)
    write("grid.md", text)


# ---------------------------------------------------------------------------------------------------
# 2. encoder compute per 1 s chunk: streaming vs re-encoding the 30 s buffer


def part_encoder(model, processor, rounds: int, warm_seconds: int = 30) -> None:
    audio, _ = load_clip()
    total = warm_seconds + rounds + 1
    stream = audio.repeat(-(-total * RATE // audio.numel()))[: total * RATE]
    mel_filters = torch.as_tensor(processor.feature_extractor.mel_filters, dtype=torch.float32)
    mel = log_mel(stream, mel_filters).T[None].contiguous()  # [1, frames, 80], 100 frames per second
    policy = context_policy(1.0, 8.0, 0.2)
    streaming = whisper_encoder(model, policy)
    encoder = model.get_encoder()
    buffer_feats = []  # whisper_streaming's buffer after each update: the audio since the last 30 s boundary
    for r in range(rounds):
        end = (warm_seconds + r + 1) * RATE
        start = (end - 1) // (30 * RATE) * (30 * RATE)
        buffer_feats.append(
            processor.feature_extractor(
                stream[start:end].numpy(), sampling_rate=RATE, return_tensors="pt"
            ).input_features.to(model.dtype)  # [1, 80, 3000]: padded to 30 s
        )
    load_start, whole = loadavg(), Others()
    ours, theirs = [], []
    with torch.inference_mode():
        for s in range(warm_seconds):  # the stream's first 30 s, untimed
            streaming.push(mel[:, 100 * s : 100 * (s + 1)], [100])
        encoder(buffer_feats[0])  # warm-up
        for r in range(rounds):
            s = warm_seconds + r
            piece = mel[:, 100 * s : 100 * (s + 1)]
            order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
            for who in order:
                t0 = time.perf_counter()
                if who == "ours":
                    streaming.push(piece, [100])
                    ours.append(time.perf_counter() - t0)
                else:
                    encoder(buffer_feats[r])
                    theirs.append(time.perf_counter() - t0)
    ratios = [b / a for a, b in zip(ours, theirs, strict=True)]
    frames = policy.left + policy.chunk + policy.lookahead
    lines = [
        f"Machine: {machine()}. 2 cores shared with other jobs: other processes used {whole.cores():.2f} cores "
        f"on average during this part (load average {load_start} at the start, {loadavg()} at the end).",
        "",
        f"Whisper tiny.en's encoder (4 layers, d 384), fp32, one stream. {rounds} interleaved rounds (order "
        f"alternating), stream seconds {warm_seconds}-{warm_seconds + rounds} (after the first {warm_seconds} s, "
        "untimed): each round one 1 s push of the streaming encoder (`whisper_encoder(model, context_policy(1.0, "
        f"8.0, 0.2))`: 100 log-mel frames in, ~50 encoder frames out, attention over <= {frames} keys per layer; "
        "positions t mod 1500, the default: the transcriber's epoch positions cost the same) "
        "and one re-encode of whisper_streaming's buffer (transformers' `model.get_encoder()` on the buffer's "
        "features padded to 3,000 frames = 30 s, as Whisper requires: one per 1 s update; the buffer here is the "
        "audio since the last 30 s boundary, and its length does not change the cost). Front end not timed in "
        "either. The same clip repeated to make the stream.",
        "",
        "| encoder, per 1 s of audio | median (ms) | p90 (ms) | best (ms) | RTF of the encoder (median) |",
        "|---|---:|---:|---:|---:|",
        f"| streaming (chunk 1 s, left 8 s, lookahead 0.2 s) | {1e3 * statistics.median(ours):.1f} "
        f"| {1e3 * p90(ours):.1f} | {1e3 * min(ours):.1f} | {statistics.median(ours):.4f} |",
        f"| re-encode the 30 s buffer (whisper_streaming) | {1e3 * statistics.median(theirs):.1f} "
        f"| {1e3 * p90(theirs):.1f} | {1e3 * min(theirs):.1f} | {statistics.median(theirs):.4f} |",
        "",
        f"Re-encode / streaming: {statistics.median(ratios):.1f}x (median of per-round ratios); "
        f"{statistics.median(theirs) / statistics.median(ours):.1f}x (ratio of medians). "
        f"Streaming encoder state after the run: {streaming.nbytes / 2**10:,.0f} KiB.",
    ]
    text = "\n".join(lines)
    console.print(text)
    write("encoder.md", text)


# ---------------------------------------------------------------------------------------------------
# 3. an hour of speech (the clip repeated): memory and cost per chunk stay flat


def prefix_distances(ref: list[str], hyp: list[str], cuts: list[tuple[int, int, int]]) -> list[int]:
    """For each ``(i, j, slack)`` in ``cuts`` (``i`` increasing): the edit distance between ``ref[:i]`` and
    the best ``hyp[:j']`` with ``|j' - j| <= slack`` (a hypothesis cut that is only an estimate); one
    dynamic programme over the whole of both, a row at a time."""
    wanted: dict[int, list[int]] = {}
    for n, (i, _, _) in enumerate(cuts):
        wanted.setdefault(i, []).append(n)
    out = [0] * len(cuts)
    previous = list(range(len(hyp) + 1))

    def best(row: list[int], n: int) -> int:
        _, j, slack = cuts[n]
        return min(row[max(0, j - slack) : j + slack + 1])

    for n in wanted.get(0, []):
        out[n] = best(previous, n)
    for i, word in enumerate(ref, start=1):
        current = [i]
        for j, other in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other)))
        previous = current
        for n in wanted.get(i, []):
            out[n] = best(previous, n)
    return out


def part_long(model, processor, minutes: float, every: float, words_out: Path | None = None) -> None:
    audio, reference = load_clip()
    clip_n = audio.numel()
    ref_words = normalize(reference)
    repeats = max(1, round(minutes * 60 * RATE / clip_n))
    total = repeats * clip_n
    asr = StreamingTranscriber(model, processor, chunk=1.0, left=8.0, lookahead=0.2)
    step, span = RATE, round(every * 60)  # span: chunks per reported row
    rows: list[dict] = []
    per_minute: list[dict] = []
    walls: list[float] = []
    at: list[float] = []  # audio pushed when each word was committed
    load_start, whole, span_others, minute_others = loadavg(), Others(), Others(), Others()

    def take(start: int, n: int) -> torch.Tensor:  # samples [start, start + n) of the repeated clip
        n = min(n, total - start)
        out, i = [], start
        while i < start + n:
            off = i % clip_n
            piece = audio[off : min(clip_n, off + start + n - i)]
            out.append(piece)
            i += piece.numel()
        return torch.cat(out)

    t_start = time.perf_counter()
    for chunk_index, start in enumerate(range(0, total, step), start=1):
        t0 = time.perf_counter()
        words = asr.push(take(start, step)[None])[0]
        walls.append(time.perf_counter() - t0)
        pushed = asr.samples[0] / RATE
        at += [pushed] * len(words)
        end_of_stream = start + step >= total
        if chunk_index % 60 == 0 or end_of_stream:
            per_minute.append(
                {
                    "audio_min": pushed / 60,
                    "rss_mb": rss_mb(),
                    "encoder_kib": asr.encoder.nbytes / 2**10,
                    "window_frames": asr.windows[0].frames.shape[0],
                    "chunk_ms": 1e3 * statistics.mean(walls[-60:]),
                    "rtf": (time.perf_counter() - t_start) / pushed,
                    "others_cores": minute_others.cores(),
                }
            )
            minute_others.start()
        if chunk_index % span == 0 or end_of_stream:
            if end_of_stream:
                t0 = time.perf_counter()
                at += [total / RATE] * len(asr.finish()[0])
                walls.append(time.perf_counter() - t0)
            window = asr.windows[0]
            row = {
                "audio": pushed,
                "rss": rss_mb(),
                "enc": asr.encoder.nbytes,
                "frames": window.frames.shape[0],
                "prompt": len(window.prompt),
                "committed": len(asr.committed[0]),
                "chunk_ms": 1e3 * statistics.mean(walls[-span:]),
                "chunk_max": 1e3 * max(walls[-span:]),
                "rtf": (time.perf_counter() - t_start) / pushed,
                "words_at": len(at),
                "others": span_others.cores(),
            }
            span_others.start()
            rows.append(row)
            console.print(
                f"{row['audio'] / 60:5.1f} min  RSS {row['rss']:7.1f} MB  encoder {row['enc'] / 2**10:6.0f} KiB  "
                f"window {row['frames']:4d} frames  chunk {row['chunk_ms']:6.1f} ms (max {row['chunk_max']:6.1f})  "
                f"RTF {row['rtf']:.3f}  "
                f"others {row['others']:.2f} cores"
            )
    wall, others_total = time.perf_counter() - t_start, whole.cores()
    t0 = time.perf_counter()
    words = asr.committed[0]
    lat = latencies(words, at, total / RATE)
    for i, row in enumerate(rows):
        span_lat = lat[rows[i - 1]["words_at"] if i else 0 : row["words_at"]]
        row["lat"] = statistics.mean(span_lat) if span_lat else float("nan")
    if words_out is not None:
        words_out.parent.mkdir(parents=True, exist_ok=True)
        words_out.write_text(json.dumps([[w.text, round(w.end, 3), a] for w, a in zip(words, at, strict=True)]))
    # Cumulative errors at repetition boundaries: the reference words of the first k repetitions vs the
    # hypothesis words placed before the k-th boundary, one alignment of the whole stream (a word placed
    # across a boundary shifts errors between two spans, never adds any to the whole).
    clip_s = clip_n / RATE
    reps = [min(repeats, int(row["audio"] / clip_s + 1e-9)) for row in rows]
    reps[-1] = repeats
    hyp_words = [normalize(w.text) for w in words]
    cuts = []
    for k in reps:
        j = next((i for i, w in enumerate(words) if w.end >= k * clip_s), len(words)) if k < repeats else len(words)
        cuts.append((k * len(ref_words), sum(len(h) for h in hyp_words[:j]), 30 if k < repeats else 0))
    hyp_all = [x for h in hyp_words for x in h]
    errors = prefix_distances(ref_words * repeats, hyp_all, cuts)
    for i, row in enumerate(rows):
        n_ref = (reps[i] - (reps[i - 1] if i else 0)) * len(ref_words)
        row["wer"] = (errors[i] - (errors[i - 1] if i else 0)) / n_ref if n_ref else float("nan")
        row["reps"] = reps[i] - (reps[i - 1] if i else 0)
    global_wer = errors[-1] / (len(ref_words) * repeats)
    console.print(f"WER {global_wer:.1%} ({time.perf_counter() - t0:.0f} s to align)")
    hours = total / RATE / 3600
    lines = [
        f"Machine: {machine()}. 2 cores shared with other jobs: other processes used {others_total:.2f} cores on "
        f"average during this part (load average {load_start} at the start, {loadavg()} at the end); the per-chunk "
        'times include their interference (column "others": cores they used during each span).',
        "",
        f"One stream of {total / RATE / 60:.1f} min ({hours:.2f} h): the shipped {clip_n / RATE:.1f} s LibriVox "
        f"clip repeated {repeats} times (real speech, repeated; the transcriber is not told), fed 1 s at a time to "
        "`StreamingTranscriber(chunk=1.0, left=8.0, lookahead=0.2)` (Whisper tiny.en fp32, one stream). Every "
        f"{every:g} min of audio: process RSS, the streaming encoder's state (`encoder.nbytes`), the frames of the "
        "decoder's current 30 s window (<= 1,500), its prompt tokens (<= 200), words committed so far (the "
        f"output, kept by the caller), mean and max wall per 1 s chunk over the last {every:g} min "
        "(push: front end, encoder, decode; the last row includes `finish()`), cumulative RTF, mean emission "
        "latency of the words committed in the span, and the WER of the span: the whole transcript is aligned "
        "once against the reference repeated, and the errors accumulated up to each repetition boundary "
        "(reference words of the repetitions completed vs the hypothesis up to the word whose estimated end "
        "crosses the boundary, give or take 30 words: the best such cut) are differenced between rows (reps: "
        "repetitions in the span; the last row's alignment is the whole stream's).",
        "",
        "| audio (min) | RSS (MB) | encoder state (KiB) | window (frames) | prompt (tokens) | words committed "
        "| per chunk, mean (ms) | per chunk, max (ms) | cumulative RTF | latency mean (s) | WER in span (reps) "
        "| others (cores) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['audio'] / 60:.1f} | {row['rss']:.1f} | {row['enc'] / 2**10:,.0f} | {row['frames']} "
            f"| {row['prompt']} | {row['committed']:,} | {row['chunk_ms']:.1f} | {row['chunk_max']:.1f} "
            f"| {row['rtf']:.3f} | {row['lat']:.2f} | {row['wer']:.1%} ({row['reps']}) | {row['others']:.2f} |"
        )
    lines += [
        "",
        f"Whole stream: {wall / 60:.1f} min wall, RTF {wall / (total / RATE):.3f}; WER {global_wer:.1%} "
        f"({len(hyp_all):,} words transcribed, {len(ref_words) * repeats:,} in the reference repeated {repeats} "
        f"times; one clip alone: see grid.md).",
    ]
    text = "\n".join(lines)
    console.print(text)
    write("long_stream.md", text)
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "long_stream.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(per_minute[0]))
        writer.writeheader()
        writer.writerows({k: round(v, 4) for k, v in m.items()} for m in per_minute)
    plot(per_minute, total / RATE / 60, repeats)


def plot(per_minute: list[dict], minutes: float, repeats: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print("matplotlib is not installed: no plot")
        return
    x = [m["audio_min"] for m in per_minute]
    fig, (top, bottom, others) = plt.subplots(
        3, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.4]}
    )
    top.plot(x, [m["rss_mb"] for m in per_minute], color="tab:blue")
    top.set_ylabel("process RSS (MB)")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    top.set_title(f"Streaming Whisper tiny.en, {minutes:.0f} min (the 44.4 s clip x {repeats}), chunk 1 s, left 8 s")
    bottom.plot(x, [m["chunk_ms"] for m in per_minute], color="tab:orange")
    bottom.set_ylabel("wall per 1 s chunk (ms)\nmean over each minute")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    others.fill_between(x, [m["others_cores"] for m in per_minute], color="tab:gray", alpha=0.5, step="pre")
    others.set_ylabel("other processes\n(cores of 2)")
    others.set_ylim(0, 2)
    others.set_xlabel("audio time (min)")
    others.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "long_stream.png", dpi=110)
    console.print(f"wrote {OUT / 'long_stream.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", choices=("grid", "encoder", "long"), help="default: all, long last")
    parser.add_argument("--rounds", type=int, default=3, help="grid: rounds over all configurations")
    parser.add_argument("--encoder-rounds", type=int, default=60, help="encoder: timed 1 s chunks")
    parser.add_argument("--minutes", type=float, default=60, help="long: minutes of audio (the clip repeated)")
    parser.add_argument("--every", type=float, default=5, help="long: minutes of audio between rows")
    parser.add_argument("--words", type=Path, default=None, help="long: save the committed words (JSON) here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    parts = args.parts or ["grid", "encoder", "long"]
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model, processor = load_whisper()
    console.print(f"Machine: {machine()}; load {loadavg()}")
    for part in ("grid", "encoder", "long"):  # long last, whatever the order given
        if part not in parts:
            continue
        if part == "grid":
            part_grid(model, processor, args.rounds)
        elif part == "encoder":
            part_encoder(model, processor, args.encoder_rounds)
        else:
            part_long(model, processor, args.minutes, args.every, args.words)


if __name__ == "__main__":
    main()
