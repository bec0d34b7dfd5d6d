"""Transcribe a WAV file as if it were live: streaming Whisper, words printed as they become final.

Feeds AUDIO (16 kHz mono 16-bit WAV) to a ``StreamingTranscriber`` (Whisper tiny.en, chunked
encoder ``--chunk``/``--left``/``--lookahead`` seconds) in pieces of ``--chunk`` seconds, as fast as
it can (``--realtime``: each piece only once it would have been recorded), and prints each piece's
newly committed words as ``[ 12.0s] It was the`` (the audio pushed so far, then the words). Writes
``transcript.txt``, ``words.csv`` (per word: its end, the audio pushed and the wall time when it was
committed, the latency between them) and ``summary.md`` (real-time factor, latency, encoder state,
WER vs ``--reference`` and vs offline Whisper) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from streamattn.cli.common import needs_hf

SAMPLE_RATE = 16_000
FRAME = 0.02  # seconds per encoder frame: chunk, left and lookahead are multiples of it


def _left(value: str) -> float | None:
    if value.strip().lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'none', got {value!r}") from None


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("audio", type=Path, help="16 kHz mono 16-bit PCM WAV file")
    p.add_argument("--chunk", type=float, default=1.0, help="seconds per piece and per encoder chunk (x 0.02 s)")
    p.add_argument("--left", type=_left, default=8.0, help="seconds of encoder left context, or 'none' (all)")
    p.add_argument("--lookahead", type=float, default=0.2, help="seconds of encoder lookahead")
    p.add_argument(
        "--lookahead-layers",
        type=int,
        default=None,
        help="only the first N encoder layers look ahead (default: all; 1 cuts the latency, lookaheads compound)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/transcribe"), help="directory for the transcript, CSV")
    p.add_argument("--reference", type=Path, default=None, help="text file of what is said: WER is reported")
    p.add_argument("--no-offline", action="store_true", help="skip the offline Whisper transcript (and its WER)")
    p.add_argument("--realtime", action="store_true", help="push each piece only once it would have been recorded")


@dataclass
class Committed:
    """A committed word: ``end`` (stream seconds, final placement), when it was committed."""

    text: str
    end: float
    at_audio: float
    at_wall: float

    @property
    def latency(self) -> float:
        return self.at_audio - self.end


def _frames(seconds: float, flag: str, positive: bool = False) -> int:
    frames = round(seconds / FRAME) if math.isfinite(seconds) else -1
    if frames < 0 or abs(frames * FRAME - seconds) > 1e-6 or (positive and not frames):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{flag} must be a {kind} multiple of 0.02 s (one encoder frame), got {seconds:g}")
    return frames


def _check_args(args: argparse.Namespace) -> None:
    chunk = _frames(args.chunk, "--chunk", positive=True)
    _frames(args.lookahead, "--lookahead")
    if args.left is not None and _frames(args.left, "--left") % chunk:
        raise ValueError(f"--left ({args.left:g} s) must be a multiple of --chunk ({args.chunk:g} s)")
    for flag, path in (("AUDIO", args.audio), ("--reference", args.reference)):
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"{flag}: no such file: {path}")


@needs_hf
def run(args: argparse.Namespace) -> int:
    import torch

    from streamattn.audio import StreamingTranscriber, load_audio, load_whisper, transcribe_offline
    from streamattn.audio.metrics import normalize, wer

    _check_args(args)
    audio = load_audio(args.audio)  # refuses anything but 16 kHz mono 16-bit PCM, before the model loads
    if not audio.numel():
        raise ValueError(f"{args.audio} has no samples")
    reference = None
    if args.reference is not None:
        reference = args.reference.read_text(encoding="utf-8")
        if not normalize(reference):
            raise ValueError(f"--reference {args.reference} has no words")
    model, processor = load_whisper()
    transcriber = StreamingTranscriber(
        model,
        processor,
        chunk=args.chunk,
        left=args.left,
        lookahead=args.lookahead,
        lookahead_layers=args.lookahead_layers,
    )
    duration = audio.numel() / SAMPLE_RATE
    left = "all" if args.left is None else f"{args.left:g} s"
    print(
        f"streamattn transcribe: {args.audio} ({duration:.1f} s), chunk {args.chunk:g} s, left {left}, "
        f"lookahead {args.lookahead:g} s{', real time' if args.realtime else ''}",
        flush=True,
    )

    step = round(args.chunk * SAMPLE_RATE)
    times: list[tuple[float, float]] = []  # (audio pushed, wall seconds) of each committed word, in order
    console = Console() if sys.stdout.isatty() else Console(stderr=True)  # stdout stays plain when piped
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.1f}/{task.total:.1f} s"),
        TextColumn("RTF {task.fields[rtf]:.2f}"),
        TextColumn("{task.fields[words]:,} words"),
        TextColumn("encoder {task.fields[state]:,.0f} KiB"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
        redirect_stdout=console.file is sys.stdout,
    )

    def report(words, pushed: float, wall: float) -> None:
        times.extend([(pushed, wall)] * len(words))
        if words:
            print(f"[{pushed:5.1f}s] " + " ".join(w.text for w in words), flush=True)

    start = time.perf_counter()
    with progress, torch.inference_mode():
        task = progress.add_task("transcribing", total=duration, rtf=0.0, words=0, state=0.0)
        for a in range(0, audio.numel(), step):
            b = min(a + step, audio.numel())
            if args.realtime:  # a live source delivers the piece once its last sample is recorded
                time.sleep(max(0.0, b / SAMPLE_RATE - (time.perf_counter() - start)))
            new = transcriber.push(audio[a:b][None])[0]
            wall = time.perf_counter() - start
            report(new, b / SAMPLE_RATE, wall)
            progress.update(
                task,
                completed=b / SAMPLE_RATE,
                rtf=wall / (b / SAMPLE_RATE),
                words=len(times),
                state=transcriber.encoder.nbytes / 1024,
            )
        report(transcriber.finish()[0], duration, time.perf_counter() - start)
        wall = time.perf_counter() - start
        progress.update(task, rtf=wall / duration, words=len(times))
    state_bytes = transcriber.encoder.nbytes
    final = transcriber.committed[0]  # ends placed again from each closed window's final timestamps
    if len(final) != len(times):
        raise RuntimeError(f"{len(final)} words committed but {len(times)} returned by push/finish")
    # finish() appends silence, and a window's last segment may be timed to its very end: no word
    # ends after the audio does
    words = [Committed(w.text, min(w.end, duration), *at) for w, at in zip(final, times, strict=True)]
    text = " ".join(w.text for w in words)

    offline = None
    if not args.no_offline:
        print("offline Whisper (30 s windows) for comparison ...", flush=True)
        offline = transcribe_offline(model, processor, audio)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transcript.txt").write_text(text + "\n", encoding="utf-8")
    if offline is not None:
        (args.out / "offline.txt").write_text(offline + "\n", encoding="utf-8")
    else:  # not one left by an earlier run in the same directory
        (args.out / "offline.txt").unlink(missing_ok=True)
    _write_csv(args.out / "words.csv", words)
    latencies = [w.latency for w in words]
    rows = [
        ("audio", f"{duration:.1f} s"),
        ("wall (streaming)", f"{wall:.1f} s"),
        ("real-time factor (wall / audio)", f"{wall / duration:.3f}"),
        ("words committed", f"{len(words):,}"),
        ("latency mean (committed at - word end)", _seconds(sum(latencies) / len(latencies) if words else None)),
        ("latency p90", _seconds(_percentile(latencies, 0.9))),
        ("encoder state at the end", f"{state_bytes:,} bytes"),
        ("WER vs reference", _wer(wer, reference, text)),
        ("WER vs offline Whisper", "skipped (--no-offline)" if offline is None else _wer(wer, offline, text)),
        (
            "offline Whisper's WER vs reference",
            "skipped (--no-offline)" if offline is None else _wer(wer, reference, offline),
        ),
    ]
    summary = _markdown(args, left, rows)
    (args.out / "summary.md").write_text(summary, encoding="utf-8")
    print()
    print(summary, end="")
    written = ["transcript.txt", *(["offline.txt"] if offline is not None else []), "words.csv", "summary.md"]
    print(f"wrote {', '.join(written)} to {args.out}")
    return 0


def _write_csv(path: Path, words: list[Committed]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["word", "word_end_s", "committed_at_audio_s", "latency_s", "committed_at_wall_s"])
        for w in words:
            writer.writerow([w.text, f"{w.end:.2f}", f"{w.at_audio:.2f}", f"{w.latency:.2f}", f"{w.at_wall:.3f}"])


def _percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``values``, linearly interpolated between order statistics."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _wer(wer, reference: str | None, hypothesis: str) -> str:
    if reference is None:
        return "- (no --reference)"
    try:
        return f"{wer(reference, hypothesis):.3f}"
    except ValueError:  # the offline transcript may be empty (silence): no words to compare against
        return "- (no words to compare against)"


def _markdown(args: argparse.Namespace, left: str, rows: list[tuple[str, str]]) -> str:
    lines = [
        f"# streamattn transcribe: {args.audio.name}",
        "",
        f"Whisper tiny.en, streamed: chunk {args.chunk:g} s, left {left}, lookahead {args.lookahead:g} s"
        f"{', real time' if args.realtime else ''}.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
    ]
    return "\n".join(lines)
