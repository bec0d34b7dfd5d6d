"""What every attention policy provides.

A policy is a small frozen dataclass that says *which keys a query may see*. It is pure
configuration: it owns no tensors. The engine that realises a policy in bounded memory lives in
``streamattn.core``; the same policy also produces training masks (``streamattn.masks``) and is
checked against the literal rules in ``streamattn.reference``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Policy(Protocol):
    """Protocol of a streaming policy.

    ``visible(q_idx, kv_idx)`` takes integer tensors of absolute stream indices (broadcastable)
    and returns a bool tensor: True where query ``q_idx`` may attend to key ``kv_idx``. It must be
    written with tensor ops only, so it serves as a FlexAttention ``mask_mod`` as well.
    """

    name: str

    def visible(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor: ...

    def to_config(self) -> dict[str, Any]: ...


def check_int(owner: str, name: str, value: object, minimum: int) -> None:
    """Raise a ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
