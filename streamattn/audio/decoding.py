"""Whisper's decoder over a window of encoder frames: greedy, with timestamps, and LocalAgreement.

``decode_window`` reads the encoder frames of one window (at most 30 s: 1,500 frames of 20 ms) and
returns timed segments, with OpenAI's timestamp rules (a window starts with a timestamp, at most 1 s
in; timestamps come in pairs and never go back; a timestamp is forced when timestamps are more
probable together than any text token; none past the window's end). ``Agreement`` turns successive
hypotheses of a growing window into committed words (LocalAgreement-2, Macháček et al. 2023, "Turning
Whisper into Real-Time Transcription System"): a word is final once two successive hypotheses agree
on it and on everything before it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

SECONDS_PER_FRAME = 0.02  # Whisper's encoder frames (and its timestamp tokens): 20 ms
MAX_INITIAL_TIMESTAMP = 50  # <|1.00|>: a window's first timestamp comes within its first second
COPY = 10  # text tokens: a run this long seen before in the same window is a copy, not speech


@dataclass
class Segment:
    """Text between two timestamps of a window, in frames from the window's start (``end`` None: open)."""

    start: int
    end: int | None
    tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Word:
    """A word and its end, in seconds of the stream (``end``: interpolated within its segment)."""

    text: str
    end: float


def normalise(word: str) -> str:
    """Lowercase, letters and digits only: how hypotheses are compared (and WER computed)."""
    return re.sub(r"[^\w']", "", word.lower())


@dataclass(frozen=True)
class Request:
    """One window to decode: ``frames [T, d_model]`` (its encoder output), ``prompt`` (ids of the
    text before the window, sent as ``<|startofprev|>`` context), ``prefix`` (tokens already
    committed in this window: forced, never decoded again) and ``max_tokens`` new tokens at most."""

    frames: torch.Tensor
    prompt: Sequence[int] = ()
    prefix: Sequence[int] = ()
    max_tokens: int = 224


def decode_window(
    model, frames: torch.Tensor, prompt: Sequence[int] = (), prefix: Sequence[int] = (), max_tokens: int = 224
) -> list[int]:
    """``decode_windows`` of one window."""
    return decode_windows(model, [Request(frames, prompt, prefix, max_tokens)])[0]


@torch.inference_mode()
def decode_windows(model, requests: Sequence[Request]) -> list[list[int]]:
    """Greedy timestamped decoding of several windows in one batch; returns each one's new tokens
    (timestamps included, ``<|endoftext|>`` not).

    One decoder forward per step for all windows: contexts are left-padded (masked, positions
    counted from each row's first real token), encoder frames right-padded (masked in the
    cross-attention), finished rows ride along until the last one ends. A loop (the last 1-16
    tokens three times in a row) or a copy (10 text tokens in a row that the window already holds):
    Whisper's failures on a window that ends mid-speech or in silence, end a row and are cut off.
    """
    gen, config, decoder = model.generation_config, model.config, model.get_decoder()
    sot, eot, prev = gen.decoder_start_token_id, gen.eos_token_id, gen.prev_sot_token_id
    ts_begin = gen.no_timestamps_token_id + 1  # <|0.00|>
    suppress = torch.tensor([*(gen.suppress_tokens or []), gen.no_timestamps_token_id], dtype=torch.long)
    b = len(requests)
    contexts = []
    for r in requests:
        room = config.max_target_positions - len(r.prefix) - r.max_tokens - 2
        head = [prev, *list(r.prompt)[-room:], sot] if r.prompt and room > 0 else [sot]
        contexts.append(head + list(r.prefix))
    width, frames = max(map(len, contexts)), max(r.frames.shape[0] for r in requests)
    pads = [width - len(c) for c in contexts]
    ids = torch.tensor([[eot] * p + c for p, c in zip(pads, contexts, strict=True)])  # [B, L]
    encoded = torch.zeros(b, frames, config.d_model, dtype=model.dtype)
    for i, r in enumerate(requests):
        encoded[i, : r.frames.shape[0]] = r.frames
    neg = torch.finfo(model.dtype).min
    n_frames = torch.tensor([r.frames.shape[0] for r in requests])
    cross = torch.where(torch.arange(frames)[None] < n_frames[:, None], 0.0, neg).to(model.dtype)[:, None, None]
    pad = torch.tensor(pads)
    real = torch.arange(width)[None] >= pad[:, None]  # [B, L] keys that exist
    causal = torch.arange(width)[None, :] <= torch.arange(width)[:, None]  # [L, L]
    self_mask = torch.where(causal[None] & real[:, None], 0.0, neg).to(model.dtype)[:, None]  # [B, 1, L, L]
    positions = (torch.arange(width)[None] - pad[:, None]).clamp(min=0)  # [B, L]

    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    tokens = [list(r.prefix) for r in requests]
    new: list[list[int]] = [[] for _ in requests]
    running = [r.max_tokens > 0 for r in requests]
    copies = [_Copies(r.prefix, ts_begin) for r in requests]
    step = ids
    while any(running):
        h = decoder.embed_tokens(step) + decoder.embed_positions.weight[positions]
        for layer in decoder.layers:
            h = layer(h, self_mask, encoded, encoder_attention_mask=cross, past_key_values=cache, use_cache=True)
        logits = model.proj_out(decoder.layer_norm(h[:, -1])).float()  # [B, vocab]
        logits[:, suppress] = -torch.inf
        chosen = []
        for i, r in enumerate(requests):
            if running[i]:
                _timestamp_rules(logits[i], tokens[i], ts_begin, eot, r.frames.shape[0])
                token = int(logits[i].argmax())
                if token == eot:
                    running[i] = False
                else:
                    tokens[i].append(token)
                    new[i].append(token)
                    copy = copies[i].add(token, len(new[i]) - 1)
                    if (cut := _loop(new[i]) if copy is None else copy) is not None:
                        new[i], running[i] = new[i][:cut], False
                    elif len(new[i]) >= r.max_tokens:
                        running[i] = False
            chosen.append(tokens[i][-1] if running[i] else eot)
        step = torch.tensor(chosen)[:, None]
        real = torch.cat([real, torch.ones(b, 1, dtype=torch.bool)], dim=1)
        self_mask = torch.where(real, 0.0, neg).to(model.dtype)[:, None, None]  # [B, 1, 1, L + t]
        positions = positions[:, -1:] + 1
    return new


