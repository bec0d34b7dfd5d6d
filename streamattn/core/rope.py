"""Rotary position embedding (RoPE), rotate-half convention, angles in float64.

Su et al., "RoFormer" (arXiv:2104.09864); the rotate-half layout is the one used by Llama/GPT-NeoX
and transformers: dimension ``i`` pairs with ``i + D/2`` and rotates by ``p * theta**(-2i/D)``.

Why float64: an fp32 angle ``p * inv_freq`` at ``p = 10**6`` is already off by ~0.03 rad. Angles are
formed from integer positions in float64 and only their cos/sin are cast to the compute dtype, so
the error is ~``p * 2**-53`` rad (1e-10 at 2**20). The engine additionally keeps positions relative
to a per-stream base that it moves forward (``rebase_every``), so ``p`` stays bounded forever.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class RoPE:
    """RoPE over the full head dimension: ``inv_freq[i] = theta ** (-2 i / head_dim)``."""

    head_dim: int
    theta: float = 10000.0

    def __post_init__(self) -> None:
        d = self.head_dim
        if isinstance(d, bool) or not isinstance(d, int) or d < 2 or d % 2:
            raise ValueError(f"RoPE: head_dim must be an even int >= 2, got {d!r}")
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)):
            raise ValueError(f"RoPE: theta must be a number, got {self.theta!r}")
        if not (math.isfinite(self.theta) and self.theta > 1.0):
            raise ValueError(f"RoPE: theta must be a finite number > 1, got {self.theta!r}")

    def to_config(self) -> dict[str, Any]:
        return {"head_dim": self.head_dim, "theta": float(self.theta)}

    def inv_freq(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[head_dim / 2]`` float64 inverse frequencies."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim
        return float(self.theta) ** (-exponent)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of ``positions[..., None] * inv_freq``, each ``[..., head_dim]`` in ``dtype``.

        ``positions`` is an integer tensor (any shape); the two halves of the last dim repeat.
        """
        angles = positions.to(torch.float64)[..., None] * self.inv_freq(positions.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate ``x [..., T, D]`` by ``positions`` (broadcastable to ``x.shape[:-1]``)."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return apply_rotary(x, cos, sin)

    def rotation_matrices(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[..., D, D]`` matrices ``M`` with ``x @ M == rotate(x, p)`` for a row vector ``x``.

        One small matmul applies RoPE to all heads of a decode step, which on CPU costs a single
        kernel launch instead of the ~5 of the elementwise form.
        """
        h = self.head_dim // 2
        angles = positions.to(torch.float64)[..., None] * self.inv_freq(positions.device)
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)  # fp64 angles, then cast
        m = torch.zeros(*positions.shape, self.head_dim, self.head_dim, dtype=dtype, device=positions.device)
        diag = m.diagonal(dim1=-2, dim2=-1)
        diag[..., :h].copy_(cos)
        diag[..., h:].copy_(cos)
        m.diagonal(offset=h, dim1=-2, dim2=-1).copy_(sin)  # out[h+i] += x[i] * sin_i
        m.diagonal(offset=-h, dim1=-2, dim2=-1).copy_(-sin)  # out[i]   -= x[h+i] * sin_i
        return m


@functools.lru_cache(maxsize=16)
def range_cos_sin(rope: RoPE, start: int, t: int, dtype: torch.dtype, device: torch.device):
    """cos/sin ``[1, 1, T, D]`` of positions ``start .. start + t - 1`` (``t = 1``: one position,
    broadcast over any T). Cached: the layers of a forward ask for the same ones, so one build
    serves them all; never written to."""
    return rope.cos_sin(torch.arange(start, start + t, device=device)[None, None], dtype)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[h:], x[:h])``.

    ``out``: write the result there (same shape and dtype as the result, not overlapping ``x``), half
    by half with no temporaries: what re-rotating a whole buffer in place needs."""
    h = x.shape[-1] // 2
    if out is None:
        rotated = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
        return torch.addcmul(x * cos, rotated, sin)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=o1).addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=o2).addcmul_(x1, sin[..., h:])
    return out
