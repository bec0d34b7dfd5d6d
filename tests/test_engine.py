"""Every optimised path against the float64 reference: the parametrised matrix of the engine.

policies x positions x rope on/off x GQA (9/3, 4/4, 8/1) x chunkings {1, 3, 7, 64, > window,
random} x B in {1, 3 ragged}. Chunk size 1 runs the decode fast path, the others the block path.
"""

from __future__ import annotations

import functools

import pytest
import torch

import streamattn as sa
from streamattn import reference
from tests.conftest import HEADS, POLICIES, POSITIONS, TOL, chunk_sizes, make_qkv, max_err, stream, stream_ragged

D = 16
T_TOTAL = 90
CHUNKINGS = [1, 3, 7, 64, 40, "random"]  # 40 > window (16); 64 > window; random in 1..50
ROPES = [pytest.param(None, id="norope"), pytest.param(sa.RoPE(D, 10000.0), id="rope")]


def engine_matrix(test):
    """policies x positions x rope x heads x chunkings, shared by the single and batched tests."""
    axes = [("policy", POLICIES), ("positions", POSITIONS), ("rope", ROPES), ("heads", HEADS), ("chunking", CHUNKINGS)]
    for name, values in reversed(axes):
        test = pytest.mark.parametrize(name, values, ids=str if name == "chunking" else None)(test)
    return test


@functools.cache
def _reference(policy, positions, rope, heads, b, seed, t_total):
    q, k, v = make_qkv(b, *heads, t_total, D, torch.float64, seed=seed)
    return reference.attention(q, k, v, policy, rope=rope, positions=positions)


@engine_matrix
def test_single_stream_matches_reference(policy, positions, rope, heads, chunking):
    q, k, v = make_qkv(1, *heads, T_TOTAL, D, torch.float32, seed=1)
    attn = sa.StreamingAttention(policy=policy, rope=rope, positions=positions)
    out = stream(attn, q, k, v, chunk_sizes(chunking, T_TOTAL, seed=2))
    want = _reference(policy, positions, rope, heads, 1, 1, T_TOTAL)
    assert max_err(out, want) < TOL[torch.float32]


@engine_matrix
def test_ragged_batch_equals_each_stream_alone(policy, positions, rope, heads, chunking):
    """Three streams of different lengths and chunkings in one batch; padding is NaN and never leaks."""
    lengths = [T_TOTAL, 57, 23]
    streams = [make_qkv(1, *heads, n, D, torch.float32, seed=10 + i) for i, n in enumerate(lengths)]
    sizes = [chunk_sizes(chunking if i == 0 else "random", n, seed=i) for i, n in enumerate(lengths)]
    attn = sa.StreamingAttention(policy=policy, rope=rope, positions=positions)
    outs = stream_ragged(
        attn, [s[0][0] for s in streams], [s[1][0] for s in streams], [s[2][0] for s in streams], sizes
    )
    for i, n in enumerate(lengths):
        want = _reference(policy, positions, rope, heads, 1, 10 + i, n)[0]
        assert max_err(outs[i], want) < TOL[torch.float32], f"stream {i}"
    assert attn.seen == lengths


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("chunking", [1, 7, 40], ids=str)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_dtypes(policy, positions, chunking, dtype):
    rope = sa.RoPE(D, 10000.0)
    q, k, v = make_qkv(1, 9, 3, T_TOTAL, D, dtype, seed=1)
    attn = sa.StreamingAttention(policy=policy, rope=rope, positions=positions)
    out = stream(attn, q, k, v, chunk_sizes(chunking, T_TOTAL))
    assert out.dtype == dtype
    # the reference sees the same rounded inputs
    want = reference.attention(q, k, v, policy, rope=rope, positions=positions)
    assert max_err(out, want) < TOL[dtype]


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("chunking", [1, 7, "random"], ids=str)
def test_rebase_keeps_results_exact(positions, chunking):
    """Frame origins moved every 5 tokens give the same outputs as the reference."""
    policy, rope = sa.SinkWindow(sinks=2, window=9), sa.RoPE(D, 10000.0)
    q, k, v = make_qkv(2, 4, 2, T_TOTAL, D, torch.float32, seed=3)
    attn = sa.StreamingAttention(policy=policy, rope=rope, positions=positions, rebase_every=5)
    out = stream(attn, q, k, v, chunk_sizes(chunking, T_TOTAL))
    want = reference.attention(q, k, v, policy, rope=rope, positions=positions)
    assert max_err(out, want) < TOL[torch.float32]
    assert max(attn.state.base) > 0, "the test must actually rebase"