class _Copies:
    """Whisper copying its own window (its failure when a window ends in silence or mid-speech): the
    newest ``COPY`` text tokens already occurred, in a row, earlier in the window (forced prefix or
    this hypothesis). ``add`` returns the index in the new tokens where the copy began, or None."""

    def __init__(self, prefix: Sequence[int], ts_begin: int) -> None:
        self.ts_begin, self.text, self.seen = ts_begin, [], set()
        for token in prefix:
            self.add(token, -1)

    def add(self, token: int, where: int) -> int | None:
        if token >= self.ts_begin:
            return None
        self.text.append((token, where))
        if len(self.text) < COPY:
            return None
        gram = tuple(t for t, _ in self.text[-COPY:])
        if gram in self.seen and self.text[-COPY][1] >= 0:  # (a repeat inside the prefix is history)
            return self.text[-COPY][1]
        self.seen.add(gram)
        return None


def _loop(tokens: list[int], repeats: int = 3, longest: int = 16) -> int | None:
    """Where the loop at the end of ``tokens`` starts repeating (cut there), or None."""
    for n in range(1, longest + 1):
        if len(tokens) >= repeats * n and all(
            tokens[-n:] == tokens[len(tokens) - (r + 1) * n : len(tokens) - r * n] for r in range(1, repeats)
        ):
            return len(tokens) - (repeats - 1) * n
    return None


def _timestamp_rules(logits: torch.Tensor, tokens: list[int], ts_begin: int, eot: int, n_frames: int) -> None:
    """OpenAI Whisper's ``ApplyTimestampRules``, plus: no timestamp past the window's last frame."""
    logits[ts_begin + n_frames + 1 :] = -torch.inf
    if not tokens:
        logits[:ts_begin] = -torch.inf  # a window opens with a timestamp
        logits[ts_begin + MAX_INITIAL_TIMESTAMP + 1 :] = -torch.inf
        return
    last_ts = tokens[-1] >= ts_begin
    penultimate_ts = len(tokens) < 2 or tokens[-2] >= ts_begin
    if last_ts:
        if penultimate_ts:
            logits[ts_begin:] = -torch.inf  # a pair closed: text (or the end) follows
        else:
            logits[:eot] = -torch.inf  # a segment's end: a timestamp or the end follows
    stamps = [t for t in tokens if t >= ts_begin]
    if stamps:
        floor = stamps[-1] if last_ts and not penultimate_ts else stamps[-1] + 1
        logits[ts_begin:floor] = -torch.inf  # never back in time
    logprobs = torch.log_softmax(logits, dim=-1)
    if torch.logsumexp(logprobs[ts_begin:], dim=-1) > logprobs[:ts_begin].max():
        logits[:ts_begin] = -torch.inf


def _segments(tokens: list[int], ts_begin: int) -> list[Segment]:
    segments: list[Segment] = []
    current: Segment | None = None
    for token in tokens:
        if token >= ts_begin:
            frame = token - ts_begin
            if current is not None and current.tokens:
                current.end = frame
                segments.append(current)
                current = None
            else:
                current = Segment(frame, None)
        else:
            if current is None:
                current = Segment(segments[-1].end if segments else 0, None)
            current.tokens.append(token)
    if current is not None and current.tokens:
        segments.append(current)
    return segments


def words_of(tokens: list[int], tokenizer, ts_begin: int, origin: float, window_end: float) -> list[Word]:
    """The words of a window's tokens, each ending where its segment's timestamps place it (by
    character position between them; an open segment ends at ``window_end``), in stream seconds."""
    out = []
    for seg in _segments(tokens, ts_begin):
        text = tokenizer.decode(seg.tokens, skip_special_tokens=True)
        start = origin + seg.start * SECONDS_PER_FRAME
        end = origin + seg.end * SECONDS_PER_FRAME if seg.end is not None else window_end
        length = max(len(text.rstrip()), 1)
        out += [Word(m.group(), start + (end - start) * m.end() / length) for m in re.finditer(r"\S+", text)]
    return out


class Agreement:
    """LocalAgreement-2 on tokens: ``update(hypothesis)`` returns how many of its first tokens are final.

    ``hypothesis`` continues the tokens already committed in the window (decoded with them forced,
    so committed text is never decoded again). Final: the longest common prefix of this hypothesis
    and the previous one, cut back to a word start in both (a token opening a word, i.e. starting
    with a space, or a timestamp), so only whole words are ever committed.
    """

    def __init__(self, starts_word) -> None:
        self.starts_word = starts_word  # token id -> bool
        self.previous: list[int] | None = None

    def update(self, hypothesis: list[int]) -> int:
        previous, self.previous = self.previous, hypothesis
        if previous is None:
            return 0
        n = 0
        while n < min(len(hypothesis), len(previous)) and hypothesis[n] == previous[n]:
            n += 1
        while n > 0 and not (
            n < len(hypothesis)
            and n < len(previous)
            and self.starts_word(hypothesis[n])
            and self.starts_word(previous[n])
        ):
            n -= 1
        self.previous = hypothesis[n:]
        return n
