"""Float64 oracles of the recurrent memories: literal loops over tokens, slow on purpose.

Written from the definitions, not from the fast forms: linear attention as the weighted sum over
past tokens it unrolls to (no state is carried), Infini-attention as its per-token rule with the
memory updated at literal segment ends and RoPE at stream indices, as a complex rotation of the
pairs ``(x_i, x_{i + D/2})`` (not ``streamattn.core.rope``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from streamattn.core.rope import RoPE
from streamattn.recurrent.linear import FEATURE_MAPS, elu1


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    feature_map: str = "elu1",
    normalize: bool = False,
    decay: float | Sequence[float] | None = None,
    scale: float = 1.0,
    eps: float = 1e-6,
    initial_state: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(o, S_T, z_T)`` in float64, every output from its unrolled definition:

        S_t = w_{t,0} S_0 + sum_{j <= t} w_{t,j} phi(k_j)^T v_j,   w_{t,j} = prod_{j < i <= t} g_i
        z_t likewise with phi(k_j); o_t = s phi(q_t) S_t (/ (s phi(q_t) . z_t + eps))

    with ``w_{t,0}`` the product over ``i <= t`` and ``g_i = decay[h] * exp(log_gate[:, h, i])``.
    ``initial_state``: ``(S_0, z_0)`` (``z_0`` only when normalised), default zeros.
    """
    phi = FEATURE_MAPS[feature_map]
    q, k, v = phi(q.double()), phi(k.double()), v.double()
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    g = torch.ones(b, h, t, dtype=torch.float64)
    if decay is not None:
        g = g * torch.tensor(decay if isinstance(decay, Sequence) else [decay] * h, dtype=torch.float64)[None, :, None]
    if log_gate is not None:
        g = g * log_gate.double().exp()
    s0 = torch.zeros(b, h, dk, dv, dtype=torch.float64) if initial_state is None else initial_state[0].double()
    z0 = torch.zeros(b, h, dk, dtype=torch.float64)
    if initial_state is not None and initial_state[1] is not None:
        z0 = initial_state[1].double()
    o = torch.zeros(b, h, t, dv, dtype=torch.float64)
    s_i, z_i = s0, z0
    for i in range(t):
        s_i = g[:, :, : i + 1].prod(-1)[..., None, None] * s0
        z_i = g[:, :, : i + 1].prod(-1)[..., None] * z0
        for j in range(i + 1):
            w = g[:, :, j + 1 : i + 1].prod(-1)  # [B, H]; the empty product is 1
            s_i = s_i + w[..., None, None] * k[:, :, j, :, None] * v[:, :, j, None, :]
            z_i = z_i + w[..., None] * k[:, :, j]
        num = scale * (q[:, :, i, None, :] @ s_i)[:, :, 0]
        o[:, :, i] = num / (scale * (q[:, :, i] * z_i).sum(-1, keepdim=True) + eps) if normalize else num
    return o, s_i, z_i if normalize else None


def infini_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    segment: int,
    delta_rule: bool = False,
    rope: RoPE | None = None,
    scale: float | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(o, M, z)`` in float64 for streams starting at index 0 (``M, z``: after the complete segments).

    Token ``t`` of segment ``s = t // N``: softmax attention over keys ``sN .. t`` (scale
    ``1/sqrt(Dk)`` unless given; with ``rope``, query and keys rotated at their stream indices), retrieval ``sigma(q) M / (sigma(q) . z + eps)`` from the memory of
    segments ``< s`` (``sigma = elu + 1``), mixed as ``sigmoid(beta_h) A_mem + (1 - sigmoid(beta_h)) A_dot``.
    When segment ``s`` ends: ``M += sum_j sigma(k_j)^T v_j`` (delta rule: ``v_j`` minus its retrieval
    ``sigma(k_j) M / (sigma(k_j) . z + eps)`` from the memory before the update), ``z += sum_j sigma(k_j)``.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, h, t, dk = q.shape
    scale = 1 / math.sqrt(dk) if scale is None else scale
    gate = torch.sigmoid(beta.double())[None, :, None]  # [1, H, 1]
    mem = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64)
    z = torch.zeros(b, h, dk, dtype=torch.float64)

    def write(mem, z, start):  # the segment [start, start + N) ends
        old_mem, old_z = mem, z
        for j in range(start, start + segment):
            sk = elu1(k[:, :, j])  # [B, H, Dk]
            value = v[:, :, j]
            if delta_rule:
                value = value - (sk[:, :, None, :] @ old_mem)[:, :, 0] / ((sk * old_z).sum(-1, keepdim=True) + eps)
            mem, z = mem + sk[..., :, None] * value[..., None, :], z + sk
        return mem, z

    o = torch.zeros(b, h, t, v.shape[-1], dtype=torch.float64)
    for i in range(t):
        start = i - i % segment
        if i > 0 and i % segment == 0:
            mem, z = write(mem, z, start - segment)
        q_i = q[:, :, i] if rope is None else _rotate(q[:, :, i], i, rope.theta)
        keys = [k[:, :, j] if rope is None else _rotate(k[:, :, j], j, rope.theta) for j in range(start, i + 1)]
        scores = torch.stack([scale * (q_i * key).sum(-1) for key in keys], -1)
        weights = (scores - scores.amax(-1, keepdim=True)).exp()
        weights = weights / weights.sum(-1, keepdim=True)  # [B, H, i - start + 1]
        a_dot = sum(weights[..., n, None] * v[:, :, j] for n, j in enumerate(range(start, i + 1)))
        sq = elu1(q[:, :, i])
        a_mem = (sq[:, :, None, :] @ mem)[:, :, 0] / ((sq * z).sum(-1, keepdim=True) + eps)
        o[:, :, i] = gate * a_mem + (1 - gate) * a_dot
    if t and t % segment == 0:
        mem, z = write(mem, z, t - segment)
    return o, mem, z


def _rotate(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """RoPE of ``x [..., D]`` at ``position``: pair ``(x_i, x_{i + D/2})`` times ``exp(i position theta^(-2i/D))``."""
    half = x.shape[-1] // 2
    angle = position * float(theta) ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    rotated = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([rotated.real, rotated.imag], dim=-1)
