"""The encoder engine: ``ChunkedContext`` attention streamed exactly, in state bounded by the policy.

A streaming speech encoder receives frames in pieces of any size. A query of chunk ``c`` needs every
key up to frame ``(c + 1) * chunk + lookahead - 1``, so its output exists only once that frame has
arrived: outputs are *emitted* chunk by chunk, later than the frames that produced them. The state
of a batch of streams (``ChunkedState``) holds, per stream, the keys and values a future query may
see (the ``left`` frames before the oldest pending chunk, and every pending frame) and the queries of
the frames not emitted yet. With ``left`` bounded that is at most ``left + chunk + lookahead - 1``
keys and ``chunk + lookahead - 1`` queries, whatever the stream's length.

``join_frames`` / ``take_frames`` move ragged runs of frames (row ``b`` holds its own number of
frames, left-aligned, zeros after) with one gather each; ``streamattn.core.conv`` and
``streamattn.encoder`` use them too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamattn.core.kernels import attend
from streamattn.core.streaming import check_lengths
from streamattn.policies.chunked_context import ChunkedContext

_FORMAT = "streamattn.ChunkedAttention/1"


# ---------------------------------------------------------------------- ragged runs of frames
def _gather(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[b, ..., i, ...] = x[b, ..., index[b, i], ...]`` on time dim ``dim`` where ``valid[b, i]``,
    else 0 (``torch.where``: a NaN in an unused slot never reaches the output)."""
    x = x.movedim(dim, 1)  # [B, N, ...]
    if x.shape[1] == 0:  # nothing to take: every slot is padding
        return x.new_zeros(x.shape[0], index.shape[1], *x.shape[2:]).movedim(1, dim)
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    out = x[rows, index.clamp(0, x.shape[1] - 1)]  # [B, W, ...]
    keep = valid.view(*valid.shape, *([1] * (out.dim() - 2)))
    return torch.where(keep, out, out.new_zeros(())).movedim(1, dim)