def test_small_block_size_changes_nothing():
    policy, rope = sa.SinkWindow(sinks=3, window=20), sa.RoPE(D, 10000.0)
    q, k, v = make_qkv(2, 4, 2, T_TOTAL, D, torch.float64, seed=4)
    want = stream(sa.StreamingAttention(policy, rope), q, k, v, [T_TOTAL])
    got = stream(sa.StreamingAttention(policy, rope, block_size=3), q, k, v, [T_TOTAL])
    assert max_err(got, want) < 1e-12


def test_custom_scale():
    policy = sa.SinkWindow(sinks=1, window=5)
    q, k, v = make_qkv(1, 2, 2, 30, D, torch.float64)
    got = stream(sa.StreamingAttention(policy, scale=0.37), q, k, v, chunk_sizes("random", 30))
    want = reference.attention(q, k, v, policy, scale=0.37)
    assert max_err(got, want) < 1e-12


def test_zero_length_call_is_a_no_op():
    attn = sa.StreamingAttention(sa.SinkWindow(sinks=1, window=4), sa.RoPE(D))
    q, k, v = make_qkv(2, 2, 1, 3, D)
    attn(q, k, v)
    out = attn(q, k, v, lengths=[0, 0])
    assert torch.all(out == 0) and attn.seen == [3, 3]
    assert attn(q[:, :, :0], k[:, :, :0], v[:, :, :0]).shape == (2, 2, 0, D)


def test_cache_is_bounded_and_reported():
    attn = sa.StreamingAttention(sa.SinkWindow(sinks=4, window=16), sa.RoPE(D))
    q, k, v = make_qkv(1, 2, 1, 100, D)
    stream(attn, q, k, v, chunk_sizes(7, 100))
    assert attn.cached == [20] and attn.seen == [100]
    assert attn.state.k.shape[2] == 20


@pytest.mark.parametrize("chunking", [1, 7, "random"], ids=str)
@pytest.mark.parametrize("positions", POSITIONS)
def test_non_contiguous_inputs(positions, chunking):
    """Views such as transformers' [B, T, H, D] -> [B, H, T, D] transposes give the same outputs."""
    policy, rope = sa.SinkWindow(sinks=3, window=16), sa.RoPE(D, 10000.0)
    q, k, v = make_qkv(2, 9, 3, T_TOTAL, D, torch.float32, seed=8)
    sizes = chunk_sizes(chunking, T_TOTAL)
    want = stream(sa.StreamingAttention(policy, rope, positions), q, k, v, sizes)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))  # same values, [B, T, H, D] memory
    assert not qt.is_contiguous()
    got = stream(sa.StreamingAttention(policy, rope, positions), qt, kt, vt, sizes)
    assert max_err(got, want) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b", [1, 3])
def test_banded_chunks_match_the_reference(b, dtype, monkeypatch):
    """Cache mode, past a full ring, streams in step: chunks take the banded path (keys in stream
    order, sub-blocks of queries, one band mask), which must equal the reference. Sizes cover one
    sub-block short of the rest, an odd chunk, a chunk split by the window, and chunks below 16."""
    from streamattn.core.engine import SinkWindowEngine

    policy, rope = sa.SinkWindow(sinks=4, window=40), sa.RoPE(D, 10000.0)
    sizes = [50, 40, 37, 33, 90, 16, 15, 3, 1, 60]
    q, k, v = make_qkv(b, 6, 2, sum(sizes), D, dtype, seed=21)
    banded = []
    real = SinkWindowEngine._attend_banded

    def spy(self, st, q, *args):
        banded.append(q.shape[2])
        return real(self, st, q, *args)

    monkeypatch.setattr(SinkWindowEngine, "_attend_banded", spy)
    attn = sa.StreamingAttention(policy, rope=rope, positions="cache")
    got = stream(attn, q, k, v, sizes)
    want = reference.attention(q.double(), k.double(), v.double(), policy, rope=rope, positions="cache")
    assert banded and min(banded) >= 16 and max(banded) == 40  # the path ran, blocks <= window
    assert max_err(got, want) < TOL[dtype]
