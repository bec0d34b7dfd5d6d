"""Full causal attention: the unbounded baseline every streaming policy is compared with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class Full:
    """Query ``t`` sees every key ``j <= t``. The cache grows with the stream (amortised doubling).

    In the engine it is a window without a bound and without sinks, so ``positions="cache"`` and
    ``"absolute"`` coincide.
    """

    kind: ClassVar[str] = "index"

    @property
    def name(self) -> str:
        return "full"

    @property
    def sinks(self) -> int:
        return 0

    @property
    def window(self) -> None:
        return None

    @property
    def capacity(self) -> None:
        return None

    def visible(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx <= q_idx

    def to_config(self) -> dict[str, Any]:
        return {"type": "Full"}
