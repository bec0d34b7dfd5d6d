"""What a scorer is: how the budget engine ranks the keys it may evict.

A scorer is a frozen dataclass of configuration (no tensors) that says, per kv head, what each held
key's *score* accumulates; at each eviction point the engine keeps the highest scores (see
``streamattn.policies.Compressed`` for the exact rule). Two families:

- key-only (``observe == 0``): the score is a function of the key alone, fixed when it is written
  (``key_score``): ``KeyNorm``, ``QFilters``;
- attention-based: the score accumulates ``mean over the query heads of the kv head`` of the
  attention weight a query gives the key. ``observe = n`` counts the ``n`` queries right before each
  eviction point and resets after it (``TOVA``: n = 1, ``SnapKV``: its window); ``observe = None``
  counts every query since the key entered and never resets (``H2O``). ``kernel > 1`` max-pools the
  scores over neighbouring held keys (in stream order) at eviction time (``SnapKV``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Scorer(Protocol):
    name: str
    observe: int | None
    kernel: int

    def key_score(self, k: torch.Tensor) -> torch.Tensor | None:
        """``[B, Hkv, T]`` scores of un-rotated keys ``k [B, Hkv, T, D]`` (key-only scorers), else None."""
        ...

    def to_config(self) -> dict[str, Any]: ...


def check_odd(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"{owner}: {name} must be an odd int >= 1, got {value!r}")
