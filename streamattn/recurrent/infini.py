"""Infini-attention: local softmax attention per segment + a compressive memory of all earlier segments.

Munkhdalai, Faruqui and Gopal, "Leave No Context Behind: Efficient Infinite Context Transformers
with Infini-attention", 2024 (arXiv:2404.07143). The stream is cut into segments of ``N`` tokens at
stream indices ``0, N, 2N, ...`` (fixed by the index, never by how the stream is fed). Per head,
with ``sigma = elu + 1`` and ``s = t // N`` the segment of token ``t``:

    A_dot_t = softmax_{sN <= j <= t}(q_t . k_j * scale) v_j                    local, causal
    A_mem_t = sigma(q_t) M_{s-1} / (sigma(q_t) . z_{s-1} + eps)                memory of segments < s
    o_t     = sigmoid(beta_h) A_mem_t + (1 - sigmoid(beta_h)) A_dot_t

and when segment ``s`` ends (``K, V`` its keys and values, ``M_{-1} = 0, z_{-1} = 0``):

    M_s = M_{s-1} + sigma(K)^T V                                              linear update
    M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1} + eps))   delta rule
    z_s = z_{s-1} + sum_j sigma(k_j)

``eps`` (not in the paper) makes the empty memory read as 0; afterwards ``sigma(q) . z`` grows with
every token and ``eps`` is negligible. Positions: with ``rope``, the local scores are
``R(t) q_t . R(j) k_j`` (RoPE at stream indices), computed as RoPE at the position within the
segment (``t - sN``, ``j - sN``: the same scores, as ``R(a) x . R(c) y`` depends on ``a - c`` only),
so angles stay below ``N`` however long the stream; the memory reads and writes un-rotated ``q, k``.
Without ``rope`` the layer is position-free. ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``, ``beta [H]``
(gate logits).
A stream's state is ``(M, z)`` plus the keys and values of its current, incomplete segment
(at most ``N - 1`` tokens), so any feeding (token by token, odd pieces, whole) gives the outputs of
one call on the whole stream. 16-bit inputs are computed and their state kept in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from streamattn.core.rope import RoPE
from streamattn.policies.base import check_int
from streamattn.recurrent.linear import (
    check_keys,
    check_positive,
    check_qkv,
    check_seen,
    check_tensor,
    describe,
    elu1,
    seen_from_tensor,
    work_dtype,
)


@dataclass(frozen=True)
class InfiniMemory:
    """Configuration of Infini-attention: ``segment`` (N), ``delta_rule``, ``rope`` (RoPE of the local
    attention, ``None``: position-free), softmax ``scale`` (``None``: ``1/sqrt(Dk)``) and ``eps``
    (the formulas in the module docstring)."""

    segment: int = 64
    delta_rule: bool = False
    rope: RoPE | None = None
    scale: float | None = None
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_int("InfiniMemory", "segment", self.segment, 1)
        if not isinstance(self.delta_rule, bool):
            raise ValueError(f"InfiniMemory: delta_rule must be a bool, got {self.delta_rule!r}")
        if self.rope is not None and not isinstance(self.rope, RoPE):
            raise ValueError(f"InfiniMemory: rope must be a streamattn.RoPE or None, got {self.rope!r}")
        if self.scale is not None:
            check_positive("InfiniMemory", "scale", self.scale)
        check_positive("InfiniMemory", "eps", self.eps)

    def to_config(self) -> dict[str, Any]:
        return {
            "type": "InfiniMemory",
            "segment": self.segment,
            "delta_rule": self.delta_rule,
            "rope": None if self.rope is None else self.rope.to_config(),
            "scale": self.scale,
            "eps": self.eps,
        }


class InfiniState(NamedTuple):
    """What a batch of Infini-attention streams carries.

    ``mem [B, H, Dk, Dv]``, ``z [B, H, Dk]``: the memory of the complete segments; ``k [B, H, N-1, Dk]``,
    ``v [B, H, N-1, Dv]``: the current segment's tokens so far in slots ``0 .. seen[b] % N - 1``
    (zeros after them); ``seen[b]``: tokens stream ``b`` has consumed.
    """

    mem: torch.Tensor
    z: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    seen: tuple[int, ...]


# ---------------------------------------------------------------------- the two forms
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
    initial_state: InfiniState | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, InfiniState | None]:
    """Parallel (training) form: ``o [B, H, T, Dv]``, the segments side by side.

    The held partial segment and the new tokens are laid out from a segment boundary, every
    segment's local attention is one causal SDPA over ``[B, H, n, N, N]``, the memories entering
    the ``n`` segments come from a scan over segments (``n`` small ``[Dk, Dv]`` updates) and are read
    by one batched matmul. Cost ``O(T N D + T Dk Dv)``; differentiable in ``q, k, v, beta`` and
    the initial state.
    """
    memory = InfiniMemory(segment, delta_rule, rope, scale, eps)
    return _run(memory, q, k, v, beta, initial_state, output_final_state, recurrent=False)


def infini_attention_recurrent(
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
    initial_state: InfiniState | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, InfiniState | None]:
    """Recurrent (streaming) form: token by token, attending to the held segment (``O(N D)``), reading
    the memory (``O(Dk Dv)``), and writing the memory when a segment completes."""
    memory = InfiniMemory(segment, delta_rule, rope, scale, eps)
    return _run(memory, q, k, v, beta, initial_state, output_final_state, recurrent=True)


def _run(memory, q, k, v, beta, initial_state, output_final_state, *, recurrent):
    check_qkv(q, k, v)
    b, h, _, dk = q.shape
    check_beta(beta, h, q.device)
    check_rope(memory, dk)
    dv = v.shape[-1]
    state = new_state(memory, b, h, dk, dv, q.dtype, q.device) if initial_state is None else initial_state
    check_state(memory, state, b, h, dk, dv, work_dtype(q.dtype), q.device)
    o, final = forward(memory, q, k, v, beta, state, None, recurrent=recurrent)
    return o, (final if output_final_state else None)


def forward(
    memory: InfiniMemory,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    state: InfiniState,
    counts: Sequence[int] | None,
    *,
    recurrent: bool,
) -> tuple[torch.Tensor, InfiniState]:
    """Both forms on validated inputs; ``counts[b]`` tokens of row ``b`` are real (right padding;
    the recurrent form takes none): padded tokens never reach the state and their outputs are 0."""
    dtype, work = q.dtype, work_dtype(q.dtype)
    if q.shape[2] == 0:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), state
    q, k, v, beta = q.to(work), k.to(work), v.to(work), beta.to(work)
    if recurrent:
        o, state = _recurrent(memory, q, k, v, beta, state)
    else:
        o, state = _parallel(memory, q, k, v, beta, state, counts or [q.shape[2]] * q.shape[0])
    return o.to(dtype), state


def _scale(memory: InfiniMemory, dk: int) -> float:
    return 1 / math.sqrt(dk) if memory.scale is None else memory.scale


def _retrieve(sq: torch.Tensor, mem: torch.Tensor, z: torch.Tensor, eps: float) -> torch.Tensor:
    """``sigma(q) M / (sigma(q) . z + eps)`` for ``sq [..., n, Dk]``, ``mem [..., Dk, Dv]``, ``z [..., Dk]``."""
    return (sq @ mem) / (sq @ z[..., None] + eps)


def _write(memory: InfiniMemory, mem, z, sk, vals):
    """The memory after a segment with keys ``sk = sigma(K) [..., N, Dk]`` (0 rows add nothing)."""
    if memory.delta_rule:
        vals = vals - _retrieve(sk, mem, z, memory.eps)
    return mem + sk.transpose(-1, -2) @ vals, z + sk.sum(-2)


def _gather(x: torch.Tensor, index: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``x[b, :, index[b, i]]`` where ``keep[b, i]``, else 0: ``x [B, H, T, D]``, ``index, keep [B, L]``."""
    b, h, _, d = x.shape
    out = x.gather(2, index[:, None, :, None].expand(b, h, -1, d))
    return torch.where(keep[:, None, :, None], out, 0)


