"""The budget engine: score-based eviction (``Compressed``) in fixed buffers of ``budget + every`` slots.

Layout. Per kv head, slots ``[0, held)`` hold the kept keys *in stream order* (``index`` records
which token each slot holds); new tokens append at ``held``; an eviction point compacts the kept
keys back to ``[0, budget)``. Every head holds the same count (``policy.held(seen)``), so a query's
visible keys are a prefix of the buffer and the mask is causal over "buffer + block".

Positions. ``"absolute"``: keys are rotated once, at ``j - base`` (as in the window engine; ``base``
moves forward every ``rebase_every`` tokens). ``"cache"``: a key's position is its rank among the
held keys, which in this layout *is its slot*: a query at slot ``s`` is at position ``s``. Ranks
change only at eviction points, where the kept keys are re-rotated at their new slots from the
un-rotated copy ``k_raw`` (never from an already rotated key, so no error accumulates); positions
stay below ``budget + every`` forever and no rebasing is needed.

Chunks. A block never crosses a stream's eviction point: each stream advances to its next point at
most, so the blocks (and their results) are those of token-by-token streaming, for any chunking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from streamattn.core.engine import Rotations
from streamattn.core.kernels import (
    attend,
    attend_accumulate,
    attend_grouped_weights,
    compute_dtype,
    rebase_keys,
    take_rows,
    write_slots,
)
from streamattn.core.registry import register_engine
from streamattn.core.rope import RoPE, apply_rotary
from streamattn.core.state import EMPTY, StateSpec, StreamState, in_segments
from streamattn.policies import Compressed


@register_engine(Compressed)
class BudgetEngine:
    """Realises ``Compressed(sinks, window, budget, score, every)``; holds no stream."""

    def __init__(
        self,
        policy: Compressed,
        rope: RoPE | None,
        positions: str,
        scale: float | None,
        rebase_every: int,
        block_size: int,
    ) -> None:
        self.policy = policy
        self.scorer = policy.score
        self.every, self.budget = policy.every, policy.budget
        self.slots = policy.budget + policy.every
        self.rope = rope
        self.cache_mode = positions == "cache"
        self.keep_raw = self.cache_mode and rope is not None
        self.scale = scale
        self.rebase_every = rebase_every
        self.block_size = block_size
        self._rotations = Rotations(rope) if rope is not None else None
        self._ranks: tuple[torch.Tensor, torch.Tensor] | None = None  # cos/sin of ranks 0 .. budget - 1
        self._ranks_key: tuple | None = None

    # ------------------------------------------------------------------ state
    def new_state(self, b: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device) -> StreamState:
        size = (b, hkv, self.slots)
        return StreamState(
            k=torch.zeros(*size, d, dtype=dtype, device=device),
            v=torch.zeros(*size, d, dtype=dtype, device=device),
            sink_k=None,
            seen=[0] * b,
            base=[0] * b,
            index=torch.full(size, EMPTY, dtype=torch.int64, device=device),
            score=torch.zeros(size, dtype=compute_dtype(dtype), device=device),
            k_raw=torch.zeros(*size, d, dtype=dtype, device=device) if self.keep_raw else None,
        )

    @property
    def spec(self) -> StateSpec:
        return StateSpec(
            sinks=self.policy.sinks,
            slots=self.slots,
            head_dim=None if self.rope is None else self.rope.head_dim,
            sink_k=False,
            index=True,
            score=True,
            k_raw=self.keep_raw,
        )

    def check_inputs(self, hkv: int, d: int) -> None:
        check = getattr(self.scorer, "check_shape", None)
        if check is not None:
            check(hkv, d)

    def slot_index(self, st: StreamState) -> torch.Tensor:
        return st.index.clone()

    def cached(self, st: StreamState) -> list[int]:
        return [self.policy.held(n) for n in st.seen]

    # ------------------------------------------------------------------ streaming
    def forward(
        self, st: StreamState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Stream ``counts[b]`` tokens of each stream (right-padded to T), each stream in blocks that
        end at its eviction points."""
        t = q.shape[2]
        if t == 1 and min(counts) == 1 and all(n == st.seen[0] for n in st.seen):
            return self._decode(st, q, k, v)
        limit = lambda seen: min(self.every - seen % self.every, self.block_size)  # noqa: E731
        return in_segments(st, q, k, v, counts, limit, self._block)

    def _decode(self, st: StreamState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token of streams that are all at the same index (B = 1, or a batch in lockstep): the
        hot path, with no mask and no per-stream bookkeeping tensors. At this size every op's launch
        counts: writes go through ``narrow`` (one op, where ``x[:, :, a:b] = y`` takes four)."""
        bsz, hq, _, d = q.shape
        hkv = k.shape[1]
        dtype, cdt = q.dtype, compute_dtype(q.dtype)
        n0 = st.seen[0]
        h0 = self.policy.held(n0)
        k_raw = k if k.dtype == cdt else k.to(cdt)
        if self.rope is not None:
            self._maybe_rebase(st, 1)
            pos = [h0] if self.cache_mode else [n0 - b for b in st.base]  # equal entries: one [D, D] matrix
            m = self._rotations(pos, cdt, q.device)
            qw, kw = torch.matmul(q if q.dtype == cdt else q.to(cdt), m), torch.matmul(k_raw, m)
        else:
            qw, kw = (q if q.dtype == cdt else q.to(cdt)), k_raw
        st.k.narrow(2, h0, 1).copy_(kw)
        st.v.narrow(2, h0, 1).copy_(v)
        st.index.narrow(2, h0, 1).fill_(n0)
        key_score = self.scorer.key_score(k_raw)
        if key_score is not None:  # otherwise the slot's score is already 0: slots past ``held`` hold 0
            st.score.narrow(2, h0, 1).copy_(key_score)
        if st.k_raw is not None:
            st.k_raw.narrow(2, h0, 1).copy_(k)
        keys, values = st.k.narrow(2, 0, h0 + 1), st.v.narrow(2, 0, h0 + 1)
        observe = self.scorer.observe
        if observe is None or (observe > 0 and n0 % self.every + 1 > self.every - observe):
            if keys.dtype != cdt:
                keys, values = keys.to(cdt), values.to(cdt)
            out = attend_accumulate(qw, keys, values, st.score.narrow(2, 0, h0 + 1), self.scale)
        else:  # the G query heads of a kv head ride in SDPA's query-length dim
            grouped = (qw if qw.dtype == dtype else qw.to(dtype)).view(bsz, hkv, hq // hkv, d)
            out = attend(grouped, keys, values, None, self.scale).view(bsz, hq, 1, d)
        st.seen = [n0 + 1] * bsz
        if (n0 + 1) % self.every == 0:
            if h0 + 1 > self.budget:
                self._evict(st, list(range(bsz)), [h0 + 1] * bsz)
            if observe:
                st.score.zero_()
        return out if out.dtype == dtype else out.to(dtype)

    def _block(self, st: StreamState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: list[int]) -> torch.Tensor:
        """Attend ``n[b]`` new tokens of each stream (right-padded to T), none past an eviction point;
        write them, accumulate scores, and evict at the streams that reach a point."""
        t = q.shape[2]
        dtype, dev, cdt = q.dtype, q.device, compute_dtype(q.dtype)
        self._maybe_rebase(st, t)
        held = [self.policy.held(s) for s in st.seen]
        uniform = all(h == held[0] for h in held) and all(m == t for m in n)
        col = torch.arange(t, device=dev)
        valid = col[None, :] < torch.tensor(n, device=dev)[:, None]  # [B, T]
        qpos = torch.tensor(st.seen, device=dev)[:, None] + col  # [B, T] stream index of each token
        slot = torch.tensor(held, device=dev)[:, None] + col  # [B, T] its slot (= its rank)
        q, k_raw, v = q.to(cdt), k.to(cdt), v.to(cdt)
        if min(n) < t:  # padding may hold anything (NaN included): 0 * NaN would leak through P @ V
            pad = ~valid[:, None, :, None]
            q, k_raw, v = q.masked_fill(pad, 0), k_raw.masked_fill(pad, 0), v.masked_fill(pad, 0)
        qw, kw = self._rotate(st, q, k_raw, slot, qpos)

        # write the block (valid tokens) into its slots
        key_score = self.scorer.key_score(k_raw)  # [B, Hkv, T] or None
        if uniform:
            h0 = held[0]
            st.k[:, :, h0 : h0 + t] = kw
            st.v[:, :, h0 : h0 + t] = v
            st.index[:, :, h0 : h0 + t] = qpos[:, None, :]
            st.score[:, :, h0 : h0 + t] = 0 if key_score is None else key_score
            if st.k_raw is not None:
                st.k_raw[:, :, h0 : h0 + t] = k_raw
        else:
            b_idx, i_idx = valid.nonzero(as_tuple=True)
            sl = slot[b_idx, i_idx]
            write_slots(st.k, b_idx, sl, kw.transpose(1, 2)[b_idx, i_idx])
            write_slots(st.v, b_idx, sl, v.transpose(1, 2)[b_idx, i_idx])
            st.index[b_idx, :, sl] = qpos[b_idx, i_idx][:, None]
            st.score[b_idx, :, sl] = 0 if key_score is None else key_score.transpose(1, 2)[b_idx, i_idx]
            if st.k_raw is not None:
                write_slots(st.k_raw, b_idx, sl, k_raw.transpose(1, 2)[b_idx, i_idx])

        # attend: the buffer prefix [0, L) with a causal mask on slots
        span = max(h + m for h, m in zip(held, n, strict=True))
        keys, values = st.k[:, :, :span], st.v[:, :, :span]
        mask = None
        if not (uniform and t == 1):
            see = torch.arange(span, device=dev)[None, None, :] <= slot[:, :, None]  # [B, T, L]
            mask = (see | ~valid[:, :, None])[:, None]  # padded rows see everything (zeroed below): no NaN
        observed = self._observed(qpos, valid)
        first = t if observed is None else int(observed.any(dim=0).nonzero()[0])  # first observed column
        parts = []
        if first > 0:  # rows no scorer reads: one SDPA
            rows = None if mask is None else mask[:, :, :first]
            parts.append(attend(qw[:, :, :first], keys.to(cdt), values.to(cdt), rows, self.scale))
        if observed is not None:  # rows whose weights feed the scores, from the same softmax as their output
            rows = None if mask is None else mask[:, :, first:]
            out, w = attend_grouped_weights(qw[:, :, first:], keys.to(cdt), values.to(cdt), rows, self.scale)
            st.score[:, :, :span] += (w * observed[:, None, first:, None]).sum(dim=2)  # w [B, Hkv, T', L]
            parts.append(out)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        st.seen = [s + m for s, m in zip(st.seen, n, strict=True)]

        # eviction points reached by this block
        points = [b for b, m in enumerate(n) if m > 0 and st.seen[b] % self.every == 0]
        full = [b for b in points if held[b] + n[b] > self.budget]
        if full:
            self._evict(st, full, [held[b] + n[b] for b in full])
        if points and self.scorer.observe:  # an observation window starts afresh at each point
            st.score[torch.tensor(points, device=dev)] = 0
        return out.masked_fill(~valid[:, None, :, None], 0).to(dtype)

    def _observed(self, qpos: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """``[B, T]`` bool: queries whose attention weights feed the scores (None if none)."""
        observe = self.scorer.observe
        if observe == 0:
            return None
        if observe is None:
            observed = valid
        else:
            phase = qpos % self.every + 1  # queries since the last point, this one included: 1..every
            observed = valid & (phase > self.every - observe)
        return observed if bool(observed.any()) else None

    def _rotate(self, st, q, k, slot, qpos) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated at their positions: the slot (cache mode) or ``index - base`` (absolute)."""
        if self.rope is None:
            return q, k
        pos = slot if self.cache_mode else qpos - torch.tensor(st.base, device=q.device)[:, None]
        if q.shape[2] == 1:
            m = self._rotations(pos[:, 0].tolist(), q.dtype, q.device)
            return torch.matmul(q, m), torch.matmul(k, m)
        cos, sin = self.rope.cos_sin(pos[:, None], q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _maybe_rebase(self, st: StreamState, t: int) -> None:
        """Absolute mode: move the frame origin of streams whose positions would exceed ``rebase_every``."""
        if self.rope is None or self.cache_mode:
            return
        rebase_keys(st, self.rope, self.rebase_every, t, lambda b: st.k[b, :, : self.policy.held(st.seen[b])])

    def _evict(self, st: StreamState, rows: list[int], counts: list[int]) -> None:
        """Streams ``rows`` hold ``counts`` keys per head: keep ``budget`` per head, compacted in stream order."""
        dev = st.device
        at = torch.tensor(rows, device=dev)
        c = max(counts)
        filled = torch.arange(c, device=dev) < torch.tensor(counts, device=dev)[:, None, None]  # [E, 1, C]
        minus_inf = float("-inf")
        score = st.score[at, :, :c].masked_fill(~filled, minus_inf)  # [E, Hkv, C]
        kernel = self.scorer.kernel
        if kernel > 1:  # max over neighbours in stream order; the pool's padding is -inf
            e, h = score.shape[:2]
            score = F.max_pool1d(score.reshape(e * h, 1, c), kernel, stride=1, padding=kernel // 2).view(e, h, c)
            score = score.masked_fill(~filled, minus_inf)
        index = st.index[at, :, :c]
        seen = torch.tensor([st.seen[b] for b in rows], device=dev)[:, None, None]
        protected = filled & ((index < self.policy.sinks) | (index >= seen - self.policy.window))
        score = score.masked_fill(protected, float("inf"))
        # best first; among equal scores the newer key first (the older is evicted first)
        order = torch.sort(score.flip(-1), dim=-1, descending=True, stable=True).indices[..., : self.budget]
        keep = (c - 1 - order).sort(dim=-1).values  # [E, Hkv, budget] kept slots, in stream order
        every_row = rows == list(range(st.batch_size))
        budget = self.budget
        dest = slice(None) if every_row else at
        rerotate = st.k_raw is not None  # cache mode: k is rebuilt from k_raw below, no need to move it
        for name in ("v", "k_raw", "index", "score") if rerotate else ("k", "v", "index", "score"):
            buf = getattr(st, name)
            buf[dest, :, :budget] = take_rows(buf, None if every_row else at, keep)
        st.index[dest, :, budget:] = EMPTY
        st.score[dest, :, budget:] = 0
        if rerotate:  # ranks changed: rotate the kept keys at their new slots, from the raw copy
            cos, sin = self._rank_rotation(st.dtype, dev)
            raw = st.k_raw[dest, :, :budget]
            if raw.dtype == cos.dtype and every_row:  # straight into the buffer, no temporaries
                apply_rotary(raw, cos, sin, out=st.k[:, :, :budget])
            else:
                st.k[dest, :, :budget] = apply_rotary(raw.to(cos.dtype), cos, sin).to(st.dtype)

    def _rank_rotation(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions ``0 .. budget - 1`` (the ranks after an eviction), built once."""
        key = (compute_dtype(dtype), device)
        if self._ranks_key != key:
            self._ranks = self.rope.cos_sin(torch.arange(self.budget, device=device), key[0])
            self._ranks_key = key
        return self._ranks
