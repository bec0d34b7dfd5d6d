"""``StreamingCache``: a transformers ``Cache`` whose layers are streamattn engines.

How it plugs in (transformers 5.x extension points only):

- each decoder layer's cache is a ``StreamingLayer`` (``CacheLayerMixin``). Its ``update()`` does not
  concatenate anything: it hands the new keys/values to the ``"streamattn"`` attention function;
- ``"streamattn"`` is registered in ``AttentionInterface``. A ``StreamingCache`` switches its model
  to it while the cache is attached and puts the model back as it was (implementation and hooks)
  when the cache is closed, leaves its ``with`` block or is garbage-collected. It is not in the mask
  registry, so transformers skips building masks (the engine knows its own visibility);
- per-layer patterns: a layer that the model itself runs with a sliding window (``layer_types`` /
  ``sliding_window``; Gemma 3, Mistral, Qwen2) keeps exactly that window (``SinkWindow(0, W)``, its
  own RoPE), so the streamed model equals its dense forward within its trained length; the
  streaming policy applies to the other layers; ``layer_policies`` overrides any layer;
- every argument transformers passes to the attention function is honoured (``scaling``,
  ``sliding_window``, ``position_ids``) or refused with a clear error (``softcap``, dropout,
  prepared masks, packed-sequence arguments, anything unknown): never silently ignored;
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
import inspect
import math
import weakref
from collections.abc import Mapping, Sequence

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

import streamattn as sa

ATTN_IMPLEMENTATION = "streamattn"
_PENDING: contextvars.ContextVar[StreamingLayer | None] = contextvars.ContextVar("streamattn_pending", default=None)
_SLIDING, _FULL = "sliding_attention", "full_attention"


def _rope_params(config, layer_type: str | None) -> dict:
    """The RoPE parameters of ``layer_type`` (Gemma 3 keeps one dict per layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), Mapping):
        return dict(params[layer_type])
    if params and all(isinstance(x, Mapping) for x in params.values()):
        raise ValueError(f"{config.model_type}: RoPE parameters are given per layer type {sorted(params)}; name one")
    return dict(params)


def rope_from_config(config, layer_type: str | None = None) -> sa.RoPE:
    """The RoPE of a model (of its layers of ``layer_type`` when it has several) as a ``streamattn.RoPE``.

    A clear error for what is not supported: no RoPE, scaled RoPE types, partial rotary.
    """
    params = _rope_params(config, layer_type)
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


