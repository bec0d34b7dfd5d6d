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


def cat_rerotate_hf_cache(model, sinks: int, window: int):
    """transformers 4.x ``SinkCache`` / ``attention_sinks`` for a transformers model: a ``Cache``
    whose layers keep keys rotated at their cache slot, and on every eviction re-rotate the whole
    window back by the number of evicted tokens and ``torch.cat`` sinks + window + new tokens.

    The caller passes ``position_ids = cache.next_positions(T)`` (cache slots). Within a chunk the
    window is the classic approximation (the first token of a chunk sees fewer than ``window``
    keys); token by token it is StreamingLLM's semantics.
    """
    from transformers.cache_utils import Cache, DynamicLayer

    from streamattn.hf.cache import rope_from_config

    rope = rope_from_config(model.config.get_text_config())
    capacity = sinks + window

    class CatRerotateLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            keep = max(capacity - key_states.shape[2], sinks)  # old keys kept so that the result fits
            if self.keys.numel() and self.keys.shape[2] > keep:
                shift = self.keys.shape[2] - keep  # evicted tokens: the window slides back by this many
                window_k = rope.rotate(self.keys[:, :, sinks + shift :], torch.tensor(-shift))
                self.keys = torch.cat((self.keys[:, :, :sinks], window_k), dim=2)
                self.values = torch.cat((self.values[:, :, :sinks], self.values[:, :, sinks + shift :]), dim=2)
            self.keys = torch.cat((self.keys, key_states), dim=2)
            self.values = torch.cat((self.values, value_states), dim=2)
            return self.keys, self.values

        def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
            return min(self.get_seq_length(), max(capacity - query_length, sinks)) + query_length, 0

    class CatRerotateCache(Cache):
        def __init__(self):
            config = model.config.get_text_config()
            super().__init__(layers=[CatRerotateLayer() for _ in range(config.num_hidden_layers)])

        def next_positions(self, t: int) -> torch.Tensor:
            held = self.layers[0].get_seq_length()
            start = min(held, max(capacity - t, sinks))
            return torch.arange(start, start + t)[None]

    return CatRerotateCache()
