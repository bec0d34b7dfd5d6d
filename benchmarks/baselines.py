"""The way existing StreamingLLM implementations do it, for comparison (never used by the library).

StreamingLLM's ``enable_streaming_llm``, ``attention_sinks`` and transformers' old ``SinkCache`` keep
un-rotated (or re-rotated) keys, ``torch.cat`` the new token onto the cache, evict by slicing and
concatenating the sinks with the recent window, and apply RoPE to *every* cached key at its cache
slot on every step. Same semantics as ``positions="cache"``; O(window) extra work per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import streamattn as sa


class CatRerotateCache:
    """One decode step at a time: ``step(q, k, v)`` with ``q [B, Hq, 1, D]``, ``k/v [B, Hkv, 1, D]``."""

    def __init__(self, sinks: int, window: int, rope: sa.RoPE) -> None:
        self.sinks, self.window, self.rope = sinks, window, rope
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        if self.k.shape[2] > self.sinks + self.window:  # evict: sinks + most recent window
            s, w = self.sinks, self.window
            self.k = torch.cat((self.k[:, :, :s], self.k[:, :, -w:]), dim=2)
            self.v = torch.cat((self.v[:, :, :s], self.v[:, :, -w:]), dim=2)
        n = self.k.shape[2]
        keys = self.rope.rotate(self.k, torch.arange(n))  # the whole cache, every step
        query = self.rope.rotate(q, torch.tensor([n - 1]))
        return F.scaled_dot_product_attention(query, keys, self.v, enable_gqa=True)
