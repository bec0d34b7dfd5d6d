"""Attention sinks + sliding window (StreamingLLM).

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(arXiv:2309.17453). Keep the first ``sinks`` tokens of the stream forever and the ``window`` most
recent tokens (the query itself included). ``sinks=0`` is a plain sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from streamattn.policies.base import check_int


@dataclass(frozen=True)
class SinkWindow:
    """Query ``t`` sees key ``j`` iff ``j <= t and (j < sinks or t - j < window)``.

    At most ``sinks + window`` keys are ever visible, so the engine keeps exactly that many.
    """

    sinks: int = 4
    window: int = 1020
    kind: ClassVar[str] = "index"

    def __post_init__(self) -> None:
        check_int("SinkWindow", "sinks", self.sinks, 0)
        check_int("SinkWindow", "window", self.window, 1)

    @property
    def name(self) -> str:
        return f"sink{self.sinks}_window{self.window}"

    @property
    def capacity(self) -> int:
        """Most keys any query sees: the size of the cache."""
        return self.sinks + self.window

    def visible(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return (kv_idx <= q_idx) & ((kv_idx < self.sinks) | (q_idx - kv_idx < self.window))

    def to_config(self) -> dict[str, Any]:
        return {"type": "SinkWindow", "sinks": self.sinks, "window": self.window}
