"""Chunks with a bounded left context and a lookahead: the attention of streaming speech encoders.

Streaming ASR encoders attend within a chunk of frames, to a bounded number of earlier chunks (their
keys and values cached) and to a few frames after the chunk: WeNet's U2 dynamic chunks (Zhang et
al., "Unified Streaming and Non-streaming Two-pass End-to-end Model for Speech Recognition",
arXiv:2012.05481), NeMo's cache-aware Conformer (Noroozi et al., "Stateful Conformer with Cache-based
Inference for Streaming Automatic Speech Recognition", arXiv:2312.17279), Emformer (Shi et al.,
arXiv:2010.10759; its right context). ``streamattn.ChunkedAttention`` realises it in bounded state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from streamattn.policies.base import check_int


@dataclass(frozen=True)
class ChunkedContext:
    """Frame ``t`` is in chunk ``c = t // chunk``; query frame ``t`` sees key frame ``j`` iff

        ``j // chunk >= c - left // chunk``   (always true when ``left is None``)
        ``and j < (c + 1) * chunk + lookahead``

    so a query sees its whole chunk, the ``left / chunk`` chunks before it and the ``lookahead``
    frames after its chunk (``left=None``: every earlier chunk). Every query of a chunk sees the same
    keys, so a chunk's outputs are all known once frame ``(c + 1) * chunk + lookahead - 1`` arrived.

    Args:
        chunk: frames per chunk, >= 1.
        left: left context in frames, a multiple of ``chunk`` (>= 0), or ``None`` (unbounded).
        lookahead: frames after the chunk every query of the chunk sees, >= 0.
    """

    chunk: int
    left: int | None = None
    lookahead: int = 0
    kind: ClassVar[str] = "encoder"

    def __post_init__(self) -> None:
        check_int("ChunkedContext", "chunk", self.chunk, 1)
        if self.left is not None:
            check_int("ChunkedContext", "left", self.left, 0)
            if self.left % self.chunk:
                raise ValueError(
                    f"ChunkedContext: left must be a multiple of chunk (whole chunks of left context), got "
                    f"left={self.left} with chunk={self.chunk}; e.g. left={self.left // self.chunk * self.chunk} "
                    "or None (unbounded)"
                )
        check_int("ChunkedContext", "lookahead", self.lookahead, 0)

    @property
    def name(self) -> str:
        left = "inf" if self.left is None else self.left
        return f"chunk{self.chunk}_left{left}_ahead{self.lookahead}"

    @property
    def capacity(self) -> int | None:
        """Most keys any query sees: ``left + chunk + lookahead`` (``None`` when ``left`` is)."""
        return None if self.left is None else self.left + self.chunk + self.lookahead

    def visible(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        c = q_idx // self.chunk
        ahead = kv_idx < (c + 1) * self.chunk + self.lookahead
        if self.left is None:
            return ahead
        return ahead & (kv_idx // self.chunk >= c - self.left // self.chunk)

    def to_config(self) -> dict[str, Any]:
        return {"type": "ChunkedContext", "chunk": self.chunk, "left": self.left, "lookahead": self.lookahead}
