"""A ``torch.nn.Conv1d`` over streams fed in pieces: each output as soon as its receptive field arrived.

Layout ``[B, C, T]`` like torch's conv. The offline reference is the plain conv over the whole
utterance zero-padded with ``pad_left`` zeros before it and ``pad_right`` after it:
``F.conv1d(F.pad(x, (pad_left, pad_right)), weight, bias, stride, 0, dilation, groups)``.

Frame ``t`` of a stream sits at padded index ``pad_left + t``; output ``o`` reads padded indices
``o * stride + i * dilation`` for ``i < kernel``. The left zeros exist from the start, so output
``o`` is emitted once padded index ``o * stride + (kernel - 1) * dilation`` has arrived; the right
zeros exist only once the stream is known to end (``final`` / ``finish``). The state keeps, per
stream, the padded frames from ``next_output * stride`` on: at most ``max(pad_left, (kernel - 1) *
dilation)`` frames, whatever the stream length.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from streamattn.core.chunked import (
    check_final,
    check_open,
    check_rows,
    counters,
    join_frames,
    saved_tensor,
    take_frames,
)
from streamattn.core.streaming import check_lengths
from streamattn.policies.base import check_int

_FORMAT = "streamattn.StreamingConv1d/1"


@dataclass
class ConvState:
    """The streams of one ``StreamingConv1d`` (row ``b`` = stream ``b``). Replaced whole by each call.

    held     ``[B, C_in, H]``  padded frames ``[emitted_b * stride, pad_left + seen_b)`` in stream
                              order (the left zeros included), zeros after; ``H = max(pad_left,
                              (kernel - 1) * dilation)``
    seen     ``list[int]``     input frames arrived per stream
    emitted  ``list[int]``     output frames emitted per stream
    closed   ``list[bool]``    finished (right padding applied): no frame may come, nothing held
    """

    config: dict[str, int]
    held: torch.Tensor
    seen: list[int]
    emitted: list[int]
    closed: list[bool]

    @property
    def batch(self) -> int:
        return len(self.seen)

    @property
    def dtype(self) -> torch.dtype:
        return self.held.dtype

    @property
    def device(self) -> torch.device:
        return self.held.device

    @property
    def nbytes(self) -> int:
        return self.held.numel() * self.held.element_size()

    @property
    def frames_in(self) -> list[int]:
        return list(self.seen)

    @property
    def frames_out(self) -> list[int]:
        return list(self.emitted)

    def select(self, rows: Sequence[int]) -> ConvState:
        rows = check_rows(rows, self.batch)
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
        return ConvState(self.config, self.held[idx], pick(self.seen), pick(self.emitted), pick(self.closed))

    @staticmethod
    def cat(states: Sequence[ConvState]) -> ConvState:
        first = states[0]
        if any(
            st.config != first.config or st.held.shape[1:] != first.held.shape[1:] or st.dtype != first.dtype
            for st in states
        ):
            raise ValueError("ConvState.cat: states of different convolutions, channels or dtypes")
        return ConvState(
            first.config,
            torch.cat([st.held for st in states]),
            [n for st in states for n in st.seen],
            [n for st in states for n in st.emitted],
            [c for st in states for c in st.closed],
        )

    def fresh(self, batch: int) -> ConvState:
        """``batch`` new streams in this layout (the left zeros held)."""
        return ConvState(
            self.config, self.held.new_zeros(batch, *self.held.shape[1:]), [0] * batch, [0] * batch, [False] * batch
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "config": dict(self.config),
            "held": self.held.clone(),
            "seen": torch.tensor(self.seen, dtype=torch.int64),
            "emitted": torch.tensor(self.emitted, dtype=torch.int64),
            "closed": torch.tensor(self.closed, dtype=torch.int64),
        }


class StreamingConv1d:
    """A ``torch.nn.Conv1d`` (any kernel, stride, dilation, groups incl. depthwise; bias or not) over
    streams fed in pieces, equal to the offline conv of the zero-padded utterance.

    Args:
        conv: the convolution; its weights are read at each call (``padding_mode`` must be ``"zeros"``).
        pad_left, pad_right: zeros before / after the utterance. Both ``None``: ``conv.padding``
            (an int on both sides; ``"same"`` as torch splits it; ``"valid"``: none). If either is
            given, ``conv.padding`` is ignored and the other one defaults to 0 (causal:
            ``pad_left=(kernel - 1) * dilation``).

    ``forward(state, x [B, C_in, T], counts=None, *, final=None) -> (y [B, C_out, E], emitted)``:
    ``counts[b]`` real frames in row ``b`` (right padding never enters the state); ``emitted[b]``
    outputs are new (``y[b, :, :emitted[b]]``, zeros after). After a call a stream has emitted
    every output whose padded receptive field ``[o * stride, o * stride + (kernel - 1) * dilation]``
    lies below ``pad_left + seen``; ``final[b]`` / ``finish`` appends the ``pad_right`` zeros and
    emits the rest (``out_length(seen)`` outputs in all: the offline conv's length). ``step`` is the
    same as a pure function (the state given is left untouched).
    """

    def __init__(self, conv: nn.Conv1d, *, pad_left: int | None = None, pad_right: int | None = None) -> None:
        if not isinstance(conv, nn.Conv1d):
            raise TypeError(f"StreamingConv1d wraps a torch.nn.Conv1d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"StreamingConv1d: padding_mode={conv.padding_mode!r} pads from frames the stream has not "
                "produced yet (or wraps around); only zero padding streams: padding_mode='zeros'"
            )
        self.conv = conv
        self.kernel, self.stride, self.dilation = conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        self.span = (self.kernel - 1) * self.dilation + 1  # receptive field, in padded frames
        if pad_left is None and pad_right is None:
            if conv.padding == "valid":
                pad_left = pad_right = 0
            elif conv.padding == "same":
                pad_left = (self.span - 1) // 2
                pad_right = self.span - 1 - pad_left
            else:
                pad_left = pad_right = conv.padding[0]
        self.pad_left = 0 if pad_left is None else pad_left
        self.pad_right = 0 if pad_right is None else pad_right
        check_int("StreamingConv1d", "pad_left", self.pad_left, 0)
        check_int("StreamingConv1d", "pad_right", self.pad_right, 0)
        self.slots = max(self.pad_left, self.span - 1)
        self.config = {
            "in_channels": conv.in_channels,
            "kernel": self.kernel,
            "stride": self.stride,
            "dilation": self.dilation,
            "pad_left": self.pad_left,
            "pad_right": self.pad_right,
        }

    def __repr__(self) -> str:
        return f"StreamingConv1d({self.conv}, pad_left={self.pad_left}, pad_right={self.pad_right})"

    def out_length(self, n: int, final: bool = True) -> int:
        """Outputs of ``n`` input frames (with the right zeros if ``final``): the offline conv's length."""
        padded = self.pad_left + n + (self.pad_right if final else 0)
        return 0 if padded < self.span else (padded - self.span) // self.stride + 1

    def new_state(
        self, batch: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> ConvState:
        """``batch`` empty streams (dtype and device of the conv's weight unless given)."""
        check_int("StreamingConv1d.new_state", "batch", batch, 0)
        w = self.conv.weight
        held = torch.zeros(batch, self.conv.in_channels, self.slots, dtype=dtype or w.dtype, device=device or w.device)
        return ConvState(dict(self.config), held, [0] * batch, [0] * batch, [False] * batch)

    # ------------------------------------------------------------------ calls
    def forward(
        self,
        state: ConvState,
        x: torch.Tensor,
        counts: Sequence[int] | torch.Tensor | None = None,
        *,
        final: bool | Sequence[bool] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Feed frames; returns ``(y [B, C_out, E], emitted)`` and advances ``state`` in place."""
        y, emitted, nxt = self.step(state, x, counts, final=final)
        state.__dict__.update(nxt.__dict__)
        return y, emitted

    __call__ = forward

    def finish(self, state: ConvState, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """No frame follows for streams ``rows`` (default: all): right zeros, emit the rest."""
        b = state.batch
        final = [True] * b if rows is None else [i in set(check_rows(rows, b)) for i in range(b)]
        return self.forward(state, state.held[:, :, :0], [0] * b, final=final)

    def step(
        self,
        state: ConvState,
        x: torch.Tensor,
        counts: Sequence[int] | torch.Tensor | None = None,
        *,
        final: bool | Sequence[bool] | None = None,
    ) -> tuple[torch.Tensor, list[int], ConvState]:
        """``forward`` as a pure function: ``(y, emitted, next_state)``."""
        counts, final = self._check(state, x, counts, final)
        pl, s = self.pad_left, self.stride
        base = [e * s for e in state.emitted]  # padded index of the first frame still needed
        held = [0 if c else max(0, pl + n - b0) for n, b0, c in zip(state.seen, base, state.closed, strict=True)]
        skip = [min(n, max(0, b0 - pl - m)) for n, b0, m in zip(counts, base, state.seen, strict=True)]
        enter = [n - k for n, k in zip(counts, skip, strict=True)]  # frames of x that enter (strides skip some)
        seen = [m + n for m, n in zip(state.seen, counts, strict=True)]
        closed = [c or f for c, f in zip(state.closed, final, strict=True)]
        total = [self.out_length(n, c) for n, c in zip(seen, closed, strict=True)]
        emitted = [t1 - t0 for t1, t0 in zip(total, state.emitted, strict=True)]
        # row b: padded frames [base_b, pad_left + seen_b) (+ the right zeros when final), zeros after
        tail = [self.pad_right if f and not c else 0 for f, c in zip(final, state.closed, strict=True)]
        width = max((h + n + t for h, n, t in zip(held, enter, tail, strict=True)), default=0)
        work = join_frames(state.held, held, x, enter, dim=2, skip=skip, width=width)  # [B, C_in, W]
        e = max(emitted, default=0)
        if e:
            w = self.conv
            y = F.conv1d(work, w.weight, w.bias, s, 0, self.dilation, w.groups)[:, :, :e]  # output base_b/s + i
            idle = torch.arange(e, device=y.device)[None, :] >= torch.tensor(emitted, device=y.device)[:, None]
            y = y.masked_fill(idle[:, None, :], 0.0)
        else:
            y = work.new_zeros(work.shape[0], self.conv.out_channels, 0)
        keep = [0 if c else max(0, pl + n - t * s) for n, t, c in zip(seen, total, closed, strict=True)]
        moved = [t * s - b0 for t, b0 in zip(total, base, strict=True)]
        nxt = ConvState(state.config, take_frames(work, moved, keep, self.slots, dim=2), seen, total, closed)
        return y, emitted, nxt

    def offline(self, x: torch.Tensor, lengths: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """The plain conv over each whole zero-padded utterance: ``(y [B, C_out, T_out], out_lengths)``;
        frames of ``x`` past ``lengths[b]`` are treated as absent (zeros after the right padding)."""
        b, _, t = x.shape
        lengths = check_lengths(lengths, b, t)
        real = torch.arange(t, device=x.device)[None, :] < torch.tensor(lengths, device=x.device)[:, None]
        x = torch.where(real[:, None, :], x, x.new_zeros(()))
        out = [self.out_length(n) for n in lengths]
        if self.pad_left + t + self.pad_right < self.span:
            return x.new_zeros(b, self.conv.out_channels, 0), out
        w = self.conv
        y = F.conv1d(
            F.pad(x, (self.pad_left, self.pad_right)), w.weight, w.bias, self.stride, 0, self.dilation, w.groups
        )
        y = y[:, :, : max(out, default=0)]
        idle = torch.arange(y.shape[2], device=x.device)[None, :] >= torch.tensor(out, device=x.device)[:, None]
        return y.masked_fill(idle[:, None, :], 0.0), out

    # ------------------------------------------------------------------ validation
    def _check(self, state, x, counts, final) -> tuple[list[int], list[bool]]:
        if not isinstance(state, ConvState):
            raise TypeError(f"state must be a ConvState (from new_state / load_state), got {type(state).__name__}")
        if state.config != self.config:
            raise ValueError(f"state belongs to a conv {state.config}, this one is {self.config}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[0] != state.batch or x.shape[1] != self.conv.in_channels:
            raise ValueError(
                f"x must be [B, C_in, T] = [{state.batch}, {self.conv.in_channels}, T], got {list(x.shape)}"
            )
        if x.dtype != state.dtype or x.dtype != self.conv.weight.dtype:
            raise TypeError(
                f"x is {x.dtype}; the state is {state.dtype} and the conv's weight {self.conv.weight.dtype}"
            )
        if x.device != state.device:
            raise ValueError(f"x is on {x.device}, the streams' state on {state.device}")
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("StreamingConv1d is an inference operator: call it under torch.no_grad()")
        counts = check_lengths(counts, x.shape[0], x.shape[2])
        final = check_final(final, x.shape[0])
        check_open(state.closed, counts, "StreamingConv1d")
        return counts, final

    def load_state(self, raw: Mapping[str, Any]) -> ConvState:
        """A ``ConvState`` from ``state.to_dict()``, validated completely and copied."""
        owner = "StreamingConv1d"
        if not isinstance(raw, Mapping) or raw.get("format") != _FORMAT:
            raise ValueError(f"{owner}: not a saved ConvState (expected a dict with format {_FORMAT!r})")
        if raw.get("config") != self.config:
            raise ValueError(f"{owner}: state comes from another conv: theirs {raw.get('config')}, ours {self.config}")
        held = saved_tensor(raw, "held", owner, 3)
        b = held.shape[0]
        if tuple(held.shape[1:]) != (self.conv.in_channels, self.slots):
            raise ValueError(
                f"{owner}: saved 'held' is {list(held.shape)}, expected [B, {self.conv.in_channels}, {self.slots}]"
            )
        seen, emitted, closed = (counters(raw, key, b, owner) for key in ("seen", "emitted", "closed"))
        if any(c not in (0, 1) for c in closed):
            raise ValueError(f"{owner}: saved 'closed' must hold 0 or 1, got {closed}")
        for i, (n, e, c) in enumerate(zip(seen, emitted, closed, strict=True)):
            if e != self.out_length(n, bool(c)):
                raise ValueError(
                    f"{owner}: stream {i} has seen {n} frames and emitted {e} outputs; this conv emits "
                    f"{self.out_length(n, bool(c))} by then ({'finished' if c else 'open'})"
                )
        return ConvState(dict(self.config), held.clone(), seen, emitted, [bool(c) for c in closed])
