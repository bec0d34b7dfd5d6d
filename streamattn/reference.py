"""The obviously-correct float64 oracle every optimised path is tested against.

Slow on purpose: one query at a time, the visible keys gathered from the literal rule of each policy,
positions assigned by the literal definition of each mode, RoPE written independently of
``streamattn.core.rope`` (as a complex rotation of the pairs ``(x_i, x_{i+D/2})``), plain softmax.

Modes (``t`` is the query's absolute stream index, ``j`` a key's):
- ``"absolute"``: query at position ``t``, key at ``j``.
- ``"cache"`` (StreamingLLM): positions are slots in the cache at the moment of attending, i.e. a
  visible key's rank among the visible keys (ordered by ``j``) and the query at the last rank.
"""

from __future__ import annotations

import torch

from streamattn.core.rope import RoPE
from streamattn.policies import Compressed, Full, PerHead, Policy, Retrieval, SinkWindow
from streamattn.policies.chunked_context import ChunkedContext


def is_visible(policy: Policy, t: int, j: int) -> bool:
    """The literal visibility rule, in plain Python integers."""
    if isinstance(policy, SinkWindow):
        return j <= t and (j < policy.sinks or t - j < policy.window)
    if isinstance(policy, Full):
        return j <= t
    raise TypeError(f"reference: no literal rule for policy {policy!r}")


def visible_keys(policy: Policy, t: int) -> list[int]:
    """All key indices query ``t`` sees, ascending. O(t); fine for an oracle."""
    if isinstance(policy, SinkWindow):  # same set without scanning the invisible middle (tested)
        recent = range(max(policy.sinks, t - policy.window + 1), t + 1)
        return list(range(min(policy.sinks, t + 1))) + list(recent)
    return [j for j in range(t + 1) if is_visible(policy, t, j)]


