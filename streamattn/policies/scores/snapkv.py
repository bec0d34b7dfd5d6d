"""SnapKV: keep the keys an observation window of recent queries attends to, pooled.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024
(arXiv:2404.14469). The paper scores a prompt once, with its last ``window`` queries; streaming, the
same rule runs at every eviction point: a key's score is the attention weight the ``window``
queries right before the point gave it (summed, averaged over the query heads of its kv head), then
max-pooled over its ``kernel`` neighbours among the held keys in stream order (the paper's
``max_pool1d``, so a chosen key keeps its context). Reset after each eviction point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from streamattn.policies.base import check_int
from streamattn.policies.scores.base import check_odd


@dataclass(frozen=True)
class SnapKV:
    """Score = pooled attention of the last ``window`` queries before the eviction point."""

    window: int = 32
    kernel: int = 7

    def __post_init__(self) -> None:
        check_int("SnapKV", "window", self.window, 1)
        check_odd("SnapKV", "kernel", self.kernel)

    @property
    def observe(self) -> int:
        return self.window

    @property
    def name(self) -> str:
        return f"snapkv{self.window}k{self.kernel}"

    def key_score(self, k: torch.Tensor) -> None:
        return None

    def to_config(self) -> dict[str, Any]:
        return {"type": "SnapKV", "window": self.window, "kernel": self.kernel}
