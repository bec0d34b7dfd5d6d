"""Streaming attention policies: one small dataclass per file."""

from __future__ import annotations

from typing import Any

from streamattn.policies import scores
from streamattn.policies.base import IndexPolicy, Policy, WindowPolicy
from streamattn.policies.chunked_context import ChunkedContext
from streamattn.policies.compressed import Compressed
from streamattn.policies.full import Full
from streamattn.policies.per_head import PerHead
from streamattn.policies.per_layer import PerLayer
from streamattn.policies.retrieval import PLACEMENT_FIELDS, Retrieval
from streamattn.policies.sink_window import SinkWindow

_REGISTRY: dict[str, type] = {
    "SinkWindow": SinkWindow,
    "Full": Full,
    "Compressed": Compressed,
    "PerHead": PerHead,
    "PerLayer": PerLayer,
    "Retrieval": Retrieval,
    "ChunkedContext": ChunkedContext,
}


def policy_from_config(config: dict[str, Any]) -> Policy:
    """Inverse of ``policy.to_config()``; raises ``ValueError`` on an unknown or malformed config."""
    if not isinstance(config, dict) or config.get("type") not in _REGISTRY:
        raise ValueError(
            f"unknown policy config {config!r}; expected a dict whose 'type' is one of {sorted(_REGISTRY)}"
        )
    fields = {k: v for k, v in config.items() if k != "type"}
    try:
        return _REGISTRY[config["type"]](**fields)
    except TypeError as exc:
        raise ValueError(f"malformed policy config {config!r}: {exc}") from None


def state_config(config: Any) -> Any:
    """``to_config()`` output without what places a policy's buffers but changes no result (a
    ``Retrieval``'s ``store`` / ``store_dir``): what a saved state must match to be loaded, so a
    stream saved with its store on the GPU resumes with the store on disk, and back."""
    if isinstance(config, dict):
        retrieval = config.get("type") == "Retrieval"
        # every=1 is how states were saved before the field existed: they stay loadable
        drop = lambda k, v: retrieval and (k in PLACEMENT_FIELDS or (k == "every" and v == 1))  # noqa: E731
        return {k: state_config(v) for k, v in config.items() if not drop(k, v)}
    if isinstance(config, (list, tuple)):
        return [state_config(x) for x in config]
    return config


from streamattn.policies.spec import parse_policy  # noqa: E402  (the spec grammar builds on the registry)

__all__ = [
    "ChunkedContext",
    "Compressed",
    "Full",
    "IndexPolicy",
    "PerHead",
    "PerLayer",
    "Policy",
    "Retrieval",
    "SinkWindow",
    "WindowPolicy",
    "parse_policy",
    "policy_from_config",
    "scores",
    "state_config",
]