def _rope64(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE as a complex rotation. ``x [..., n, D]`` float64, ``pos [n]`` int."""
    d = x.shape[-1]
    h = d // 2
    inv_freq = float(theta) ** (-(torch.arange(0, d, 2, dtype=torch.float64) / d))
    angle = pos.to(torch.float64)[:, None] * inv_freq[None, :]  # [n, h]
    z = torch.complex(x[..., :h], x[..., h:]) * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: Policy,
    *,
    rope: RoPE | None = None,
    positions: str = "cache",
    scale: float | None = None,
    q_idx: torch.Tensor | list[int] | None = None,
    kv_idx: torch.Tensor | list[int] | None = None,
) -> torch.Tensor:
    """Streaming attention of queries over a stream, computed offline in float64.

    Args:
        q: ``[B, Hq, Tq, D]`` un-rotated queries.
        k, v: ``[B, Hkv, Tk, D]`` un-rotated keys and values, ``Hq % Hkv == 0``.
        q_idx: absolute stream index of each query (default ``0..Tq-1``).
        kv_idx: absolute stream index of each given key (default ``0..Tk-1``). Must include every
            key that any query sees, so a long stream can be checked from a few of its tokens.

    Returns:
        ``[B, Hq, Tq, D]`` float64.
    """
    if positions not in ("cache", "absolute"):
        raise ValueError(f"positions must be 'cache' or 'absolute', got {positions!r}")
    if isinstance(policy, PerHead):  # each kv head by its own policy; a query head goes with its kv head
        out = torch.zeros(q.shape, dtype=torch.float64)
        g = q.shape[1] // k.shape[1]
        for sub, heads in policy.groups:
            qh = [h * g + i for h in heads for i in range(g)]
            out[:, qh] = attention(
                q[:, qh],
                k[:, heads],
                v[:, heads],
                sub,
                rope=rope,
                positions=positions,
                scale=scale,
                q_idx=q_idx,
                kv_idx=kv_idx,
            )
        return out
    if isinstance(policy, Compressed):
        if q_idx is not None or kv_idx is not None:
            raise ValueError(
                "reference: an eviction policy is replayed from the stream's first token (no q_idx/kv_idx)"
            )
        return replay(q, k, v, policy, rope=rope, positions=positions, scale=scale)
    if isinstance(policy, Retrieval):
        if q_idx is not None or kv_idx is not None:
            raise ValueError(
                "reference: a retrieval policy is replayed from the stream's first token (no q_idx/kv_idx)"
            )
        return replay_retrieval(q, k, v, policy, rope=rope, positions=positions, scale=scale)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    group = hq // hkv
    q_idx = list(range(tq)) if q_idx is None else [int(i) for i in q_idx]
    kv_idx = list(range(tk)) if kv_idx is None else [int(i) for i in kv_idx]
    where = {j: n for n, j in enumerate(kv_idx)}
    scale = d**-0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(b, hq, tq, d, dtype=torch.float64)
    for qi, t in enumerate(q_idx):
        keys = visible_keys(policy, t)
        missing = [j for j in keys if j not in where]
        if missing:
            raise ValueError(f"reference: query {t} sees keys {missing[:5]}... that kv_idx does not provide")
        cols = torch.tensor([where[j] for j in keys])
        kk, vv = k[:, :, cols], v[:, :, cols]  # [B, Hkv, n, D]
        qq = q[:, :, qi : qi + 1]  # [B, Hq, 1, D]
        if rope is not None:
            if positions == "absolute":
                kpos, qpos = torch.tensor(keys), torch.tensor([t])
            else:
                kpos, qpos = torch.arange(len(keys)), torch.tensor([len(keys) - 1])
            kk, qq = _rope64(kk, kpos, rope.theta), _rope64(qq, qpos, rope.theta)
        kk = kk.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
        vv = vv.repeat_interleave(group, dim=1)
        w = torch.softmax((qq @ kk.transpose(-1, -2)) * scale, dim=-1)  # [B, Hq, 1, n]
        out[:, :, qi : qi + 1] = w @ vv
    return out


def replay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: Compressed,
    *,
    rope: RoPE | None = None,
    positions: str = "cache",
    scale: float | None = None,
    held_out: list[list[list[int]]] | None = None,
) -> torch.Tensor:
    """Score-based eviction (``Compressed``) replayed literally, token by token, per stream and kv head.

    Each kv head keeps a Python list of the stream indices it holds and a dict of their scores; the
    rule of ``streamattn.policies.compressed`` is followed step by step: add the key, attend,
    accumulate the scorer's observation, and at each eviction point drop the lowest (score, index)
    candidates. ``[B, Hq, T, D]`` float64. ``held_out``, if given, receives ``held_out[b][h]``: the
    stream indices each kv head holds at the end.
    """
    b, hq, t_len, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    scorer = policy.score
    out = torch.zeros(b, hq, t_len, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(hkv):
            heads = range(h * group, (h + 1) * group)
            held: list[int] = []
            score: dict[int, float] = {}
            for t in range(t_len):
                held.append(t)
                static = scorer.key_score(k[bi : bi + 1, :, t : t + 1])  # key-only scorers; else None
                score[t] = 0.0 if static is None else float(static[0, h, 0])
                kk, vv, qq = k[bi, h, held], v[bi, h, held], q[bi, list(heads), t : t + 1]  # [n, D], [G, 1, D]
                if rope is not None:
                    kpos = torch.tensor(held) if positions == "absolute" else torch.arange(len(held))
                    qpos = torch.tensor([t]) if positions == "absolute" else torch.tensor([len(held) - 1])
                    kk, qq = _rope64(kk, kpos, rope.theta), _rope64(qq, qpos, rope.theta)
                w = torch.softmax((qq @ kk.T) * scale, dim=-1)  # [G, 1, n]
                out[bi, list(heads), t] = (w @ vv)[:, 0]
                n = t + 1  # tokens consumed
                observe = scorer.observe
                phase = n % policy.every or policy.every  # queries since the last point, this one included
                if observe is None or (observe > 0 and phase > policy.every - observe):
                    mean = w[:, 0].mean(dim=0)
                    for i, j in enumerate(held):
                        score[j] += float(mean[i])
                if n % policy.every:
                    continue
                if len(held) > policy.budget:
                    values = [score[j] for j in held]
                    r = scorer.kernel // 2
                    pooled = [max(values[max(0, i - r) : i + r + 1]) for i in range(len(held))]
                    protected = [j < policy.sinks or j >= n - policy.window for j in held]
                    candidates = sorted(
                        (pooled[i], j) for i, j in enumerate(held) if not protected[i]
                    )  # lowest score first, then older first
                    drop = {j for _, j in candidates[: len(held) - policy.budget]}
                    held = [j for j in held if j not in drop]
                    score = {j: score[j] for j in held}
                if observe is not None and observe > 0:
                    score = {j: 0.0 for j in held}
            if held_out is not None:
                if h == 0:
                    held_out.append([])
                held_out[bi].append(held)
    return out


def replay_retrieval(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: Retrieval,
    *,
    rope: RoPE | None = None,
    positions: str = "cache",
    scale: float | None = None,
    retrieved_out: list[list[list[list[int]]]] | None = None,
) -> torch.Tensor:
    """Retrieval memory (``Retrieval``) replayed literally, token by token, per stream and kv head.

    Each kv head keeps a dict ``block -> stamp`` of the blocks in its memory; the rule of
    ``streamattn.policies.retrieval`` is followed step by step: at a block's entry index add it (and
    drop the least recently retrieved block not chosen for the query block in progress if memory is
    over ``max_blocks``); at the first query of each query block (``t % every == 0``) score every
    block in memory by the sum over the kv head's query heads of ``sum_d max(q_d lo_d, q_d hi_d)``
    (query and keys rotated at the positions where the query would attend the block), take the
    ``topk`` best (ties: the newer block) and stamp them; every query attends to sinks + the tokens
    of its query block's choice + window (cache positions: every retrieved block at the same
    ``block`` ranks after the sinks). ``[B, Hq, T, D]`` float64. ``retrieved_out``, if given,
    receives ``retrieved_out[b][h][t]``: the blocks query ``t`` of stream ``b`` attended for kv head
    ``h``, ascending.
    """
    b, hq, t_len, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    s, w, size = policy.sinks, policy.window, policy.block
    scale = d**-0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(b, hq, t_len, d, dtype=torch.float64)
    for bi in range(b):
        if retrieved_out is not None:
            retrieved_out.append([])
        for h in range(hkv):
            heads = list(range(h * group, (h + 1) * group))
            memory: dict[int, int] = {}  # block -> stamp (the last query that chose it)
            log: list[list[int]] = []
            chosen: list[int] = []  # the choice of the query block in progress
            for t in range(t_len):
                decides = t % policy.every == 0
                entered = policy.blocks_in_memory(t)
                if entered and policy.entry(entered - 1) == t:  # block entered - 1 enters memory now
                    memory[entered - 1] = t
                    if policy.max_blocks is not None and len(memory) > policy.max_blocks:
                        kept = set() if decides else set(chosen)  # at a first query the entry comes first
                        leaves = [blk for blk in memory if blk not in kept]
                        del memory[min(leaves, key=lambda blk: (memory[blk], blk))]
                if decides:
                    chosen = _choose_blocks(q, k, policy, bi, h, heads, t, memory, rope, positions, w)
                    for blk in chosen:
                        memory[blk] = t
                log.append(list(chosen))
                sinks = list(range(min(s, t + 1)))
                memory_idx = [j for blk in chosen for j in range(s + blk * size, s + (blk + 1) * size)]
                window = list(range(max(s, t - w + 1), t + 1))
                idx = sinks + memory_idx + window
                kk, vv, qr = k[bi, h, idx], v[bi, h, idx], q[bi, heads, t : t + 1]  # [n, D], [G, 1, D]
                if rope is not None:
                    if positions == "absolute":
                        kpos, qpos = idx, [t]
                    else:  # sinks, every retrieved block at the same `block` ranks, the window
                        shift = len(sinks) + (size if chosen else 0)
                        kpos = sinks + [len(sinks) + u for _ in chosen for u in range(size)]
                        kpos += [shift + i for i in range(len(window))]
                        qpos = [kpos[-1]]
                    kk = _rope64(kk, torch.tensor(kpos), rope.theta)
                    qr = _rope64(qr, torch.tensor(qpos), rope.theta)
                wts = torch.softmax((qr @ kk.T) * scale, dim=-1)  # [G, 1, n]
                out[bi, heads, t] = (wts @ vv)[:, 0]
            if retrieved_out is not None:
                retrieved_out[bi].append(log)
    return out


def _choose_blocks(q, k, policy, bi, h, heads, t, memory, rope, positions, w) -> list[int]:
    """Query ``t``'s choice for its query block: the ``topk`` blocks in ``memory`` of highest
    relevance (ties: the newer block), ascending."""
    s, size = policy.sinks, policy.block
    qq = q[bi, heads, t]  # [G, D]
    blocks = list(memory)
    if not blocks:
        return []
    # keys rotated where the query attends them (cache: every block at the same offsets)
    keys = torch.stack([k[bi, h, s + blk * size : s + (blk + 1) * size] for blk in blocks])
    if rope is not None and positions == "absolute":
        keys = torch.stack(
            [
                _rope64(kb, torch.arange(s + blk * size, s + (blk + 1) * size), rope.theta)
                for kb, blk in zip(keys, blocks, strict=True)
            ]
        )
        qq = _rope64(qq[:, None], torch.tensor([t]), rope.theta)[:, 0]
    elif rope is not None:  # token u at distance (window + block - 1 - u): u vs w + block - 1
        keys = _rope64(keys, torch.arange(size), rope.theta)
        qq = _rope64(qq[:, None], torch.tensor([w + size - 1]), rope.theta)[:, 0]
    lo, hi = keys.min(dim=1).values[:, None], keys.max(dim=1).values[:, None]  # [n, 1, D]
    scores = torch.maximum(qq * lo, qq * hi).sum(dim=(1, 2))  # over the G heads and D
    relevance = {blk: float(scores[i]) for i, blk in enumerate(blocks)}
    return sorted(sorted(memory, key=lambda blk: (-relevance[blk], -blk))[: policy.topk])


def chunked_visible(policy: ChunkedContext, t: int, j: int) -> bool:
    """``ChunkedContext``'s literal rule in plain Python integers."""
    c = t // policy.chunk
    if policy.left is not None and j // policy.chunk < c - policy.left // policy.chunk:
        return False
    return j < (c + 1) * policy.chunk + policy.lookahead


