"""Per-head policies: each kv head of a layer keeps its own kind of context.

DuoAttention (Xiao et al., ICLR 2025, arXiv:2410.10819) observes that only some heads ("retrieval
heads") need the long context, while the others ("streaming heads") do with sinks + a short window.
There, retrieval heads keep *everything*, so memory still grows with the stream; here every head's
policy is bounded (typically a large ``Compressed`` budget for retrieval heads and a small
``SinkWindow`` for streaming heads), so the whole cache is. A ``PerHead`` is one layer's
assignment; ``from_profile`` builds one per layer from a calibration profile (``streamattn
calibrate``: which heads attend to the answer when a model recalls a fact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from streamattn.policies.base import Policy


@dataclass(frozen=True)
class PerHead:
    """``heads[h]``: the policy of kv head ``h`` (any policy with an engine, not another ``PerHead``)."""

    heads: tuple[Policy, ...]
    kind: ClassVar[str] = "per_head"

    def __post_init__(self) -> None:
        from streamattn.policies import policy_from_config

        heads = self.heads
        if not isinstance(heads, Sequence) or isinstance(heads, str) or not heads:
            raise ValueError(
                f"PerHead: heads must be a non-empty sequence of policies (one per kv head), got {heads!r}"
            )
        heads = tuple(policy_from_config(h) if isinstance(h, Mapping) else h for h in heads)
        for h, p in enumerate(heads):
            if isinstance(p, PerHead) or not isinstance(p, Policy):
                raise ValueError(f"PerHead: head {h} must be a (non-PerHead) policy, got {p!r}")
        object.__setattr__(self, "heads", heads)

    @classmethod
    def split(cls, kv_heads: int, retrieval_heads: Sequence[int], retrieval: Policy, streaming: Policy) -> PerHead:
        """``retrieval`` for the kv heads in ``retrieval_heads``, ``streaming`` for the others."""
        chosen = set(retrieval_heads)
        if not chosen <= set(range(kv_heads)):
            raise ValueError(f"PerHead.split: retrieval heads {sorted(chosen)} are not all in [0, {kv_heads})")
        return cls(tuple(retrieval if h in chosen else streaming for h in range(kv_heads)))

    @staticmethod
    def from_profile(profile: Any, *, retrieval: Policy, streaming: Policy, heads: float | int = 0.25) -> list[Policy]:
        """One policy per layer from a calibration profile (a path or the loaded dict): the
        ``heads`` highest-scoring (layer, kv head) pairs of the whole model (a fraction in (0, 1] or a
        count) get ``retrieval``, the others ``streaming``. A layer whose heads all agree gets that
        policy itself. Pass the list as ``StreamingCache(..., layer_policies=...)``."""
        from streamattn.policies.profile import load_profile, top_heads

        profile = load_profile(profile)
        chosen = top_heads(profile, heads)
        kv_heads = profile["kv_heads"]
        return [cls_or_plain(PerHead.split(kv_heads, sorted(c), retrieval, streaming)) for c in chosen]

    @property
    def kv_heads(self) -> int:
        return len(self.heads)

    @property
    def groups(self) -> list[tuple[Policy, list[int]]]:
        """The distinct policies, in order of first appearance, with the kv heads of each."""
        out: dict[Policy, list[int]] = {}
        for h, p in enumerate(self.heads):
            out.setdefault(p, []).append(h)
        return list(out.items())

    @property
    def name(self) -> str:
        return "perhead_" + "+".join(f"{len(hs)}x{p.name}" for p, hs in self.groups)

    @property
    def capacity(self) -> int | None:
        caps = [p.capacity for p in self.heads]
        return None if None in caps else max(caps)

    def to_config(self) -> dict[str, Any]:
        return {"type": "PerHead", "heads": [p.to_config() for p in self.heads]}


def cls_or_plain(policy: PerHead) -> Policy:
    """The one policy of a ``PerHead`` whose heads all agree, else the ``PerHead``."""
    groups = policy.groups
    return groups[0][0] if len(groups) == 1 else policy
