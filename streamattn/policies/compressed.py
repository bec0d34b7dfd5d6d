"""Score-based KV eviction to a fixed budget per kv head (H2O, TOVA, SnapKV, K-norm, Q-Filters).

The rule, exactly (the fp64 replay ``streamattn.reference.replay`` implements it literally):

1. Every token's key enters the cache of every kv head when its query arrives; a query attends to
   every key its kv head holds at that moment, its own included.
2. **Eviction points** are fixed stream indices: after the token at index ``n - 1`` when
   ``n % every == 0``, i.e. where the stream has consumed a multiple of ``every`` tokens, whatever
   the chunking. At a point, a kv head holding more than ``budget`` keys drops keys until it holds
   ``budget``: the sinks (index ``< sinks``) and the last ``window`` tokens (index ``>= n - window``)
   are never dropped; of the others the lowest *score* goes first, and among equal scores the older
   key (smaller stream index). Heads decide independently.
3. Scores (``score``, a scorer of ``streamattn.scores``) accumulate per kv head as the scorer says:
   a function of the key, or attention weights of observed queries (mean over the query heads of
   the kv head), optionally max-pooled over neighbouring held keys at the point.
4. So a kv head holds at most ``budget + every`` keys (``budget`` right after a point), and the
   engine allocates exactly that many slots.

Positions (``StreamingAttention(positions=...)``): ``"absolute"``: a key sits at its stream index;
``"cache"``: at its rank among the keys its head holds when attended (the query at the last rank),
StreamingLLM's rule, which keeps positions below ``budget + every`` however long the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from streamattn.policies.base import check_int
from streamattn.policies.scores import TOVA, Scorer, scorer_from_config


@dataclass(frozen=True)
class Compressed:
    """Keep ``sinks`` + the last ``window`` + the best-scored keys, ``budget`` per kv head in all."""

    sinks: int = 4
    window: int = 64
    budget: int = 1024
    score: Scorer = field(default_factory=TOVA)
    every: int = 64
    kind: ClassVar[str] = "eviction"

    def __post_init__(self) -> None:
        check_int("Compressed", "sinks", self.sinks, 0)
        check_int("Compressed", "window", self.window, 1)
        check_int("Compressed", "every", self.every, 1)
        check_int("Compressed", "budget", self.budget, self.sinks + self.window)
        if isinstance(self.score, dict):
            object.__setattr__(self, "score", scorer_from_config(self.score))
        if not isinstance(self.score, Scorer):
            raise ValueError(f"Compressed: score must be a scorer of streamattn.scores, got {self.score!r}")
        observe = self.score.observe
        if observe is not None and observe > self.every:
            raise ValueError(
                f"Compressed: the scorer observes the last {observe} queries before each eviction point, "
                f"more than every={self.every} tokens between points; use every >= {observe}"
            )

    @property
    def name(self) -> str:
        return f"{self.score.name}_sink{self.sinks}_window{self.window}_budget{self.budget}_every{self.every}"

    @property
    def capacity(self) -> int:
        """Most keys a kv head holds (and a query sees): ``budget + every``."""
        return self.budget + self.every

    @property
    def first_eviction(self) -> int:
        """Tokens consumed at the first eviction point that evicts: the first multiple of ``every`` > ``budget``."""
        return (self.budget // self.every + 1) * self.every

    def held(self, n: int) -> int:
        """Keys every kv head holds after ``n`` tokens (all heads hold the same count)."""
        return n if n < self.first_eviction else self.budget + n % self.every

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "Compressed",
            "sinks": self.sinks,
            "window": self.window,
            "budget": self.budget,
            "score": self.score.to_config(),
            "every": self.every,
        }
