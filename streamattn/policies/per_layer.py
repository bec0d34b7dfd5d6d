"""A policy per decoder layer, for a whole model (``StreamingCache(model, PerLayer(...))``).

What calibration produces: Q-Filter directions differ per layer, and DuoAttention-style retrieval
heads are chosen over the whole model, so each layer gets its own ``Compressed`` or ``PerHead``.
Layers the model itself runs with a sliding window keep that window (as with any policy); pass
``layer_policies`` to ``StreamingCache`` to override those too. Not an attention policy itself:
``StreamingAttention`` takes one of its layers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from streamattn.policies.base import Policy


@dataclass(frozen=True)
class PerLayer:
    """``layers[i]``: the policy of decoder layer ``i``."""

    layers: tuple[Policy, ...]
    label: str = "per-layer"
    kind: ClassVar[str] = "per_layer"

    def __post_init__(self) -> None:
        from streamattn.policies import policy_from_config

        layers = self.layers
        if not isinstance(layers, Sequence) or isinstance(layers, str) or not layers:
            raise ValueError(f"PerLayer: layers must be a non-empty sequence of policies, got {layers!r}")
        layers = tuple(policy_from_config(p) if isinstance(p, Mapping) else p for p in layers)
        for i, p in enumerate(layers):
            if isinstance(p, PerLayer) or not isinstance(p, Policy):
                raise ValueError(f"PerLayer: layer {i} must be an attention policy, got {p!r}")
        object.__setattr__(self, "layers", layers)
        if not isinstance(self.label, str) or not self.label:
            raise ValueError(f"PerLayer: label must be a non-empty str, got {self.label!r}")

    @property
    def name(self) -> str:
        return self.label

    @property
    def capacity(self) -> int | None:
        caps = [p.capacity for p in self.layers]
        return None if None in caps else max(caps)

    def to_config(self) -> dict[str, Any]:
        return {"type": "PerLayer", "layers": [p.to_config() for p in self.layers], "label": self.label}
