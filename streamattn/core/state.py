"""The explicit, serialisable state of a batch of streams."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StreamState:
    """Everything a batch of ``B`` independent streams carries from one call to the next.

    Layout (``S`` sinks, ring capacity ``C``: the window, or a growing size for ``Full``):

    - ``k``, ``v``: ``[B, Hkv, S + C, D]``. Slots ``[0, S)`` hold the sinks, ``[S, S + C)`` the
      window as a ring (token ``j >= S`` lives in slot ``S + (j - S) % C``). Keys are stored
      RoPE-rotated at ``j - base[b]``; sink slots hold a *display* copy that the decode path keeps
      in the frame of the current query.
    - ``sink_k``: ``[B, Hkv, S, D]`` sinks rotated at ``j - anchor`` (``anchor = S + W - 1``, the
      cache slot of the newest token once the cache is full); ``None`` without RoPE or sinks.
    - ``seen[b]``: tokens stream ``b`` has consumed = absolute index of its next token.
    - ``base[b]``: origin of stream ``b``'s RoPE frame (moved forward to keep angles small).
    """

    k: torch.Tensor
    v: torch.Tensor
    sink_k: torch.Tensor | None
    seen: list[int]
    base: list[int]

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors (constant for a bounded policy once allocated)."""
        tensors = (self.k, self.v) if self.sink_k is None else (self.k, self.v, self.sink_k)
        return sum(t.numel() * t.element_size() for t in tensors)

    def to_dict(self) -> dict[str, object]:
        """A snapshot (cloned tensors, plain ints) that ``torch.save`` can write."""
        return {
            "k": self.k.clone(),
            "v": self.v.clone(),
            "sink_k": None if self.sink_k is None else self.sink_k.clone(),
            "seen": torch.tensor(self.seen, dtype=torch.int64),
            "base": torch.tensor(self.base, dtype=torch.int64),
        }
