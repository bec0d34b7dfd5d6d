"""Calibration profiles (``streamattn calibrate``): per (layer, kv head) facts measured on a model.

A profile is JSON::

    {"format": "streamattn.profile/1", "model": "...", "layers": L, "kv_heads": H, "head_dim": D,
     "retrieval": [[score of each kv head] for each layer],        # attention mass on the answer
     "qfilters": [[[D numbers] for each kv head] for each layer],  # or null
     "calibration": {...how it was measured...}}

``load_profile`` validates it completely (a clear ``ValueError`` naming the problem); the policies
built from it: ``PerHead.from_profile`` and ``qfilters_policies``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FORMAT = "streamattn.profile/1"


def load_profile(profile: Any) -> dict[str, Any]:
    """A validated profile from a path (str/Path) or an already loaded dict."""
    if isinstance(profile, (str, Path)):
        try:
            profile = json.loads(Path(profile).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read the profile {str(profile)!r}: {exc}") from None
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise ValueError(f"not a streamattn profile (expected a dict with format {FORMAT!r})")
    try:
        layers, heads, dim = int(profile["layers"]), int(profile["kv_heads"]), int(profile["head_dim"])
        retrieval = profile["retrieval"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed profile: {exc!r}") from None
    if not (
        isinstance(retrieval, list)
        and len(retrieval) == layers
        and all(isinstance(r, list) and len(r) == heads for r in retrieval)
        and all(isinstance(x, (int, float)) and math.isfinite(x) for r in retrieval for x in r)
    ):
        raise ValueError(f"malformed profile: 'retrieval' must be {layers} lists of {heads} finite numbers")
    q = profile.get("qfilters")
    if q is not None and not (
        isinstance(q, list)
        and len(q) == layers
        and all(
            isinstance(r, list) and len(r) == heads and all(isinstance(f, list) and len(f) == dim for f in r) for r in q
        )
    ):
        raise ValueError(f"malformed profile: 'qfilters' must be [{layers}][{heads}][{dim}] numbers or null")
    return profile


def top_heads(profile: dict[str, Any], heads: float | int) -> list[set[int]]:
    """The kv heads of each layer among the ``heads`` best retrieval scores of the model (ties: lower
    layer, then lower head first). ``heads``: a fraction in (0, 1] or a count >= 0. Layers the model
    runs with a sliding window (``sliding_layers``: they keep their trained window) are not ranked."""
    sliding = set(profile.get("sliding_layers") or [])
    scores = [[] if i in sliding else r for i, r in enumerate(profile["retrieval"])]
    total = sum(len(r) for r in scores)
    if isinstance(heads, bool) or not isinstance(heads, (int, float)):
        raise ValueError(f"heads must be a fraction in (0, 1] or a count, got {heads!r}")
    if isinstance(heads, float):
        if not 0 < heads <= 1:
            raise ValueError(f"heads as a fraction must be in (0, 1], got {heads}")
        count = max(1, round(heads * total))
    else:
        if not 0 <= heads <= total:
            raise ValueError(f"heads as a count must be in [0, {total}], got {heads}")
        count = heads
    ranked = sorted(((-s, li, h) for li, r in enumerate(scores) for h, s in enumerate(r)))[:count]
    chosen: list[set[int]] = [set() for _ in scores]
    for _, li, h in ranked:
        chosen[li].add(h)
    return chosen


def qfilters_policies(profile: Any, *, sinks: int, window: int, budget: int, every: int) -> list:
    """One ``Compressed(..., score=QFilters(directions of that layer))`` per layer."""
    from streamattn.policies.compressed import Compressed
    from streamattn.policies.scores import QFilters

    profile = load_profile(profile)
    if profile.get("qfilters") is None:
        raise ValueError("this profile has no Q-Filter directions (calibrate with --qfilters)")
    return [Compressed(sinks, window, budget, QFilters(layer), every) for layer in profile["qfilters"]]
