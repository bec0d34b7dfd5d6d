"""K-norm: keep the keys of *low* L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression", EMNLP 2024
(arXiv:2406.11430): keys with a low norm draw high attention, so the score is ``-||k||`` of the
un-rotated key (RoPE preserves norms, so rotated or not is the same). Needs no attention weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KeyNorm:
    """Score ``-||k||_2``: the lowest-norm keys are kept."""

    observe = 0
    kernel = 1

    @property
    def name(self) -> str:
        return "knorm"

    def key_score(self, k: torch.Tensor) -> torch.Tensor:
        return -torch.linalg.vector_norm(k, dim=-1)

    def to_config(self) -> dict[str, Any]:
        return {"type": "KeyNorm"}