def layer_types(config) -> list[str]:
    """Each decoder layer's attention type as transformers runs it: ``"sliding_attention"`` (with
    ``config.sliding_window``) or ``"full_attention"``. Without ``config.layer_types`` a model with a
    ``sliding_window`` (Mistral, Phi-3) slides in every layer."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types is None:
        return [_SLIDING if getattr(config, "sliding_window", None) else _FULL] * n
    unknown = sorted({t for t in types if t not in (_SLIDING, _FULL)})
    if unknown:
        raise NotImplementedError(f"{config.model_type}: attention layer types {unknown} are not supported yet")
    return list(types[:n])


def trained_window(config, layer: int) -> int | None:
    """The sliding window the model was trained with at ``layer`` (``None``: full attention)."""
    if layer_types(config)[layer] != _SLIDING:
        return None
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"{config.model_type}: layer {layer} is a sliding-window layer without a valid sliding_window")
    return window


def _attention_modules(model, n: int) -> list[torch.nn.Module | None]:
    """The attention module of each decoder layer (``layer_idx`` attribute), ``None`` if not found."""
    found: list[torch.nn.Module | None] = [None] * n
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and 0 <= idx < n and hasattr(module, "q_proj") and found[idx] is None:
            found[idx] = module
    return found


class StreamingLayer(CacheLayerMixin):
    """One decoder layer's streams: a ``StreamingAttention`` whose state is this layer's cache.

    ``trained_window``: the sliding window the model runs this layer with (``None``: full).
    """

    is_compileable = False

    def __init__(self, attn: sa.StreamingAttention, cache: StreamingCache, trained_window: int | None = None) -> None:
        super().__init__()
        self.attn = attn
        self._cache = weakref.ref(cache)  # no cycle: dropping the cache detaches it from the model at once
        self.trained_window = trained_window
        self.is_sliding = trained_window is not None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def cache(self) -> StreamingCache:
        cache = self._cache()
        if cache is None:
            raise RuntimeError("the StreamingCache of this layer is gone")
        return cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.cache.check_open()
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

    # ------------------------------------------------------------------ what generate() may call
    def reset(self) -> None:
        self.attn.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.attn.state is not None:
            self.attn.select_streams(beam_idx.tolist())

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.attn.state is not None:
            self.attn.select_streams(indices.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.attn.state is not None:
            self.attn.select_streams(torch.arange(self.attn.state.batch_size).repeat_interleave(repeats).tolist())

    def crop(self, max_length: int) -> None:
        raise NotImplementedError(
            "a StreamingCache cannot be cropped: evicted tokens are gone for good, so a stream cannot be "
            "rolled back (assisted/speculative decoding need that). Snapshot and restore instead "
            "(StreamingAttention.state_dict / Stream.state_dict)."
        )

    def offload(self) -> None:
        raise NotImplementedError("a StreamingCache is not offloaded layer by layer; move the model instead")

    def prefetch(self) -> None:
        raise NotImplementedError("a StreamingCache is not offloaded layer by layer; move the model instead")


class StreamingCache(Cache):
    """Streams every layer of ``model``: sliding-window layers keep the model's own window, the others
    run ``policy`` (default ``SinkWindow(4, 1020)``; a ``PerLayer`` gives each layer its own) in
    ``positions`` mode.

    ``layer_policies``: ``{layer: policy}`` (or a list with ``None`` for "as usual") overriding any
    layer, sliding ones included. While the cache is open the model runs the ``"streamattn"``
    attention implementation; ``close()`` (or leaving ``with StreamingCache(...) as cache:``, or
    dropping the last reference) puts the model back as it was.
    """

    def __init__(
        self,
        model,
        policy: sa.Policy | None = None,
        positions: str = "cache",
        *,
        layer_policies: Mapping[int, sa.Policy] | Sequence[sa.Policy | None] | None = None,
    ) -> None:
        config = model.config.get_text_config()
        n = config.num_hidden_layers
        self.policy = sa.SinkWindow() if policy is None else policy
        per_layer = None
        if isinstance(self.policy, sa.PerLayer):  # e.g. from a calibration profile: a policy per layer
            per_layer = self.policy.layers
            if len(per_layer) != n:
                raise ValueError(f"the PerLayer policy has {len(per_layer)} layers; the model has {n}")
        else:
            sa.core.engine_for(self.policy)  # TypeError now, not at the first forward
        overrides = _overrides(layer_policies, n)
        types = layer_types(config)
        modules = _attention_modules(model, n)
        windows = [trained_window(config, i) for i in range(n)]
        softcap = getattr(config, "attn_logit_softcapping", None)
        if softcap is not None:
            raise NotImplementedError(
                f"{config.model_type}: attention logit softcapping ({softcap}) is not supported yet"
            )
        self.layer_types = types
        self.ropes = [rope_from_config(config, types[i] if _per_type(config) else None) for i in range(n)]
        self.rope = self.ropes[types.index(_FULL)] if _FULL in types else self.ropes[0]
        self.rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
        if self.rotary is None:
            raise ValueError(f"{type(model).__name__}: no rotary embedding module found; RoPE models only")
        self._rotary_takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        layers = []
        for i in range(n):
            head_dim = self.ropes[i].head_dim
            scaling = getattr(modules[i], "scaling", None)
            scale = None if scaling is None or math.isclose(scaling, head_dim**-0.5, rel_tol=1e-6) else float(scaling)
            default = self.policy if per_layer is None else per_layer[i]
            layer_policy = overrides.get(i) or (sa.SinkWindow(0, windows[i]) if windows[i] else default)
            attn = sa.StreamingAttention(layer_policy, self.ropes[i], positions, scale)
            layers.append(StreamingLayer(attn, self, windows[i]))
        super().__init__(layers=layers)
        self.layer_policies = [layer.attn.policy for layer in layers]
        self._unrotation: dict[str | None, tuple] = {}
        self.lengths: list[int] | None = None  # valid tokens per stream of the current forward (ragged batches)
        # from a padding mask, once per forward: (valid tokens per row, index moving them to the
        # front [B, T], its inverse or None when no row is left-padded)
        self.valid: tuple[list[int], torch.Tensor, torch.Tensor | None] | None = None
        self._release = weakref.finalize(self, _detach, _attach(model))

    # ------------------------------------------------------------------ attachment
    @property
    def closed(self) -> bool:
        return not self._release.alive

    def close(self) -> None:
        """Put the model back as it was before this cache (once no other open cache uses it)."""
        self._release()

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this StreamingCache is closed (its model is back to its own attention); make a new one")

    def __enter__(self) -> StreamingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def capacity(self) -> int | None:
        """Most keys any layer keeps per stream (``None``: some layer grows without bound)."""
        capacities = [layer.attn.policy.capacity for layer in self.layers]
        return None if None in capacities else max(capacities)

    def cached(self) -> list[int]:
        """Keys held per stream by the layer that holds the most (empty before the first forward)."""
        per_layer = [layer.attn.cached for layer in self.layers if layer.attn.cached]
        return [max(column) for column in zip(*per_layer, strict=True)] if per_layer else []

    @property
    def nbytes(self) -> int:
        """Bytes held by every layer's stream state (keys, values, sink copies)."""
        return sum(layer.attn.state.nbytes for layer in self.layers if layer.attn.state is not None)

    def reset(self) -> None:
        """Forget every stream of every layer (the next forward starts new streams)."""
        super().reset()
        self.lengths, self.valid, self._unrotation = None, None, {}

    def unrotate(self, query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None, layer_type=None):
        """Undo the model's RoPE with its own cos/sin (computed once per forward and layer type)."""
        if position_ids is None:
            raise ValueError("the 'streamattn' attention function needs position_ids from the model")
        cached = self._unrotation.get(layer_type)
        if cached is None or cached[0] is not position_ids:
            if not bool(position_ids.any()):  # position 0 (what Stream feeds): the model's rotation is the identity
                cached = (position_ids, None, None)
            else:
                extra = {"layer_type": layer_type} if self._rotary_takes_type else {}
                cos, sin = self.rotary(query, position_ids, **extra)  # [B, T, D], exactly what the model applied
                cached = (position_ids, cos[:, None], sin[:, None])
            self._unrotation[layer_type] = cached
        _, cos, sin = cached
        if cos is None:
            return query, key
        return sa.core.apply_rotary(query, cos, -sin), sa.core.apply_rotary(key, cos, -sin)


