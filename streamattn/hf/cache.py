"""``StreamingCache``: a transformers ``Cache`` whose layers are streamattn engines.

How it plugs in (transformers 5.x extension points only):

- each decoder layer's cache is a ``StreamingLayer`` (``CacheLayerMixin``). Its ``update()`` does not
  concatenate anything: it hands the new keys/values to the ``"streamattn"`` attention function;
- ``"streamattn"`` is registered in ``AttentionInterface``; ``StreamingCache`` switches the model to
  it with ``model.set_attn_implementation("streamattn")``. It is not in the mask registry, so
  transformers skips building masks (the engine knows its own visibility);
- positions: the model rotates q/k at its ``position_ids`` before the cache sees them. The
  attention function undoes that rotation with the model's own cos/sin (so any fp32 error in them
  cancels) and the engine applies exact positions itself. ``Stream`` feeds ``position_ids = 0``,
  which makes the model's rotation the identity;
- padding: a forward pre-hook on the model reads the 2-D ``attention_mask`` it is called with (as
  ``generate`` does for batched, left-padded prompts). Padding tokens never enter a stream: each
  row's valid tokens are moved to the front and the engine is told how many there are.
"""

from __future__ import annotations

import contextvars
import math

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

import streamattn as sa

ATTN_IMPLEMENTATION = "streamattn"
_PENDING: contextvars.ContextVar[StreamingLayer | None] = contextvars.ContextVar("streamattn_pending", default=None)


