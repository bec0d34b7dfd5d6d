"""The explicit, serialisable state of a batch of streams: one place validates and (de)serialises it.

A state is a value: every engine reads and writes a ``StreamState``, never a hidden buffer. Rows are
streams; the server moves streams in and out of a batch with ``select`` (gather rows), ``put``
(scatter rows from another state) and ``cat`` (streams joining).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

EMPTY = 2**62  # stream index recorded for an empty slot: no query ever sees it
_SLOT_FIELDS = ("index", "score", "k_raw")  # optional per-slot tensors, [B, Hkv, N, ...]


@dataclass(frozen=True)
class StateSpec:
    """What an engine expects of a state (everything ``from_dict`` checks beyond self-consistency).

    ``slots``: the fixed slot count, or ``None`` for a growing buffer (``Full``), which must then
    hold at least every token seen. ``index``: whether the state records each slot's stream index
    (engines whose slots are not a closed-form function of ``seen``, e.g. score-based eviction).
    """

    sinks: int
    slots: int | None
    head_dim: int | None
    sink_k: bool
    index: bool
    score: bool = False
    k_raw: bool = False

    def load(self, raw: Any) -> StreamState:
        """``StreamState.from_dict(raw, self)``: a validated new state or ``ValueError``."""
        return StreamState.from_dict(raw, self)


@dataclass
class StreamState:
    """Everything a batch of ``B`` independent streams carries from one call to the next.

    - ``k``, ``v``: ``[B, Hkv, N, D]`` key/value slots (keys stored RoPE-rotated at ``j - base[b]``).
      For the sinks + window engine: slots ``[0, S)`` hold the sinks (as a *display* copy in the
      frame of the current query), ``[S, N)`` the window as a ring (token ``j >= S`` in slot
      ``S + (j - S) % W``).
    - ``sink_k``: ``[B, Hkv, S, D]`` sinks rotated at ``j - anchor`` (``anchor = S + W - 1``);
      ``None`` without RoPE or sinks.
    - ``seen[b]``: tokens stream ``b`` has consumed = stream index of its next token.
    - ``base[b]``: origin of stream ``b``'s RoPE frame (moved forward to keep angles small).
    - ``index``: ``[B, Hkv, N]`` int64 on the state's device, the stream index each slot holds per
      kv head (``EMPTY`` if none), for engines that evict by data; ``None`` where the slot of a token
      is a closed-form function of ``seen`` (the engine's ``slot_index(state)`` derives it).
    - ``score``: ``[B, Hkv, N]`` per-slot eviction score (float64 for float64 states, else float32)
      of engines that evict by score; ``None`` otherwise.
    - ``k_raw``: ``[B, Hkv, N, D]`` un-rotated keys, for engines that re-rotate kept keys when their
      position changes (score-based eviction in ``positions="cache"``); ``None`` otherwise.

    ``seen``/``base`` are host-side ints: every call needs them for control flow (block sizes,
    rebasing, buffer growth), and reading them from a device tensor would synchronise each step.
    They are serialised as int64 tensors.
    """

    k: torch.Tensor
    v: torch.Tensor
    sink_k: torch.Tensor | None
    seen: list[int]
    base: list[int]
    index: torch.Tensor | None = None
    score: torch.Tensor | None = None
    k_raw: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.k, self.v, self.sink_k, *self.slot_fields().values()) if t is not None]

    def slot_fields(self) -> dict[str, torch.Tensor | None]:
        """The optional per-slot tensors (``[B, Hkv, N, ...]``) by name."""
        return {name: getattr(self, name) for name in _SLOT_FIELDS}

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant for a bounded policy once allocated)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def head_nbytes(self) -> list[int]:
        """Bytes held for each kv head (every head of one state holds the same)."""
        return [self.nbytes // self.kv_heads] * self.kv_heads

    # ------------------------------------------------------------------ rows: streams leave and join
    def _rows(self, rows: torch.Tensor | Sequence[int]) -> list[int]:
        values = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
        if isinstance(rows, torch.Tensor) and (rows.dim() != 1 or rows.dtype.is_floating_point):
            raise TypeError(f"rows must be a 1-D integer tensor or a sequence of ints, got {rows.dtype} {rows.shape}")
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in values):
            raise TypeError(f"rows must be ints, got {values!r}")
        if any(r < -self.batch_size or r >= self.batch_size for r in values):
            raise ValueError(f"rows {values} out of range for a batch of {self.batch_size} streams")
        return [r % self.batch_size for r in values]

    def select(self, rows: torch.Tensor | Sequence[int]) -> StreamState:
        """A new state holding streams ``rows`` of this one, in that order (repeats allowed: beams).

        The result shares no memory with this state.
        """
        idx = self._rows(rows)
        if not idx:
            raise ValueError("select needs at least one row (a state holds B >= 1 streams)")
        at = torch.tensor(idx, device=self.device)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, at)

        return StreamState(
            k=pick(self.k),
            v=pick(self.v),
            sink_k=pick(self.sink_k),
            seen=[self.seen[i] for i in idx],
            base=[self.base[i] for i in idx],
            **{name: pick(t) for name, t in self.slot_fields().items()},
        )

    def put(self, rows: torch.Tensor | Sequence[int], other: StreamState) -> None:
        """Overwrite streams ``rows`` with the streams of ``other`` (row ``i`` of ``other`` -> ``rows[i]``).

        In place; everything is checked before anything is written. A growing buffer (``Full``)
        is widened to fit ``other`` first.
        """
        idx = self._rows(rows)
        if len(idx) != other.batch_size or len(set(idx)) != len(idx):
            raise ValueError(f"put needs {other.batch_size} distinct rows (one per stream of other), got {idx}")
        self._check_compatible(other)
        if other.slots > self.slots:
            self.widen(other.slots)
        at = torch.tensor(idx, device=self.device)
        n = other.slots
        self.k[at, :, :n], self.v[at, :, :n] = other.k, other.v
        for name, mine in self.slot_fields().items():
            if mine is not None:
                mine[at] = EMPTY if name == "index" else 0
                mine[at, :, :n] = getattr(other, name)
        if self.sink_k is not None:
            self.sink_k[at] = other.sink_k
        for i, r in enumerate(idx):
            self.seen[r], self.base[r] = other.seen[i], other.base[i]

    @staticmethod
    def cat(states: Sequence[StreamState]) -> StreamState:
        """One state holding the streams of ``states`` in order (growing buffers padded to the widest)."""
        if not states:
            raise ValueError("cat needs at least one state")
        first = states[0]
        for other in states[1:]:
            first._check_compatible(other)
        n = max(s.slots for s in states)
        if any(s.slots != n for s in states):
            states = [s if s.slots == n else _widened_copy(s, n) for s in states]

        def join(name: str) -> torch.Tensor | None:
            return None if getattr(first, name) is None else torch.cat([getattr(s, name) for s in states])

        return StreamState(
            k=join("k"),
            v=join("v"),
            sink_k=join("sink_k"),
            seen=[x for s in states for x in s.seen],
            base=[x for s in states for x in s.base],
            **{name: join(name) for name in _SLOT_FIELDS},
        )

    def _check_compatible(self, other: StreamState) -> None:
        if not isinstance(other, StreamState):
            raise TypeError(f"expected a StreamState, got {type(other).__name__}")

        def layout(st: StreamState) -> tuple:
            held = tuple(name for name, t in st.slot_fields().items() if t is not None)
            return (st.kv_heads, st.head_dim, st.dtype, st.device, st.sink_k is not None, held)

        mine, theirs = layout(self), layout(other)
        if mine != theirs or (self.sink_k is not None and self.sink_k.shape[2] != other.sink_k.shape[2]):
            raise ValueError(
                "states of different layouts cannot share a batch: (Hkv, D, dtype, device, sink_k, slot fields) "
                f"= {mine} vs {theirs}"
            )

    def widen(self, n: int) -> None:
        """Grow the slot buffers to ``n >= slots`` (new slots empty): a growing (``Full``) buffer."""
        widened = _widened_copy(self, n)
        self.k, self.v = widened.k, widened.v
        for name, t in widened.slot_fields().items():
            setattr(self, name, t)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self, copy: bool = True) -> dict[str, object]:
        """A snapshot (cloned tensors, int64 counters) that ``torch.save`` can write; ``copy=False``:
        the live buffers themselves (for writing straight to a file, never to keep)."""
        keep = (lambda t: t.clone()) if copy else (lambda t: t)
        out = {
            "k": keep(self.k),
            "v": keep(self.v),
            "sink_k": None if self.sink_k is None else keep(self.sink_k),
            "seen": torch.tensor(self.seen, dtype=torch.int64),
            "base": torch.tensor(self.base, dtype=torch.int64),
        }
        for name, t in self.slot_fields().items():  # absent when unused (the saved format stays as it was)
            if t is not None:
                out[name] = keep(t)
        return out

    @classmethod
    def from_dict(cls, raw: Any, spec: StateSpec) -> StreamState:
        """Validate ``raw`` (from ``to_dict``) completely against ``spec``; a new state or ``ValueError``.

        Nothing is aliased: the tensors are cloned.
        """
        if not isinstance(raw, Mapping):
            raise ValueError(f"malformed stream state: expected a dict, got {type(raw).__name__}")
        try:
            k, v, sink_k = raw["k"], raw["v"], raw["sink_k"]
            fields = {name: raw.get(name) for name in _SLOT_FIELDS}
            seen, base = [int(x) for x in raw["seen"]], [int(x) for x in raw["base"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed stream state: {exc!r}") from None
        if not (isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4 and k.shape == v.shape):
            raise ValueError("malformed stream state: k and v must be 4-D tensors of one shape")
        if k.dtype != v.dtype or not k.dtype.is_floating_point or k.device != v.device:
            raise ValueError("malformed stream state: k and v must share one float dtype and device")
        b, hkv, slots, d = k.shape
        if (
            b < 1
            or len(seen) != b
            or len(base) != b
            or any(x < 0 or y < 0 or y > x for x, y in zip(seen, base, strict=True))
        ):
            raise ValueError("malformed stream state: seen/base do not match the batch")
        if spec.slots is not None and slots != spec.slots:
            raise ValueError(f"stream state buffers hold {slots} slots, this policy needs {spec.slots}")
        if spec.slots is None and slots < max(seen):
            raise ValueError(f"stream state buffers hold {slots} slots, fewer than the {max(seen)} tokens seen")
        if spec.head_dim is not None and d != spec.head_dim:
            raise ValueError(f"stream state head_dim {d} does not match rope.head_dim {spec.head_dim}")
        if spec.sink_k != isinstance(sink_k, torch.Tensor) or (
            spec.sink_k
            and (sink_k.shape != (b, hkv, spec.sinks, d) or sink_k.dtype != k.dtype or sink_k.device != k.device)
        ):
            raise ValueError("malformed stream state: sink_k does not match the policy")
        expected = {
            "index": ((b, hkv, slots), torch.int64),
            "score": ((b, hkv, slots), torch.float64 if k.dtype == torch.float64 else torch.float32),
            "k_raw": ((b, hkv, slots, d), k.dtype),
        }
        for name, t in fields.items():
            shape, dtype = expected[name]
            wanted = getattr(spec, name)
            if wanted != isinstance(t, torch.Tensor) or (
                wanted and (t.shape != shape or t.dtype != dtype or t.device != k.device)
            ):
                need = f"a {dtype} {list(shape)} tensor on {k.device}" if wanted else "absent"
                raise ValueError(f"malformed stream state: {name} must be {need} for this policy")
        state = cls(k=k.clone(), v=v.clone(), sink_k=None if sink_k is None else sink_k.clone(), seen=seen, base=base)
        return replace(state, **{name: None if t is None else t.clone() for name, t in fields.items()})


def in_segments(
    st: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[int], limit, run
) -> torch.Tensor:
    """Stream ``counts[b]`` tokens of each stream (right-padded to T) through ``run(st, q, k, v, n)``
    in segments: each stream advances by at most ``limit(st.seen[b])`` tokens per segment (engines
    whose decisions happen at fixed stream indices end segments there). Streams at the same offset
    take plain slices; ragged ones are gathered into one right-padded segment. ``run`` advances
    ``st.seen``."""
    bsz, _, _, d = q.shape
    out = q.new_zeros(q.shape)
    done = [0] * bsz
    while True:
        n = [max(0, min(c - o, limit(s))) for c, o, s in zip(counts, done, st.seen, strict=True)]
        width = max(n)
        if width == 0:
            return out
        if all(o == done[0] for o in done):
            o = done[0]
            out[:, :, o : o + width] = run(
                st, q[:, :, o : o + width], k[:, :, o : o + width], v[:, :, o : o + width], n
            )
        else:
            parts = []
            for x in (q, k, v):
                part = x.new_zeros(bsz, x.shape[1], width, d)
                for b, (o, m) in enumerate(zip(done, n, strict=True)):
                    part[b, :, :m] = x[b, :, o : o + m]
                parts.append(part)
            res = run(st, *parts, n)
            for b, (o, m) in enumerate(zip(done, n, strict=True)):
                out[b, :, o : o + m] = res[b, :, :m]
        done = [o + m for o, m in zip(done, n, strict=True)]


def _widened_copy(st: StreamState, n: int) -> StreamState:
    """``st`` with ``n >= st.slots`` slots (new slots empty)."""

    def grow(t: torch.Tensor) -> torch.Tensor:
        return torch.cat((t, t.new_zeros(*t.shape[:2], n - t.shape[2], *t.shape[3:])), dim=2)

    fields = {}
    for name, t in st.slot_fields().items():
        if t is not None:
            pad = t.new_full((*t.shape[:2], n - st.slots, *t.shape[3:]), EMPTY if name == "index" else 0)
            fields[name] = torch.cat((t, pad), dim=2)
    return StreamState(k=grow(st.k), v=grow(st.v), sink_k=st.sink_k, seen=list(st.seen), base=list(st.base), **fields)
