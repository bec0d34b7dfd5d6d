"""The CUDA path against the reference (runs where a GPU is present; CI is CPU-only)."""

from __future__ import annotations

import pytest
import torch

import streamattn as sa
from streamattn import reference
from tests.conftest import POLICIES, POSITIONS, TOL, chunk_sizes, make_qkv, max_err, stream, stream_ragged

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
D = 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunking", [1, 7, 300, "random"], ids=str)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_cuda_matches_reference(policy, positions, chunking, dtype):
    rope = sa.RoPE(D, 1e5)
    q, k, v = make_qkv(2, 9, 3, 400, D, dtype, seed=1)
    attn = sa.StreamingAttention(policy, rope, positions)
    out = stream(attn, q.cuda(), k.cuda(), v.cuda(), chunk_sizes(chunking, 400))
    assert out.device.type == "cuda" and out.dtype == dtype
    want = reference.attention(q, k, v, policy, rope=rope, positions=positions)
    assert max_err(out.cpu(), want) < max(TOL[dtype], 1e-4)  # TF32/fused kernels: 1e-4 in fp32


@pytest.mark.parametrize("positions", POSITIONS)
def test_cuda_ragged_batch_and_state_round_trip(positions, tmp_path):
    policy, rope = sa.SinkWindow(sinks=4, window=64), sa.RoPE(D, 1e5)
    lengths = [300, 170, 20]
    streams = [make_qkv(1, 9, 3, n, D, seed=20 + i) for i, n in enumerate(lengths)]
    sizes = [chunk_sizes("random", n, seed=i) for i, n in enumerate(lengths)]
    attn = sa.StreamingAttention(policy, rope, positions)
    outs = stream_ragged(attn, *[[s[j][0].cuda() for s in streams] for j in range(3)], sizes)
    for i in range(len(lengths)):
        want = reference.attention(*streams[i], policy, rope=rope, positions=positions)[0]
        assert max_err(outs[i].cpu(), want) < 1e-4
    torch.save(attn.state_dict(), tmp_path / "s.pt")
    resumed = sa.StreamingAttention(policy, rope, positions)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    x = [t.cuda() for t in make_qkv(3, 9, 3, 1, D, seed=99)]
    assert torch.equal(resumed(*x), attn(*x))


@pytest.mark.parametrize("store", ["device", "cpu", "disk"])
def test_cuda_retrieval_store_off_the_device(store, tmp_path):
    """A retrieval store in host memory or on disk gives the device store's results: only the
    retrieved blocks travel to the GPU; the bounds and the local buffers stay there."""
    kw = {"store_dir": str(tmp_path)} if store == "disk" else {}
    policy, rope = sa.Retrieval(sinks=4, window=32, block=8, topk=2, store=store, **kw), sa.RoPE(D, 1e5)
    q, k, v = make_qkv(2, 9, 3, 300, D, torch.float32, seed=5)
    attn = sa.StreamingAttention(policy, rope, "cache")
    out = stream(attn, q.cuda(), k.cuda(), v.cuda(), chunk_sizes("random", 300))
    assert attn.state.mem_k.device.type == ("cuda" if store == "device" else "cpu")
    assert attn.state.lo.device.type == "cuda" and out.device.type == "cuda"
    want = reference.replay_retrieval(q.double(), k.double(), v.double(), policy, rope=rope, positions="cache")
    assert max_err(out.cpu(), want) < 1e-4
