"""Save / restore a stream bit for bit (also in a new process), reset, and allocation-free steps."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import streamattn as sa
from tests.conftest import POLICIES, make_qkv

D = 16


@pytest.mark.parametrize("positions", ["cache", "absolute"])
@pytest.mark.parametrize("policy", POLICIES)
def test_state_dict_round_trip_continues_bitwise(policy, positions, tmp_path):
    rope = sa.RoPE(D, 10000.0)
    q, k, v = make_qkv(3, 6, 2, 80, D, seed=7)
    attn = sa.StreamingAttention(policy, rope, positions)
    attn(q[:, :, :37], k[:, :, :37], v[:, :, :37], lengths=[37, 20, 5])
    torch.save(attn.state_dict(), tmp_path / "s.pt")
    restored = sa.StreamingAttention(policy, rope, positions)
    restored.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert restored.seen == attn.seen
    outs = []
    for a in (attn, restored):  # a decode step, then a chunk, on both
        out = [a(q[:, :, 37:38], k[:, :, 37:38], v[:, :, 37:38]), a(q[:, :, 38:], k[:, :, 38:], v[:, :, 38:])]
        outs += out
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])


def test_state_dict_is_a_snapshot_not_an_alias():
    """Feeding the source after save/load moves neither the saved dict nor the restored stream."""
    attn = sa.StreamingAttention(sa.SinkWindow(sinks=1, window=3), sa.RoPE(D))
    q, k, v = make_qkv(1, 2, 1, 6, D)
    attn(q[:, :, :3], k[:, :, :3], v[:, :, :3])
    saved = attn.state_dict()
    frozen = {key: val.clone() for key, val in saved["_extra_state"]["state"].items()}
    other = sa.StreamingAttention(sa.SinkWindow(sinks=1, window=3), sa.RoPE(D))
    other.load_state_dict(saved)
    attn(q[:, :, 3:], k[:, :, 3:], v[:, :, 3:])
    assert other.seen == [3]
    assert all(torch.equal(saved["_extra_state"]["state"][key], val) for key, val in frozen.items())
    assert torch.equal(other.state.k, frozen["k"]) and torch.equal(other.state.v, frozen["v"])


def test_round_trip_in_a_new_process(tmp_path):
    """Save in one process, resume in another: the continuation is bitwise what an unbroken run gives."""
    script = textwrap.dedent(
        """
        import sys, torch, streamattn as sa
        from tests.conftest import make_qkv
        mode, path = sys.argv[1], sys.argv[2]
        q, k, v = make_qkv(2, 9, 3, 300, 64, seed=11)
        attn = sa.StreamingAttention(sa.SinkWindow(sinks=4, window=100), sa.RoPE(64, 1e5), "cache")
        if mode == "save":
            attn(q[:, :, :250], k[:, :, :250], v[:, :, :250])
            torch.save(attn.state_dict(), path)
        else:
            attn.load_state_dict(torch.load(path, weights_only=True))
            outs = [attn(q[:, :, i:i+1], k[:, :, i:i+1], v[:, :, i:i+1]) for i in range(250, 260)]
            outs.append(attn(q[:, :, 260:], k[:, :, 260:], v[:, :, 260:]))
            torch.save(torch.cat(outs, 2), path + ".out")
        """
    )
    path = str(tmp_path / "state.pt")
    for mode in ("save", "load"):
        subprocess.run([sys.executable, "-c", script, mode, path], check=True, cwd=str(_root()))
    q, k, v = make_qkv(2, 9, 3, 300, 64, seed=11)
    attn = sa.StreamingAttention(sa.SinkWindow(sinks=4, window=100), sa.RoPE(64, 1e5), "cache")
    attn(q[:, :, :250], k[:, :, :250], v[:, :, :250])
    outs = [attn(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1]) for i in range(250, 260)]
    outs.append(attn(q[:, :, 260:], k[:, :, 260:], v[:, :, 260:]))
    assert torch.equal(torch.cat(outs, 2), torch.load(path + ".out", weights_only=True))


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_empty_state_round_trip_and_reset():
    attn = sa.StreamingAttention(sa.SinkWindow(sinks=1, window=3), sa.RoPE(D))
    other = sa.StreamingAttention(sa.SinkWindow(sinks=1, window=3), sa.RoPE(D))
    other.load_state_dict(attn.state_dict())
    assert other.state is None and other.seen == []
    attn(*make_qkv(2, 2, 1, 5, D))
    attn.reset()
    assert attn.seen == []
    attn(*make_qkv(4, 2, 2, 5, D, dtype=torch.float64))  # new batch size, heads and dtype after reset
    assert attn.seen == [5] * 4


@pytest.mark.parametrize("positions", ["cache", "absolute"])
@pytest.mark.parametrize("batch", [1, 3])
def test_steady_state_steps_never_reallocate(positions, batch):
    """10K decode steps (and chunk steps) past the fill: same buffers, same addresses, same size."""
    attn = sa.StreamingAttention(sa.SinkWindow(sinks=4, window=32), sa.RoPE(D), positions)
    q, k, v = make_qkv(batch, 6, 2, 64, D)
    attn(q, k, v)  # past sinks + window: the ring is full
    st = attn.state
    nbytes = st.nbytes
    assert nbytes == 4 * (2 * batch * 2 * 36 * D + batch * 2 * 4 * D)  # k, v [B, 2, 4 + 32, D] + sink_k, fp32
    ptrs = [t.untyped_storage().data_ptr() for t in (st.k, st.v, st.sink_k)]
    objs = [id(t) for t in (st.k, st.v, st.sink_k)]
    q1, k1, v1 = q[:, :, :1], k[:, :, :1], v[:, :, :1]
    for _ in range(10_000):
        attn(q1, k1, v1)
    for size in (3, 7, 64):
        attn(q[:, :, :size], k[:, :, :size], v[:, :, :size])
    assert [t.untyped_storage().data_ptr() for t in (st.k, st.v, st.sink_k)] == ptrs
    assert [id(t) for t in (st.k, st.v, st.sink_k)] == objs and attn.state is st
    assert st.k.shape == (batch, 2, 36, D) and st.nbytes == nbytes


def test_engines_with_the_same_rope_share_one_decode_rotation_table():
    """A model's layers step through the same positions: the table is built and held once."""
    layers = [sa.StreamingAttention(sa.SinkWindow(sinks=4, window=32), sa.RoPE(D, 1e5)) for _ in range(3)]
    q, k, v = make_qkv(1, 6, 2, 40, D)
    for attn in layers:
        attn(q, k, v)
        attn(q[:, :, :1], k[:, :, :1], v[:, :, :1])  # decode: uses the table
    tables = [attn.engine._rotations._table for attn in layers]
    assert tables[0].numel() and all(t is tables[0] for t in tables)
