"""The retrieval engine: ``Retrieval`` (sinks + window + the top-k blocks of a memory of evicted blocks).

Layout. ``MemoryState.local`` is a ``StreamState`` of ``sinks + window + block`` slots: slots
``[0, S)`` hold the sinks rotated at their index ``j`` (frame origin 0, never rebased), slots
``[S, S + R)`` a ring of ``R = window + block`` tokens rotated at ``j - base`` (token ``j`` in slot
``S + (j - S) % R``). The ring is ``block`` longer than the window so that a block's tokens are
all still there when it enters memory (its first token left the window ``block - 1`` queries
earlier): a block moves into the store with one copy, at its entry index.

The store (``MemoryState``): per stream and kv head, ``C`` block slots, each with its keys in the
block's own frame (token ``u`` of the block rotated at ``u``), values, the bounds (elementwise
min / max of the keys in the store's frame) that relevance reads, the block's number and its stamp (the last
query that retrieved it). ``max_blocks=N``: ``C = N`` and an entering block takes the slot of the
least recently retrieved one; ``None``: block ``b`` in slot ``b``, ``C`` doubling as the stream grows.

Positions. Window keys are rotated once at ``j - base`` and the query at ``t - base`` (distance
``t - j`` in both modes, as in the window engine). Sinks (rotated at ``j``) are scored against the
query rotated at its position ``P`` (``t``, or its rank in cache mode). The store keeps keys in the
frame the mode needs, so that one rotation of the query serves every block: absolute mode, token
``j`` at ``j`` (query at ``t``); cache mode, token ``u`` of a block at ``u`` (query at ``n_window +
block - 1``: every retrieved block sits at the same ``block`` positions right before the window).
The three parts are merged by log-sum-exp.

Chunks. A segment never crosses an entry index (each stream advances to its next entry at most),
so the memory a query sees, and the stamps that decide what leaves, are those of token-by-token
streaming for any chunking. Query blocks (``every > 1``): the choice of the query block in progress
is state (``MemoryState.choice``), and a decode step reuses the blocks gathered for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from streamattn.core.kernels import add_keys, attend_lse, attend_with_lse, compute_dtype, rebase_keys, write_wrapped
from streamattn.core.placement import Placement
from streamattn.core.registry import register_engine
from streamattn.core.rope import RoPE, apply_rotary, range_cos_sin
from streamattn.core.state import EMPTY, StateSpec, StreamState, in_segments
from streamattn.policies import Retrieval

NO_BLOCK = -1  # block number of an empty store slot
# gathered keys per tile of queries in the per-query path: below the allocator's mmap threshold, so
# the tiles reuse memory instead of faulting in fresh pages
_GATHER_BYTES = 4 << 20
_UNION = 2  # attend the union of the chosen blocks while it is at most this many times topk, else gather per query
_STORE = ("mem_k", "mem_v", "lo", "hi", "block_id", "stamp")
_PLACED = ("mem_k", "mem_v")  # the store's bulk: where ``Retrieval(store=...)`` says; the rest stays with the attention


@dataclass
class MemoryState:
    """A batch of streams of a ``Retrieval`` policy: the local ring and the store of blocks.

    - ``local``: sinks + ring (``StreamState``; ``seen``/``base`` are the streams' counters).
    - ``mem_k``, ``mem_v``: ``[B, Hkv, C, block, D]`` blocks in memory (keys in the block's frame).
    - ``lo``, ``hi``: ``[B, Hkv, C, D]`` elementwise min / max of each block's keys (as stored).
    - ``block_id``: ``[B, Hkv, C]`` int64 block number held by each slot (``NO_BLOCK``: empty).
    - ``stamp``: ``[B, Hkv, C]`` int64 the last query that retrieved the block (or its entry index).
    - ``choice``: ``[B, Hkv, topk]`` int64 the slots chosen for the query block in progress (``-1``:
      none; kept only when ``every > 1``, where a choice outlives the call that made it).
    - ``placement``: where ``mem_k`` / ``mem_v`` live (the attention device, host memory or
      memory-mapped files: ``core.placement``); every other tensor is on the attention device.
    - ``fetched``: the keys and values of ``choice``'s blocks, gathered once per query block for the
      decode steps that share it (on the attention device, in the compute dtype; ``[B, Hkv, topk *
      block, D]``); a cache, never saved: ``None`` whenever the choice changes.
    """

    local: StreamState
    mem_k: torch.Tensor
    mem_v: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    block_id: torch.Tensor
    stamp: torch.Tensor
    choice: torch.Tensor
    placement: Placement = field(default_factory=Placement)
    fetched: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return self.local.batch_size

    @property
    def kv_heads(self) -> int:
        return self.local.kv_heads

    @property
    def head_dim(self) -> int:
        return self.local.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def seen(self) -> list[int]:
        return self.local.seen

    @property
    def capacity(self) -> int:
        """Block slots per stream and kv head."""
        return self.mem_k.shape[2]

    def store(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _STORE}

    @property
    def nbytes(self) -> int:
        """Bytes held: the local buffers and the store (allocated slots)."""
        held = [*self.store().values(), self.choice]
        return self.local.nbytes + sum(t.numel() * t.element_size() for t in held)

    def head_nbytes(self) -> list[int]:
        return [self.nbytes // self.kv_heads] * self.kv_heads

    def _placed(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a new value of store tensor ``name``) where that tensor belongs."""
        return self.placement.adopt(t, self.device) if name in _PLACED else t.to(self.device)

    def select(self, rows: torch.Tensor | Sequence[int]) -> MemoryState:
        local = self.local.select(rows)
        idx = self.local._rows(rows)
        store = {
            name: self._placed(name, t.index_select(0, torch.tensor(idx, device=t.device)))
            for name, t in self.store().items()
        }
        choice = self.choice.index_select(0, torch.tensor(idx, device=self.device))
        return MemoryState(local, **store, choice=choice, placement=self.placement)

    def put(self, rows: torch.Tensor | Sequence[int], other: MemoryState) -> None:
        self._check_compatible(other)
        idx = self.local._rows(rows)
        if len(idx) != other.batch_size or len(set(idx)) != len(idx):
            raise ValueError(f"put needs {other.batch_size} distinct rows (one per stream of other), got {idx}")
        if other.capacity > self.capacity:
            self.widen(other.capacity)
        self.local.put(idx, other.local)
        c = other.capacity
        for name, mine in self.store().items():
            at = torch.tensor(idx, device=mine.device)
            mine[at] = NO_BLOCK if name == "block_id" else 0
            mine[at, :, :c] = getattr(other, name).to(mine.device)
        self.choice[torch.tensor(idx, device=self.device)] = other.choice.to(self.device)
        self.fetched = None

    @staticmethod
    def cat(states: Sequence[MemoryState]) -> MemoryState:
        if not states:
            raise ValueError("cat needs at least one state")
        for other in states[1:]:
            states[0]._check_compatible(other)
        c = max(s.capacity for s in states)
        states = [s if s.capacity == c else s._widened(c) for s in states]
        local = StreamState.cat([s.local for s in states])
        first = states[0]
        store = {}
        for name in _STORE:
            dev = getattr(first, name).device
            store[name] = first._placed(name, torch.cat([getattr(s, name).to(dev) for s in states]))
        choice = torch.cat([s.choice.to(first.device) for s in states])
        return MemoryState(local, **store, choice=choice, placement=first.placement)

    def _check_compatible(self, other: Any) -> None:
        if (
            not isinstance(other, MemoryState)
            or other.mem_k.shape[3] != self.mem_k.shape[3]
            or other.choice.shape[2] != self.choice.shape[2]
        ):
            raise ValueError("retrieval states of different block sizes (or not retrieval states) cannot share a batch")
        self.local._check_compatible(other.local)

    def widen(self, c: int) -> None:
        """Grow the store to ``c >= capacity`` block slots (new slots empty)."""
        for name, t in self._widened(c).store().items():
            setattr(self, name, t)

    def _widened(self, c: int) -> MemoryState:
        grown = {}
        for name, t in self.store().items():
            shape = (*t.shape[:2], c, *t.shape[3:])
            if name in _PLACED:
                new = self.placement.zeros(shape, t.dtype, self.device)
            else:
                new = t.new_full(shape, NO_BLOCK if name == "block_id" else 0)
            new[:, :, : t.shape[2]] = t
            grown[name] = new
        return MemoryState(self.local, **grown, choice=self.choice, placement=self.placement)

    def to_dict(self, copy: bool = True) -> dict[str, object]:
        keep = (lambda t: t.clone()) if copy else (lambda t: t)
        store = {name: keep(t) for name, t in self.store().items()}
        return {"local": self.local.to_dict(copy), **store, "choice": keep(self.choice)}


@dataclass(frozen=True)
class MemorySpec:
    """What a saved ``MemoryState`` must look like: the local ``StateSpec``, the block size and the
    store's capacity (``None``: growing). ``placement``: where a loaded store's blocks are put (a
    saved state's blocks may be on the attention device or on the CPU, whatever it was saved from)."""

    local: StateSpec
    block: int
    capacity: int | None
    topk: int
    placement: Placement = field(default_factory=Placement)

    def load(self, raw: Any) -> MemoryState:
        if not isinstance(raw, Mapping) or any(name not in raw for name in ("local", *_STORE)):
            raise ValueError(f"malformed retrieval state: expected a dict with 'local' and {list(_STORE)}")
        local = self.local.load(raw["local"])
        b, hkv, _, d = local.k.shape
        c = raw["mem_k"].shape[2] if isinstance(raw["mem_k"], torch.Tensor) and raw["mem_k"].dim() == 5 else -1
        if c < 0 or (self.capacity is not None and c != self.capacity):
            raise ValueError(
                f"malformed retrieval state: mem_k must be [B, Hkv, C, {self.block}, D] with C = "
                f"{self.capacity if self.capacity is not None else 'any'}"
            )
        expected = {
            "mem_k": ((b, hkv, c, self.block, d), local.dtype),
            "mem_v": ((b, hkv, c, self.block, d), local.dtype),
            "lo": ((b, hkv, c, d), local.dtype),
            "hi": ((b, hkv, c, d), local.dtype),
            "block_id": ((b, hkv, c), torch.int64),
            "stamp": ((b, hkv, c), torch.int64),
        }
        store = {}
        for name, (shape, dtype) in expected.items():
            t = raw[name]
            devices = (local.device, torch.device("cpu")) if name in _PLACED else (local.device,)
            where = " or ".join(dict.fromkeys(str(x) for x in devices))
            if (
                not isinstance(t, torch.Tensor)
                or tuple(t.shape) != shape
                or t.dtype != dtype
                or t.device not in devices
            ):
                raise ValueError(f"malformed retrieval state: {name} must be a {dtype} {list(shape)} tensor on {where}")
        # a state saved before ``choice`` existed (every=1, where no choice outlives a call): none
        choice = raw.get("choice", torch.full((b, hkv, self.topk), -1, dtype=torch.int64, device=local.device))
        if (
            not isinstance(choice, torch.Tensor)
            or tuple(choice.shape) != (b, hkv, self.topk)
            or choice.dtype != torch.int64
            or choice.device != local.device
            or bool(((choice < -1) | (choice >= c)).any())
        ):
            raise ValueError(
                f"malformed retrieval state: choice must be a torch.int64 [{b}, {hkv}, {self.topk}] tensor "
                f"on {local.device} of slots in [-1, {c})"
            )
        for name in expected:
            t = raw[name]
            store[name] = self.placement.copy(t, local.device) if name in _PLACED else t.clone()
        return MemoryState(local, **store, choice=choice.clone(), placement=self.placement)


def _slot_base(st: MemoryState) -> torch.Tensor:
    """``[B, Hkv, 1]``: where each (stream, kv head)'s slots start among the flattened store's blocks."""
    bsz, hkv, dev = st.batch_size, st.kv_heads, st.device
    return ((torch.arange(bsz, device=dev)[:, None] * hkv + torch.arange(hkv, device=dev)) * st.capacity)[:, :, None]


def _union(chosen: torch.Tensor, ok: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct slots of ``chosen [B, Hkv, T, K]`` where ``ok``, per (stream, kv head), packed
    first: ``(union [B, Hkv, U], real [B, Hkv, U])`` with ``U >= 1`` the most any row has (padding:
    slot 0, ``real`` False). A sort of the ``T K`` choices, whatever the store's size ``C``."""
    flat = chosen.masked_fill(~ok, c).flatten(2)  # c: "none", sorts last
    ordered = flat.sort(dim=-1).values
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    new &= ordered < c
    u = max(1, int(new.sum(-1).max()))
    rank = new.cumsum(-1) - 1  # where each distinct slot goes
    union = torch.zeros(*flat.shape[:2], u + 1, dtype=flat.dtype, device=flat.device)
    union.scatter_(-1, torch.where(new, rank, u), torch.where(new, ordered, 0))  # duplicates and "none" to column u
    union = union[..., :u]
    real = torch.arange(u, device=flat.device) < new.sum(-1, keepdim=True)
    return union, real


@register_engine(Retrieval)
class RetrievalEngine:
    """Realises ``Retrieval(sinks, window, block, topk, max_blocks)``; holds no stream."""

    def __init__(
        self,
        policy: Retrieval,
        rope: RoPE | None,
        positions: str,
        scale: float | None,
        rebase_every: int,
        block_size: int,
    ) -> None:
        self.policy = policy
        self.sinks, self.window, self.block, self.topk = policy.sinks, policy.window, policy.block, policy.topk
        self.ring = policy.window + policy.block
        self.rope = rope
        self.cache_mode = positions == "cache"
        self.scale = scale
        self.rebase_every = rebase_every
        self.block_size = block_size
        self.placement = Placement(policy.store, policy.store_dir)

    # ------------------------------------------------------------------ state
    def new_state(self, b: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device) -> MemoryState:
        slots = self.sinks + self.ring
        local = StreamState(
            k=torch.zeros(b, hkv, slots, d, dtype=dtype, device=device),
            v=torch.zeros(b, hkv, slots, d, dtype=dtype, device=device),
            sink_k=None,
            seen=[0] * b,
            base=[0] * b,
        )
        c = self.policy.max_blocks or 4
        return MemoryState(
            local,
            mem_k=self.placement.zeros((b, hkv, c, self.block, d), dtype, device),
            mem_v=self.placement.zeros((b, hkv, c, self.block, d), dtype, device),
            lo=torch.zeros(b, hkv, c, d, dtype=dtype, device=device),
            hi=torch.zeros(b, hkv, c, d, dtype=dtype, device=device),
            block_id=torch.full((b, hkv, c), NO_BLOCK, dtype=torch.int64, device=device),
            stamp=torch.zeros(b, hkv, c, dtype=torch.int64, device=device),
            choice=torch.full((b, hkv, self.topk), -1, dtype=torch.int64, device=device),
            placement=self.placement,
        )

    @property
    def spec(self) -> MemorySpec:
        local = StateSpec(
            sinks=self.sinks,
            slots=self.sinks + self.ring,
            head_dim=None if self.rope is None else self.rope.head_dim,
            sink_k=False,
            index=False,
        )
        return MemorySpec(local, self.block, self.policy.max_blocks, self.topk, self.placement)

    def check_inputs(self, hkv: int, d: int) -> None:
        pass

    def _held_blocks(self, t: int) -> int:
        """Blocks in memory (per kv head) when query ``t`` attends (after ``t`` tokens: ``t - 1``)."""
        n = self.policy.blocks_in_memory(t) if t >= 0 else 0
        return n if self.policy.max_blocks is None else min(n, self.policy.max_blocks)

    def _ring_index(self, seen: torch.Tensor) -> torch.Tensor:
        """``[B, R]``: the stream index held by each ring slot after ``seen`` tokens (EMPTY: none)."""
        r = torch.arange(self.ring, device=seen.device)
        last = seen[:, None] - 1 - self.sinks - r  # the newest j - S - r that is >= 0 and = 0 mod R
        j = self.sinks + r + self.ring * torch.div(last, self.ring, rounding_mode="floor")
        return torch.where(last >= 0, j, EMPTY)

    def slot_index(self, st: MemoryState) -> torch.Tensor:
        """Stream index per slot: sinks, ring, then every token slot of the store."""
        seen = torch.tensor(st.seen, device=st.device)
        b, hkv = st.batch_size, st.kv_heads
        sinks = torch.arange(self.sinks, device=st.device)
        sinks = torch.where(sinks[None] < seen[:, None], sinks[None], EMPTY)
        local = torch.cat((sinks, self._ring_index(seen)), dim=1)[:, None].expand(b, hkv, -1)
        u = torch.arange(self.block, device=st.device)
        tokens = self.sinks + st.block_id[..., None] * self.block + u  # [B, Hkv, C, block]
        tokens = torch.where(st.block_id[..., None] == NO_BLOCK, EMPTY, tokens).flatten(2)
        return torch.cat((local, tokens), dim=2)

    def cached(self, st: MemoryState) -> list[int]:
        """Keys held per stream and kv head: sinks, the ring and the blocks in memory."""
        s = self.sinks
        return [min(n, s) + min(max(n - s, 0), self.ring) + self._held_blocks(n - 1) * self.block for n in st.seen]

    # ------------------------------------------------------------------ streaming
    def _to_next_entry(self, seen: int) -> int:
        """Tokens from index ``seen`` up to (excluding) the next entry index after it."""
        first = self.policy.entry(0)
        return first - seen if seen < first else self.block - (seen - first) % self.block

    def forward(
        self, st: MemoryState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Stream ``counts[b]`` tokens of each stream (right-padded to T), in segments that end
        before each stream's next entry index."""
        loc = st.local
        t0 = loc.seen[0]
        if (
            q.shape[2] == 1
            and min(counts) == 1
            and t0 >= self.sinks
            and all(x == t0 for x in loc.seen)
            and all(x == loc.base[0] for x in loc.base)
        ):
            return self._decode(st, q, k, v)
        limit = lambda seen: min(self._to_next_entry(seen), self.block_size)  # noqa: E731
        return in_segments(st, q, k, v, counts, limit, self._segment)

    def _decode(self, st: MemoryState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token per stream, streams in step and past the sinks (generation's hot path): the rule
        of ``_segment`` as one softmax over the scores of sinks, window (the ring in place, its
        stale slots masked) and retrieved blocks, each against the query rotated for its frame. About
        thirty small ops where the general path, built for chunks and ragged streams, takes ~250."""
        loc, s, w, size = st.local, self.sinks, self.window, self.block
        first = self.policy.entry(0)
        if loc.seen[0] >= first and (loc.seen[0] - first) % size == 0:  # an entry index: every stream's block enters
            for b in range(len(loc.seen)):
                self._enter(st, b)
        self._maybe_rebase(loc, 1)
        t0, origin = loc.seen[0], loc.base[0]
        bsz, hq, _, d = q.shape
        hkv = loc.kv_heads
        g = hq // hkv
        dtype, dev, cdt = q.dtype, q.device, compute_dtype(q.dtype)
        scale = d**-0.5 if self.scale is None else self.scale
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
        held = self._held_blocks(t0)
        n_win = min(t0 + 1 - s, w)
        rotate = lambda x, at: x if self.rope is None else apply_rotary(x, *range_cos_sin(self.rope, at, 1, cdt, dev))  # noqa: E731
        qw, kw = rotate(q, t0 - origin), rotate(k, t0 - origin)
        slot = s + (t0 - s) % self.ring
        loc.k.narrow(2, slot, 1).copy_(kw)
        loc.v.narrow(2, slot, 1).copy_(v)
        rows = lambda x: x.reshape(bsz, hkv, g, d)  # noqa: E731  (a kv head's query heads in the rows)

        ring_k, ring_v = (x.narrow(2, s, self.ring).to(cdt) for x in (loc.k, loc.v))
        scores = [torch.matmul(rows(qw), ring_k.transpose(-1, -2))]  # [B, Hkv, G, R]
        # ring slot r holds index t0 - (t0 - s - r) % R: seen while that distance is below n_win
        dist = (t0 - s - torch.arange(self.ring, device=dev)) % self.ring
        scores[0].masked_fill_(dist >= n_win, float("-inf"))
        values = [ring_v]
        if held:
            at = n_win + size - 1 if self.cache_mode else t0
            qm = rotate(q, at)
            one = torch.full((bsz, 1), t0, device=dev)
            chosen, ok = self._retrieve(st, qm, one, one >= 0, held)  # [B, Hkv, 1, K]
            some = bool(ok[0].any())  # streams in step hold as many blocks: all choose some or none
            kk = chosen.shape[-1]
            if st.fetched is not None and st.fetched[0].dtype == cdt:  # the query block's blocks, gathered already
                mem_k, mem_v = st.fetched
            else:
                mem_k, mem_v = self._fetch(st, _slot_base(st)[..., None] + chosen, cdt, dev)
                mem_k, mem_v = mem_k.view(bsz, hkv, kk * size, d), mem_v.view(bsz, hkv, kk * size, d)
                if self.policy.every > 1:  # kept for the query block's other steps
                    st.fetched = (mem_k, mem_v)
            sc = torch.matmul(rows(qm), mem_k.transpose(-1, -2))
            if not bool(ok.all()):
                sc.masked_fill_(~ok.repeat_interleave(size, dim=-1), float("-inf"))
            scores.append(sc)
            values.append(mem_v)
        if s:
            ppos = (s + (size if held and some else 0) + n_win - 1) if self.cache_mode else t0
            scores.append(torch.matmul(rows(rotate(q, ppos)), loc.k[:, :, :s].to(cdt).transpose(-1, -2)))
            values.append(loc.v[:, :, :s].to(cdt))
        p = torch.softmax(torch.cat(scores, dim=-1).mul_(scale), dim=-1)
        out, at = None, 0
        for x in values:
            part = torch.matmul(p.narrow(-1, at, x.shape[2]), x)
            out = part if out is None else out.add_(part)
            at += x.shape[2]
        loc.seen = [t0 + 1] * bsz
        return out.reshape(bsz, hq, 1, d).to(dtype)

    def _segment(
        self, st: MemoryState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: list[int]
    ) -> torch.Tensor:
        """``n[b]`` tokens of each stream (right-padded to T), none past an entry index other than
        the segment's first: enter due blocks, attend (window, sinks, retrieved blocks), commit."""
        t, d = q.shape[2], q.shape[3]
        dtype, dev, cdt = q.dtype, q.device, compute_dtype(q.dtype)
        loc, s, w = st.local, self.sinks, self.window
        scale = d**-0.5 if self.scale is None else self.scale
        first = self.policy.entry(0)
        for b, m in enumerate(n):
            if m and loc.seen[b] >= first and (loc.seen[b] - first) % self.block == 0:  # an entry index
                self._enter(st, b)
        self._maybe_rebase(loc, t)
        seen = torch.tensor(loc.seen, device=dev)
        col = torch.arange(t, device=dev)
        valid = col[None, :] < torch.tensor(n, device=dev)[:, None]  # [B, T]
        qpos = seen[:, None] + col  # [B, T] stream index of each token
        q, k_raw, v = q.to(cdt), k.to(cdt), v.to(cdt)
        if min(n) < t:  # padding may hold anything (NaN included)
            pad = ~valid[:, None, :, None]
            q, k_raw, v = q.masked_fill(pad, 0), k_raw.masked_fill(pad, 0), v.masked_fill(pad, 0)
        base = torch.tensor(loc.base, device=dev)[:, None]
        # streams in step, no padding: every position below is known from the first query's index
        t0 = loc.seen[0] if all(x == loc.seen[0] for x in loc.seen) and min(n) == t else None
        if t0 is not None and any(b != loc.base[0] for b in loc.base):
            t0 = None
        if self.rope is None:
            qw, kw = q, k_raw
        else:  # one cos/sin for both
            cos, sin = self._cos_sin(qpos - base, t0 is not None and (t0 - loc.base[0], t0 - loc.base[0] + t - 1), cdt)
            qw, kw = apply_rotary(q, cos, sin), apply_rotary(k_raw, cos, sin)

        # sinks of this segment are written first (a query sees the sinks up to itself)
        is_sink = valid & (qpos < s)
        if bool(is_sink.any()):
            b_idx, i_idx = is_sink.nonzero(as_tuple=True)
            j = qpos[b_idx, i_idx]
            sink_keys = self._rotate(k_raw.transpose(1, 2)[b_idx, i_idx][:, :, None], j[:, None, None])[:, :, 0]
            loc.k[b_idx, :, j] = sink_keys.to(loc.dtype)
            loc.v[b_idx, :, j] = v.transpose(1, 2)[b_idx, i_idx].to(loc.dtype)

        held = max(self._held_blocks(x) for x in loc.seen)  # blocks in memory for this segment's queries
        n_sinks = qpos.clamp(max=s - 1) + 1 if s else torch.zeros_like(qpos)  # sinks visible
        n_win = (qpos + 1 - s).clamp(min=0, max=w)
        at = (n_win + self.block - 1) if self.cache_mode else qpos  # blocks are stored at u (cache) or j
        ends = {"ppos": False, "at": False}  # (first, last) of each, when streams are in step
        if t0 is not None:
            last = t0 + t - 1
            win_py = lambda j: min(max(j + 1 - s, 0), w)  # noqa: E731
            ends["at"] = (win_py(t0) + self.block - 1, win_py(last) + self.block - 1) if self.cache_mode else (t0, last)
        # the segment's tokens go into the ring first: they overwrite tokens at least ``window + block``
        # older, which no query of the segment sees and whose block has entered memory already
        self._write_ring(loc, kw, v, qpos, valid, n)
        parts = [self._attend_window(loc, qw, seen + torch.tensor(n, device=dev), qpos, valid, scale)]
        some = torch.zeros_like(valid)  # [B, T]: the query attends to >= 1 block (shifts the window in cache mode)
        if held > 0:
            qm = self._rotate_query(q, at, ends["at"], cdt)
            chosen, ok = self._retrieve(st, qm, qpos, valid, held)
            parts.append(self._attend_memory(st, qm, chosen, ok, t0, scale))
            some = ok[:, 0].any(dim=-1)  # every kv head holds as many blocks, so all choose some or none
        ppos = (n_sinks + some * self.block + n_win - 1) if self.cache_mode else qpos  # [B, T]
        if t0 is not None and not self.cache_mode:
            ends["ppos"] = (t0, t0 + t - 1)
        elif t0 is not None and (bool(some.all()) or not bool(some.any())):  # the same shift for every query
            sinks_py = lambda j: min(j, s - 1) + 1 if s else 0  # noqa: E731
            ppos_py = lambda j: sinks_py(j) + (self.block if bool(some[0, 0]) else 0) + win_py(j) - 1  # noqa: E731
            ends["ppos"] = (ppos_py(t0), ppos_py(t0 + t - 1))
        if s and t0 is not None and t0 >= s:  # every query sees every sink: one softmax adds them
            bsz, hq = q.shape[:2]
            hkv, g = loc.kv_heads, hq // loc.kv_heads
            qs = self._rotate_query(q, ppos, ends["ppos"], cdt).view(bsz, hkv, g, t, -1)
            sink_k, sink_v = (x[:, :, None, :s].to(cdt) for x in (loc.k, loc.v))
            groups = [(o.reshape(bsz, hkv, g, t, -1), lse.reshape(bsz, hkv, g, t)) for o, lse in parts]
            out = add_keys(groups, qs, sink_k, sink_v, scale).view(q.shape)
            loc.seen = [x + m for x, m in zip(loc.seen, n, strict=True)]
            return out.to(dtype)
        if s:  # sinks, rotated at j, against the query at its position (every query sees sink 0)
            bsz, hq = q.shape[:2]
            hkv = loc.kv_heads
            qs = self._rotate_query(q, ppos, ends["ppos"], cdt).reshape(bsz, hkv, hq // hkv * t, -1)
            hidden = torch.arange(s, device=dev)[None, None, :] > qpos[:, :, None]  # [B, T, S]
            bias = torch.zeros(hidden.shape, dtype=cdt, device=dev).masked_fill_(hidden, float("-inf"))
            bias = bias[:, None].expand(bsz, hq // hkv, t, s).reshape(bsz, 1, -1, s)
            o_s, l_s = attend_lse(qs, loc.k[:, :, :s].to(cdt), loc.v[:, :, :s].to(cdt), bias, scale)
            parts.append((o_s.reshape(q.shape), l_s.reshape(bsz, hq, t)))
        lse = torch.logsumexp(torch.stack([part[1] for part in parts]), dim=0)  # [B, Hq, T]
        out = sum(o * torch.exp(part - lse)[..., None] for o, part in parts)

        loc.seen = [x + m for x, m in zip(loc.seen, n, strict=True)]
        return out.masked_fill(~valid[:, None, :, None], 0).to(dtype)

    def _cos_sin(self, pos: torch.Tensor, ends, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin at ``pos [B, T]``, broadcastable over heads. ``ends``: ``(first, last)`` position
        when every stream has the same positions (else False): one position, or consecutive ones,
        come from the cache that the layers of a forward share."""
        if ends:
            first, last = ends
            if first == last:
                return range_cos_sin(self.rope, first, 1, dtype, pos.device)
            if last - first == pos.shape[1] - 1:  # steps of 0 or 1 that add up to T - 1: all 1
                return range_cos_sin(self.rope, first, pos.shape[1], dtype, pos.device)
        return self.rope.cos_sin(pos[:, None], dtype)

    def _rotate_query(self, q: torch.Tensor, pos: torch.Tensor, ends, dtype: torch.dtype) -> torch.Tensor:
        """``q [B, Hq, T, D]`` rotated at ``pos [B, T]`` (``ends``: as ``_cos_sin``); identity without RoPE."""
        if self.rope is None:
            return q
        cos, sin = self._cos_sin(pos, ends, dtype)
        return apply_rotary(q, cos, sin)

    def _write_ring(self, loc: StreamState, kw, v, qpos, valid, n: list[int]) -> None:
        """Commit the segment's valid tokens past the sinks to their ring slots."""
        s, t = self.sinks, kw.shape[2]
        t0 = loc.seen[0]
        if t0 >= s and all(x == t0 for x in loc.seen) and all(m == t for m in n):  # in step, no padding
            for buf, x in ((loc.k, kw), (loc.v, v)):
                write_wrapped(buf, x, s + (t0 - s) % self.ring, s, s + self.ring)
            return
        in_ring = valid & (qpos >= s)
        if bool(in_ring.any()):
            b_idx, i_idx = in_ring.nonzero(as_tuple=True)
            slot = s + (qpos[b_idx, i_idx] - s) % self.ring
            loc.k[b_idx, :, slot] = kw.transpose(1, 2)[b_idx, i_idx].to(loc.dtype)
            loc.v[b_idx, :, slot] = v.transpose(1, 2)[b_idx, i_idx].to(loc.dtype)

    def _attend_window(self, loc, qw, seen_after, qpos, valid, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """The window part, over the ring in place (the segment written): output and log-sum-exp ``[B, Hq, T]``."""
        bsz, hq, t, d = qw.shape
        hkv, s, cdt = loc.kv_heads, self.sinks, qw.dtype
        kidx = self._ring_index(seen_after)  # [B, R] stream index of each ring slot
        see = (kidx[:, None, :] <= qpos[:, :, None]) & (kidx[:, None, :] > qpos[:, :, None] - self.window)
        see &= kidx[:, None, :] >= s
        keys, values = loc.k[:, :, s:], loc.v[:, :, s:]
        if keys.dtype != cdt:
            keys, values = keys.to(cdt), values.to(cdt)
        if bool((qpos[valid] < s).any()):  # a sink query sees no window key: the explicit form takes empty rows
            o, lse, _ = attend_with_lse(qw, keys, values, see[:, None], scale)
            return o, lse
        g = hq // hkv
        see |= ~valid[:, :, None]  # padded rows see everything (dropped later): no empty row
        bias = torch.zeros(see.shape, dtype=cdt, device=qw.device).masked_fill_(~see, float("-inf"))
        bias = bias[:, None].expand(bsz, g, t, -1).reshape(bsz, 1, g * t, -1)  # rows (g, t), as the queries
        o, lse = attend_lse(qw.reshape(bsz, hkv, g * t, d), keys, values, bias, scale)
        return o.reshape(bsz, hq, t, d), lse.reshape(bsz, hq, t)

    def _choose(self, st: MemoryState, q: torch.Tensor, held: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's ``topk`` slots by relevance, per kv head: ``chosen [B, Hkv, T, K]`` and ``ok``
        (False where fewer blocks are in memory). ``q``: rotated for the store's frame, where the
        bounds were taken. Relevance: ``sum_g sum_d max(q lo, q hi)`` =
        ``(sum_g relu(q)) . hi + (sum_g min(q, 0)) . lo``, two matmuls over the slots in use (``held``
        blocks per stream at most: a growing store fills its slots in order, a bounded one all of them)."""
        bsz, hq, t, d = q.shape
        hkv = st.kv_heads
        c = st.capacity if self.policy.max_blocks is not None else min(held, st.capacity)
        qg = q.view(bsz, hkv, hq // hkv, t, d)
        # blocks in the rows ([C, D] @ [D, T]): one pass over the bounds, a matrix-vector product at decode
        pos, neg = qg.clamp(min=0).sum(2).transpose(-1, -2), qg.clamp(max=0).sum(2).transpose(-1, -2)
        hi, lo, block_id = st.hi[:, :, :c], st.lo[:, :, :c], st.block_id[:, :, :c]
        rel = torch.matmul(hi.to(q.dtype), pos).add_(torch.matmul(lo.to(q.dtype), neg))  # [B, Hkv, C, T]
        empty = block_id == NO_BLOCK
        if bool(empty.any()):  # streams at different fills, or a bounded store still filling
            rel.masked_fill_(empty[..., None], float("-inf"))
        rel = rel.transpose(-1, -2)  # [B, Hkv, T, C]
        kk = min(self.topk, c)
        # one more than needed: a tie at the cut is the (k+1)-th best equal to the k-th (and finite)
        best, chosen = rel.topk(min(kk + 1, c), dim=-1)
        tie = kk < c and bool(((best[..., kk] == best[..., kk - 1]) & torch.isfinite(best[..., kk])).any())
        best, chosen = best[..., :kk], chosen[..., :kk]
        if tie:  # the stated rule: among equal relevance the newer block
            order = torch.sort(block_id, dim=-1, descending=True, stable=True).indices  # newer block first
            order = order[:, :, None, :].expand(-1, -1, t, -1)
            top = torch.sort(rel.gather(-1, order), dim=-1, descending=True, stable=True).indices[..., :kk]
            chosen = order.gather(-1, top)
            best = rel.gather(-1, chosen)
        return chosen, torch.isfinite(best)

    def _retrieve(self, st, qm, qpos, valid, held) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks each query attends to: ``chosen [B, Hkv, T, K]`` (slots) and ``ok`` (a block is
        there). The first query of each query block chooses (``_choose``, with ``qm`` rotated for the
        store's frame); the others take their query block's choice (made in this segment or kept in
        ``st.choice``). Stamps and ``st.choice`` updated."""
        bsz, hq, t, d = qm.shape
        hkv, every, k = st.kv_heads, self.policy.every, self.topk
        if every == 1:
            chosen, ok = self._choose(st, qm, held)
            ok &= valid[:, None, :, None]
            stamp_of = torch.where(ok, qpos[:, None, :, None], -1)
            st.stamp.scatter_reduce_(-1, chosen.flatten(2), stamp_of.flatten(2), reduce="amax")
            return chosen, ok
        decides = valid & (qpos % every == 0)  # [B, T]
        count = decides.sum(dim=-1)  # [B]
        m = int(count.max())
        options, options_ok = st.choice[:, :, None], st.choice[:, :, None] >= 0  # [B, Hkv, 1, K]: the kept choice
        if m:
            # the deciding queries first in each row (a stable sort keeps their order): [B, m] columns
            cols = torch.sort((~decides).to(torch.uint8), dim=-1, stable=True).indices[:, :m]
            real = torch.arange(m, device=qm.device) < count[:, None]  # [B, m]
            qd = qm.gather(2, cols[:, None, :, None].expand(bsz, hq, m, d))
            chosen, ok = self._choose(st, qd, held)  # [B, Hkv, m, kk]
            if chosen.shape[-1] < k:  # fewer slots than topk: pad the choice with none
                pad = (bsz, hkv, m, k - chosen.shape[-1])
                chosen = torch.cat((chosen, chosen.new_zeros(pad)), dim=-1)
                ok = torch.cat((ok, ok.new_zeros(pad)), dim=-1)
            ok &= real[:, None, :, None]
            stamp_of = torch.where(ok, qpos.gather(1, cols)[:, None, :, None], -1)
            st.stamp.scatter_reduce_(-1, chosen.flatten(2), stamp_of.flatten(2), reduce="amax")
            options = torch.cat((options, chosen), dim=2)
            options_ok = torch.cat((options_ok, ok), dim=2)
            last = count.clamp(max=m)[:, None, None, None].expand(bsz, hkv, 1, k)  # the last choice, or the kept one
            st.choice = torch.where(options_ok, options, -1).gather(2, last)[:, :, 0]
            st.fetched = None
        which = decides.cumsum(dim=-1)[:, None, :, None].expand(bsz, hkv, t, k)  # 0: the kept choice
        chosen, ok = options.gather(2, which), options_ok.gather(2, which)
        return chosen.clamp(min=0), ok & valid[:, None, :, None]

    def _attend_memory(self, st, qm, chosen, ok, t0, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query against the blocks it attends to (``chosen``/``ok``: ``_retrieve``), with the
        query ``qm`` rotated for the store's frame: output and log-sum-exp. Streams in step with query
        blocks: each run of queries sharing a choice against its blocks, gathered once; otherwise the
        union of the blocks the segment's queries chose, gathered once per kv head with each query
        masked to its own, or, when the queries disagree, each query's own blocks."""
        c = st.capacity
        base = _slot_base(st)
        every, t = self.policy.every, qm.shape[2]
        if every > 1 and t0 is not None:
            starts = [0, *range((-t0) % every or every, t, every)]  # queries where a new choice starts
            return self._attend_runs(st, qm, base, chosen, ok, [*zip(starts, [*starts[1:], t], strict=True)], scale)
        union, real = _union(chosen, ok, c)  # [B, Hkv, U]: the distinct slots chosen (O(T K log T K), not O(C))
        if union.shape[-1] > _UNION * chosen.shape[-1]:  # the queries disagree: gather each query's own blocks
            return self._attend_gathered(st, qm, base[..., None] + chosen, ok, scale)
        return self._attend_union(st, qm, base, chosen, ok, union, real, scale)

    def _attend_runs(self, st, qm, base, chosen, ok, runs, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries ``[a, b)`` of each run share one choice (streams in step, query blocks): per run,
        its ``K`` blocks gathered once and attended by the run's queries (``K * block`` keys each)."""
        bsz, hq, t, d = qm.shape
        hkv, size = st.kv_heads, self.block
        g, cdt, dev = hq // hkv, qm.dtype, qm.device
        out = qm.new_zeros(bsz, hkv, g, t, d)
        lse = qm.new_full((bsz, hkv, g, t), float("-inf"))
        rows = qm.view(bsz, hkv, g, t, d)
        for a, b in runs:
            pick, got = chosen[:, :, a], ok[:, :, a]  # [B, Hkv, K]
            if not bool(got.any()):
                continue
            keys, values = self._fetch(st, base + pick, cdt, dev)
            kk = pick.shape[-1] * size
            keys, values = keys.view(bsz, hkv, kk, d), values.view(bsz, hkv, kk, d)
            has = got.any(dim=-1)  # [B, Hkv]: a row that chose nothing sees everything, then is dropped
            see = (got | ~has[..., None]).repeat_interleave(size, dim=-1)[:, :, None]  # [B, Hkv, 1, K * block]
            bias = torch.zeros(see.shape, dtype=cdt, device=dev).masked_fill_(~see, float("-inf"))
            o, l_run = attend_lse(rows[:, :, :, a:b].reshape(bsz, hkv, g * (b - a), d), keys, values, bias, scale)
            out[:, :, :, a:b] = o.view(bsz, hkv, g, b - a, d)
            lse[:, :, :, a:b] = l_run.view(bsz, hkv, g, b - a).masked_fill(~has[:, :, None, None], float("-inf"))
        return out.view(bsz, hq, t, d), lse.view(bsz, hq, t)

    def _attend_union(self, st, qm, base, chosen, ok, union, real, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """The union of the blocks the queries chose (``union [B, Hkv, U]``, ``real``: not padding),
        gathered once per kv head; each query masked to its own (one fused call). Output
        ``[B, Hq, T, D]`` and log-sum-exp ``[B, Hq, T]``."""
        bsz, hq, t, d = qm.shape
        hkv, size, u = st.kv_heads, self.block, union.shape[-1]
        g, cdt, dev = hq // hkv, qm.dtype, qm.device
        sel = ((chosen[..., None] == union[:, :, None, None, :]) & ok[..., None]).any(dim=-2)  # [B, Hkv, T, U]
        sel &= real[:, :, None, :]
        has = sel.any(dim=-1)  # [B, Hkv, T]: rows that retrieved something
        sel |= ~has[..., None]  # the others see everything (their part is dropped below): no empty row
        keys, values = self._fetch(st, base + union, cdt, dev)
        keys, values = keys.view(bsz, hkv, u * size, d), values.view(bsz, hkv, u * size, d)
        bias = torch.zeros(sel.shape, dtype=cdt, device=dev).masked_fill_(~sel, float("-inf"))
        bias = bias[:, :, None, :, :, None].expand(bsz, hkv, g, t, u, size).reshape(bsz, hkv, g * t, u * size)
        o, lse = attend_lse(qm.reshape(bsz, hkv, g * t, d), keys, values, bias, scale)
        lse = lse.view(bsz, hkv, g, t).masked_fill(~has[:, :, None], float("-inf"))
        return o.reshape(bsz, hq, t, d), lse.reshape(bsz, hq, t)

    def _attend_gathered(self, st, qm, flat, ok, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query against its own ``K`` blocks (``flat [B, Hkv, T, K]``: rows of the flattened
        store), batched over (stream, kv head, query): ``K * block`` keys per query whatever the store.
        In tiles of ``_GATHER_BYTES`` of gathered keys: memory the allocator reuses from tile to tile
        (one large gather is mostly page faults: measured 4x slower on CPU)."""
        bsz, hq, t, d = qm.shape
        hkv, size, kk = st.kv_heads, self.block, flat.shape[-1]
        g, cdt = hq // hkv, qm.dtype
        n = bsz * hkv * t
        rows = qm.view(bsz, hkv, g, t, d).transpose(2, 3).reshape(n, g, d)
        flat, hidden = flat.reshape(n, kk), ~ok.reshape(n, kk, 1).expand(n, kk, size).reshape(n, 1, kk * size)
        o = torch.empty(n, g, d, dtype=cdt, device=qm.device)
        lse = torch.empty(n, g, dtype=cdt, device=qm.device)
        step = max(1, _GATHER_BYTES // (kk * size * d * qm.element_size()))
        for a in range(0, n, step):
            b = min(n, a + step)
            keys, values = self._fetch(st, flat[a:b], cdt, qm.device)
            keys, values = keys.view(b - a, kk * size, d), values.view(b - a, kk * size, d)
            scores = torch.bmm(rows[a:b], keys.transpose(1, 2)).mul_(scale)  # [n, G, K * block]
            scores.masked_fill_(hidden[a:b], float("-inf"))
            torch.logsumexp(scores, dim=-1, out=lse[a:b])  # -inf where the query retrieved nothing
            p = scores.sub_(torch.where(torch.isfinite(lse[a:b]), lse[a:b], 0)[..., None]).exp_()
            torch.bmm(p, values, out=o[a:b])
        o = o.view(bsz, hkv, t, g, d).transpose(2, 3).reshape(bsz, hq, t, d)
        return o, lse.view(bsz, hkv, t, g).transpose(2, 3).reshape(bsz, hq, t)

    def _fetch(self, st: MemoryState, rows: torch.Tensor, dtype: torch.dtype, device: torch.device):
        """Blocks ``rows`` (indices into the flattened store, any shape) as ``[N, block, D]`` keys and
        values in ``dtype`` on ``device``: one gather where the store lives, then one transfer."""
        size, d = self.block, st.head_dim
        at = rows.reshape(-1).to(st.mem_k.device)
        keys = st.mem_k.reshape(-1, size, d).index_select(0, at)
        values = st.mem_v.reshape(-1, size, d).index_select(0, at)
        return keys.to(device, dtype, non_blocking=True), values.to(device, dtype, non_blocking=True)

    def _enter(self, st: MemoryState, b: int) -> None:
        """Stream ``b`` is at the entry index of its next block: move that block from the ring into
        the store (in its own frame, with its bounds), taking the least recently retrieved block's
        slot when memory is full."""
        loc, s, size = st.local, self.sinks, self.block
        blk = self.policy.blocks_in_memory(loc.seen[b]) - 1
        first = s + blk * size
        slots = s + (torch.arange(first, first + size, device=st.device) - s) % self.ring
        ring = loc.k[b, :, slots].to(compute_dtype(st.dtype))  # [Hkv, block, D], rotated at j - base
        u = torch.arange(size, device=st.device)
        # to the store's frame: token u of the block at u (cache) or token j at j (absolute)
        to_store = (loc.base[b] - first) if self.cache_mode else loc.base[b]
        local = self._rotate(ring, torch.full_like(u, to_store))
        held = self._held_blocks(loc.seen[b] - 1)  # before this block
        max_blocks = self.policy.max_blocks
        hkv = st.kv_heads
        if max_blocks is None:
            if blk >= st.capacity:
                st.widen(max(2 * st.capacity, blk + 1))
            slot = torch.full((hkv,), blk, device=st.device)
        elif held < max_blocks:
            slot = torch.full((hkv,), held, device=st.device)
        else:  # the least recently retrieved (lowest stamp; among equal stamps the older block) leaves
            stamp = st.stamp[b]
            if self.policy.every > 1 and loc.seen[b] % self.policy.every:  # within a query block: its choice stays
                choice = st.choice[b]  # [Hkv, K]
                kept = (torch.arange(st.capacity, device=st.device) == choice[..., None]).any(dim=-2)
                stamp = stamp.masked_fill(kept, torch.iinfo(stamp.dtype).max)
            oldest = stamp == stamp.min(dim=-1, keepdim=True).values
            slot = torch.where(oldest, st.block_id[b], EMPTY).argmin(dim=-1)
        heads = torch.arange(hkv, device=st.device)
        where = st.mem_k.device
        st.mem_k[b, heads.to(where), slot.to(where)] = local.to(where, st.dtype)
        st.mem_v[b, heads.to(where), slot.to(where)] = loc.v[b, :, slots].to(where)
        st.lo[b, heads, slot] = local.min(dim=1).values.to(st.dtype)
        st.hi[b, heads, slot] = local.max(dim=1).values.to(st.dtype)
        st.block_id[b, heads, slot] = blk
        st.stamp[b, heads, slot] = loc.seen[b]

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [..., n, D]`` rotated at ``positions`` (broadcastable to ``x.shape[:-1]``); identity without RoPE."""
        if self.rope is None:
            return x
        cos, sin = self.rope.cos_sin(positions, x.dtype)
        return apply_rotary(x, cos, sin)

    def _maybe_rebase(self, loc: StreamState, t: int) -> None:
        """Move the frame origin of streams whose ring positions would exceed ``rebase_every``: the
        ring is re-rotated once (sinks and the store are in their own frames)."""
        if self.rope is not None:
            rebase_keys(loc, self.rope, self.rebase_every, t, lambda b: loc.k[b, :, self.sinks :])