def rope_from_config(config) -> sa.RoPE:
    """The model's RoPE as a ``streamattn.RoPE``; a clear error for what is not supported."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"{config.model_type}: no RoPE in its config; streamattn streams RoPE decoder models only")
    if rope_type != "default":
        raise NotImplementedError(f"{config.model_type}: rope_type {rope_type!r} is not supported yet (only 'default')")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary = int(head_dim * params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)))
    if rotary != head_dim:
        raise NotImplementedError(
            f"{config.model_type}: partial rotary ({rotary} of {head_dim} dims) is not supported yet"
        )
    return sa.RoPE(head_dim=head_dim, theta=float(theta))


class StreamingLayer(CacheLayerMixin):
    """One decoder layer's streams: a ``StreamingAttention`` whose state is this layer's cache."""

    def __init__(self, attn: sa.StreamingAttention, cache: StreamingCache) -> None:
        super().__init__()
        self.attn, self.cache = attn, cache
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.pending = (key_states, value_states)  # consumed by the "streamattn" attention function
        _PENDING.set(self)
        return key_states, value_states

    def get_seq_length(self) -> int:
        return max(self.attn.seen, default=0)

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return query_length + max(self.attn.cached, default=0), 0

    def get_max_length(self) -> int:
        capacity = self.attn.policy.capacity
        return -1 if capacity is None else capacity


class StreamingCache(Cache):
    """Streams every layer of ``model`` with ``policy`` (positions default to StreamingLLM's)."""

    def __init__(self, model, policy: sa.Policy | None = None, positions: str = "cache") -> None:
        config = model.config.get_text_config()
        self.rope = rope_from_config(config)
        self.policy = sa.SinkWindow() if policy is None else policy
        layers = [
            StreamingLayer(sa.StreamingAttention(self.policy, self.rope, positions), self)
            for _ in range(config.num_hidden_layers)
        ]
        super().__init__(layers=layers)
        self.rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
        if self.rotary is None:
            raise ValueError(f"{type(model).__name__}: no rotary embedding module found; RoPE models only")
        self._unrotation: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self.lengths: list[int] | None = None  # valid tokens per stream of the current forward (ragged batches)
        # from a padding mask, once per forward: (valid tokens per row, index moving them to the
        # front [B, T], its inverse or None when no row is left-padded)
        self.valid: tuple[list[int], torch.Tensor, torch.Tensor | None] | None = None
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        for module in {id(model): model, id(model.base_model): model.base_model}.values():
            if not getattr(module, "_streamattn_padding_hook", False):
                module.register_forward_pre_hook(_read_padding, with_kwargs=True)
                module._streamattn_padding_hook = True

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's stream state (keys, values, sink copies)."""
        return sum(layer.attn.state.nbytes for layer in self.layers if layer.attn.state is not None)

    def unrotate(self, query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None):
        """Undo the model's RoPE with its own cos/sin (computed once per forward, shared by layers)."""
        if position_ids is None:
            raise ValueError("the 'streamattn' attention function needs position_ids from the model")
        cached = self._unrotation
        if cached is None or cached[0] is not position_ids:
            if not bool(position_ids.any()):  # position 0 (what Stream feeds): the model's rotation is the identity
                cached = (position_ids, None, None)
            else:
                cos, sin = self.rotary(query, position_ids)  # [B, T, D], exactly what the model applied
                cached = (position_ids, cos[:, None], sin[:, None])
            self._unrotation = cached
        _, cos, sin = cached
        if cos is None:
            return query, key
        return sa.core.apply_rotary(query, cos, -sin), sa.core.apply_rotary(key, cos, -sin)


def _read_padding(module, args, kwargs):
    """Forward pre-hook: the valid tokens of each row of this call, from a 2-D ``attention_mask``.

    Raises (before any layer runs, so no stream changes) when a row's valid tokens are not one
    contiguous run: left and right padding are supported, holes are not.
    """
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, StreamingCache):
        return None
    cache.valid = None
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    x = kwargs.get("input_ids", args[0] if args else None)
    x = kwargs.get("inputs_embeds") if x is None else x
    if x is None:
        return None
    current = mask[:, -x.shape[1] :].bool()  # columns of the tokens of this call
    if bool(current.all()):
        return None
    counts = current.sum(dim=1)
    first = torch.where(counts > 0, current.int().argmax(dim=1), 0)
    span = torch.arange(current.shape[1], device=current.device)[None]
    if not torch.equal(current, (span >= first[:, None]) & (span < (first + counts)[:, None])):
        raise ValueError(
            "attention_mask: each row's valid tokens must be one contiguous run (left or right padding); "
            "got padding between valid tokens"
        )
    back = None
    index = (span + first[:, None]) % current.shape[1]
    if bool(first.any()):
        back = (span - first[:, None]) % current.shape[1]
    cache.valid = (counts.tolist(), index, back)
    return None


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, D]`` with its tokens reordered per row by ``index [B, T]``."""
    return x.gather(2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def streamattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: the streamattn engine of the layer that was just updated."""
    layer = _PENDING.get()
    if layer is None or layer.pending is None or layer.pending[0] is not key:
        raise RuntimeError(
            "attention implementation 'streamattn' runs only with a StreamingCache as past_key_values "
            "(pass past_key_values=StreamingCache(model, ...) or use streamattn.hf.Stream)"
        )
    layer.pending = None
    if scaling is not None and not math.isclose(scaling, query.shape[-1] ** -0.5, rel_tol=1e-6):
        raise NotImplementedError(f"attention scaling {scaling} != 1/sqrt(head_dim) is not supported yet")
    if dropout:
        raise NotImplementedError("streamattn is an inference operator: attention dropout must be 0")
    if attention_mask is not None:
        raise NotImplementedError(
            "streamattn builds its own visibility from the policy; a prepared (4-D) attention mask is not supported"
        )
    cache = layer.cache
    q, k = cache.unrotate(query, key, kwargs.get("position_ids"))
    v, lengths, back = value, cache.lengths, None
    if cache.valid is not None:  # from a padding mask: valid tokens to the front of each row
        lengths, index, back = cache.valid
        if index.shape != q.shape[::2]:
            raise ValueError(f"attention_mask covers {tuple(index.shape)} tokens, the call {tuple(q.shape[::2])}")
        if back is not None:
            index = index.to(q.device)
            q, k, v = _gather_tokens(q, index), _gather_tokens(k, index), _gather_tokens(v, index)
    out = layer.attn(q, k, v, lengths=lengths)  # [B, Hq, T, D]; padding never enters the state
    if back is not None:
        out = _gather_tokens(out, back.to(q.device))
    return out.transpose(1, 2).contiguous(), None  # transformers expects [B, T, H, D]


AttentionInterface.register(ATTN_IMPLEMENTATION, streamattn_attention)