def _per_type(config) -> bool:
    params = getattr(config, "rope_parameters", None) or {}
    return bool(params) and all(isinstance(x, Mapping) for x in params.values())


def _overrides(layer_policies, n: int) -> dict[int, sa.Policy]:
    if layer_policies is None:
        return {}
    if isinstance(layer_policies, Mapping):
        items = dict(layer_policies)
    elif isinstance(layer_policies, Sequence) and not isinstance(layer_policies, str):
        if len(layer_policies) != n:
            raise ValueError(f"layer_policies has {len(layer_policies)} entries; the model has {n} layers")
        items = {i: p for i, p in enumerate(layer_policies) if p is not None}
    else:
        raise TypeError(f"layer_policies must be a dict {{layer: policy}} or a list of {n} policies/None")
    for i, p in items.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise ValueError(f"layer_policies: layer {i!r} is not a layer index in [0, {n})")
        sa.core.engine_for(p)  # TypeError now, not at the first forward
    return items


# ---------------------------------------------------------------------- reversible attachment
def _attach(model) -> torch.nn.Module:
    """Switch ``model`` to the streamattn implementation (counted: several caches may share a model)."""
    record = model.__dict__.get("_streamattn_attached")
    if record is None:
        previous = model.config._attn_implementation
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        targets = {id(model): model, id(model.base_model): model.base_model}.values()
        hooks = [m.register_forward_pre_hook(_read_padding, with_kwargs=True) for m in targets]
        record = model.__dict__["_streamattn_attached"] = {"count": 0, "previous": previous, "hooks": hooks}
    record["count"] += 1
    return model


