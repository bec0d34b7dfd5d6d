"""The per-head engine: each group of kv heads (one per distinct policy of a ``PerHead``) runs its
own engine on its own state; a query head goes with its kv head (GQA groups stay together).

``PerHeadState`` holds one ``StreamState`` per group and presents the stream-level interface
``StreamingAttention`` uses (rows, counters, save/restore); ``PerHeadSpec.load`` validates a saved
one part by part. Bytes are per group, so per head: ``head_nbytes()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamattn.core.registry import engine_for, register_engine
from streamattn.core.rope import RoPE
from streamattn.core.state import EMPTY, StateSpec, StreamState
from streamattn.policies import PerHead


@dataclass
class PerHeadState:
    """A batch of streams whose kv heads are split in groups: ``parts[g]`` holds heads ``groups[g]``."""

    parts: list[StreamState]
    groups: list[list[int]]

    @property
    def batch_size(self) -> int:
        return self.parts[0].batch_size

    @property
    def kv_heads(self) -> int:
        return sum(len(g) for g in self.groups)

    @property
    def head_dim(self) -> int:
        return self.parts[0].head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def seen(self) -> list[int]:
        return self.parts[0].seen

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def head_nbytes(self) -> list[int]:
        """Bytes held for each kv head (its group's bytes shared evenly by the group's heads)."""
        out = [0] * self.kv_heads
        for part, heads in zip(self.parts, self.groups, strict=True):
            for h in heads:
                out[h] = part.nbytes // len(heads)
        return out

    def select(self, rows: torch.Tensor | Sequence[int]) -> PerHeadState:
        return PerHeadState([p.select(rows) for p in self.parts], [list(g) for g in self.groups])

    def put(self, rows: torch.Tensor | Sequence[int], other: PerHeadState) -> None:
        self._check_compatible(other)
        for mine in self.parts:
            mine._rows(rows)  # everything checked before anything is written
        for mine, theirs in zip(self.parts, other.parts, strict=True):
            mine.put(rows, theirs)

    @staticmethod
    def cat(states: Sequence[PerHeadState]) -> PerHeadState:
        if not states:
            raise ValueError("cat needs at least one state")
        for other in states[1:]:
            states[0]._check_compatible(other)
        parts = [StreamState.cat([s.parts[g] for s in states]) for g in range(len(states[0].parts))]
        return PerHeadState(parts, [list(g) for g in states[0].groups])

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, PerHeadState) or other.groups != self.groups:
            raise ValueError("per-head states of different head groups cannot share a batch")

    def to_dict(self, copy: bool = True) -> dict[str, object]:
        return {"groups": [list(g) for g in self.groups], "parts": [p.to_dict(copy) for p in self.parts]}


@dataclass(frozen=True)
class PerHeadSpec:
    """What a saved ``PerHeadState`` must look like: the groups and each part's ``StateSpec``."""

    groups: tuple[tuple[int, ...], ...]
    parts: tuple[StateSpec, ...]

    def load(self, raw: Any) -> PerHeadState:
        if not isinstance(raw, Mapping) or not isinstance(raw.get("parts"), Sequence):
            raise ValueError("malformed per-head state: expected a dict with 'groups' and 'parts'")
        if [list(g) for g in self.groups] != raw.get("groups") or len(raw["parts"]) != len(self.parts):
            raise ValueError(f"per-head state of other head groups: {raw.get('groups')}, this policy has {self.groups}")
        parts = [spec.load(r) for spec, r in zip(self.parts, raw["parts"], strict=True)]
        first = parts[0]
        for part, heads in zip(parts, self.groups, strict=True):
            if (
                part.kv_heads != len(heads)
                or part.seen != first.seen
                or (part.head_dim, part.dtype)
                != (
                    first.head_dim,
                    first.dtype,
                )
            ):
                raise ValueError("malformed per-head state: its parts disagree (heads, tokens seen, head_dim or dtype)")
        return PerHeadState(parts, [list(g) for g in self.groups])


@register_engine(PerHead)
class PerHeadEngine:
    """Realises ``PerHead``: one sub-engine per distinct policy, over that policy's kv heads."""

    def __init__(
        self,
        policy: PerHead,
        rope: RoPE | None,
        positions: str,
        scale: float | None,
        rebase_every: int,
        block_size: int,
    ) -> None:
        self.policy = policy
        self.groups = [heads for _, heads in policy.groups]
        self.engines = [engine_for(p)(p, rope, positions, scale, rebase_every, block_size) for p, _ in policy.groups]
        self.rebase_every = rebase_every

    def new_state(self, b: int, hkv: int, d: int, dtype: torch.dtype, device: torch.device) -> PerHeadState:
        parts = [e.new_state(b, len(g), d, dtype, device) for e, g in zip(self.engines, self.groups, strict=True)]
        return PerHeadState(parts, [list(g) for g in self.groups])

    @property
    def spec(self) -> PerHeadSpec:
        return PerHeadSpec(tuple(tuple(g) for g in self.groups), tuple(e.spec for e in self.engines))

    def check_inputs(self, hkv: int, d: int) -> None:
        if hkv != self.policy.kv_heads:
            raise ValueError(f"this PerHead policy is for {self.policy.kv_heads} kv heads, got keys with Hkv={hkv}")
        for e, g in zip(self.engines, self.groups, strict=True):
            e.check_inputs(len(g), d)

    def slot_index(self, st: PerHeadState) -> torch.Tensor:
        parts = [e.slot_index(p) for e, p in zip(self.engines, st.parts, strict=True)]
        n = max(p.shape[2] for p in parts)
        out = torch.full((st.batch_size, st.kv_heads, n), EMPTY, dtype=torch.int64, device=st.device)
        for p, heads in zip(parts, self.groups, strict=True):
            out[:, heads, : p.shape[2]] = p
        return out

    def cached(self, st: PerHeadState) -> list[int]:
        """Keys held per stream by the kv head that holds the most."""
        per_part = [e.cached(p) for e, p in zip(self.engines, st.parts, strict=True)]
        return [max(column) for column in zip(*per_part, strict=True)]

    def forward(
        self, st: PerHeadState, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        g = q.shape[1] // k.shape[1]
        out = torch.empty_like(q)
        for engine, part, heads in zip(self.engines, st.parts, self.groups, strict=True):
            kv = torch.tensor(heads, device=q.device)
            qh = (kv[:, None] * g + torch.arange(g, device=q.device)).flatten()  # query heads of these kv heads
            out[:, qh] = engine.forward(part, q[:, qh], k[:, kv], v[:, kv], counts)
        return out
