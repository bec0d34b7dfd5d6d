"""The sinks + sliding-window engine: fixed buffers, O(sinks + T) position work per call.

Positions. RoPE is relative: ``<R(a) q, R(c) k> = <R(a - c) q, k>``. So keys are rotated once, when
written, at ``j - base`` and never again; a query is rotated at ``t - base``; the score then carries
exactly the distance ``t - j`` whatever ``base`` is. That is all ``positions="absolute"`` needs, and
it is also right for every window key in ``positions="cache"``. Only sinks differ in cache mode: sink
``j`` must sit at distance ``min(t, anchor) - j`` (``anchor = S + W - 1``). Sinks are therefore kept
rotated at ``j - anchor`` (``sink_k``) and scored with the query rotated at ``min(t, anchor) - anchor``
(chunk path), or re-rotated to the query's frame each decode step (S rows: O(S) work).

Drift. Angles come from integer positions in float64, and ``base`` moves to the current position
every ``rebase_every`` tokens (re-rotating the ring once: amortised O(W / rebase_every) per token),
so angles stay below ``rebase_every + T`` however long the stream runs.
"""

from __future__ import annotations

import functools

import torch

from streamattn.core.kernels import (
    add_keys,
    attend,
    attend_lse,
    compute_dtype,
    merge_lse,
    rebase_keys,
    rope_at_write,
    write_slots,
    write_wrapped,
)
from streamattn.core.registry import register_engine
from streamattn.core.rope import RoPE, apply_rotary, range_cos_sin
from streamattn.core.state import EMPTY, StateSpec, StreamState
from streamattn.policies import Full, SinkWindow
from streamattn.policies.base import WindowPolicy

_TABLE = 256  # decode rotation matrices cached per stretch of positions
_SCORE_BUDGET = 2**25  # max elements of one block's [B, Hq, T, K] mask (128 MiB in fp32)


@functools.lru_cache(maxsize=8)
def _rotation_table(rope: RoPE, start: int, dtype: torch.dtype, device: torch.device):
    """Rotations of positions ``start .. start + _TABLE - 1`` as ``([_TABLE, D, D], list of rows)``.

    Shared by every engine with the same RoPE: the layers of a model step through the same
    positions, so one build serves them all (and the memory is held once, not per layer).
    """
    table = rope.rotation_matrices(torch.arange(start, start + _TABLE, device=device), dtype)
    return table, list(table.unbind(0))


