"""Scorers of ``Compressed``: one small file each, the paper cited in its docstring."""

from __future__ import annotations

from typing import Any

from streamattn.policies.scores.base import Scorer
from streamattn.policies.scores.h2o import H2O
from streamattn.policies.scores.key_norm import KeyNorm
from streamattn.policies.scores.qfilters import QFilters
from streamattn.policies.scores.snapkv import SnapKV
from streamattn.policies.scores.tova import TOVA

_REGISTRY: dict[str, type] = {"KeyNorm": KeyNorm, "TOVA": TOVA, "H2O": H2O, "SnapKV": SnapKV, "QFilters": QFilters}


def scorer_from_config(config: Any) -> Scorer:
    """Inverse of ``scorer.to_config()``; ``ValueError`` on an unknown or malformed config."""
    if not isinstance(config, dict) or config.get("type") not in _REGISTRY:
        raise ValueError(
            f"unknown scorer config {config!r}; expected a dict whose 'type' is one of {sorted(_REGISTRY)}"
        )
    try:
        return _REGISTRY[config["type"]](**{k: v for k, v in config.items() if k != "type"})
    except TypeError as exc:
        raise ValueError(f"malformed scorer config {config!r}: {exc}") from None


__all__ = ["H2O", "TOVA", "KeyNorm", "QFilters", "Scorer", "SnapKV", "scorer_from_config"]
