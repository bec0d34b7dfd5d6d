"""Streaming encoders as a list of stages: convolutions, per-frame functions, chunked attention blocks
(``ConvStage``, ``FrameStage``, ``AttentionStage``, and ``Residual`` around a stride-1 chain).

A speech encoder (Whisper, Conformer, ...) streamed exactly: frames go in by pieces of any size, the
frames of every stage's output come out as soon as they are determined, and the whole stream equals
one offline forward of the utterance with the same (chunked) attention mask::

    enc = StreamingEncoder([
        ConvStage(conv1), FrameStage(F.gelu),                 # Conv1d(80, 384, 3, padding=1)
        ConvStage(conv2), FrameStage(F.gelu),                 # Conv1d(384, 384, 3, stride=2, padding=1)
        FrameStage(lambda x, t: x + pos[t], index=True),      # t: each frame's absolute index
        *[AttentionStage(policy, block_pre, block_post) for ...],
        FrameStage(final_norm),
    ])
    y, emitted = enc.push(x, counts)      # x [B, T, F]: the next T frames of B streams (ragged)
    y, emitted = enc.finish()             # the streams end: right padding, last chunks
    y_off, lengths = enc.forward(x_all, lengths)   # the same encoder offline (dense chunked mask)

Layout: frames on dim 1, ``[B, T, *F]`` (a transformer's hidden states); ``ConvStage`` transposes
to torch's ``[B, C, T]`` around its conv (feed a log-mel ``[B, n_mels, T]`` as ``mel.transpose(1,
2)``). Row ``b`` of a call carries ``counts[b]`` real frames (right padding, zeroed before any stage
sees it, never entering a state). Each stage returns ``(y [B, E, *F'], emitted)``: ``emitted[b]``
new frames of row ``b``, the next stage's ``counts``.

Latency: an ``AttentionStage`` emits chunk ``c`` once frame ``(c + 1) * chunk + lookahead - 1`` of
*its input* arrived. Stacked, the lookaheads compound: with ``N`` attention stages of lookahead ``R
> 0``, the last stage's chunk ``c`` waits for its input's chunk ``c + 1`` (when ``R <= chunk``),
which waits for the stage before it, ...: emission trails the input by up to ``N`` chunks (plus the
convolutions' receptive fields). That is exact with respect to the per-layer mask, which is what the
model computes offline (NeMo's cache-aware streaming documents the same growth of the right context
with depth); a model whose lookahead should not compound has to be trained with ``lookahead=0`` in
its upper layers.

A stage is stateless configuration; the streams' state is one value per stage, held by
``StreamingEncoder``. A stage provides ``step(state | None, x, counts, final) -> (y, emitted,
next_state)`` (pure; ``None``: streams not started, the stage builds its state from the first input),
``forward(x, lengths) -> (y, lengths)`` (offline) and ``load_state(raw) -> state`` (validated). A
state provides ``batch``, ``nbytes``, ``frames_in``, ``frames_out``, ``closed``, ``select(rows)``,
``fresh(n)``, ``cat(states)`` and ``to_dict()``. The user callables must accept zero frames (``T =
0``), as ``nn.Linear``, ``nn.LayerNorm`` and activations do.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from streamattn.core.chunked import (
    ChunkedAttention,
    ChunkedState,
    check_final,
    check_open,
    check_rows,
    counters,
    join_frames,
    take_frames,
)
from streamattn.core.conv import StreamingConv1d
from streamattn.core.kernels import attend
from streamattn.core.streaming import check_lengths
from streamattn.masks import dense_mask
from streamattn.policies.chunked_context import ChunkedContext

_FORMAT = "streamattn.StreamingEncoder/1"
_FRAMES = "streamattn.FrameStage/1"
_BLOCK = "streamattn.AttentionStage/1"
_RESIDUAL = "streamattn.Residual/1"


class Stage(Protocol):
    def step(
        self, state: Any, x: torch.Tensor, counts: list[int], final: list[bool]
    ) -> tuple[torch.Tensor, list[int], Any]: ...

    def forward(self, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]: ...

    def load_state(self, raw: Mapping[str, Any]) -> Any: ...


def frame_index(start: Sequence[int], counts: Sequence[int], t: int, device: torch.device) -> torch.Tensor:
    """``[B, T]`` int64: absolute index ``start[b] + i`` of frame ``i`` of row ``b``; 0 on padding
    (so a table lookup such as a position embedding stays in range)."""
    i = torch.arange(t, device=device)[None, :]
    index = torch.tensor(list(start), device=device)[:, None] + i
    return index.masked_fill(i >= torch.tensor(list(counts), device=device)[:, None], 0)


def zero_padding(x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """``x [B, T, ...]`` with frames ``>= counts[b]`` of row ``b`` set to 0 (``where``: NaN-safe)."""
    i = torch.arange(x.shape[1], device=x.device)[None, :]
    real = i < torch.tensor(list(counts), device=x.device)[:, None]
    return torch.where(real.view(*real.shape, *([1] * (x.dim() - 2))), x, x.new_zeros(()))


def _takes_index(fn: Callable, n: int) -> None:
    """A callable given ``index=True`` must take one more positional argument than the plain form."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: trust the caller
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < n + 1 and not any(p.kind == p.VAR_POSITIONAL for p in params):
        raise ValueError(f"{fn!r} is called with the frame index (index=True), so it must take {n + 1} arguments")


