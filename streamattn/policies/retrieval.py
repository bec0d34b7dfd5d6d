"""Retrieval memory of evicted blocks (InfLLM's idea: Xiao et al. 2024, "InfLLM: Training-Free
Long-Context Extrapolation for LLMs with an Efficient Context Memory"; block relevance by Quest's
bound: Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference").

The rule, exactly (``streamattn.reference.replay_retrieval`` implements it literally):

1. **Local keys.** Query ``t`` sees the sinks (index ``j < sinks``) and the last ``window`` tokens
   (``t - window < j <= t``), as ``SinkWindow``.
2. **Memory blocks.** Tokens after the sinks are grouped in blocks of ``block`` tokens: block ``b``
   holds indices ``[sinks + b * block, sinks + (b + 1) * block)``. Block ``b`` *enters memory* at the
   first query that no longer sees any of its tokens locally, ``t = sinks + (b + 1) * block - 1 +
   window``: a fixed stream index (whatever the chunking). Tokens that left the window before their
   block entered are seen by no query until it does (at most ``block - 1`` of them).
3. **Retrieval, per query block and kv head.** Queries form *query blocks* of ``every`` stream
   indices (``[a, a + every)`` with ``a`` a multiple of ``every``; ``every=1``: each query alone).
   The first query ``a`` of a query block chooses for all of them, from the blocks in memory then;
   a block that enters later in the query block waits for the next choice. Each memory block has two *bounds* per kv head, the
   elementwise min and max of its keys rotated where queries attend them (below: at their stream
   index, or in cache mode token ``u`` of every block at the same offset); its relevance to query
   ``t`` is Quest's upper bound on the scores the query would give the block's keys there, summed
   over the query heads ``g`` of the kv head: ``sum_g sum_d max(q_gd * lo_d, q_gd * hi_d)`` (``q``
   rotated at its own position in the same frame). Query ``a`` chooses the ``topk`` most relevant
   blocks in memory (higher relevance first, among equal relevance the newer block), all of them if
   fewer are in memory, and every query of its query block attends, besides its local keys, to
   every key of the chosen blocks.
4. **Bounded memory** (``max_blocks=N``): a kv head keeps at most ``N`` blocks. When a block enters
   a full memory, the block least recently retrieved leaves (a block's *stamp* is the last query
   that chose it, or the query at which it entered; lowest stamp leaves, among equal stamps the
   older block), except the blocks chosen for the query block in progress (none at its first
   query, where the entry comes before the choice); heads decide independently. ``every > 1`` needs
   ``max_blocks > topk`` (so that a block can always leave). ``max_blocks=None`` keeps every block
   (the store grows by ``block`` tokens per ``block`` tokens streamed).

So a query attends to at most ``sinks + window + topk * block`` keys, however long the stream.
Choosing scans the bounds of every block in memory (``O(blocks)``, one matrix product); with
``every=E`` it happens once per ``E`` queries, so its cost per token is ``O(blocks / E)``: flat in
practice with a query block of a few dozen tokens (InfLLM retrieves per chunk of queries likewise).

Where the store's keys and values live (``store``) changes no result, only where the bytes are:
``"device"`` (with the attention), ``"cpu"`` (host memory; each step moves only the blocks it
retrieved to the attention device) or ``"disk"`` (memory-mapped files in ``store_dir``, default the
system temp directory, unlinked as soon as they are mapped: the operating system pages the store
in and out, and nothing is left behind). The bounds that relevance reads stay with the attention
(``2 / block`` of the store's bytes).

Positions (``StreamingAttention(positions=...)``): ``"absolute"``: every key at its stream index;
``"cache"`` (StreamingLLM's rule, with InfLLM's treatment of memory): the sinks at ``0 .. s - 1``,
then, if the query retrieved any block, *every* retrieved block at the same ``block`` positions
``s .. s + block - 1`` (token ``u`` of a block at ``s + u``: blocks keep their inner order, not their
order among each other), then the window, the query at the last position. A window key sits at
distance ``t - j``, a retrieved token ``u`` at ``n_window + block - 1 - u``: positions stay below
``sinks + block + window`` however long the stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar

from streamattn.policies.base import check_int

STORES = ("device", "cpu", "disk")  # where a Retrieval store's keys and values live
PLACEMENT_FIELDS = ("store", "store_dir")  # change where bytes are, never a result: not part of a state's identity


@dataclass(frozen=True)
class Retrieval:
    """Sinks + window + the ``topk`` most relevant of the blocks that left the window."""

    sinks: int = 4
    window: int = 1020
    block: int = 128
    topk: int = 4
    max_blocks: int | None = None
    store: str = "device"
    store_dir: str | None = None
    every: int = 1
    kind: ClassVar[str] = "memory"

    def __post_init__(self) -> None:
        check_int("Retrieval", "sinks", self.sinks, 0)
        check_int("Retrieval", "window", self.window, 1)
        check_int("Retrieval", "block", self.block, 1)
        check_int("Retrieval", "topk", self.topk, 1)
        if self.max_blocks is not None:
            check_int("Retrieval", "max_blocks", self.max_blocks, self.topk)
        check_int("Retrieval", "every", self.every, 1)
        if self.every > 1 and self.max_blocks is not None and self.max_blocks <= self.topk:
            raise ValueError(
                f"Retrieval: every > 1 needs max_blocks > topk (the chosen blocks stay while their query "
                f"block runs; an entering block needs another to leave), got max_blocks={self.max_blocks}, "
                f"topk={self.topk}"
            )
        if self.store not in STORES:
            raise ValueError(f"Retrieval: store must be one of {STORES}, got {self.store!r}")
        if self.store_dir is not None:
            if self.store != "disk":
                raise ValueError(f"Retrieval: store_dir is for store='disk', got store={self.store!r}")
            if not isinstance(self.store_dir, str) or not os.path.isdir(self.store_dir):
                raise ValueError(f"Retrieval: store_dir must be an existing directory, got {self.store_dir!r}")

    @property
    def name(self) -> str:
        keep = "" if self.max_blocks is None else f"_max{self.max_blocks}"
        every = "" if self.every == 1 else f"_every{self.every}"
        return f"retrieval_sink{self.sinks}_window{self.window}_block{self.block}_top{self.topk}{keep}{every}"

    @property
    def capacity(self) -> int:
        """Most keys a query attends to: ``sinks + window + topk * block``."""
        return self.sinks + self.window + self.topk * self.block

    def blocks_in_memory(self, t: int) -> int:
        """Blocks that have entered memory by query ``t`` (0, 1, ...; before any drop)."""
        return max(0, (t + 1 - self.window - self.sinks) // self.block)

    def entry(self, b: int) -> int:
        """The query at which block ``b`` enters memory."""
        return self.sinks + (b + 1) * self.block - 1 + self.window

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "Retrieval",
            "sinks": self.sinks,
            "window": self.window,
            "block": self.block,
            "topk": self.topk,
            "max_blocks": self.max_blocks,
            "store": self.store,
            "store_dir": self.store_dir,
            "every": self.every,
        }
