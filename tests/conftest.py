"""Shared test matrix: every generic engine test runs over these policies (one row per policy)."""

from __future__ import annotations

import random

import pytest
import torch

import streamattn as sa

# One row per policy; a new policy adds a row here and runs through every generic test.
POLICIES = [
    pytest.param(sa.SinkWindow(sinks=4, window=16), id="sink4_win16"),
    pytest.param(sa.SinkWindow(sinks=0, window=16), id="win16"),
    pytest.param(sa.SinkWindow(sinks=1, window=1), id="sink1_win1"),
    pytest.param(sa.Full(), id="full"),
]
POSITIONS = ["cache", "absolute"]


def _qfilters(hkv: int, d: int) -> sa.scores.QFilters:
    return sa.scores.QFilters(torch.randn(hkv, d, generator=torch.Generator().manual_seed(hkv * 100 + d)))


# One row per scorer of Compressed: ``make(hkv, d) -> scorer`` (Q-Filters needs one direction per kv head).
SCORERS = [
    pytest.param(lambda hkv, d: sa.scores.KeyNorm(), id="knorm"),
    pytest.param(lambda hkv, d: sa.scores.TOVA(), id="tova"),
    pytest.param(lambda hkv, d: sa.scores.H2O(), id="h2o"),
    pytest.param(lambda hkv, d: sa.scores.SnapKV(window=4, kernel=3), id="snapkv"),
    pytest.param(_qfilters, id="qfilters"),
]
HEADS = [pytest.param((9, 3), id="gqa9_3"), pytest.param((4, 4), id="mha4_4"), pytest.param((8, 1), id="mqa8_1")]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 6e-2, torch.float16: 1e-2}


def make_qkv(b, hq, hkv, t, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def chunk_sizes(spec, total, seed=0):
    """Chunk lengths summing to ``total``: an int, or "random" (1..50, seeded)."""
    rng = random.Random(seed)
    sizes = []
    while sum(sizes) < total:
        size = rng.randint(1, 50) if spec == "random" else spec
        sizes.append(min(size, total - sum(sizes)))
    return sizes


def stream(attn, q, k, v, sizes):
    """Feed one batch in chunks of ``sizes``; return the concatenated outputs."""
    outs, i = [], 0
    for size in sizes:
        outs.append(attn(q[:, :, i : i + size], k[:, :, i : i + size], v[:, :, i : i + size]))
        i += size
    return torch.cat(outs, dim=2)


def stream_ragged(attn, qs, ks, vs, sizes_per_stream):
    """Feed B streams of different lengths together, each with its own chunking, padding the rest.

    Returns one output tensor ``[Hq, T_b, D]`` per stream.
    """
    b = len(qs)
    pos, step = [0] * b, [0] * b
    outs = [[] for _ in range(b)]
    while any(step[i] < len(sizes_per_stream[i]) for i in range(b)):
        lens = [sizes_per_stream[i][step[i]] if step[i] < len(sizes_per_stream[i]) else 0 for i in range(b)]
        t = max(lens)
        hq, d = qs[0].shape[0], qs[0].shape[-1]
        hkv = ks[0].shape[0]
        like = {"dtype": qs[0].dtype, "device": qs[0].device}
        q = torch.zeros(b, hq, t, d, **like)
        k = torch.full((b, hkv, t, d), float("nan"), **like)  # padding must never leak
        v = torch.full((b, hkv, t, d), float("nan"), **like)
        for i in range(b):
            q[i, :, : lens[i]] = qs[i][:, pos[i] : pos[i] + lens[i]]
            k[i, :, : lens[i]] = ks[i][:, pos[i] : pos[i] + lens[i]]
            v[i, :, : lens[i]] = vs[i][:, pos[i] : pos[i] + lens[i]]
        out = attn(q, k, v, lengths=lens)
        for i in range(b):
            outs[i].append(out[i, :, : lens[i]])
            assert torch.all(out[i, :, lens[i] :] == 0), "padded outputs must be zero"
            pos[i] += lens[i]
            step[i] += 1 if step[i] < len(sizes_per_stream[i]) else 0
    return [torch.cat(o, dim=1) for o in outs]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()
