"""Whisper, streamed: log-mel frames -> a chunked encoder with caches -> incremental decoding.

The encoder is transformers' ``WhisperEncoder`` (its own modules, weights untouched) rebuilt as a
``streamattn.encoder.StreamingEncoder``: two convolutions with caches, the position embedding, and
each self-attention restricted to ``ChunkedContext(chunk, left, lookahead)`` (Whisper was trained
with full attention over 30 s; the README measures what the restriction costs).

The stream is cut into *epochs* of 20-30 s (``Epochs``): a new epoch starts in the middle of the
first pause (0.25 s, 35 dB below the epoch's loudest frame) once the current one holds
``min_epoch`` seconds, or after 30 s without a pause. A frame's position is its distance to its
epoch's start, so each epoch has exactly Whisper's positions 0..1499 (measured first: a window
that starts elsewhere, or is padded with made-up silence, makes the decoder skip or invent text).
A start is placed only at frames the position stage has not reached, so no position ever changes.

The decoder reads a *window*: the encoder frames of the current epoch. After every chunk it decodes
the window again (greedy, timestamps, the committed text before it as prompt, the words already
committed in it forced as a prefix, at most ~6 tokens per second of audio) and commits the words
two successive hypotheses agree on (LocalAgreement-2); when the epoch is complete, or the stream
ends, everything is committed and the next window starts. Loops and copies of the window's own
text (Whisper's failures on windows that end in silence or mid-speech) are cut off. Encoder state,
window (<= 1,500 frames) and prompt (<= 200 tokens) are bounded whatever the stream's length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from streamattn.audio.decoding import (
    SECONDS_PER_FRAME,
    Agreement,
    Request,
    Word,
    decode_windows,
    normalise,
    words_of,
)
from streamattn.audio.features import LogMelStream
from streamattn.encoder import AttentionStage, ConvStage, FrameStage, StreamingEncoder
from streamattn.policies.chunked_context import ChunkedContext

FRAMES_PER_SECOND = 50  # encoder frames (after the stride-2 convolution)
POSITION_STAGE = 4  # whisper_encoder's stage that adds the position embedding
OVERLAP = 5  # words: a new window's first words that repeat the previous window's last are dropped
QUIET, PAUSE = 3.5 / 4, 25  # a pause: 25 log-mel frames (0.25 s) 35 dB below the epoch's loudest
_FORMAT = "streamattn.StreamingTranscriber/1"


def seconds_to_frames(seconds: float, what: str) -> int:
    frames = round(seconds * FRAMES_PER_SECOND)
    if abs(frames - seconds * FRAMES_PER_SECOND) > 1e-6 or frames < 0:
        raise ValueError(f"{what} must be a non-negative multiple of 0.02 s (one encoder frame), got {seconds}")
    return frames


def context_policy(chunk: float = 1.0, left: float | None = 8.0, lookahead: float = 0.2) -> ChunkedContext:
    """``ChunkedContext`` in encoder frames from seconds (``left=None``: all the past)."""
    c = seconds_to_frames(chunk, "chunk")
    left_frames = None if left is None else seconds_to_frames(left, "left")
    if left_frames is not None and left_frames % c:
        raise ValueError(f"left ({left} s) must be a multiple of chunk ({chunk} s)")
    return ChunkedContext(chunk=c, left=left_frames, lookahead=seconds_to_frames(lookahead, "lookahead"))


def whisper_encoder(
    model, policy: ChunkedContext, lookahead_layers: int | None = None, position=None
) -> StreamingEncoder:
    """transformers' Whisper encoder as a ``StreamingEncoder``: input ``[B, T, n_mels]`` log-mel frames,
    output ``[B, T / 2, d_model]`` (what ``WhisperEncoder`` gives, with ``policy``'s attention).

    ``lookahead_layers=n``: only the first ``n`` layers look ahead (the others use ``policy`` with
    ``lookahead=0``). Lookaheads compound with depth (a layer's chunk waits for the next chunk of
    the layer below), so with all 4 layers looking ahead a chunk is emitted ~4 chunks late; with
    one, ``chunk + lookahead`` late.

    ``position(t) -> p``: the position (``[0, 1500)``) of each frame from its index in the stream
    (``[B, T]`` int64 -> ``[B, T]``); default ``t mod 1500``. The transcriber restarts positions at
    each of its epochs."""
    enc = model.get_encoder()
    positions = enc.embed_positions.weight  # [1500, d_model]
    n_pos = positions.shape[0]
    stages = [
        ConvStage(enc.conv1),
        FrameStage(F.gelu),
        ConvStage(enc.conv2),
        FrameStage(F.gelu),
        FrameStage(lambda x, t: x + positions[t % n_pos if position is None else position(t)], index=True),
    ]
    n = len(enc.layers) if lookahead_layers is None else lookahead_layers
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(enc.layers):
        raise ValueError(f"lookahead_layers must be an int in [0, {len(enc.layers)}] or None, got {lookahead_layers!r}")
    local = ChunkedContext(chunk=policy.chunk, left=policy.left, lookahead=0)
    for i, layer in enumerate(enc.layers):
        p = policy if i < n else local
        stages.append(AttentionStage(p, _pre(layer), _post(layer), scale=layer.self_attn.scaling))
    stages.append(FrameStage(enc.layer_norm))
    return StreamingEncoder(stages)


def _pre(layer):
    attn = layer.self_attn
    heads, dim = attn.num_heads, attn.head_dim

    def pre(x: torch.Tensor):  # x [B, T, d_model] -> q, k, v [B, H, T, D]
        h = layer.self_attn_layer_norm(x)
        split = lambda t: t.unflatten(-1, (heads, dim)).transpose(1, 2)  # noqa: E731
        return split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))

    return pre


def _post(layer):
    def post(x: torch.Tensor, attn: torch.Tensor):  # x [B, E, d_model], attn [B, H, E, D]
        x = x + layer.self_attn.out_proj(attn.transpose(1, 2).flatten(2))
        h = layer.final_layer_norm(x)
        return x + layer.fc2(layer.activation_fn(layer.fc1(h)))

    return post


class Epochs:
    """Where each stream's decoding epochs start, in encoder frames: the frames from one start to the
    next have positions 0, 1, 2, ... (Whisper's window), and the decoder reads one epoch at a time.

    An epoch starts at an explicit start (the stream's first frame, or a pause the transcriber
    found), or ``length`` (1,500) frames after the previous start when no pause came in time. A
    start is only ever added at frames no stage has positioned yet, so positions never change.
    """

    def __init__(self, batch: int, length: int = 1500) -> None:
        self.length = length
        self.starts = [[0] for _ in range(batch)]  # explicit starts per stream, increasing

    def start_of(self, b: int, t: int) -> int:
        s = max(x for x in self.starts[b] if x <= t)
        return s + self.length * ((t - s) // self.length)

    def next_after(self, b: int, t: int) -> int:
        """The first epoch start after frame ``t``."""
        return min([self.start_of(b, t) + self.length, *(x for x in self.starts[b] if x > t)])

    def position(self, t: torch.Tensor) -> torch.Tensor:
        """Positions of frames ``t [B, T]`` (int64): their distance to their epoch's start."""
        out = torch.empty_like(t)
        for b in range(t.shape[0]):
            starts = torch.tensor(self.starts[b], dtype=t.dtype, device=t.device)
            s = starts[(torch.searchsorted(starts, t[b], right=True) - 1).clamp(min=0)]
            out[b] = (t[b] - s) % self.length
        return out

    def add(self, b: int, frame: int) -> None:
        if frame <= self.starts[b][-1]:
            raise ValueError(f"epoch starts must increase: {frame} after {self.starts[b][-1]}")
        self.starts[b].append(frame)

    def forget_before(self, b: int, frame: int) -> None:
        """Keep only what frames from ``frame`` on need: the last start at or before it, and later ones."""
        starts = self.starts[b]
        self.starts[b] = [x for x in starts if x <= frame][-1:] + [x for x in starts if x > frame]


@dataclass
class _Window:
    """One stream's decoding window: encoder frames from ``origin`` (stream frame) on, and its text."""

    frames: torch.Tensor
    agreement: Agreement
    origin: int = 0
    forced: list[int] = field(default_factory=list)  # tokens committed in this window (timestamps too)
    committed: list[Word] = field(default_factory=list)
    first: int = 0  # index in committed of this window's first word
    skip: int = 0  # words at the start of this window that repeated the window before (not emitted)
    prompt: list[int] = field(default_factory=list)  # text before this window


class StreamingTranscriber:
    """Transcribe ``batch`` audio streams as they arrive (16 kHz float samples).

    ``chunk``, ``left``, ``lookahead`` (seconds): the encoder's ``ChunkedContext``;
    ``lookahead_layers``: how many of its layers look ahead (None: all; see ``whisper_encoder``);
    ``tail``: seconds of silence ``finish()`` appends.

    ``push(audio [B, S], counts=None) -> list[list[Word]]``: the words each stream committed during
    this call (final: never revised); ``finish()`` flushes every stream and commits the rest.
    ``committed[b]``: all words of stream ``b`` so far (once a window closes, its words' ends are
    placed again from its final timestamps, more accurately than when they were first returned).
    Encoder and decoder run batched over the streams (one forward per step for all of them).
    """

    def __init__(
        self,
        model,
        processor,
        *,
        chunk: float = 1.0,
        left: float | None = 8.0,
        lookahead: float = 0.2,
        lookahead_layers: int | None = None,
        batch: int = 1,
        tail: float = 1.0,
        min_epoch: float = 20.0,
    ) -> None:
        self.policy = context_policy(chunk, left, lookahead)
        self.tail = seconds_to_frames(tail, "tail") * 320  # samples of silence appended by finish()
        self.model, self.tokenizer = model, processor.tokenizer
        mel = torch.as_tensor(processor.feature_extractor.mel_filters, dtype=torch.float32)
        self.features = LogMelStream(mel, batch)
        self.lookahead_layers = lookahead_layers
        self.epochs = Epochs(batch, model.config.max_source_positions)
        self.min_epoch = seconds_to_frames(min_epoch, "min_epoch")
        if not 0 < self.min_epoch <= self.epochs.length:
            raise ValueError(f"min_epoch must be in (0, 30] seconds, got {min_epoch}")
        self._speech_end: list[int] | None = None  # during finish(): each stream's last real frame
        self._quiet = [0] * batch  # quiet log-mel frames at the end of each stream
        self._loud = [-torch.inf] * batch  # loudest frame of the current epoch (normalised log-mel)
        self.encoder = whisper_encoder(model, self.policy, lookahead_layers, self.epochs.position)
        d_model = model.config.d_model
        self.ts_begin = model.generation_config.no_timestamps_token_id + 1
        vocabulary = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
        opens = [t is None or t.startswith("Ġ") for t in vocabulary]  # a space before it: a new word
        self._starts_word = lambda token: token >= self.ts_begin or (token < len(opens) and opens[token])
        self.windows = [
            _Window(torch.zeros(0, d_model, dtype=model.dtype), Agreement(self._starts_word)) for _ in range(batch)
        ]
        self.samples = [0] * batch
        self.batch = batch

    @property
    def committed(self) -> list[list[Word]]:
        return [w.committed for w in self.windows]

    def push(self, audio: torch.Tensor, counts: Sequence[int] | None = None) -> list[list[Word]]:
        audio = torch.as_tensor(audio)
        if audio.dim() == 1:
            audio = audio[None]
        mel, emitted = self.features.push(audio, None if counts is None else list(counts))
        self.samples = [s + c for s, c in zip(self.samples, counts or [audio.shape[1]] * self.batch, strict=True)]
        self._find_pauses(mel, emitted)
        return self._advance(mel, emitted, final=False)

    def _find_pauses(self, mel: torch.Tensor, emitted: list[int]) -> None:
        """Start a new epoch in a pause: once the current epoch holds ``min_epoch`` and the last
        ``PAUSE`` log-mel frames were all ``QUIET`` below its loudest frame, the next epoch starts in
        the middle of that pause (or at the first frame not positioned yet, if later)."""
        stage = self.encoder.states[POSITION_STAGE]
        positioned = stage.seen if stage is not None else [0] * self.batch
        for b in range(self.batch):
            if not emitted[b]:
                continue
            loudness = mel[b, :, : emitted[b]].amax(dim=0)  # [F] each frame's loudest bin
            self._loud[b] = max(self._loud[b], float(loudness.max()))
            first = self.features.frames_emitted()[b] - emitted[b]  # log-mel index of loudness[0]
            middle = None  # log-mel index of the middle of the last pause
            for i, quiet in enumerate((loudness < self._loud[b] - QUIET).tolist()):
                self._quiet[b] = self._quiet[b] + 1 if quiet else 0
                if self._quiet[b] >= PAUSE:
                    middle = first + i - self._quiet[b] // 2
            if middle is None:
                continue
            current = self.epochs.start_of(b, positioned[b])
            cut = max(positioned[b], middle // 2)
            if self.min_epoch <= cut - current < self.epochs.length:
                self.epochs.add(b, cut)
                self._quiet[b], self._loud[b] = 0, -torch.inf

    def finish(self) -> list[list[Word]]:
        """The streams end: ``tail`` seconds of silence are appended (Whisper decodes a window that
        ends mid-air by inventing more text; trailing silence tells it the speech is over), every
        stage is flushed, and every window is committed."""
        self._speech_end = [n // 320 for n in self.samples]  # encoder frames: text after them is made up
        try:
            new = self.push(torch.zeros(self.batch, self.tail)) if self.tail else [[] for _ in range(self.batch)]
            mel, emitted = self.features.finish()
            return [a + b for a, b in zip(new, self._advance(mel, emitted, final=True), strict=True)]
        finally:
            self._speech_end = None

    def _advance(self, mel: torch.Tensor, emitted: list[int], final: bool) -> list[list[Word]]:
        x = mel.transpose(1, 2).to(self.model.dtype)  # [B, F, n_mels]
        out, n = self.encoder.push(x, emitted, final=[final] * self.batch)  # [B, E, d_model]
        new: list[list[Word]] = [[] for _ in range(self.batch)]
        rest = [out[b, : n[b]] for b in range(self.batch)]
        while True:  # rounds: a push may cross an epoch's end (close that window, go on in the next)
            jobs = []
            for b, w in enumerate(self.windows):
                room = self.epochs.next_after(b, w.origin) - w.origin - w.frames.shape[0]
                take, rest[b] = rest[b][:room], rest[b][room:]
                w.frames = torch.cat([w.frames, take])
                last = final and not rest[b].shape[0]
                if w.frames.shape[0] and (take.shape[0] or last):
                    jobs.append((b, last or take.shape[0] == room))  # closing: the stream or the epoch ends
            if jobs:  # one batched decode for every window that changed
                requests = [self._request(self.windows[b]) for b, _ in jobs]
                for (b, closing), hypothesis in zip(jobs, decode_windows(self.model, requests), strict=True):
                    new[b] += self._apply(b, hypothesis, closing)
            if not any(r.shape[0] for r in rest):
                return new

    def _request(self, w: _Window) -> Request:
        seconds = w.frames.shape[0] * SECONDS_PER_FRAME
        budget = max(8, 8 + round(6 * seconds) - len(w.forced))  # ~3x fast speech: loops end early
        return Request(w.frames, w.prompt, w.forced, budget)

    def _apply(self, b: int, hypothesis: list[int], closing: bool) -> list[Word]:
        """Commit what this hypothesis and the previous one agree on (everything when ``closing``:
        the epoch is complete or the stream ended; the next window then starts empty)."""
        w = self.windows[b]
        if self._speech_end is not None:  # finishing: nothing said after the speech ended is real
            limit = self.ts_begin + self._speech_end[b] - w.origin
            hypothesis = next((hypothesis[:i] for i, t in enumerate(hypothesis) if t >= limit), hypothesis)
        seconds = w.frames.shape[0] * SECONDS_PER_FRAME
        final = len(hypothesis) if closing else w.agreement.update(hypothesis)
        new: list[Word] = []
        if final:
            origin = w.origin * SECONDS_PER_FRAME
            before = len(words_of(w.forced, self.tokenizer, self.ts_begin, origin, origin + seconds))
            w.forced = w.forced + hypothesis[:final]
            new = words_of(w.forced, self.tokenizer, self.ts_begin, origin, origin + seconds)[before:]
            if before == 0:  # a window's first words may repeat the last ones of the window before
                w.skip = _overlap(w.committed[max(0, w.first - OVERLAP) : w.first], new)
                new = new[w.skip :]
            self._commit(w, new)
        if closing:  # every segment of the window is closed now: place its words again, better
            origin = w.origin * SECONDS_PER_FRAME
            placed = words_of(w.forced, self.tokenizer, self.ts_begin, origin, origin + seconds)[w.skip :]
            mine = len(w.committed) - w.first
            if len(placed) == mine:
                w.committed[w.first :] = placed
            w.first = len(w.committed)
            w.origin += w.frames.shape[0]
            self.epochs.forget_before(b, w.origin)
            w.frames, w.forced, w.agreement, w.skip = w.frames[:0], [], Agreement(self._starts_word), 0
        return new

    # ------------------------------------------------------------------ save / restore
    def state_dict(self) -> dict:
        """Everything the streams carry (front end, encoder, windows, committed words), copied;
        ``torch.save`` it and ``load_state_dict`` into a transcriber of the same configuration."""
        return {
            "format": _FORMAT,
            "config": self._config(),
            "features": self.features.state_dict(),
            "encoder": self.encoder.state_dict(),
            "samples": torch.tensor(self.samples, dtype=torch.int64),
            "epochs": [list(starts) for starts in self.epochs.starts],
            "quiet": list(self._quiet),
            "loud": list(self._loud),
            "windows": [
                {
                    "frames": w.frames.clone(),
                    "origin": w.origin,
                    "forced": list(w.forced),
                    "words": [word.text for word in w.committed],
                    "ends": torch.tensor([word.end for word in w.committed], dtype=torch.float64),
                    "first": w.first,
                    "skip": w.skip,
                    "prompt": list(w.prompt),
                    "previous": None if w.agreement.previous is None else list(w.agreement.previous),
                }
                for w in self.windows
            ],
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume saved streams; checked against this transcriber's configuration first."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"not a StreamingTranscriber state (expected a dict with format {_FORMAT!r})")
        if state.get("config") != self._config():
            raise ValueError(f"the state was saved with {state.get('config')}, this transcriber is {self._config()}")
        windows = state["windows"]
        d_model = self.model.config.d_model
        for w in windows:
            frames = w["frames"]
            if not isinstance(frames, torch.Tensor) or frames.dim() != 2 or frames.shape[1] != d_model:
                raise ValueError(f"a saved window's frames must be [T, {d_model}]")
            if frames.shape[0] > self.epochs.length or len(w["words"]) != w["ends"].numel():
                raise ValueError("a saved window is inconsistent (frames past an epoch, or words without ends)")
        features = LogMelStream(self.features.mel_filters, self.batch, self.features.floor_frames)
        features.load_state_dict(state["features"])
        restored = []
        for w in windows:
            agreement = Agreement(self._starts_word)
            agreement.previous = None if w["previous"] is None else list(w["previous"])
            words = [Word(t, float(e)) for t, e in zip(w["words"], w["ends"].tolist(), strict=True)]
            restored.append(
                _Window(
                    w["frames"].to(self.model.dtype).clone(),
                    agreement,
                    int(w["origin"]),
                    list(w["forced"]),
                    words,
                    int(w["first"]),
                    int(w["skip"]),
                    list(w["prompt"]),
                )
            )
        epochs = Epochs(self.batch, self.epochs.length)
        epochs.starts = [[int(x) for x in starts] for starts in state["epochs"]]
        if len(epochs.starts) != self.batch or any(not st or st != sorted(set(st)) for st in epochs.starts):
            raise ValueError(f"saved epoch starts must be {self.batch} increasing lists")
        encoder = whisper_encoder(self.model, self.policy, self.lookahead_layers, epochs.position)
        encoder.load_state_dict(state["encoder"])
        self.features, self.encoder, self.windows, self.epochs = features, encoder, restored, epochs
        self._quiet, self._loud = [int(x) for x in state["quiet"]], [float(x) for x in state["loud"]]
        self.samples = [int(x) for x in state["samples"].tolist()]

    def _config(self) -> dict:
        return {
            "policy": self.policy.to_config(),
            "lookahead_layers": self.lookahead_layers,
            "batch": self.batch,
            "tail": self.tail,
            "min_epoch": self.min_epoch,
        }

    def _commit(self, w: _Window, words: list[Word]) -> None:
        if not words:
            return
        w.committed += words
        text = " " + " ".join(word.text for word in w.committed[-64:])
        w.prompt = self.tokenizer.encode(text, add_special_tokens=False)[-200:]


def _overlap(tail: list[Word], head: list[Word]) -> int:
    """The most words (<= OVERLAP) that end ``tail`` and start ``head`` alike (normalised): speech
    near an epoch's end reaches the window before it through the encoder's lookahead, and may be
    transcribed in both windows (whisper_streaming drops such n-grams the same way)."""
    for k in range(min(OVERLAP, len(tail), len(head)), 0, -1):
        if [normalise(w.text) for w in tail[-k:]] == [normalise(w.text) for w in head[:k]]:
            return k
    return 0
