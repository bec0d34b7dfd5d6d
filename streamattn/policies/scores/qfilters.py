"""Q-Filters: score keys by their projection on each head's dominant query direction.

Godey et al., "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression" (2025,
arXiv:2503.02812). Queries and keys of a head are anisotropic: the queries concentrate around one
direction ``f``, so ``E[<q, k>] ~ <f, k>`` up to a positive factor and the keys with the largest
projection on ``f`` draw the most attention. ``f`` is the first right-singular vector of a sample
of the model's own queries, signed so the queries project positively on it (one per kv head:
queries of a GQA group are pooled). streamattn projects *un-rotated* queries and keys, so the score
does not depend on where a key sits; ``streamattn.hf.calibrate_qfilters`` computes the directions
for a transformers model. Needs no attention weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class QFilters:
    """Score ``<f_h, k>`` with ``directions[h]`` the unit query direction ``f_h`` of kv head ``h``."""

    directions: tuple[tuple[float, ...], ...]

    observe = 0
    kernel = 1

    def __post_init__(self) -> None:
        rows = self.directions
        if isinstance(rows, torch.Tensor):
            rows = tuple(tuple(float(x) for x in row) for row in rows.tolist())
            object.__setattr__(self, "directions", rows)
        if not isinstance(rows, (tuple, list)) or not rows or not all(isinstance(r, (tuple, list)) for r in rows):
            raise ValueError("QFilters: directions must be one vector per kv head ([Hkv][D] numbers)")
        rows = tuple(tuple(float(x) for x in row) for row in rows)
        object.__setattr__(self, "directions", rows)
        if len({len(r) for r in rows}) != 1 or len(rows[0]) < 1:
            raise ValueError(f"QFilters: every direction needs the same length D >= 1, got {[len(r) for r in rows]}")
        if not all(math.isfinite(x) for r in rows for x in r) or any(not any(r) for r in rows):
            raise ValueError("QFilters: directions must be finite and non-zero")

    @property
    def kv_heads(self) -> int:
        return len(self.directions)

    @property
    def head_dim(self) -> int:
        return len(self.directions[0])

    @property
    def name(self) -> str:
        return "qfilters"

    def check_shape(self, hkv: int, d: int) -> None:
        """``ValueError`` unless keys of ``hkv`` heads of dim ``d`` are what the directions were made for."""
        if (hkv, d) != (self.kv_heads, self.head_dim):
            raise ValueError(
                f"QFilters was calibrated for {self.kv_heads} kv heads of dim {self.head_dim}, "
                f"got keys with Hkv={hkv}, D={d}"
            )

    def key_score(self, k: torch.Tensor) -> torch.Tensor:
        self.check_shape(k.shape[1], k.shape[-1])
        f = torch.tensor(self.directions, dtype=k.dtype, device=k.device)  # [Hkv, D]
        return torch.einsum("bhtd,hd->bht", k, f)

    def to_config(self) -> dict[str, Any]:
        return {"type": "QFilters", "directions": [list(r) for r in self.directions]}
