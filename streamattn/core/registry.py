"""Engines chosen by policy type: ``StreamingAttention`` asks ``engine_for(policy)``.

An engine realises one kind of policy in bounded memory. It holds configuration and derived
constants, never a stream: every method takes the ``StreamState`` it works on.

    new_state(b, hkv, d, dtype, device) -> StreamState
    spec -> StateSpec                          # what a saved state must be: spec.load(raw) validates it
    check_inputs(hkv, d)                       # policy-specific input checks (ValueError), before any change
    forward(state, q, k, v, counts) -> out     # counts[b]: valid tokens of stream b (right padding)
    slot_index(state) -> [B, Hkv, N] int64     # stream index held by each slot (EMPTY: none)
    cached(state) -> list[int]                 # keys held per stream

Register with ``@register_engine(PolicyType, ...)``; the constructor takes
``(policy, rope, positions, scale, rebase_every, block_size)``.
"""

from __future__ import annotations

from typing import Any

_ENGINES: dict[type, type] = {}


def register_engine(*policy_types: type):
    """Class decorator: ``engine_cls`` realises every policy of ``policy_types``."""

    def register(engine_cls: type) -> type:
        for policy_type in policy_types:
            if policy_type in _ENGINES and _ENGINES[policy_type] is not engine_cls:
                raise ValueError(f"{policy_type.__name__} already has the engine {_ENGINES[policy_type].__name__}")
            _ENGINES[policy_type] = engine_cls
        return engine_cls

    return register


def engine_for(policy: Any) -> type:
    """The engine class registered for ``type(policy)``; ``TypeError`` naming the known policies."""
    engine_cls = _ENGINES.get(type(policy))
    if engine_cls is None and getattr(policy, "kind", None) == "encoder":
        raise TypeError(
            f"{policy!r} is an encoder policy: its outputs come chunk by chunk, not one per token, so the "
            "decoder operator StreamingAttention does not realise it; use streamattn.ChunkedAttention "
            "(or an AttentionStage of a streamattn.StreamingEncoder)"
        )
    if engine_cls is None:
        known = ", ".join(sorted(t.__name__ for t in _ENGINES))
        raise TypeError(f"no engine realises policy {policy!r}; policies with an engine: {known}")
    return engine_cls


def registered() -> dict[type, type]:
    """A copy of the policy type -> engine class table."""
    return dict(_ENGINES)
