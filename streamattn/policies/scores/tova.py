"""TOVA: keep the keys the newest query attends to most.

Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024 (arXiv:2401.06104). At each eviction
point the score of a key is the attention weight the *last* query before that point gave it
(averaged over the query heads of its kv head); nothing is carried between eviction points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TOVA:
    """Score = attention weight of the last query before the eviction point."""

    observe = 1
    kernel = 1

    @property
    def name(self) -> str:
        return "tova"

    def key_score(self, k: torch.Tensor) -> None:
        return None

    def to_config(self) -> dict[str, Any]:
        return {"type": "TOVA"}