def chunked_context_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    policy: ChunkedContext,
    lengths: list[int] | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """A chunked encoder's attention over whole utterances, in float64, one query at a time.

    ``q [B, Hq, T, D]``, ``k, v [B, Hkv, T, D]`` (``Hq % Hkv == 0``: query head ``h`` reads kv
    head ``h // (Hq / Hkv)``); stream ``b`` has ``lengths[b]`` frames (default ``T``), and query
    ``t`` attends to the keys ``j < lengths[b]`` that ``chunked_visible`` allows (plain softmax).
    Returns ``[B, Hq, T, D]`` float64, zeros past each stream's length.
    """
    b, hq, t, d = q.shape
    group = hq // k.shape[1]
    lengths = [t] * b if lengths is None else [int(n) for n in lengths]
    scale = d**-0.5 if scale is None else scale
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(b, hq, t, d, dtype=torch.float64)
    for bi, n in enumerate(lengths):
        for ti in range(n):
            keys = torch.tensor([j for j in range(n) if chunked_visible(policy, ti, j)])
            kk = k[bi][:, keys].repeat_interleave(group, dim=0)  # [Hq, n_keys, D]: head h reads h // group
            vv = v[bi][:, keys].repeat_interleave(group, dim=0)
            w = torch.softmax((kk @ q[bi, :, ti, :, None])[..., 0] * scale, dim=-1)  # [Hq, n_keys]
            out[bi, :, ti] = (w[:, None, :] @ vv)[:, 0]
    return out