def join_frames(
    held: torch.Tensor,
    held_n: Sequence[int],
    new: torch.Tensor,
    new_n: Sequence[int],
    dim: int,
    *,
    skip: Sequence[int] | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Row ``b``: the first ``held_n[b]`` frames of ``held``, then frames ``[skip[b], skip[b] + new_n[b])``
    of ``new``, then zeros, along time dim ``dim`` (``width``: default ``max(held_n + new_n)``).
    One concatenation and one gather: ``O(B (N + T) F)``."""
    device = held.device
    width = max((h + n for h, n in zip(held_n, new_n, strict=True)), default=0) if width is None else width
    hn = torch.tensor(list(held_n), device=device)[:, None]
    nn = torch.tensor(list(new_n), device=device)[:, None]
    sk = torch.zeros_like(hn) if skip is None else torch.tensor(list(skip), device=device)[:, None]
    i = torch.arange(width, device=device)[None, :]
    index = torch.where(i < hn, i, held.shape[dim] + sk + i - hn)
    return _gather(torch.cat([held, new], dim), index, i < hn + nn, dim)


def take_frames(work: torch.Tensor, start: Sequence[int], n: Sequence[int], width: int, dim: int) -> torch.Tensor:
    """Row ``b``: frames ``[start[b], start[b] + n[b])`` of ``work`` moved to slots ``[0, n[b])``,
    zeros up to ``width``, along time dim ``dim``."""
    device = work.device
    i = torch.arange(width, device=device)[None, :]
    index = torch.tensor(list(start), device=device)[:, None] + i
    return _gather(work, index, i < torch.tensor(list(n), device=device)[:, None], dim)


def check_rows(rows: Sequence[int], batch: int) -> list[int]:
    """Stream rows as ints in ``[0, batch)`` (repeats allowed), or ``ValueError``."""
    if isinstance(rows, torch.Tensor):
        rows = rows.tolist()
    if not isinstance(rows, Sequence) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        raise ValueError(f"rows must be a sequence of ints, got {rows!r}")
    if any(r < 0 or r >= batch for r in rows):
        raise ValueError(f"rows {list(rows)} out of range for {batch} streams")
    return list(rows)


def check_final(final: bool | Sequence[bool] | None, batch: int) -> list[bool]:
    """``final`` as one bool per stream (``None``: none ends now; a bool: every stream)."""
    if final is None or isinstance(final, bool):
        return [bool(final)] * batch
    if isinstance(final, torch.Tensor):
        final = final.tolist()
    if not isinstance(final, Sequence) or not all(isinstance(f, bool) for f in final):
        raise ValueError(f"final must be a bool or one bool per stream, got {final!r}")
    if len(final) != batch:
        raise ValueError(f"final has {len(final)} entries, expected one per stream (B={batch})")
    return list(final)


def check_open(closed: Sequence[bool], counts: Sequence[int], owner: str) -> None:
    """A finished stream takes no more frames."""
    late = [b for b, (c, n) in enumerate(zip(closed, counts, strict=True)) if c and n]
    if late:
        raise ValueError(
            f"{owner}: streams {late} were finished (final / finish()) and take no more frames; "
            "give them count 0, drop them (select) or start new streams"
        )


def counters(raw: Mapping[str, Any], key: str, batch: int, owner: str) -> list[int]:
    """A saved ``[B]`` int64 counter tensor as host ints."""
    x = raw.get(key)
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or tuple(x.shape) != (batch,):
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{owner}: saved state's {key!r} must be an int64 tensor of shape ({batch},), got {got}")
    values = x.tolist()
    if any(n < 0 for n in values):
        raise ValueError(f"{owner}: saved state's {key!r} must be >= 0, got {values}")
    return values


def saved_tensor(raw: Mapping[str, Any], key: str, owner: str, rank: int) -> torch.Tensor:
    x = raw.get(key)
    if not isinstance(x, torch.Tensor) or x.dim() != rank or not x.dtype.is_floating_point:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{owner}: saved state's {key!r} must be a floating tensor of rank {rank}, got {got}")
    return x


# ---------------------------------------------------------------------- state
@dataclass
class ChunkedState:
    """The streams of one ``ChunkedAttention`` (row ``b`` = stream ``b``). Replaced whole by each call.

    k, v    ``[B, Hkv, Nk, D]``  keys/values of frames ``[start_b, seen_b)`` in slots ``[0, seen_b -
                                start_b)`` in stream order, zeros after; ``start_b = max(0, done_b -
                                left)`` (0 when ``left is None``; ``seen_b`` once finished)
    q       ``[B, Hq, Nq, D]``   pending queries: frames ``[done_b, seen_b)``, not emitted yet
    seen    ``list[int]``        frames arrived per stream (host ints; saved as int64 tensors)
    done    ``list[int]``        frames emitted per stream: a multiple of ``chunk`` until finished
    closed  ``list[bool]``       finished: every frame emitted, nothing held, no frame may come

    ``Nk = left + chunk + lookahead - 1`` and ``Nq = chunk + lookahead - 1`` when ``left`` is bounded
    (fixed bytes whatever the stream length); ``Nk`` = the most keys a stream holds otherwise.
    """

    policy: ChunkedContext
    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor
    seen: list[int]
    done: list[int]
    closed: list[bool]

    @property
    def batch(self) -> int:
        return len(self.seen)

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        """Bytes of the state's tensors (the counters are host ints)."""
        return sum(x.numel() * x.element_size() for x in (self.k, self.v, self.q))

    @property
    def frames_in(self) -> list[int]:
        return list(self.seen)

    @property
    def frames_out(self) -> list[int]:
        return list(self.done)

    def start(self) -> list[int]:
        """First key frame each stream holds."""
        left = self.policy.left
        return [
            s if c else (0 if left is None else max(0, d - left))
            for s, d, c in zip(self.seen, self.done, self.closed, strict=True)
        ]

    def select(self, rows: Sequence[int]) -> ChunkedState:
        """Streams ``rows`` (leaving, reordering, repeating), copied."""
        rows = check_rows(rows, self.batch)
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        return ChunkedState(
            self.policy,
            self.k[idx],
            self.v[idx],
            self.q[idx],
            [self.seen[r] for r in rows],
            [self.done[r] for r in rows],
            [self.closed[r] for r in rows],
        )

    @staticmethod
    def cat(states: Sequence[ChunkedState]) -> ChunkedState:
        """The streams of ``states`` in order (streams joining); unbounded key buffers padded to the widest."""
        first = states[0]
        for st in states:
            if (
                st.policy != first.policy
                or st.k.shape[1] != first.k.shape[1]
                or st.q.shape[1] != first.q.shape[1]
                or st.k.shape[3] != first.k.shape[3]
                or st.dtype != first.dtype
                or st.device != first.device
            ):
                raise ValueError("ChunkedState.cat: states of different policies, heads, head dims, dtypes or devices")
        width = max(st.k.shape[2] for st in states)
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[2]))  # noqa: E731
        return ChunkedState(
            first.policy,
            torch.cat([pad(st.k) for st in states]),
            torch.cat([pad(st.v) for st in states]),
            torch.cat([st.q for st in states]),
            [n for st in states for n in st.seen],
            [n for st in states for n in st.done],
            [c for st in states for c in st.closed],
        )

    def fresh(self, batch: int) -> ChunkedState:
        """``batch`` new empty streams in this state's layout (what joins with ``cat``)."""
        k = self.k.new_zeros(batch, *self.k.shape[1:])
        return ChunkedState(
            self.policy,
            k,
            torch.zeros_like(k),
            self.q.new_zeros(batch, *self.q.shape[1:]),
            [0] * batch,
            [0] * batch,
            [False] * batch,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain tensors and a config (``torch.load(weights_only=True)``-safe), copied."""
        return {
            "format": _FORMAT,
            "config": self.policy.to_config(),
            "k": self.k.clone(),
            "v": self.v.clone(),
            "q": self.q.clone(),
            "seen": torch.tensor(self.seen, dtype=torch.int64),
            "done": torch.tensor(self.done, dtype=torch.int64),
            "closed": torch.tensor(self.closed, dtype=torch.int64),
        }


# ---------------------------------------------------------------------- engine
class ChunkedAttention:
    """``ChunkedContext`` attention over streams of frames fed in pieces of any size, exactly.

    Holds configuration only; the streams are a ``ChunkedState`` passed to each call::

        attn = ChunkedAttention(ChunkedContext(chunk=4, left=8, lookahead=2))
        state = attn.new_state(batch, heads_q, heads_kv, head_dim, torch.float32)
        out, emitted = attn(state, q, k, v, counts)   # again and again, then
        out, emitted = attn.finish(state)

    ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` are the projections of the next ``T`` frames of
    each stream; ``counts[b] <= T`` of them are real in row ``b`` (right padding never enters the
    state; default ``T``). GQA: query head ``h`` reads kv head ``h // (Hq / Hkv)``; scale
    ``1/sqrt(D)`` unless given.

    Emission: once frame ``(c + 1) * chunk + lookahead - 1`` of a stream has arrived, every frame
    of its chunk ``c`` is emitted (all queries of a chunk see the same keys). After a call a stream
    has emitted frames ``[0, done)`` with ``done = chunk * floor((seen - lookahead) / chunk)``
    (at least 0; ``seen`` = frames arrived) and ``emitted[b]`` is how many of them this call
    emitted: ``out[b, :, :emitted[b]]`` are their outputs in order (zeros after, ``out`` is
    ``[B, Hq, max(emitted), D]``). ``final[b]`` (or ``finish``) says no frame will follow: every
    pending frame is emitted, its chunk's lookahead being whatever exists. Each output equals
    ``reference.chunked_context_attention`` over the whole stream, whatever the pieces.

    A call is validated completely before anything changes (``ValueError`` for values and shapes,
    ``TypeError`` for types and dtypes), then the state's fields are replaced (``step`` returns the
    next state and leaves the given one untouched). Calls longer than ``block`` frames run as pieces
    of ``block``, so a call's work is ``O(T (left + chunk + lookahead + block))``, not ``O(T^2)``.
    """

    def __init__(self, policy: ChunkedContext, *, scale: float | None = None, block: int = 256) -> None:
        if not isinstance(policy, ChunkedContext):
            raise TypeError(f"ChunkedAttention realises a ChunkedContext policy, got {policy!r}")
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be an int >= 1, got {block!r}")
        self.policy = policy
        self.scale = scale
        self.block = block
        c, r = policy.chunk, policy.lookahead
        self.q_slots = c + r - 1  # pending frames: < chunk + lookahead, else their chunk is complete
        self.k_slots = None if policy.left is None else policy.left + self.q_slots

    def __repr__(self) -> str:
        return f"ChunkedAttention({self.policy}, scale={self.scale}, block={self.block})"

    def frontier(self, seen: int, final: bool) -> int:
        """Frames emitted once ``seen`` frames arrived (all of them if no frame follows)."""
        if final:
            return seen
        c = self.policy.chunk
        return max(0, (seen - self.policy.lookahead) // c * c)

    def new_state(
        self,
        batch: int,
        heads_q: int,
        heads_kv: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> ChunkedState:
        for name, value in (("batch", batch), ("heads_q", heads_q), ("heads_kv", heads_kv), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "batch" else 1):
                raise ValueError(f"ChunkedAttention.new_state: {name} must be a positive int, got {value!r}")
        if heads_q % heads_kv:
            raise ValueError(f"heads_q={heads_q} must be a multiple of heads_kv={heads_kv} (GQA)")
        if not dtype.is_floating_point:
            raise TypeError(f"ChunkedAttention.new_state: dtype must be floating, got {dtype}")
        k = torch.zeros(batch, heads_kv, self.k_slots or 0, head_dim, dtype=dtype, device=device)
        q = torch.zeros(batch, heads_q, self.q_slots, head_dim, dtype=dtype, device=device)
        return ChunkedState(self.policy, k, torch.zeros_like(k), q, [0] * batch, [0] * batch, [False] * batch)

    # ------------------------------------------------------------------ calls
    def forward(
        self,
        state: ChunkedState,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        counts: Sequence[int] | torch.Tensor | None = None,
        *,
        final: bool | Sequence[bool] | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Feed frames; returns ``(out [B, Hq, E, D], emitted)`` and advances ``state`` in place."""
        out, emitted, nxt = self.step(state, q, k, v, counts, final=final)
        state.__dict__.update(nxt.__dict__)
        return out, emitted

    __call__ = forward

    def finish(self, state: ChunkedState, rows: Sequence[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        """No frame follows for streams ``rows`` (default: all): emit everything they still hold."""
        b, hq, _, d = state.q.shape
        final = [True] * b if rows is None else [i in set(check_rows(rows, b)) for i in range(b)]
        q = state.q.new_zeros(b, hq, 0, d)
        k = state.k.new_zeros(b, state.k.shape[1], 0, d)
        return self.forward(state, q, k, k, [0] * b, final=final)

    def step(
        self,
        state: ChunkedState,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        counts: Sequence[int] | torch.Tensor | None = None,
        *,
        final: bool | Sequence[bool] | None = None,
    ) -> tuple[torch.Tensor, list[int], ChunkedState]:
        """``forward`` as a pure function: ``(out, emitted, next_state)``; ``state`` is not changed."""
        counts, final = self._check(state, q, k, v, counts, final)
        pieces = max(1, -(-max(counts, default=0) // self.block))
        if pieces == 1:
            return self._step(state, q, k, v, counts, final)
        parts, st = [], state
        for p in range(pieces):  # in pieces of `block` frames: the invariance makes this exact
            lo = p * self.block
            sl = slice(lo, lo + self.block)
            n = [min(max(c - lo, 0), self.block) for c in counts]
            out, emitted, st = self._step(
                st, q[:, :, sl], k[:, :, sl], v[:, :, sl], n, final if p == pieces - 1 else [False] * len(n)
            )
            parts.append((out, emitted))
        return (*_pack(parts, q), st)

    def _step(self, st: ChunkedState, q, k, v, counts: list[int], final: list[bool]):
        start = st.start()
        held = [s - a for s, a in zip(st.seen, start, strict=True)]
        pending = [s - d for s, d in zip(st.seen, st.done, strict=True)]
        seen = [s + n for s, n in zip(st.seen, counts, strict=True)]
        closed = [c or f for c, f in zip(st.closed, final, strict=True)]
        done = [self.frontier(s, c) for s, c in zip(seen, closed, strict=True)]
        emitted = [d1 - d0 for d1, d0 in zip(done, st.done, strict=True)]
        kw = join_frames(st.k, held, k, counts, dim=2)  # [B, Hkv, W, D]: frames [start_b, seen_b)
        vw = join_frames(st.v, held, v, counts, dim=2)
        qw = join_frames(st.q, pending, q, counts, dim=2)  # [B, Hq, P, D]: frames [done_b, seen_b)
        out = self._attend(qw[:, :, : max(emitted, default=0)], kw, vw, st.done, start, seen, emitted)
        nxt = ChunkedState(self.policy, kw, vw, qw, seen, done, closed)
        start2 = nxt.start()
        keep = [s - a for s, a in zip(seen, start2, strict=True)]
        width = max(keep, default=0) if self.k_slots is None else self.k_slots
        moved = [a2 - a for a2, a in zip(start2, start, strict=True)]
        nxt.k = take_frames(kw, moved, keep, width, dim=2)
        nxt.v = take_frames(vw, moved, keep, width, dim=2)
        nxt.q = take_frames(qw, emitted, [s - d for s, d in zip(seen, done, strict=True)], self.q_slots, dim=2)
        return out, emitted, nxt

    def _attend(self, q, k, v, done, start, seen, emitted) -> torch.Tensor:
        """Outputs of queries ``done_b + i`` (``i < emitted_b``) over keys ``start_b + j`` (``< seen_b``)."""
        e, w = q.shape[2], k.shape[2]
        if e == 0:
            return q
        device = q.device
        tensor = lambda xs: torch.tensor(xs, device=device)[:, None]  # noqa: E731  [B, 1]
        q_idx = tensor(done) + torch.arange(e, device=device)  # [B, E] stream index of each query
        kv_idx = tensor(start) + torch.arange(w, device=device)  # [B, W] stream index of each key slot
        mask = self.policy.visible(q_idx[:, :, None], kv_idx[:, None, :]) & (kv_idx < tensor(seen))[:, None, :]
        idle = torch.arange(e, device=device) >= tensor(emitted)  # [B, E] padding rows of the output
        mask = mask | idle[:, :, None]  # a padding row sees every (finite) slot: no empty softmax
        out = attend(q, k, v, mask[:, None], self.scale)  # [B, Hq, E, D]
        return out.masked_fill(idle[:, None, :, None], 0.0)

    # ------------------------------------------------------------------ validation
    def _check(self, state, q, k, v, counts, final) -> tuple[list[int], list[bool]]:
        """Every check on a call, before anything is touched."""
        if not isinstance(state, ChunkedState):
            raise TypeError(f"state must be a ChunkedState (from new_state / load_state), got {type(state).__name__}")
        if state.policy != self.policy:
            raise ValueError(f"state belongs to {state.policy}, this engine realises {self.policy}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
            if x.dim() != 4:
                raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(x.shape)}")
            if x.dtype != state.dtype:
                raise TypeError(f"{name} is {x.dtype}, the streams' state is {state.dtype}")
            if x.device != state.device:
                raise ValueError(f"{name} is on {x.device}, the streams' state on {state.device}")
        b, t = q.shape[0], q.shape[2]
        want_q = (state.batch, state.q.shape[1], t, state.q.shape[3])
        want_kv = (state.batch, state.k.shape[1], t, state.k.shape[3])
        if tuple(q.shape) != want_q or tuple(k.shape) != want_kv or tuple(v.shape) != want_kv:
            raise ValueError(
                f"expected q {list(want_q)} and k, v {list(want_kv)} ([B, Hq, T, D] / [B, Hkv, T, D] of the "
                f"streams in the state), got q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}"
            )
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            raise ValueError(
                "ChunkedAttention is an inference operator: its state carries no gradient across calls. "
                "Call it under torch.no_grad(); to train use the dense mask (streamattn.masks)."
            )
        counts = check_lengths(counts, b, t)
        final = check_final(final, b)
        check_open(state.closed, counts, "ChunkedAttention")
        return counts, final

    def load_state(self, raw: Mapping[str, Any]) -> ChunkedState:
        """A ``ChunkedState`` from ``state.to_dict()``, validated completely (``ValueError`` naming
        what was wrong and what was expected) and copied."""
        owner = "ChunkedAttention"
        if not isinstance(raw, Mapping) or raw.get("format") != _FORMAT:
            raise ValueError(f"{owner}: not a saved ChunkedState (expected a dict with format {_FORMAT!r})")
        if raw.get("config") != self.policy.to_config():
            raise ValueError(
                f"{owner}: state comes from another policy: theirs {raw.get('config')}, ours {self.policy.to_config()}"
            )
        k, v, q = (saved_tensor(raw, key, owner, 4) for key in ("k", "v", "q"))
        b, hkv, nk, d = k.shape
        if tuple(v.shape) != tuple(k.shape) or q.shape[0] != b or q.shape[3] != d or q.shape[1] % max(hkv, 1):
            raise ValueError(
                f"{owner}: saved k {list(k.shape)}, v {list(v.shape)}, q {list(q.shape)} do not agree "
                "(expected k, v [B, Hkv, Nk, D] and q [B, Hq, Nq, D] with Hq a multiple of Hkv)"
            )
        if len({k.dtype, v.dtype, q.dtype}) != 1 or len({k.device, v.device, q.device}) != 1:
            raise ValueError(f"{owner}: saved k, v, q must share one dtype and device")
        if q.shape[2] != self.q_slots or (self.k_slots is not None and nk != self.k_slots):
            raise ValueError(
                f"{owner}: saved buffers hold {nk} key and {q.shape[2]} query slots; {self.policy} keeps "
                f"{'any number of' if self.k_slots is None else self.k_slots} key and {self.q_slots} query slots"
            )
        seen, done, closed = (counters(raw, key, b, owner) for key in ("seen", "done", "closed"))
        if any(c not in (0, 1) for c in closed):
            raise ValueError(f"{owner}: saved 'closed' must hold 0 or 1, got {closed}")
        for i, (s, n, c) in enumerate(zip(seen, done, closed, strict=True)):
            if n != self.frontier(s, bool(c)):
                raise ValueError(
                    f"{owner}: stream {i} has seen {s} frames and emitted {n}; {self.policy} emits "
                    f"{self.frontier(s, bool(c))} by then ({'finished' if c else 'open'})"
                )
        st = ChunkedState(self.policy, k.clone(), v.clone(), q.clone(), seen, done, [bool(c) for c in closed])
        if any(s - a > nk for s, a in zip(seen, st.start(), strict=True)):
            raise ValueError(f"{owner}: saved key buffers ({nk} slots) are narrower than the keys the streams hold")
        return st


def _pack(parts: list[tuple[torch.Tensor, list[int]]], like: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Concatenate per-row ragged outputs ``[B, H, E_i, D]`` of consecutive pieces along time."""
    b = like.shape[0]
    total = [sum(e[r] for _, e in parts) for r in range(b)]
    out = like.new_zeros(b, parts[0][0].shape[1], max(total, default=0), *parts[0][0].shape[3:])
    at = [0] * b
    for piece, emitted in parts:
        for r in range(b):
            out[r, :, at[r] : at[r] + emitted[r]] = piece[r, :, : emitted[r]]
            at[r] += emitted[r]
    return out, total