# ---------------------------------------------------------------------- per-frame functions
@dataclass
class FrameState:
    """Frames seen per stream (the absolute index of the next one) and which streams ended."""

    seen: list[int]
    closed: list[bool]

    @property
    def batch(self) -> int:
        return len(self.seen)

    nbytes = 0

    @property
    def frames_in(self) -> list[int]:
        return list(self.seen)

    frames_out = frames_in

    def select(self, rows: Sequence[int]) -> FrameState:
        rows = check_rows(rows, self.batch)
        return FrameState([self.seen[r] for r in rows], [self.closed[r] for r in rows])

    @staticmethod
    def cat(states: Sequence[FrameState]) -> FrameState:
        return FrameState([n for st in states for n in st.seen], [c for st in states for c in st.closed])

    def fresh(self, batch: int) -> FrameState:
        return FrameState([0] * batch, [False] * batch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FRAMES,
            "seen": torch.tensor(self.seen, dtype=torch.int64),
            "closed": torch.tensor(self.closed, dtype=torch.int64),
        }


class FrameStage:
    """``y = fn(x)`` frame by frame (LayerNorm, a feed-forward, an activation): every frame out at once.

    ``index=True``: ``y = fn(x, index)`` with ``index [B, T]`` int64 the absolute frame index of
    each frame of its stream (0 on padding), e.g. ``lambda x, t: x + pos_emb[t]``. ``fn`` must act
    on each frame alone (any mixing across frames would break the streaming equality).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *, index: bool = False) -> None:
        if not callable(fn):
            raise TypeError(f"FrameStage needs a callable, got {fn!r}")
        if index:
            _takes_index(fn, 1)
        self.fn, self.index = fn, index

    def __repr__(self) -> str:
        return f"FrameStage({self.fn!r}, index={self.index})"

    def _apply(self, x: torch.Tensor, start: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
        return self.fn(x, frame_index(start, counts, x.shape[1], x.device)) if self.index else self.fn(x)

    def step(self, state: FrameState | None, x: torch.Tensor, counts: list[int], final: list[bool]):
        state = FrameState([0] * x.shape[0], [False] * x.shape[0]) if state is None else state
        y = self._apply(x, state.seen, counts)
        seen = [n + c for n, c in zip(state.seen, counts, strict=True)]
        closed = [c or f for c, f in zip(state.closed, final, strict=True)]
        return y, list(counts), FrameState(seen, closed)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        return self._apply(x, [0] * x.shape[0], lengths), list(lengths)

    def load_state(self, raw: Mapping[str, Any]) -> FrameState:
        if not isinstance(raw, Mapping) or raw.get("format") != _FRAMES:
            raise ValueError(f"FrameStage: not a saved FrameState (expected format {_FRAMES!r})")
        seen = raw.get("seen")
        b = seen.shape[0] if isinstance(seen, torch.Tensor) and seen.dim() == 1 else -1
        seen, closed = (counters(raw, key, b, "FrameStage") for key in ("seen", "closed"))
        return FrameState(seen, [bool(c) for c in closed])


# ---------------------------------------------------------------------- convolutions
class ConvStage:
    """A ``torch.nn.Conv1d`` streamed by ``StreamingConv1d`` (same arguments), on frames ``[B, T, C]``."""

    def __init__(self, conv: torch.nn.Conv1d, *, pad_left: int | None = None, pad_right: int | None = None) -> None:
        self.conv = StreamingConv1d(conv, pad_left=pad_left, pad_right=pad_right)

    def __repr__(self) -> str:
        return f"ConvStage({self.conv!r})"

    def step(self, state, x: torch.Tensor, counts: list[int], final: list[bool]):
        if state is None:
            state = self.conv.new_state(x.shape[0], x.dtype, x.device)
        y, emitted, state = self.conv.step(state, x.transpose(1, 2), counts, final=final)
        return y.transpose(1, 2), emitted, state

    def forward(self, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        y, out = self.conv.offline(x.transpose(1, 2), lengths)
        return y.transpose(1, 2), out

    def load_state(self, raw: Mapping[str, Any]):
        return self.conv.load_state(raw)


# ---------------------------------------------------------------------- attention blocks
@dataclass
class BlockState:
    """An ``AttentionStage``'s streams: the attention's state and the block inputs ``x`` of the frames
    not emitted yet (``[B, chunk + lookahead - 1, *F]``, frames ``[done_b, seen_b)``), kept for the
    residual path of ``post``."""

    attn: ChunkedState
    x: torch.Tensor

    @property
    def batch(self) -> int:
        return self.attn.batch

    @property
    def nbytes(self) -> int:
        return self.attn.nbytes + self.x.numel() * self.x.element_size()

    @property
    def frames_in(self) -> list[int]:
        return self.attn.frames_in

    @property
    def frames_out(self) -> list[int]:
        return self.attn.frames_out

    @property
    def closed(self) -> list[bool]:
        return list(self.attn.closed)

    def select(self, rows: Sequence[int]) -> BlockState:
        attn = self.attn.select(rows)
        return BlockState(attn, self.x[torch.tensor(list(rows), dtype=torch.long, device=self.x.device)])

    @staticmethod
    def cat(states: Sequence[BlockState]) -> BlockState:
        if len({(st.x.shape[1:], st.x.dtype) for st in states}) != 1:
            raise ValueError("BlockState.cat: states of different frame shapes or dtypes")
        return BlockState(ChunkedState.cat([st.attn for st in states]), torch.cat([st.x for st in states]))

    def fresh(self, batch: int) -> BlockState:
        return BlockState(self.attn.fresh(batch), self.x.new_zeros(batch, *self.x.shape[1:]))

    def to_dict(self) -> dict[str, Any]:
        return {"format": _BLOCK, "attn": self.attn.to_dict(), "x": self.x.clone()}


class AttentionStage:
    """A transformer block whose attention is ``ChunkedContext``, built from two per-frame callables:

        q, k, v = pre(x)        # x [B, T, *F] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]  (norm + projections)
        y = post(x, attn)       # x [B, E, *F], attn [B, Hq, E, D] -> y [B, E, *F']       (out proj, residual, FFN)

    ``pre`` runs on frames as they arrive, ``post`` on the frames whose attention is emitted (with
    their own inputs ``x``, kept until then: at most ``chunk + lookahead - 1`` frames per stream).
    ``index=True``: ``pre(x, index)`` gets the absolute frame indices ``[B, T]`` (rotary
    embeddings). ``scale`` and ``block`` as in ``ChunkedAttention``.
    """

    def __init__(
        self,
        policy: ChunkedContext,
        pre: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        post: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        index: bool = False,
        scale: float | None = None,
        block: int = 256,
    ) -> None:
        if not callable(pre) or not callable(post):
            raise TypeError("AttentionStage needs callables pre(x) -> (q, k, v) and post(x, attn) -> y")
        if index:
            _takes_index(pre, 1)
        self.attention = ChunkedAttention(policy, scale=scale, block=block)
        self.policy, self.pre, self.post, self.index = policy, pre, post, index

    def __repr__(self) -> str:
        return f"AttentionStage({self.policy}, index={self.index})"

    def _qkv(self, x: torch.Tensor, start: Sequence[int], counts: Sequence[int]):
        if self.index:
            return self.pre(x, frame_index(start, counts, x.shape[1], x.device))
        return self.pre(x)

    def step(self, state: BlockState | None, x: torch.Tensor, counts: list[int], final: list[bool]):
        b = x.shape[0]
        q, k, v = self._qkv(x, [0] * b if state is None else state.attn.seen, counts)
        if state is None:
            attn = self.attention.new_state(b, q.shape[1], k.shape[1], q.shape[3], q.dtype, q.device)
            state = BlockState(attn, x.new_zeros(b, self.attention.q_slots, *x.shape[2:]))
        out, emitted, attn = self.attention.step(state.attn, q, k, v, counts, final=final)
        pending = [s - d for s, d in zip(state.attn.seen, state.attn.done, strict=True)]
        xw = join_frames(state.x, pending, x, counts, dim=1)  # [B, P, *F]: inputs of frames [done_b, seen_b)
        y = self.post(xw[:, : out.shape[2]], out)
        rest = [p + c - e for p, c, e in zip(pending, counts, emitted, strict=True)]
        return y, emitted, BlockState(attn, take_frames(xw, emitted, rest, self.attention.q_slots, dim=1))

    def forward(self, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        """Offline: the block over whole utterances with the dense ``ChunkedContext`` mask."""
        b, t = x.shape[:2]
        q, k, v = self._qkv(x, [0] * b, lengths)
        i = torch.arange(t, device=x.device)
        real = i[None, :] < torch.tensor(lengths, device=x.device)[:, None]  # [B, T]
        mask = dense_mask(self.policy, t, device=x.device)[None] & real[:, None, :]  # [B, T, T]
        mask = mask | ~real[:, :, None]  # padding queries see every frame (no empty softmax); zeroed
        out = attend(q, k, v, mask[:, None], self.attention.scale).masked_fill(~real[:, None, :, None], 0.0)
        return self.post(x, out), list(lengths)

    def load_state(self, raw: Mapping[str, Any]) -> BlockState:
        if not isinstance(raw, Mapping) or raw.get("format") != _BLOCK:
            raise ValueError(f"AttentionStage: not a saved BlockState (expected format {_BLOCK!r})")
        attn = self.attention.load_state(raw.get("attn"))
        x = raw.get("x")
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.dtype.is_floating_point:
            raise ValueError("AttentionStage: saved 'x' must be a floating tensor [B, chunk + lookahead - 1, *F]")
        if x.shape[0] != attn.batch or x.shape[1] != self.attention.q_slots or x.device != attn.device:
            raise ValueError(
                f"AttentionStage: saved 'x' is {list(x.shape)} on {x.device}, expected [{attn.batch}, "
                f"{self.attention.q_slots}, *F] on {attn.device}"
            )
        return BlockState(attn, x.clone())


# ---------------------------------------------------------------------- chains of stages
def run_chain(
    stages: Sequence[Stage], states: Sequence[Any], x: torch.Tensor, counts: list[int], final: list[bool]
) -> tuple[torch.Tensor, list[int], list[Any]]:
    """Every stage in order, each on the frames the previous one emitted; the next states are returned
    (the given ones are untouched). Outputs are trimmed to ``max(emitted)`` frames, padding zeroed."""
    states = list(states)
    y, emitted = x, counts
    for i, stage in enumerate(stages):
        y, emitted, states[i] = stage.step(states[i], y, emitted, final)
        y = zero_padding(y[:, : max(emitted, default=0)], emitted)
    return y, emitted, states


def run_chain_offline(stages: Sequence[Stage], x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
    y = zero_padding(x, lengths)
    for stage in stages:
        y, lengths = stage.forward(y, lengths)
        y = zero_padding(y[:, : max(lengths, default=0)], lengths)
    return y, list(lengths)


def load_chain(stages: Sequence[Stage], parts: Any, seen: list[int], closed: list[bool], owner: str) -> list[Any]:
    """Every stage's saved state validated, and the chain checked: each stage holds the same streams,
    took in the frames the stage before it gave out, and ended the same streams."""
    if not isinstance(parts, Sequence) or len(parts) != len(stages):
        n = len(parts) if isinstance(parts, Sequence) else type(parts).__name__
        raise ValueError(f"{owner}: saved state has {n} stage states, expected {len(stages)} (one per stage)")
    states, flow = [], list(seen)  # frames into stage 0; each stage's output frames go into the next
    for i, (stage, part) in enumerate(zip(stages, parts, strict=True)):
        try:
            st = stage.load_state(part)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{owner}: stage {i} ({stage!r}): {exc}") from None
        if st.batch != len(seen) or st.frames_in != flow or list(st.closed) != closed:
            raise ValueError(
                f"{owner}: stage {i}'s state does not follow from the stages before it: it holds {st.batch} "
                f"streams with {st.frames_in} frames in (closed {list(st.closed)}), expected {len(seen)} "
                f"streams with {flow} (closed {closed})"
            )
        states.append(st)
        flow = st.frames_out
    return states


# ---------------------------------------------------------------------- residual paths
@dataclass
class ResidualState:
    """A ``Residual``'s streams: its inner stages' states and the inputs ``x [B, P, *F]`` of frames
    ``[done_b, seen_b)`` whose inner output has not come out yet (``P``: the most such frames)."""

    inner: list[Any]
    x: torch.Tensor
    seen: list[int]
    done: list[int]
    closed: list[bool]

    @property
    def batch(self) -> int:
        return len(self.seen)

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size() + sum(st.nbytes for st in self.inner)

    @property
    def frames_in(self) -> list[int]:
        return list(self.seen)

    @property
    def frames_out(self) -> list[int]:
        return list(self.done)

    def select(self, rows: Sequence[int]) -> ResidualState:
        rows = check_rows(rows, self.batch)
        idx = torch.tensor(rows, dtype=torch.long, device=self.x.device)
        pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
        inner = [st.select(rows) for st in self.inner]
        return ResidualState(inner, self.x[idx], pick(self.seen), pick(self.done), pick(self.closed))

    @staticmethod
    def cat(states: Sequence[ResidualState]) -> ResidualState:
        if len({(st.x.shape[2:], st.x.dtype) for st in states}) != 1:
            raise ValueError("ResidualState.cat: states of different frame shapes or dtypes")
        inner = [type(parts[0]).cat(parts) for parts in zip(*(st.inner for st in states), strict=True)]
        width = max(st.x.shape[1] for st in states)
        pad = lambda x: torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1], *x.shape[2:])], 1)  # noqa: E731
        return ResidualState(
            inner,
            torch.cat([pad(st.x) for st in states]),
            [n for st in states for n in st.seen],
            [n for st in states for n in st.done],
            [c for st in states for c in st.closed],
        )

    def fresh(self, batch: int) -> ResidualState:
        x = self.x.new_zeros(batch, 0, *self.x.shape[2:])
        return ResidualState([st.fresh(batch) for st in self.inner], x, [0] * batch, [0] * batch, [False] * batch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _RESIDUAL,
            "inner": [st.to_dict() for st in self.inner],
            "x": self.x.clone(),
            "seen": torch.tensor(self.seen, dtype=torch.int64),
            "done": torch.tensor(self.done, dtype=torch.int64),
            "closed": torch.tensor(self.closed, dtype=torch.int64),
        }


class Residual:
    """``y = x + inner(x)`` where ``inner`` is a chain of stages giving one frame of ``x``'s shape per
    input frame (stride 1), e.g. a Conformer's convolution module (norm, pointwise, GLU, depthwise
    conv, activation, pointwise). Inputs wait in the state until their inner output comes out (a
    centred conv's lag; nothing for causal ones)."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = _check_stages(stages)

    def __repr__(self) -> str:
        return f"Residual({list(self.stages)})"

    def step(self, state: ResidualState | None, x: torch.Tensor, counts: list[int], final: list[bool]):
        b = x.shape[0]
        if state is None:
            empty = x.new_zeros(b, 0, *x.shape[2:])
            state = ResidualState([None] * len(self.stages), empty, [0] * b, [0] * b, [False] * b)
        y, emitted, inner = run_chain(self.stages, state.inner, x, counts, final)
        seen = [s + c for s, c in zip(state.seen, counts, strict=True)]
        done = [d + e for d, e in zip(state.done, emitted, strict=True)]
        closed = [c or f for c, f in zip(state.closed, final, strict=True)]
        rest = [s - d for s, d in zip(seen, done, strict=True)]
        if any(r < 0 or (c and r) for r, c in zip(rest, closed, strict=True)) or y.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"Residual: the inner stages must give one frame of the input's shape {list(x.shape[2:])} per input "
                f"frame (stride 1); they gave {done} frames of {list(y.shape[2:])} for {seen} in"
            )
        pending = [s - d for s, d in zip(state.seen, state.done, strict=True)]
        xw = join_frames(state.x, pending, x, counts, dim=1)  # [B, P, *F]: inputs of frames [done_b, seen_b)
        out = xw[:, : y.shape[1]] + y
        width = max(max(rest, default=0), state.x.shape[1])  # grows to the inner lag, then stays (fixed bytes)
        kept = take_frames(xw, emitted, rest, width, dim=1)
        return out, emitted, ResidualState(inner, kept, seen, done, closed)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, list[int]]:
        y, out = run_chain_offline(self.stages, x, lengths)
        if out != list(lengths) or y.shape[1:] != x.shape[1:]:
            raise ValueError(
                f"Residual: the inner stages must keep the frames' count and shape: {list(x.shape)} with lengths "
                f"{list(lengths)} became {list(y.shape)} with {out}"
            )
        return x + y, out

    def load_state(self, raw: Mapping[str, Any]) -> ResidualState:
        owner = "Residual"
        if not isinstance(raw, Mapping) or raw.get("format") != _RESIDUAL:
            raise ValueError(f"{owner}: not a saved ResidualState (expected format {_RESIDUAL!r})")
        seen = raw.get("seen")
        b = seen.shape[0] if isinstance(seen, torch.Tensor) and seen.dim() == 1 else -1
        seen, done, closed = (counters(raw, key, b, owner) for key in ("seen", "done", "closed"))
        closed = [bool(c) for c in closed]
        inner = load_chain(self.stages, raw.get("inner"), seen, closed, owner)
        if (inner[-1].frames_out if inner else seen) != done:
            raise ValueError(f"{owner}: saved 'done' {done} is not what the inner stages gave out")
        x = raw.get("x")
        rest = max((s - d for s, d in zip(seen, done, strict=True)), default=0)
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != b or x.shape[1] < rest:
            raise ValueError(f"{owner}: saved 'x' must be a tensor [{b}, >= {rest}, *F] (the waiting inputs)")
        return ResidualState(inner, x.clone(), seen, done, closed)


