"""Endless streams: after 2**20 tokens the outputs still match the float64 reference to 1e-4 (fp32)."""

from __future__ import annotations

import pytest
import torch

import streamattn as sa
from streamattn import reference

N = 2**20
CHUNK = 4096
S, W, HQ, HKV, D = 4, 60, 2, 1, 32


def _chunk(i):
    """The i-th chunk of a reproducible stream (regenerated for the reference)."""
    g = torch.Generator().manual_seed(1000 + i)
    return tuple(torch.randn(1, h, CHUNK, D, generator=g) for h in (HQ, HKV, HKV))


@pytest.mark.slow
@pytest.mark.parametrize("positions", ["cache", "absolute"])
def test_no_drift_after_2_pow_20_tokens(positions):
    policy, rope = sa.SinkWindow(sinks=S, window=W), sa.RoPE(D, 10000.0)
    attn = sa.StreamingAttention(policy, rope, positions)
    n_chunks = N // CHUNK
    for i in range(n_chunks):  # 2**20 tokens in, then check what comes after them
        attn(*_chunk(i))
    q, k, v = _chunk(n_chunks)
    half = CHUNK // 2
    out_chunked = attn(q[:, :, :half], k[:, :, :half], v[:, :, :half])  # block path at ~2**20
    out_decode = torch.cat(  # then the decode fast path, token by token
        [attn(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1]) for i in range(half, half + 64)], dim=2
    )
    assert attn.seen == [N + half + 64]
    assert max(attn.state.base) > 0  # the frame origin moved at least once on the way

    first = _chunk(0)
    start = N
    sel = list(range(half - 16, half)) + list(range(half, half + 64))  # positions within the last chunk
    kv_idx = list(range(S)) + list(range(start + half - 16 - W, start + half + 64))
    k_all = torch.cat((first[1][:, :, :S], k[:, :, half - 16 - W : half + 64]), dim=2)
    v_all = torch.cat((first[2][:, :, :S], v[:, :, half - 16 - W : half + 64]), dim=2)
    want = reference.attention(
        q[:, :, sel],
        k_all,
        v_all,
        policy,
        rope=rope,
        positions=positions,
        q_idx=[start + i for i in sel],
        kv_idx=kv_idx,
    )
    got = torch.cat((out_chunked[:, :, half - 16 :], out_decode), dim=2)
    err = (got.double() - want).abs().max().item()
    assert err < 1e-4, err
