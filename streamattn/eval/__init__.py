"""Helpers that the CLI, the benchmarks and the tests share: texts, per-segment statistics, and the
streaming-recall benchmark (``streamattn.eval.recall``, imported on its own: it needs the ``hf`` extra).

Nothing here imports ``streamattn.cli``; the CLI calls into this package.
"""

from streamattn.eval.text import DEFAULT_TEXT, read_text, segment_stats

__all__ = ["DEFAULT_TEXT", "read_text", "segment_stats"]
