"""Whisper's log-mel front end, streamed: audio samples in, feature frames out, in bounded memory.

Whisper's feature extractor (``WhisperFeatureExtractor``) computes, over a 30 s window padded with
zeros: a centred STFT (``n_fft`` 400, hop 160, Hann window, the start reflected by 200 samples),
the power spectrum, 80 mel filters, ``log10(max(mel, 1e-10))``, a floor at the window's maximum
minus 8, and ``(x + 4) / 4``. Two parts of that are not causal: the floor uses the maximum of the
whole 30 s window, and the window is padded to 30 s. The streamed rule changes exactly those:

- frame ``m`` covers samples ``[160 m - 200, 160 m + 200)`` (sample ``-j`` is sample ``j``, as
  ``torch.stft`` reflects); it is emitted once sample ``160 m + 199`` has arrived; at ``finish()``
  the samples after the end are zeros (what the 30 s padding gives) and a stream of ``N`` samples
  has ``ceil(N / 160)`` frames;
- the floor is the maximum over the frame and the ``floor_frames - 1`` frames before it (default
  3,000: Whisper's 30 s), minus 8: a function of the past only.

So the frames of a stream fed in any pieces equal one call on the whole audio (tested), and the
encoder sees the same frames offline and streaming. Against Whisper's own extractor the frames
differ only where the floor binds (quiet bins before the loudest sound of a window).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

N_FFT, HOP, PAD = 400, 160, 200  # Whisper: 25 ms windows every 10 ms at 16 kHz; centred frames
FLOOR = 8.0  # log10 units below the recent maximum (Whisper's dynamic range)


class LogMelStream:
    """Streamed log-mel features of ``batch`` audio streams (ragged: each row has its own length).

    ``mel_filters``: ``[n_fft // 2 + 1, n_mels]`` (``WhisperFeatureExtractor().mel_filters``).
    ``push(audio, counts)`` takes ``[B, S]`` float samples (row ``b`` has its first ``counts[b]``
    valid, default all) and returns ``(frames [B, n_mels, F], emitted)``: row ``b``'s next
    ``emitted[b]`` frames, left-aligned, the rest zeros. ``finish()`` emits the remaining frames.
    Memory per row: at most ~560 samples and ``floor_frames`` frame maxima, whatever the length.
    """

    def __init__(self, mel_filters: torch.Tensor, batch: int = 1, floor_frames: int = 3000):
        if (
            not isinstance(mel_filters, torch.Tensor)
            or mel_filters.dim() != 2
            or mel_filters.shape[0] != N_FFT // 2 + 1
        ):
            raise ValueError(f"mel_filters must be a [{N_FFT // 2 + 1}, n_mels] tensor, got {_shape(mel_filters)}")
        for name, value in (("batch", batch), ("floor_frames", floor_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.mel_filters = mel_filters.to(torch.float32)
        self.window = torch.hann_window(N_FFT, dtype=torch.float32)
        self.floor_frames = floor_frames
        self.batch = batch
        self._buf = [torch.zeros(0) for _ in range(batch)]  # samples [start[b], seen[b])
        self._start = [0] * batch
        self._seen = [0] * batch  # samples received
        self._frames = [0] * batch  # frames emitted
        self._maxima = [torch.zeros(0) for _ in range(batch)]  # the last floor_frames - 1 frame maxima
        self.finished = False

    @property
    def n_mels(self) -> int:
        return self.mel_filters.shape[1]

    def frames_emitted(self) -> list[int]:
        return list(self._frames)

    def push(self, audio: torch.Tensor, counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Append samples; return the frames now complete. Checked before anything changes."""
        if not isinstance(audio, torch.Tensor) or audio.dim() != 2 or audio.shape[0] != self.batch:
            raise ValueError(f"audio must be a float tensor [{self.batch}, samples], got {_shape(audio)}")
        if not audio.is_floating_point():
            raise ValueError(f"audio must be float samples in [-1, 1], got dtype {audio.dtype}")
        counts = [audio.shape[1]] * self.batch if counts is None else list(counts)
        if len(counts) != self.batch or any(
            isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= audio.shape[1] for c in counts
        ):
            raise ValueError(f"counts must be {self.batch} ints in [0, {audio.shape[1]}], got {counts}")
        if self.finished:
            raise ValueError("this stream is finished; start a new LogMelStream for new audio")
        audio = audio.detach().to("cpu", torch.float32)
        for b in range(self.batch):
            self._buf[b] = torch.cat([self._buf[b], audio[b, : counts[b]]])
            self._seen[b] += counts[b]
        ready = [max(0, (n - PAD) // HOP + 1) if n >= PAD else 0 for n in self._seen]
        return self._emit(ready, final=False)

    def finish(self) -> tuple[torch.Tensor, list[int]]:
        """Emit every remaining frame (zeros after the end); the streams take no more audio."""
        if self.finished:
            raise ValueError("this stream is already finished")
        out = self._emit([-(-n // HOP) for n in self._seen], final=True)
        self.finished = True
        return out

    def _emit(self, ready: list[int], final: bool) -> tuple[torch.Tensor, list[int]]:
        rows = [self._frames_of(b, ready[b], final) for b in range(self.batch)]
        emitted = [r.shape[1] for r in rows]
        out = torch.zeros(self.batch, self.n_mels, max(emitted, default=0))
        for b, r in enumerate(rows):
            out[b, :, : r.shape[1]] = r
        return out, emitted

    def _frames_of(self, b: int, ready: int, final: bool) -> torch.Tensor:
        m0, n = self._frames[b], ready - self._frames[b]
        if n <= 0:
            return torch.zeros(self.n_mels, 0)
        # sample indices of each frame [n, N_FFT]; reflect the start, zeros past the end (final only)
        idx = torch.arange(m0, ready)[:, None] * HOP - PAD + torch.arange(N_FFT)[None, :]
        idx = idx.abs()
        buf = F.pad(self._buf[b], (0, N_FFT)) if final else self._buf[b]
        past_end = idx >= self._seen[b]
        local = (idx - self._start[b]).clamp(0, buf.numel() - 1)
        segments = torch.where(past_end, 0.0, buf[local])
        power = torch.fft.rfft(segments * self.window, dim=-1).abs() ** 2  # [n, 201]
        log_mel = (power @ self.mel_filters).clamp(min=1e-10).log10().T  # [n_mels, n]
        floor = self._floor(b, log_mel.amax(dim=0)) - FLOOR
        self._frames[b] = ready
        # keep the samples later frames need: from the first sample of the next frame on
        keep_from = max(0, ready * HOP - PAD)
        if keep_from > self._start[b]:
            self._buf[b] = self._buf[b][keep_from - self._start[b] :]
            self._start[b] = keep_from
        return (torch.maximum(log_mel, floor[None, :]) + 4.0) / 4.0

    def _floor(self, b: int, maxima: torch.Tensor) -> torch.Tensor:
        """Max over each frame and the ``floor_frames - 1`` before it (one max-pool over history + new)."""
        history = torch.cat([self._maxima[b], maxima])
        window = self.floor_frames
        padded = F.pad(history, (window - 1 - self._maxima[b].numel(), 0), value=float("-inf"))
        sliding = F.max_pool1d(padded[None, None], kernel_size=window, stride=1)[0, 0]
        self._maxima[b] = history[-(window - 1) :] if window > 1 else history[:0]
        return sliding

    def state_dict(self) -> dict:
        """The streams' explicit state (a copy): resume with ``load_state_dict`` on a new instance."""
        return {
            "buf": [t.clone() for t in self._buf],
            "start": torch.tensor(self._start, dtype=torch.int64),
            "seen": torch.tensor(self._seen, dtype=torch.int64),
            "frames": torch.tensor(self._frames, dtype=torch.int64),
            "maxima": [t.clone() for t in self._maxima],
            "finished": torch.tensor(self.finished),
        }

    def load_state_dict(self, state: dict) -> None:
        keys = {"buf", "start", "seen", "frames", "maxima", "finished"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"a LogMelStream state has keys {sorted(keys)}, got {_shape(state)}")
        if len(state["buf"]) != self.batch or len(state["maxima"]) != self.batch:
            raise ValueError(f"the state holds {len(state['buf'])} streams, this LogMelStream {self.batch}")
        ints = {k: [int(v) for v in state[k].tolist()] for k in ("start", "seen", "frames")}
        if any(len(v) != self.batch for v in ints.values()):
            raise ValueError(f"start/seen/frames must hold {self.batch} values each")
        self._buf = [t.to(torch.float32).clone() for t in state["buf"]]
        self._maxima = [t.to(torch.float32).clone() for t in state["maxima"]]
        self._start, self._seen, self._frames = ints["start"], ints["seen"], ints["frames"]
        self.finished = bool(state["finished"])


def log_mel(audio: torch.Tensor, mel_filters: torch.Tensor, floor_frames: int = 3000) -> torch.Tensor:
    """The streamed features of one whole utterance ``[samples]`` -> ``[n_mels, ceil(samples / 160)]``."""
    stream = LogMelStream(mel_filters, 1, floor_frames)
    head, n_head = stream.push(audio.reshape(1, -1))
    tail, n_tail = stream.finish()
    return torch.cat([head[0, :, : n_head[0]], tail[0, :, : n_tail[0]]], dim=1)


def _shape(x: object) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
