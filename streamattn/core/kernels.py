"""Small pure functions: the only hot code of the engines (RoPE at write, slot writes, attention).

Each takes tensors and returns tensors; none holds state, so an engine is a sequence of these and a
backend (``torch.compile``, a fused kernel) can replace one at a time. Shapes follow SDPA:
``q [B, Hq, T, D]``, ``k``/``v`` ``[B, Hkv, N, D]`` with ``Hq % Hkv == 0`` (GQA: query head ``h``
reads kv head ``h // (Hq / Hkv)``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from streamattn.core.rope import RoPE


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (fp32, bf16, fp16) computes positions in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rope_at_write(x: torch.Tensor, rope: RoPE, positions: torch.Tensor) -> torch.Tensor:
    """``x [..., T, D]`` rotated at integer ``positions`` (broadcastable to ``x.shape[:-1]``), computed
    in ``compute_dtype(x.dtype)`` from float64 angles. Keys are rotated once, when written."""
    return rope.rotate(x.to(compute_dtype(x.dtype)), positions)


def write_slots(buffer: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """``buffer[rows[i], :, slots[i]] = x[i]`` for ``buffer [B, H, N, D]``, ``x [M, H, D]`` (cast to
    the buffer's dtype). One indexed write whatever ``M``; slots of a call must be distinct per row."""
    buffer[rows, :, slots] = x.to(buffer.dtype)


def write_wrapped(buffer: torch.Tensor, x: torch.Tensor, start: int, lo: int, hi: int) -> None:
    """``x [B, H, T, ...]`` into ``buffer``'s slots (dim 2) from ``start`` on, wrapping from ``hi``
    back to ``lo``: a ring of slots ``[lo, hi)``, ``T <= hi - lo``. Two narrow copies at most."""
    t = x.shape[2]
    first = min(t, hi - start)
    buffer.narrow(2, start, first).copy_(x.narrow(2, 0, first))
    if first < t:
        buffer.narrow(2, lo, t - first).copy_(x.narrow(2, first, t - first))


def rebase_keys(st, rope: RoPE, rebase_every: int, t: int, keys) -> list[int]:
    """Move the RoPE frame origin (``st.base``) of streams whose positions would exceed
    ``rebase_every`` after ``t`` more tokens to their current index, re-rotating their keys
    ``keys(b)`` (a view of ``st.k``) once by ``-(seen - base)``. Returns the rows rebased."""
    rebased = []
    for b, (seen, base) in enumerate(zip(st.seen, st.base, strict=True)):
        delta = seen - base
        if delta + t <= rebase_every or delta == 0:
            continue
        cdt = compute_dtype(st.dtype)
        back = rope.rotation_matrices(torch.tensor(-delta, device=st.device), cdt)
        view = keys(b)
        view.copy_(torch.matmul(view.to(cdt), back))
        st.base[b] = seen
        rebased.append(b)
    return rebased


def take_rows(buffer: torch.Tensor, rows: torch.Tensor | None, keep: torch.Tensor) -> torch.Tensor:
    """``out[e, h, i] = buffer[rows[e], h, keep[e, h, i]]`` for ``buffer [B, H, N, *]`` and ``keep
    [E, H, K]`` (``rows=None``: every row, ``E = B``). One ``index_select`` of whole slots from the
    flattened buffer (a row copy per kept slot), where ``gather`` with an index expanded over the
    trailing dims reads one index per element."""
    b, h, n = buffer.shape[:3]
    if not buffer.is_contiguous():
        buffer = buffer.contiguous()
    first = torch.arange(b, device=keep.device) if rows is None else rows
    base = (first[:, None] * h + torch.arange(h, device=keep.device)) * n  # [E, H] flat index of slot 0
    flat = (keep + base[..., None]).reshape(-1)
    return buffer.view(b * h * n, -1).index_select(0, flat).view(*keep.shape, *buffer.shape[3:])


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` with GQA; ``mask`` bool (True = attend) or additive float,
    broadcastable to ``[B, Hq, T, N]``. One SDPA call (the fused kernel of the platform)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def attend_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``attend`` that also returns the log-sum-exp of the scaled scores ``[B, Hq, T]`` and, when
    ``weights``, the attention weights ``[B, Hq, T, N]`` (what scorers and memories read).

    Explicit matmuls, ``O(T N)`` memory for the scores: for the rows a scorer needs, not for whole
    prefills. A query that sees no key gets ``lse = -inf``, zero weights and a zero output.
    """
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, Hq, T, N]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hq, T]
    finite = torch.isfinite(lse)
    p = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None]).masked_fill(~finite[..., None], 0.0)
    return p @ v, lse, (p if weights else None)


def attend_grouped_weights(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attend`` that also returns the attention weights averaged over each kv head's query heads,
    ``[B, Hkv, T, N]`` (what score-based eviction accumulates). The G query heads of a kv head ride
    in the matmul's row dim, so no key or value is copied per query head. ``mask`` bool
    (True = attend), broadcastable to ``[B, 1, T, N]``; every row must see at least one key.
    """
    b, hq, t, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    scores = ((q * scale).reshape(b, hkv, g * t, d) @ k.transpose(-1, -2)).view(b, hkv, g, t, n)  # scale the small side
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))  # [B, 1, 1, T, N] over the group
    p = torch.softmax(scores, dim=-1)
    out = (p.view(b, hkv, g * t, n) @ v).view(b, hq, t, d)
    return out, p.mean(dim=2)


@functools.cache
def _zero_one(dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Constant 0 and 1 (never written): a decode step should not allocate them."""
    return torch.zeros((), dtype=dtype, device=device), torch.ones((), dtype=dtype, device=device)


def attend_accumulate(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """One query per head (a decode step): ``attend_grouped_weights`` whose averaged weights are
    added into ``acc`` (``[B, Hkv, N]``, in place) instead of returned. Four batched-matmul-sized
    ops (scores, softmax, output, accumulation), no mask: what an H2O step costs beyond SDPA."""
    b, hq, _, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    rows = b * hkv
    zero, one = _zero_one(q.dtype, q.device)
    scores = torch.baddbmm(zero, q.reshape(rows, g, d), k.reshape(rows, n, d).transpose(1, 2), beta=0, alpha=scale)
    p = torch.softmax(scores, dim=-1)  # [B * Hkv, G, N]
    out = torch.bmm(p, v.reshape(rows, n, d)).view(b, hq, 1, d)
    acc.view(rows, 1, n).baddbmm_(one.expand(rows, 1, g), p, alpha=1.0 / g)
    return out


def attend_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(softmax(q k^T * scale + bias) v, logsumexp(q k^T * scale + bias))`` for equal head counts,
    ``bias`` additive (0 / -inf) of q's dtype, broadcastable to ``[B, H, T, N]``; every row must see a
    key. On CPU one fused flash kernel (PyTorch's own, which returns the log-sum-exp); elsewhere, or
    if that kernel refuses the inputs, explicit matmuls. What two attentions over disjoint key sets
    need to be merged exactly (``merge_lse``).
    """
    if q.device.type == "cpu":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=bias.expand(q.shape[0], -1, -1, -1), scale=scale
            )
            return out, lse
        except RuntimeError:  # dtype or layout the fused kernel does not take
            pass
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v, lse


def add_keys(
    parts: Sequence[tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over keys ``A_1 + ... + A_n + K`` from the attentions over each ``A_i`` (``parts``:
    ``(out [..., R, D], lse [..., R])``, ``lse`` may be ``-inf`` for a row whose ``A_i`` is empty)
    and a few more keys ``k, v [..., S, D]`` (``S >= 1``) that every row ``q [..., R, D]`` sees
    (leading dims broadcast): one softmax over ``[q k^T * scale, lse_1, ..., lse_n]`` weighs the S
    values and the outputs (a handful of ops, where scoring the S keys apart and merging by
    log-sum-exp take a dozen). ``into``: a tensor of the result's shape, any strides, written in
    place (e.g. the caller's output layout), so no copy follows."""
    s = k.shape[-2]
    # the S keys in the rows, the queries in the last dim: a softmax over a last dim of S is slow
    scores = torch.matmul(k, q.transpose(-1, -2)).mul_(scale)  # [..., S, R]
    lses = [lse.unsqueeze(-2).to(scores.dtype) for _, lse in parts]
    w = torch.softmax(torch.cat((scores, *lses), dim=-2), dim=-2)
    weights = w[..., s:, :].transpose(-1, -2)  # [..., R, n]: the weight of each part's output
    result = torch.matmul(w[..., :s, :].transpose(-1, -2), v)  # [..., R, D]
    for i, (out, _) in enumerate(parts[:-1]):
        result.addcmul_(out, weights[..., i : i + 1])
    return torch.addcmul(result, parts[-1][0], weights[..., -1:], out=into)


def merge_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Attention over keys ``A + B`` from the attentions over ``A`` and over ``B`` and their
    log-sum-exps (``lse_b`` may be ``-inf``: B empty for that row; ``lse_a`` must be finite)."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]