def _check_stages(stages: Sequence[Stage]) -> tuple[Stage, ...]:
    stages = tuple(stages)
    for stage in stages:
        if not all(callable(getattr(stage, m, None)) for m in ("step", "forward", "load_state")):
            raise TypeError(f"a stage needs step, forward and load_state methods, got {stage!r}")
    return stages


# ---------------------------------------------------------------------- the encoder
class StreamingEncoder:
    """A stack of stages over a batch of streams: ``push`` frames, get the frames each stream's last
    stage emitted; ``forward`` is the same stack offline (see the module docstring).

    ``push(x [B, T, *F], counts=None, *, final=None) -> (y [B, E, *F'], emitted)`` runs under
    ``torch.no_grad()``; a call is validated before any stage runs, and the stages' states are
    replaced only once every stage succeeded (an exception in a user callable changes nothing).
    ``final[b]``: stream ``b`` ends with this call (every stage flushes it); ``finish(rows)`` ends
    streams without new frames. A finished stream takes no more frames: drop it with
    ``select_streams``. ``state_dict`` / ``load_state_dict`` save and restore every stream
    (validated completely before anything changes); ``select_streams`` / ``add_streams`` move
    streams out and in.
    """

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = _check_stages(stages)
        self.reset()

    def __repr__(self) -> str:
        return f"StreamingEncoder({list(self.stages)})"

    def reset(self) -> None:
        """Forget every stream; the next push starts new ones (any batch size, dtype, device)."""
        self.states: list[Any] = [None] * len(self.stages)
        self.seen: list[int] = []
        self.closed: list[bool] = []
        self._input: torch.Tensor | None = None  # [0, *F]: the input's frame shape, dtype and device

    @property
    def batch(self) -> int:
        return len(self.seen)

    @property
    def nbytes(self) -> int:
        """Bytes of every stage's state tensors."""
        return sum(st.nbytes for st in self.states if st is not None)

    def push(
        self,
        x: torch.Tensor,
        counts: Sequence[int] | torch.Tensor | None = None,
        *,
        final: bool | Sequence[bool] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """The next ``T`` frames of each stream; returns the frames the last stage emitted."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise TypeError(f"x must be a tensor [B, T, *F], got {getattr(x, 'shape', type(x).__name__)}")
        b, t = x.shape[:2]
        if self._input is not None:
            if b != self.batch or x.shape[2:] != self._input.shape[1:]:
                raise ValueError(
                    f"this encoder streams {self.batch} streams of frames {list(self._input.shape[1:])}, got x "
                    f"{list(x.shape)} ([B, T, *F]); reset() to start other streams"
                )
            if x.dtype != self._input.dtype or x.device != self._input.device:
                raise TypeError(
                    f"x is {x.dtype} on {x.device}, the streams are {self._input.dtype} on {self._input.device}"
                )
        counts = check_lengths(counts, b, t)
        final = check_final(final, b)
        check_open(self.closed or [False] * b, counts, "StreamingEncoder")
        with torch.no_grad():
            y, emitted, states = run_chain(self.stages, self.states, zero_padding(x, counts), counts, final)
        self.states = states
        self.seen = [n + c for n, c in zip(self.seen or [0] * b, counts, strict=True)]
        self.closed = [c or f for c, f in zip(self.closed or [False] * b, final, strict=True)]
        if self._input is None:
            self._input = x.new_zeros(0, *x.shape[2:])
        return y, emitted

    def finish(self, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Streams ``rows`` (default: all) end: every stage flushes them (right padding, last chunks)."""
        if self._input is None:
            raise ValueError("nothing was pushed: there is no stream to finish")
        b = self.batch
        final = [True] * b if rows is None else [i in set(check_rows(rows, b)) for i in range(b)]
        return self.push(self._input.new_zeros(b, 0, *self._input.shape[1:]), [0] * b, final=final)

    def forward(
        self, x: torch.Tensor, lengths: Sequence[int] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[int]]:
        """Offline: every stage over the whole utterances ``x [B, T, *F]`` (``lengths[b]`` real frames);
        returns ``(y [B, T', *F'], lengths')``, zeros past each row's length. Gradients flow."""
        return run_chain_offline(self.stages, x, check_lengths(lengths, x.shape[0], x.shape[1]))

    __call__ = forward

    # ------------------------------------------------------------------ streams
    def select_streams(self, rows: Sequence[int]) -> None:
        """Keep streams ``rows`` (leaving, reordering, repeating), in that order."""
        rows = check_rows(rows, self.batch)
        self.states = [None if st is None else st.select(rows) for st in self.states]
        self.seen = [self.seen[r] for r in rows]
        self.closed = [self.closed[r] for r in rows]

    def add_streams(self, streams: int | Mapping[str, Any]) -> None:
        """New streams join after the current ones: ``n`` fresh streams, or the streams of a saved
        ``state_dict()`` (validated first). Needs running streams (their layout)."""
        if self._input is None:
            raise ValueError("add_streams joins running streams; push the first frames (or load a state) first")
        if isinstance(streams, Mapping):
            other = self._parse(streams)
            if other["input"] is None or other["input"].shape[1:] != self._input.shape[1:]:
                raise ValueError("the saved streams carry other frames (shape) than this encoder's, or none")
            parts, seen, closed = other["states"], other["seen"], other["closed"]
        else:
            if isinstance(streams, bool) or not isinstance(streams, int) or streams < 1:
                raise ValueError(f"add_streams takes a count >= 1 or a state_dict, got {streams!r}")
            parts = [st.fresh(streams) for st in self.states]
            seen, closed = [0] * streams, [False] * streams
        joined = [type(mine).cat([mine, theirs]) for mine, theirs in zip(self.states, parts, strict=True)]
        self.states, self.seen, self.closed = joined, self.seen + seen, self.closed + closed

    # ------------------------------------------------------------------ save / restore
    def state_dict(self) -> dict[str, Any]:
        """Every stage's state as plain tensors (``torch.load(weights_only=True)``-safe), copied."""
        return {
            "format": _FORMAT,
            "stages": [None if st is None else st.to_dict() for st in self.states],
            "seen": torch.tensor(self.seen, dtype=torch.int64),
            "closed": torch.tensor(self.closed, dtype=torch.int64),
            "input": None if self._input is None else self._input.clone(),
        }

    def load_state_dict(self, raw: Mapping[str, Any]) -> None:
        """Replace the streams by saved ones, validated completely before anything changes."""
        parsed = self._parse(raw)
        self.states, self.seen, self.closed = parsed["states"], parsed["seen"], parsed["closed"]
        self._input = parsed["input"]

    def _parse(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        owner = "StreamingEncoder"
        if not isinstance(raw, Mapping) or raw.get("format") != _FORMAT:
            raise ValueError(f"not a StreamingEncoder state (expected a dict with format {_FORMAT!r})")
        seen = raw.get("seen")
        b = seen.shape[0] if isinstance(seen, torch.Tensor) and seen.dim() == 1 else -1
        seen, closed = (counters(raw, key, b, owner) for key in ("seen", "closed"))
        closed = [bool(c) for c in closed]
        inp, parts = raw.get("input"), raw.get("stages")
        if inp is None:  # nothing was ever pushed: no stream, no stage state
            if b != 0 or not isinstance(parts, Sequence) or any(p is not None for p in parts):
                raise ValueError(f"{owner}: saved state has streams but no 'input' (the frames' shape and dtype)")
            if len(parts) != len(self.stages):
                raise ValueError(f"{owner}: saved state has {len(parts)} stage states, expected {len(self.stages)}")
            return {"states": [None] * len(self.stages), "seen": [], "closed": [], "input": None}
        if not isinstance(inp, torch.Tensor) or inp.dim() < 1 or inp.shape[0] != 0:
            raise ValueError(f"{owner}: saved 'input' must be an empty tensor [0, *F] (the frames' shape and dtype)")
        states = load_chain(self.stages, parts, seen, closed, owner)
        return {"states": states, "seen": seen, "closed": closed, "input": inp.clone()}