def _layout(q, k, v, state, fill, counts, seg):
    """Row ``b``'s held tokens (``fill[b]``) then its ``counts[b]`` new ones, from position 0 = a
    segment boundary, right-padded to ``L = n N``: ``(q, k, v [B, H, L, D], real [B, L] or None)``.
    Queries sit at ``fill[b] ..``; the held tokens are keys only (their query rows are zero)."""
    b, _, t, _ = q.shape
    ends = [f + c for f, c in zip(fill, counts, strict=True)]
    length = max(1, -(-max(ends) // seg)) * seg
    pos = torch.arange(length, device=q.device)[None, :]  # [1, L]
    if not any(fill) and all(c == t for c in counts):  # a whole sequence from a boundary (training)
        q, k, v = (F.pad(x, (0, 0, 0, length - t)) for x in (q, k, v))
        return q, k, v, (None if length == t else (pos < t).expand(b, -1))
    fill_t = torch.tensor(fill, device=q.device)[:, None]  # [B, 1]
    real = pos < torch.tensor(ends, device=q.device)[:, None]  # [B, L]: a held or a new token
    new = pos >= fill_t
    src = torch.where(new, seg - 1 + pos - fill_t, pos).clamp(max=seg - 2 + t)  # index into [held ; new]
    k = _gather(torch.cat([state.k, k], 2), src, real)
    v = _gather(torch.cat([state.v, v], 2), src, real)
    return _gather(q, (pos - fill_t).clamp(0, t - 1), real & new), k, v, real


def _parallel(memory, q, k, v, beta, state, counts):
    """All segments at once: one causal SDPA over ``[B, H n, N, N]``, the memories entering the ``n``
    segments by a scan, read by one batched matmul; then the call's outputs and the new state."""
    b, h, t, dk = q.shape
    dv, seg, dev = v.shape[-1], memory.segment, q.device
    fill = [n % seg for n in state.seen]
    qs, ks, vs, real = _layout(q, k, v, state, fill, counts, seg)
    length = qs.shape[2]
    n = length // seg

    # local: each segment's causal softmax (a real query only sees real keys: padding comes after)
    rq, rk = qs, ks
    if memory.rope is not None:  # position within the segment
        at = torch.arange(seg, device=dev).repeat(n)
        rq, rk = memory.rope.rotate(qs, at), memory.rope.rotate(ks, at)
    a_dot = F.scaled_dot_product_attention(
        rq.reshape(b, h * n, seg, dk),
        rk.reshape(b, h * n, seg, dk),
        vs.reshape(b, h * n, seg, dv),
        is_causal=True,
        scale=_scale(memory, dk),
    ).view(b, h, n, seg, dv)
    # memory: the state entering each segment, by a scan over segments (padded keys add nothing)
    qs, ks, vs = qs.reshape(b, h, n, seg, dk), ks.reshape(b, h, n, seg, dk), vs.reshape(b, h, n, seg, dv)
    sk = elu1(ks) if real is None else torch.where(real.reshape(b, 1, n, seg, 1), elu1(ks), 0)
    mems, zs = [state.mem], [state.z]
    for s in range(n):
        mem, z = _write(memory, mems[-1], zs[-1], sk[:, :, s], vs[:, :, s])
        mems.append(mem)
        zs.append(z)
    mems, zs = torch.stack(mems, 2), torch.stack(zs, 2)  # [B, H, n + 1, ...]: before segment 0 .. after n - 1
    a_mem = _retrieve(elu1(qs), mems[:, :, :n], zs[:, :, :n], memory.eps)
    gate = torch.sigmoid(beta)[None, :, None, None, None]
    out = (gate * a_mem + (1 - gate) * a_dot).reshape(b, h, length, dv)

    # back to the call's layout; the new state: memory after each row's complete segments + its tail
    fill_t, counts_t = torch.tensor(fill, device=dev)[:, None], torch.tensor(counts, device=dev)[:, None]
    i = torch.arange(t, device=dev)[None, :]
    if any(fill):
        o = _gather(out, (fill_t + i).clamp(max=length - 1), i < counts_t)
    else:  # queries at 0 .. t - 1 in every row
        o = (
            out[:, :, :t]
            if all(c == t for c in counts)
            else out[:, :, :t].masked_fill(~(i < counts_t)[:, None, :, None], 0)
        )
    ends = [f + c for f, c in zip(fill, counts, strict=True)]
    at = torch.tensor([e // seg for e in ends], device=dev)  # complete segments of each row (from its boundary)
    tail = at[:, None] * seg + torch.arange(seg - 1, device=dev)[None, :]  # [B, N - 1]: positions of the new held
    keep = tail < torch.tensor(ends, device=dev)[:, None]
    tail = tail.clamp(max=length - 1)
    rows = torch.arange(b, device=dev)
    final = InfiniState(
        mems[rows, :, at],
        zs[rows, :, at],
        _gather(ks.reshape(b, h, length, dk), tail, keep),
        _gather(vs.reshape(b, h, length, dv), tail, keep),
        tuple(s + c for s, c in zip(state.seen, counts, strict=True)),
    )
    return o, final


def _recurrent(memory, q, k, v, beta, state):
    """One token at a time; rows may sit at different places in their segments. Per token:
    attention over the held tokens and itself (``O(N D)``), one memory read (``O(Dk Dv)``), the held
    segment rebuilt with the token in it (``O(N D)``; never written in place: the state stays a value),
    and the memory written when the token completes its row's segment."""
    t, dk = q.shape[2:]
    seg = memory.segment
    last = seg - 1  # a row at fill ``last`` completes its segment with this token
    mem, z, held_k, held_v, _ = state
    fill = [n % seg for n in state.seen]
    gate = torch.sigmoid(beta)[None, :, None, None]
    slots = torch.arange(seg, device=q.device)
    scale = _scale(memory, dk)
    outs = []
    for i in range(t):
        q_i, k_i, v_i = q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1]
        if len(set(fill)) == 1:  # streams in step: the held keys are a prefix, no mask
            f = fill[0]
            if f < last:  # the token takes slot f (a new tensor: the state stays a value)
                held_k = torch.cat([held_k[:, :, :f], k_i, held_k[:, :, f + 1 :]], 2)
                held_v = torch.cat([held_v[:, :, :f], v_i, held_v[:, :, f + 1 :]], 2)
                keys, vals = held_k[:, :, : f + 1], held_v[:, :, : f + 1]
            else:
                keys, vals = torch.cat([held_k, k_i], 2), torch.cat([held_v, v_i], 2)
            visible, at = None, slots[: f + 1]  # at: positions in the segment
        else:  # the new token in the last slot; row b sees its first fill[b] slots and that one
            keys, vals = torch.cat([held_k, k_i], 2), torch.cat([held_v, v_i], 2)
            fill_t = torch.tensor(fill, device=q.device)[:, None]
            visible = ((slots < fill_t) | (slots == last))[:, None, None]
            at = torch.where(slots == last, fill_t, slots)[:, None]  # [B, 1, N]
            write = (slots[:last] == fill_t)[:, None, :, None]  # rows completing their segment match no slot
            held_k, held_v = torch.where(write, k_i, held_k), torch.where(write, v_i, held_v)
        rq, rk = q_i, keys
        if memory.rope is not None:  # rotated at use: O(N D) per token, the order of the attention itself
            rq, rk = memory.rope.rotate(q_i, at[..., -1:]), memory.rope.rotate(keys, at)
        a_dot = F.scaled_dot_product_attention(rq, rk, vals, attn_mask=visible, scale=scale)
        outs.append(gate * _retrieve(elu1(q_i), mem, z, memory.eps) + (1 - gate) * a_dot)
        ending = [f == last for f in fill]
        if any(ending):  # a completed segment (keys/vals: its N tokens) goes to the memory, its rows empty
            new_mem, new_z = _write(memory, mem, z, elu1(keys), vals)
            rows = torch.tensor(ending, device=q.device)[:, None, None, None]
            mem, z = torch.where(rows, new_mem, mem), torch.where(rows[..., 0], new_z, z)
            held_k, held_v = held_k.masked_fill(rows, 0), held_v.masked_fill(rows, 0)
        fill = [(f + 1) % seg for f in fill]
    seen = tuple(n + t for n in state.seen)
    return torch.cat(outs, dim=2), InfiniState(mem, z, held_k, held_v, seen)


# ---------------------------------------------------------------------- states and validation
def new_state(
    memory: InfiniMemory, b: int, h: int, dk: int, dv: int, dtype: torch.dtype, device: torch.device
) -> InfiniState:
    """Empty memory and segment for ``b`` streams (in ``work_dtype(dtype)``)."""
    like = {"dtype": work_dtype(dtype), "device": device}
    held = memory.segment - 1
    return InfiniState(
        torch.zeros(b, h, dk, dv, **like),
        torch.zeros(b, h, dk, **like),
        torch.zeros(b, h, held, dk, **like),
        torch.zeros(b, h, held, dv, **like),
        (0,) * b,
    )


def check_rope(memory: InfiniMemory, dk: int) -> None:
    if memory.rope is not None and memory.rope.head_dim != dk:
        raise ValueError(f"memory.rope.head_dim is {memory.rope.head_dim}, but q/k have Dk={dk}")


def check_beta(beta: Any, h: int, device: torch.device) -> None:
    if not isinstance(beta, torch.Tensor) or not beta.dtype.is_floating_point:
        raise TypeError(f"beta (the gate logits) must be a float tensor [H], got {describe(beta)}")
    if tuple(beta.shape) != (h,) or beta.device != device:
        raise ValueError(f"beta must be [H] = [{h}] on {device}, got {list(beta.shape)} on {beta.device}")


def check_state(memory, state, b, h, dk, dv, dtype, device) -> None:
    """``ValueError``/``TypeError`` unless ``state`` is an ``InfiniState`` for these shapes."""
    if not isinstance(state, InfiniState):
        raise TypeError(f"state must be an InfiniState, got {type(state).__name__}")
    held = memory.segment - 1
    expect = {"mem": (b, h, dk, dv), "z": (b, h, dk), "k": (b, h, held, dk), "v": (b, h, held, dv)}
    for name, shape in expect.items():
        check_tensor(f"state.{name}", getattr(state, name), shape, dtype, device)
    check_seen(state.seen, b)


def to_dict(state: InfiniState) -> dict[str, Any]:
    return {**state._asdict(), "seen": torch.tensor(state.seen, dtype=torch.int64)}


def from_dict(memory: InfiniMemory, raw: Any) -> InfiniState:
    """Validated, cloned ``InfiniState`` from ``to_dict`` output (``ValueError`` naming what is wrong)."""
    check_keys(raw, InfiniState._fields)
    mem = raw["mem"]
    if not isinstance(mem, torch.Tensor) or mem.dim() != 4 or mem.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state 'mem' must be a float32/float64 tensor [B, H, Dk, Dv], got {describe(mem)}")
    b, h, dk, dv = mem.shape
    state = InfiniState(mem, raw["z"], raw["k"], raw["v"], seen_from_tensor(raw["seen"]))
    try:
        check_state(memory, state, b, h, dk, dv, mem.dtype, mem.device)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return InfiniState(*(x.clone() for x in state[:4]), state.seen)