def _slot_positions(sinks: int, window: int | None, seen: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[B, S + capacity]`` stream index held by each slot given ``seen [B]``; EMPTY if none."""
    s, w = sinks, window
    dev = seen.device
    sink = torch.arange(s, device=dev)
    sink_pos = torch.where(sink < seen[:, None], sink, EMPTY)
    r = torch.arange(capacity, device=dev)
    newest = (seen - s - 1)[:, None]  # ring offset of the newest window token (< 0: none yet)
    if w is None:
        offset = torch.where(r <= newest, r, -1)
    else:
        offset = newest - torch.remainder(newest - r, w)
    ring_pos = torch.where(offset >= 0, s + offset, EMPTY)
    return torch.cat((sink_pos, ring_pos), dim=1)


@functools.lru_cache(maxsize=2)
def _block_index(seen: tuple, n: tuple, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qpos [B, T], valid [B, T])``: stream index of each column of a block of ``n[b]`` tokens
    (right-padded to ``t``) after ``seen[b]``, and which columns are real. Never written to."""
    col = torch.arange(t, device=device)
    valid = col[None, :] < torch.tensor(n, device=device)[:, None]
    return torch.tensor(seen, device=device)[:, None] + col[None, :], valid


@functools.lru_cache(maxsize=2)
def _visibility(policy: WindowPolicy, slots: int, seen: tuple, n: tuple, t: int, device: torch.device) -> torch.Tensor:
    """What a block of ``n[b]`` tokens (right-padded to ``t``) after ``seen[b]`` sees over "buffer of
    ``slots`` + block": ``see [B, T, slots + T]`` (padded rows see everything). A pure function of
    its arguments, built once per forward (every layer's engine asks the same); never written to."""
    qpos, valid = _block_index(seen, n, t, device)
    held = _slot_positions(policy.sinks, policy.window, torch.tensor(seen, device=device), slots - policy.sinks)
    kpos = torch.cat((held, torch.where(valid, qpos, EMPTY)), dim=1)  # [B, S + C + T]
    return policy.visible(qpos[:, :, None], kpos[:, None, :]) | ~valid[:, :, None]


@functools.lru_cache(maxsize=1)
def _sink_merge_bias(policy: WindowPolicy, slots: int, seen: tuple, n: tuple, t: int, device, g: int, dtype):
    """``_visibility``'s mask over the non-sink keys as an additive bias ``[B, 1, G*T, K - S]`` (rows
    ``(g, t)``), and the sinks a row does *not* see, bool ``[B, 1, G*T, S]``: once per forward. (The
    one cached bias is at most ``_SCORE_BUDGET / Hkv`` elements: ``_block_size`` bounds blocks.)"""
    see = _visibility(policy, slots, seen, n, t, device)
    bsz, s = see.shape[0], policy.sinks
    minus_inf = torch.full((), float("-inf"), dtype=dtype, device=device)
    bias = torch.where(see[:, None, :, s:], torch.zeros((), dtype=dtype, device=device), minus_inf)
    bias = bias.expand(bsz, g, t, -1).reshape(bsz, 1, g * t, -1)
    hidden = ~see[:, None, :, :s].expand(bsz, g, t, s).reshape(bsz, 1, g * t, s)
    return bias, hidden


_BAND = 64  # queries per sub-block of a banded block (``SinkWindowEngine._attend_banded``)


@functools.lru_cache(maxsize=4)
def _band_bias(window: int, m: int, g: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive bias ``[1, 1, G*m, window + m - 1]`` (rows ``(g, r)``): row ``r`` sees columns
    ``r .. r + window - 1``, the window of the ``r``-th query of a sub-block over keys in stream order."""
    r = torch.arange(m, device=device)[:, None]
    c = torch.arange(window + m - 1, device=device)[None, :]
    see = (c >= r) & (c < r + window)
    bias = torch.zeros(see.shape, dtype=dtype, device=device).masked_fill(~see, float("-inf"))
    return bias.expand(g, m, -1).reshape(1, 1, g * m, -1)


class Rotations:
    """Rotation matrices of decode positions, served from a table of the next ``_TABLE`` positions
    (rebuilt when left: amortised O(D^2) per token). The table's rows are kept as a list of views,
    so a lookup launches no kernel. One per engine; the table itself is shared (``_rotation_table``).
    """

    def __init__(self, rope: RoPE) -> None:
        self.rope = rope
        self._table = torch.empty(0)  # [_TABLE, D, D] rotations of positions _start + i
        self._rows: list[torch.Tensor] = []
        self._start = 0
        self._key: tuple[torch.dtype, torch.device] | None = None

    def __call__(self, pos: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Matrices for positions ``pos``: ``[D, D]`` if all equal, else ``[B, 1, D, D]``."""
        lo, hi = (pos[0], pos[0]) if len(pos) == 1 else (min(pos), max(pos))
        start = self._start
        if self._key != (dtype, device) or lo < start or hi >= start + _TABLE:
            if hi - lo >= _TABLE:
                return self.rope.rotation_matrices(torch.tensor(pos, device=device), dtype)[:, None]
            self._table, self._rows = _rotation_table(self.rope, lo, dtype, torch.device(device))
            self._start, self._key, start = lo, (dtype, device), lo
        if lo == hi:
            return self._rows[lo - start]
        return self._table[torch.tensor(pos, device=device) - start][:, None]


@register_engine(SinkWindow, Full)
class SinkWindowEngine:
    """Realises any policy whose visible set is "first ``sinks`` + last ``window``" (``window=None``:
    unbounded, i.e. ``Full``). Holds configuration and caches of derived constants, never a stream:
    every method takes the ``StreamState`` it works on. The fast path for index-only policies: a
    token's slot is a closed-form function of its index, so the state records no per-slot index.
    """

    def __init__(
        self,
        policy: WindowPolicy,
        rope: RoPE | None,
        positions: str,
        scale: float | None,
        rebase_every: int,
        block_size: int,
    ) -> None:
        self.policy = policy
        self.sinks: int = policy.sinks
        self.window: int | None = policy.window
        self.anchor = None if self.window is None else self.sinks + self.window - 1
        self.rope = rope
        self.cache_mode = positions == "cache"
        self.scale = scale
        self.rebase_every = rebase_every
        self.block_size = block_size
        self._rotations = Rotations(rope) if rope is not None else None

    # ------------------------------------------------------------------ state
    def new_state(self, b: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device) -> StreamState:
        cap = self.window if self.window is not None else 256
        size = (b, hkv, self.sinks + cap, d)
        sink_k = None
        if self.rope is not None and self.sinks:
            sink_k = torch.zeros(b, hkv, self.sinks, d, dtype=dtype, device=device)
        return StreamState(
            k=torch.zeros(size, dtype=dtype, device=device),
            v=torch.zeros(size, dtype=dtype, device=device),
            sink_k=sink_k,
            seen=[0] * b,
            base=[0] * b,
        )

    @property
    def spec(self) -> StateSpec:
        return StateSpec(
            sinks=self.sinks,
            slots=None if self.window is None else self.sinks + self.window,
            head_dim=None if self.rope is None else self.rope.head_dim,
            sink_k=self.rope is not None and self.sinks > 0,
            index=False,
        )

    def check_inputs(self, hkv: int, d: int) -> None:
        """Nothing beyond ``StreamingAttention``'s own checks."""

    def slot_index(self, st: StreamState) -> torch.Tensor:
        """``[B, Hkv, N]`` int64 stream index held by each slot (``EMPTY`` if none), on the state's device."""
        seen = torch.tensor(st.seen, device=st.device)
        held = self.slot_positions(seen, st.slots - self.sinks)  # the same for every kv head
        return held[:, None, :].expand(-1, st.kv_heads, -1).contiguous()

    def cached(self, st: StreamState) -> list[int]:
        """Keys held per stream."""
        return [self.filled(n) for n in st.seen]

    def slot_positions(self, seen: torch.Tensor, capacity: int) -> torch.Tensor:
        """``[B, S + capacity]`` stream index held by each slot given ``seen [B]``; EMPTY if none."""
        return _slot_positions(self.sinks, self.window, seen, capacity)

    def _slot(self, j: int) -> int:
        if j < self.sinks:
            return j
        return self.sinks + ((j - self.sinks) if self.window is None else (j - self.sinks) % self.window)

    def _reserve(self, st: StreamState, n_max: int) -> None:
        """Grow an unbounded (``Full``) buffer to hold ``n_max`` tokens, doubling."""
        if self.window is not None or st.k.shape[2] >= n_max:
            return
        st.widen(max(n_max, 2 * st.k.shape[2]))

    # ------------------------------------------------------------------ positions
    def _maybe_rebase(self, st: StreamState, t: int) -> None:
        """Move the frame origin of streams whose positions would exceed ``rebase_every``."""
        if self.rope is None:
            return
        for b in rebase_keys(st, self.rope, self.rebase_every, t, lambda b: st.k[b, :, self.sinks :]):
            if st.sink_k is not None:
                self._refresh_display(st, b)

    def _display_position(self, st: StreamState, b: int) -> int:
        """Frame position of the matrix that brings ``sink_k`` to stream ``b``'s query frame."""
        t = max(st.seen[b], self.anchor) if self.cache_mode else self.anchor
        return t - st.base[b]

    def _refresh_display(self, st: StreamState, b: int) -> None:
        cdt = compute_dtype(st.dtype)
        m = self.rope.rotation_matrices(torch.tensor(self._display_position(st, b), device=st.device), cdt)
        st.k[b, :, : self.sinks] = torch.matmul(st.sink_k[b].to(cdt), m)

    # ------------------------------------------------------------------ decode: T == 1
    def decode(self, st: StreamState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token per stream, the hot path. Kernels: RoPE on q and on k (one small matmul each),
        two slot writes, in cache mode an S-row sink refresh (matmul + write), then one SDPA over the
        buffer's filled prefix (or the whole buffer with a mask when streams are at different fills).
        """
        if self.rope is not None and max(st.seen) - min(st.base) >= self.rebase_every:  # cheap pre-check
            self._maybe_rebase(st, 1)
        bsz, hq, _, d = q.shape
        hkv = k.shape[1]
        seen = st.seen
        t0 = seen[0]
        uniform = bsz == 1 or all(t == t0 for t in seen)
        if self.window is None:
            self._reserve(st, max(seen) + 1)
        m = None
        if self.rope is not None:
            cdt = compute_dtype(q.dtype)
            pos = [seen[0] - st.base[0]] if bsz == 1 else [t - b for t, b in zip(seen, st.base, strict=True)]
            m = self._rotations(pos, cdt, q.device)
            k_raw = k
            if q.dtype == cdt:
                q, k = torch.matmul(q, m), torch.matmul(k, m)
            else:  # bf16/fp16: rotate in fp32, store rounded
                q, k = torch.matmul(q.to(cdt), m).to(q.dtype), torch.matmul(k.to(cdt), m).to(k.dtype)
        if uniform:
            slot = self._slot(t0)
            st.k.narrow(2, slot, 1).copy_(k)
            st.v.narrow(2, slot, 1).copy_(v)
        else:
            rows = torch.arange(bsz, device=q.device)
            slots = torch.tensor([self._slot(t) for t in seen], device=q.device)
            write_slots(st.k, rows, slots, k[:, :, 0])
            write_slots(st.v, rows, slots, v[:, :, 0])
        if st.sink_k is not None:
            if uniform and t0 >= self.sinks:  # common case: no new sink; refresh only past the fill
                if self.cache_mode and t0 >= self.anchor:  # sinks follow the query: same rotation m
                    sink_k = st.sink_k if st.sink_k.dtype == m.dtype else st.sink_k.to(m.dtype)
                    st.k.narrow(2, 0, self.sinks).copy_(torch.matmul(sink_k, m))
            else:
                self._decode_sinks(st, k_raw, m)
        n = [t + 1 for t in seen]
        mask = None
        keys, values = st.k, st.v
        if uniform:
            filled = self.filled(n[0])
            if filled < keys.shape[2]:
                keys, values = keys.narrow(2, 0, filled), values.narrow(2, 0, filled)
        else:
            held = self.slot_positions(torch.tensor(n, device=q.device), st.k.shape[2] - self.sinks)
            mask = (held != EMPTY)[:, None, None, :]
        # the G query heads of a kv head ride in SDPA's query-length dim: no repeat_interleave
        out = attend(q.reshape(bsz, hkv, hq // hkv, d), keys, values, mask, self.scale)
        st.seen = n
        return out.reshape(bsz, hq, 1, d)

    def filled(self, n: int) -> int:
        """Length of the buffer prefix in use after ``n`` tokens (slots fill in order)."""
        if n <= self.sinks:
            return n
        w = n - self.sinks
        return self.sinks + (w if self.window is None else min(w, self.window))

    def _decode_sinks(self, st: StreamState, k_raw: torch.Tensor, m: torch.Tensor) -> None:
        """Sink bookkeeping of a decode step when streams differ or one is still writing sinks."""
        s, anchor = self.sinks, self.anchor
        cdt = m.dtype
        new = [b for b, t in enumerate(st.seen) if t < s]  # streams whose token is a sink
        if new:
            rows = torch.tensor(new, device=st.device)
            self._keep_sinks(st, rows, torch.tensor([st.seen[b] for b in new], device=st.device), k_raw[rows, :, 0])
        for b, t in enumerate(st.seen):
            if self.cache_mode and t >= anchor:  # past the fill (anchor >= S): sinks follow the query
                mb = m if m.dim() == 2 else m[b, 0]
                st.k[b, :, :s] = torch.matmul(st.sink_k[b].to(cdt), mb).to(st.dtype)

    # ------------------------------------------------------------------ chunks: any T
    def forward(
        self, st: StreamState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Stream ``counts[b]`` tokens of each stream (right-padded to T) in blocks."""
        bsz, hq, t, d = q.shape
        if t == 1 and min(counts) == 1:
            return self.decode(st, q, k, v)
        block = self._block_size(st, bsz, hq, t)
        if block >= t and max(counts) == t:  # one block: its result is the output
            return self._block(st, q, k, v, list(counts))
        out = q.new_zeros(bsz, hq, t, d)
        for c0 in range(0, max(counts), block):
            n = [min(max(c - c0, 0), block) for c in counts]
            c1 = c0 + max(n)
            out[:, :, c0:c1] = self._block(st, q[:, :, c0:c1], k[:, :, c0:c1], v[:, :, c0:c1], n)
        return out

    def _block_size(self, st: StreamState, bsz: int, hq: int, t: int) -> int:
        """Blocks no longer than the window: a block never overwrites ring slots it still reads,
        and sinks inside a block are seen only by queries below the anchor (no shift needed)."""
        limit = min(t, self.block_size)
        if self.window is not None:
            limit = min(limit, self.window)
        keys = st.k.shape[2] + limit
        return max(1, min(limit, _SCORE_BUDGET // max(1, bsz * hq * keys)))

    def _block(self, st: StreamState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: list[int]) -> torch.Tensor:
        """Attend ``n[b]`` new tokens of each stream (right-padded to T <= window) with one SDPA over
        a copy of the buffer followed by the block, then commit the block to the state."""
        bsz, _, t, d = q.shape
        hkv = k.shape[1]
        dtype, dev, cdt = q.dtype, q.device, compute_dtype(q.dtype)
        self._maybe_rebase(st, t)
        if self.window is None:
            self._reserve(st, max(a + b for a, b in zip(st.seen, n, strict=True)))
        slots = st.k.shape[2]
        key = (self.policy, slots, tuple(st.seen), tuple(n), t, dev)
        qpos, valid = _block_index(*key[2:])
        q, k_raw, v = q.to(cdt), k.to(cdt), v.to(cdt)
        if min(n) < t:  # padding may hold anything (NaN included): 0 * NaN would leak through P @ V
            pad = ~valid[:, None, :, None]
            q, k_raw, v = q.masked_fill(pad, 0), k_raw.masked_fill(pad, 0), v.masked_fill(pad, 0)
        scale = d**-0.5 if self.scale is None else self.scale
        if self.rope is not None:
            start = st.seen[0] - st.base[0]
            if all(a - b == start for a, b in zip(st.seen, st.base, strict=True)):
                cos, sin = range_cos_sin(self.rope, start, t, cdt, dev)
            else:
                cos, sin = self.rope.cos_sin((qpos - torch.tensor(st.base, device=dev)[:, None])[:, None], cdt)
            if self._banded(st, n, t):  # the common chunk of a long stream: keys in stream order, sub-blocks
                out, k = self._attend_banded(st, q, k_raw, v, cos, sin, scale)
                self._write(st, k, v, k_raw, qpos, valid, n)
                return out.to(dtype)
            qw, k = apply_rotary(q, cos, sin), apply_rotary(k_raw, cos, sin)
        else:
            qw, k = q, k_raw
        # What this block attends to: the buffer as it was, then the block itself. One copy of
        # O((S + C + T) * D), after which the ring may be overwritten freely.
        keys = torch.empty(bsz, hkv, slots + t, d, dtype=cdt, device=dev)
        values = torch.empty_like(keys)
        keys[:, :, :slots], keys[:, :, slots:] = st.k, k
        values[:, :, :slots], values[:, :, slots:] = st.v, v
        see = _visibility(*key)
        if st.sink_k is not None and self.cache_mode:
            out = self._attend_with_sinks(st, q, qw, keys, values, key, qpos, scale)
        else:
            out = attend(qw, keys, values, see[:, None], scale)  # [B, 1, T, K] mask shared by all heads
        self._write(st, k, v, k_raw, qpos, valid, n)
        return out.masked_fill_(~valid[:, None, :, None], 0).to(dtype)

    def _banded(self, st: StreamState, n: list[int], t: int) -> bool:
        """Cache mode with sinks, every stream at the same index past a full ring, no padding: the
        block's keys can be laid out in stream order, where each query's window is a band."""
        return (
            self.cache_mode
            and st.sink_k is not None
            and t >= 16
            and st.seen[0] >= self.sinks + self.window
            and all(x == st.seen[0] for x in st.seen)
            and all(c == t for c in n)
        )

    def _attend_banded(self, st, q, k_raw, v, cos, sin, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """``_attend_with_sinks`` for a ``_banded`` block, doing ~``window + _BAND`` key reads per
        query instead of ``window + T``. Ring + block are copied in stream order (column ``c`` holds
        index ``seen - window + c``), where query ``i`` sees columns ``i + 1 .. i + window``; so a
        sub-block of ``m`` queries attends one slice of ``window + m - 1`` columns with a band mask
        that depends only on ``m`` (built once). Every sink is visible, in its frame at position 0
        (past the anchor the query is not rotated for the sinks), added by one softmax (``add_keys``).

        Layouts are chosen so that nothing is copied twice: q and k are rotated straight into the
        sub-block layout and the stream-ordered keys, and the merge writes the output in
        ``[B, T, Hq, D]`` memory order (what transformers and the next projection read), returned as
        the ``[B, Hq, T, D]`` view. Returns ``(output, rotated block keys)``."""
        bsz, hq, t, d = q.shape
        hkv, s, w = k_raw.shape[1], self.sinks, self.window
        g, cdt, dev = hq // hkv, q.dtype, q.device
        o = (st.seen[0] - s) % w  # ring offset of the oldest held token
        keys = torch.empty(bsz, hkv, w + t, d, dtype=cdt, device=dev)
        values = torch.empty_like(keys)
        for dst, ring in ((keys, st.k), (values, st.v)):
            dst[:, :, : w - o], dst[:, :, w - o : w] = ring[:, :, s + o :], ring[:, :, s : s + o]
        k = apply_rotary(k_raw, cos, sin, out=keys[:, :, w:])
        values[:, :, w:] = v
        m = min(_BAND, (t + 1) // 2)
        ns = t // m
        full = ns * m
        grouped = q.unflatten(1, (hkv, g))  # [B, Hkv, G, T, D]: a view
        split = grouped[:, :, :, :full].unflatten(3, (ns, m))  # [B, Hkv, G, ns, m, D]
        qs = torch.empty(bsz, ns, hkv, g, m, d, dtype=cdt, device=dev)  # sub-block layout
        cos_s, sin_s = (x[:, :, :full].unflatten(2, (ns, m)).unsqueeze(1) for x in (cos, sin))
        apply_rotary(split, cos_s, sin_s, out=qs.permute(0, 2, 3, 1, 4, 5))
        win = lse = None
        rest = []  # a last, shorter sub-block of each stream: (output [Hkv, G, r, D], lse [Hkv, G, r])
        for i in range(bsz):
            # the ns sub-blocks of stream i as one batch: their key slices overlap, a strided view
            kb, vb = keys[i], values[i]  # [Hkv, window + T, D]
            size, stride = (ns, hkv, w + m - 1, d), (m * d, kb.stride(0), d, 1)
            ks = kb.as_strided(size, stride, kb.storage_offset() + d)
            vs = vb.as_strided(size, stride, vb.storage_offset() + d)
            out_i, lse_i = attend_lse(qs[i].view(ns, hkv, g * m, d), ks, vs, _band_bias(w, m, g, cdt, dev), scale)
            out_i, lse_i = out_i.unflatten(2, (g, m)), lse_i.view(ns, hkv, g, m)
            if bsz == 1:
                win, lse = out_i[None], lse_i[None]
            else:
                if win is None:
                    win = torch.empty(bsz, *out_i.shape, dtype=cdt, device=dev)
                    lse = torch.empty(bsz, *lse_i.shape, dtype=lse_i.dtype, device=dev)
                win[i], lse[i] = out_i, lse_i
            if full < t:
                r = t - full
                qr = apply_rotary(
                    grouped[i : i + 1, :, :, full:], cos[i % cos.shape[0], :, full:], sin[i % sin.shape[0], :, full:]
                )
                out_r, lse_r = attend_lse(
                    qr.reshape(1, hkv, g * r, d),
                    keys[i : i + 1, :, full + 1 : t + w],
                    values[i : i + 1, :, full + 1 : t + w],
                    _band_bias(w, r, g, cdt, dev),
                    scale,
                )
                rest.append((out_r.view(hkv, g, r, d), lse_r.view(hkv, g, r)))
        out = torch.empty(bsz, t, hkv, g, d, dtype=cdt, device=dev)  # [B, T, Hq, D] memory order
        view = out.permute(0, 2, 3, 1, 4)  # [B, Hkv, G, T, D]
        sinks_k, sinks_v = st.sink_k.to(cdt)[:, :, None, None], st.v[:, :, None, None, :s].to(cdt)
        add_keys(
            [(win.permute(0, 2, 3, 1, 4, 5), lse.permute(0, 2, 3, 1, 4))],
            split,
            sinks_k,
            sinks_v,
            scale,
            into=view[:, :, :, :full].unflatten(3, (ns, m)),
        )
        if rest:
            add_keys(
                [(torch.stack([x for x, _ in rest]), torch.stack([x for _, x in rest]))],
                grouped[:, :, :, full:],
                sinks_k[:, :, 0],
                sinks_v[:, :, 0],
                scale,
                into=view[:, :, :, full:],
            )
        return out.view(bsz, t, hq, d).transpose(1, 2), k

    def _attend_with_sinks(self, st, q, qw, keys, values, key, qpos, scale) -> torch.Tensor:
        """Cache mode: sink ``j`` sits at distance ``min(t, anchor) - j`` from query ``t``, which no
        single key rotation gives. So the sinks are scored apart, in their own frame (``sink_k``
        against the query rotated at ``min(t, anchor) - anchor``: 0, no rotation, once the stream is
        past the anchor), and merged with one fused attention over the rest of the keys by
        log-sum-exp: exact, and no per-head mask is materialised. The G query heads of a kv head
        ride in the query-length dim (mask shared, no key copies). ``key``: ``_visibility``'s."""
        bsz, hq, t, d = q.shape
        hkv, s = keys.shape[1], self.sinks
        g = hq // hkv
        cdt = keys.dtype
        bias, hidden = _sink_merge_bias(*key, g, cdt)
        out_w, lse_w = attend_lse(qw.reshape(bsz, hkv, g * t, d), keys[:, :, s:], values[:, :, s:], bias, scale)
        if min(st.seen) >= self.anchor:
            qs = q
        else:
            qs = self.rope.rotate(q, (qpos.clamp_max(self.anchor) - self.anchor)[:, None])  # [B, Hq, T, D]
        sink_scores = (qs.reshape(bsz, hkv, g * t, d) @ st.sink_k.to(cdt).transpose(-1, -2)) * scale  # [B, Hkv, G*T, S]
        sink_scores = sink_scores.masked_fill(hidden, float("-inf"))
        lse_s = torch.logsumexp(sink_scores, dim=-1)
        p = torch.exp(sink_scores - torch.where(torch.isfinite(lse_s), lse_s, 0)[..., None])  # 0 where none visible
        out_s = p @ values[:, :, :s]
        return merge_lse(out_w, lse_w, out_s, lse_s).view(bsz, hq, t, d)

    def _write(self, st, k, v, k_raw, qpos, valid, n) -> None:
        """Commit the block's valid tokens: sinks to their slots (+ ``sink_k``), the rest to the ring."""
        s, t0 = self.sinks, st.seen[0]
        t = k.shape[2]
        if t0 >= s and all(x == t0 for x in st.seen) and all(c == t for c in n):  # in step, no sink, no padding
            end = st.k.shape[2] if self.window is None else s + self.window  # the ring wraps to slot s
            for buf, x in ((st.k, k), (st.v, v)):
                write_wrapped(buf, x, self._slot(t0), s, end)
            st.seen = [x + t for x in st.seen]
            return
        ring = qpos - s if self.window is None else torch.remainder(qpos - s, self.window)
        slot = torch.where(qpos < s, qpos, s + ring)
        b_idx, i_idx = valid.nonzero(as_tuple=True)
        sl = slot[b_idx, i_idx]
        write_slots(st.k, b_idx, sl, k.transpose(1, 2)[b_idx, i_idx])
        write_slots(st.v, b_idx, sl, v.transpose(1, 2)[b_idx, i_idx])
        if st.sink_k is not None and any(t < s and c > 0 for t, c in zip(st.seen, n, strict=True)):
            b_idx, i_idx = (valid & (qpos < s)).nonzero(as_tuple=True)
            self._keep_sinks(st, b_idx, qpos[b_idx, i_idx], k_raw.transpose(1, 2)[b_idx, i_idx])
        st.seen = [t + c for t, c in zip(st.seen, n, strict=True)]

    def _keep_sinks(self, st: StreamState, b_idx: torch.Tensor, j: torch.Tensor, raw: torch.Tensor) -> None:
        """Store sink keys ``raw [N, Hkv, D]`` (un-rotated) of streams ``b_idx`` at indices ``j``,
        rotated at ``j - anchor``: the frame both paths score sinks in."""
        rotated = rope_at_write(raw, self.rope, (j - self.anchor)[:, None])  # [N, Hkv, D]
        write_slots(st.sink_k, b_idx, j, rotated)