def _detach(model) -> None:
    record = model.__dict__.get("_streamattn_attached")
    if record is None:
        return
    record["count"] -= 1
    if record["count"] == 0:
        for hook in record["hooks"]:
            hook.remove()
        model.set_attn_implementation(record["previous"])
        del model.__dict__["_streamattn_attached"]


def _read_padding(module, args, kwargs):
    """Forward pre-hook: the valid tokens of each row of this call, from a 2-D ``attention_mask``.

    Raises (before any layer runs, so no stream changes) when a row's valid tokens are not one
    contiguous run: left and right padding are supported, holes are not.
    """
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, StreamingCache):
        return None
    cache.check_open()
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


# ---------------------------------------------------------------------- the attention function
# Keyword arguments transformers may pass that change nothing here when they hold these values.
_INERT = {
    "position_ids": None,  # read below
    "use_cache": None,
    "output_hidden_states": None,
    "return_dict": None,
    "cache_position": None,  # the engine knows each stream's position
    "output_attentions": (None, False),
    "is_causal": (None, True),
    "softcap": (None,),
    "s_aux": (None,),
    "cu_seq_lens_q": (None,),
    "cu_seq_lens_k": (None,),
    "max_length_q": (None,),
    "max_length_k": (None,),
}


def _check_kwargs(layer: StreamingLayer, query: torch.Tensor, scaling, dropout, kwargs: dict) -> None:
    """Honour or refuse every argument of the call: nothing transformers passes is ignored."""
    if dropout:
        raise NotImplementedError("streamattn is an inference operator: attention dropout must be 0")
    if "sliding_window" in kwargs and kwargs["sliding_window"] != layer.trained_window:
        raise NotImplementedError(
            f"the model runs this layer with sliding_window={kwargs['sliding_window']}, but its config says "
            f"{layer.trained_window}; streamattn cannot tell which window this layer was trained with"
        )
    expected = layer.attn.scale if layer.attn.scale is not None else query.shape[-1] ** -0.5
    if scaling is not None and not math.isclose(scaling, expected, rel_tol=1e-6):
        raise NotImplementedError(f"attention scaling {scaling} differs from the {expected} this layer was built with")
    for name, value in kwargs.items():
        if name == "sliding_window":
            continue
        allowed = _INERT.get(name, (None,))
        if allowed is not None and not any(value is a or (a is not None and value == a) for a in allowed):
            raise NotImplementedError(
                f"the attention function received {name}={value!r}, which streamattn does not honour yet "
                f"(accepted: {allowed}); refusing rather than ignoring it"
            )


def streamattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: the streamattn engine of the layer that was just updated."""
    layer = _PENDING.get()
    if layer is None or layer.pending is None or layer.pending[0] is not key:
        raise RuntimeError(
            "attention implementation 'streamattn' runs only with a StreamingCache as past_key_values "
            "(pass past_key_values=StreamingCache(model, ...) or use streamattn.hf.Stream)"
        )
    layer.pending = None
    _check_kwargs(layer, query, scaling, dropout, kwargs)
    if attention_mask is not None:
        raise NotImplementedError(
            "streamattn builds its own visibility from the policy; a prepared (4-D) attention mask is not supported"
        )
    cache = layer.cache
    layer_type = getattr(module, "layer_type", None) if cache._rotary_takes_type else None
    q, k = cache.unrotate(query, key, kwargs.get("position_ids"), layer_type)
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
