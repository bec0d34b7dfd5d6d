"""Where a retrieval store's block keys and values live (``Retrieval(store=...)``).

``"device"``: with the attention. ``"cpu"``: host memory (pinned when the attention runs on CUDA),
and each step moves only the blocks it retrieved to the attention device. ``"disk"``: a
memory-mapped file per tensor in ``directory`` (default: the system temp directory), unlinked as
soon as it is mapped: the operating system writes pages back and evicts them under memory pressure,
the space returns when the tensor is freed, and a crash leaves no file behind. Placement changes
no result (tests compare all three bitwise); it is not part of a saved state either.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    kind: str = "device"  # "device" | "cpu" | "disk"
    directory: str | None = None  # for "disk"; None: tempfile.gettempdir()

    def device(self, attention: torch.device) -> torch.device:
        """The device the store's tensors are on, for an attention running on ``attention``."""
        return torch.device(attention) if self.kind == "device" else torch.device("cpu")

    def zeros(self, shape: Sequence[int], dtype: torch.dtype, attention: torch.device) -> torch.Tensor:
        """A zero tensor of ``shape`` in this placement."""
        if self.kind == "disk":
            return _mapped(tuple(shape), dtype, self.directory)
        pin = self.kind == "cpu" and torch.device(attention).type == "cuda"
        return torch.zeros(tuple(shape), dtype=dtype, device=self.device(attention), pin_memory=pin)

    def copy(self, t: torch.Tensor, attention: torch.device) -> torch.Tensor:
        """A new tensor in this placement holding ``t``."""
        return self.zeros(t.shape, t.dtype, attention).copy_(t)

    def adopt(self, t: torch.Tensor, attention: torch.device) -> torch.Tensor:
        """``t`` in this placement (``t`` itself when it is already there and not to be mapped)."""
        if self.kind != "disk" and t.device == self.device(attention):
            return t
        return self.copy(t, attention)


def mapped_file(t: torch.Tensor) -> str | None:
    """The (unlinked) file a tensor's memory is mapped from, or None for ordinary memory."""
    return t.untyped_storage().filename


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, directory: str | None) -> torch.Tensor:
    """A zero tensor backed by a new file in ``directory``, mapped shared and unlinked."""
    numel = max(1, math.prod(shape))
    fd, path = tempfile.mkstemp(prefix="streamattn-store-", suffix=".bin", dir=directory)
    try:
        os.ftruncate(fd, numel * dtype.itemsize)  # reads as zeros; disk blocks are allocated when written
        flat = torch.from_file(path, shared=True, size=numel, dtype=dtype)
    finally:
        os.close(fd)
        os.unlink(path)
    return flat[: math.prod(shape)].view(shape)
