"""H2O: keep the "heavy hitters", the keys with the most attention accumulated so far.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023 (arXiv:2306.14048). The score of a key is the sum, over every query that
attended while it was held (its own query included), of the weight given to it (averaged over the
query heads of its kv head). It is never reset, so old keys that kept drawing attention stay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class H2O:
    """Score = attention accumulated by the key since it entered."""

    observe = None
    kernel = 1

    @property
    def name(self) -> str:
        return "h2o"

    def key_score(self, k: torch.Tensor) -> None:
        return None

    def to_config(self) -> dict[str, Any]:
        return {"type": "H2O"}
