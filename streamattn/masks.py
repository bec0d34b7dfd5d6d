"""The policies as training masks, so a model trained with them streams with the same outputs.

``positions="absolute"`` streaming is exactly masked attention with RoPE at absolute indices, so a
model trained (or evaluated offline) with these masks gets the same outputs from
``StreamingAttention(..., positions="absolute")`` fed in any chunking. ``positions="cache"``
additionally moves positions (StreamingLLM); no mask alone expresses that.

- ``generate_mask_mod(policy)``: a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``.
- ``generate_sink_window(sinks, window)`` / ``generate_sliding_window(window)`` /
  ``generate_chunked_context(chunk, left, lookahead)``: the same by name.
- ``dense_mask(policy, q_len, kv_len)``: a ``[q_len, kv_len]`` bool mask for SDPA (True = attend).
- ``block_mask(policy, q_len, kv_len)``: a FlexAttention ``BlockMask`` (imported lazily).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from streamattn.policies import ChunkedContext, Policy, SinkWindow

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def generate_mask_mod(policy: Policy, *, q_offset: int = 0) -> MaskMod:
    """FlexAttention ``mask_mod`` of ``policy``; queries start at stream index ``q_offset``."""

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return policy.visible(q_idx + q_offset, kv_idx)

    mask_mod.__name__ = policy.name if q_offset == 0 else f"{policy.name}_from{q_offset}"
    return mask_mod


def generate_sink_window(sinks: int, window: int) -> MaskMod:
    return generate_mask_mod(SinkWindow(sinks=sinks, window=window))


def generate_sliding_window(window: int) -> MaskMod:
    return generate_mask_mod(SinkWindow(sinks=0, window=window))


def generate_chunked_context(chunk: int, left: int | None = None, lookahead: int = 0) -> MaskMod:
    """A streaming encoder's mask (``ChunkedContext``): a chunk, ``left`` frames before it, ``lookahead`` after."""
    return generate_mask_mod(ChunkedContext(chunk=chunk, left=left, lookahead=lookahead))


def dense_mask(
    policy: Policy,
    q_len: int,
    kv_len: int | None = None,
    *,
    q_offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[q_len, kv_len]`` bool mask, True where query ``q_offset + i`` sees key ``j``."""
    kv_len = q_offset + q_len if kv_len is None else kv_len
    q_idx = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    kv_idx = torch.arange(kv_len, device=device)[None, :]
    return policy.visible(q_idx, kv_idx)


def block_mask(
    policy: Policy,
    q_len: int,
    kv_len: int | None = None,
    *,
    device: torch.device | str = "cpu",
    block_size: int = 128,
):  # -> torch.nn.attention.flex_attention.BlockMask
    """FlexAttention ``BlockMask`` of ``policy`` (queries from stream index 0)."""
    from torch.nn.attention.flex_attention import create_block_mask  # optional backend, lazily

    kv_len = q_len if kv_len is None else kv_len
    return create_block_mask(generate_mask_mod(policy), None, None, q_len, kv_len, device=device, BLOCK_SIZE=block_size)
