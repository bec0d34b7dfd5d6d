"""Reading texts (the shipped *Emma* by default) and per-segment statistics of a scored stream."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[1] / "data" / "emma.txt.gz"


def read_text(path: str | Path | None = None) -> str:
    """The text of ``path`` (``.txt`` or ``.gz``, UTF-8); the shipped *Emma* when ``None``."""
    path = DEFAULT_TEXT if path is None else Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return f.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None


def segment_stats(positions, nll, ms_per_token, rss_mb, size: int) -> dict[int, tuple[float, float, float]]:
    """One pass over per-token rows: segment start -> (perplexity, tokens/s, peak RSS).

    Tokens without a score (NaN: a stream's first token) are left out.
    """
    acc: dict[int, list[float]] = {}
    for p, n, ms, rss in zip(positions, nll, ms_per_token, rss_mb, strict=True):
        if math.isnan(n):
            continue
        a = acc.setdefault(p // size * size, [0.0, 0, 0.0, 0.0])
        a[0], a[1], a[2], a[3] = a[0] + n, a[1] + 1, a[2] + ms, max(a[3], rss)
    return {s: (math.exp(a[0] / a[1]), 1e3 * a[1] / a[2], a[3]) for s, a in sorted(acc.items())}
