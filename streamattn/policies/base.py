"""What every attention policy provides, by kind.

A policy is a small frozen dataclass: pure configuration, no tensors. Its *kind* says which engine
family realises it (``streamattn.core.registry`` maps policy types to engines):

- ``"index"``: which keys a query may see is a rule on stream indices, ``visible(q_idx, kv_idx)``.
  The same rule is the training mask (``streamattn.masks``) and the reference's literal rule.
  ``SinkWindow`` and ``Full`` are index rules whose visible set is "first ``sinks`` + last
  ``window``" (``WindowPolicy``): the sinks + window engine realises them in fixed buffers.
- ``"eviction"`` (``Compressed``: score-based eviction to a budget), ``"memory"`` (``Retrieval``:
  retrieval of evicted blocks), ``"per_head"`` (``PerHead``): each with its own engine and a literal
  fp64 replay in ``streamattn.reference``; planned: ``"encoder"`` (chunked encoders with left
  context and lookahead).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Policy(Protocol):
    """Every policy: a name (for files and plots), its kind, and a config that round-trips
    through ``streamattn.policy_from_config``."""

    kind: str
    name: str

    def to_config(self) -> dict[str, Any]: ...


@runtime_checkable
class IndexPolicy(Policy, Protocol):
    """``visible(q_idx, kv_idx)`` takes integer tensors of absolute stream indices (broadcastable) and
    returns a bool tensor: True where query ``q_idx`` may attend to key ``kv_idx``. Written with
    tensor ops only, so it serves as a FlexAttention ``mask_mod`` as well. ``capacity`` is the most
    keys a query ever sees (``None``: unbounded)."""

    capacity: int | None

    def visible(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class WindowPolicy(IndexPolicy, Protocol):
    """An index rule whose visible set is the first ``sinks`` tokens and the last ``window`` ones
    (``window=None``: every token): what the sinks + window engine reads."""

    sinks: int
    window: int | None


def check_int(owner: str, name: str, value: object, minimum: int) -> None:
    """Raise a ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
