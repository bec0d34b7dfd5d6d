"""PerHead: each kv head runs its own policy; == the reference head by head, any chunking, bounded bytes."""

from __future__ import annotations

import io
import json

import pytest
import torch

import streamattn as sa
from streamattn import reference
from streamattn.policies.profile import FORMAT, load_profile, qfilters_policies, top_heads
from tests.conftest import POSITIONS, chunk_sizes, make_qkv, max_err, stream, stream_ragged

D = 16
RETRIEVAL = sa.Compressed(sinks=2, window=4, budget=12, score=sa.scores.H2O(), every=5)
STREAMING = sa.SinkWindow(sinks=2, window=6)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize(
    "heads",
    [(RETRIEVAL, STREAMING, RETRIEVAL), (STREAMING, STREAMING, RETRIEVAL), (sa.Full(), STREAMING, RETRIEVAL)],
    ids=["rsr", "ssr", "fsr"],
)
def test_any_chunking_equals_the_reference(positions, heads):
    policy = sa.PerHead(heads)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(2, 6, 3, 60, D, torch.float64, seed=3)
    ref = reference.attention(q, k, v, policy, rope=rope, positions=positions)
    for spec in (1, 7, "random"):
        out = stream(sa.StreamingAttention(policy, rope, positions), q, k, v, chunk_sizes(spec, 60, seed=2))
        assert max_err(out, ref) < 1e-12, spec


def test_ragged_batch_and_save_restore():
    policy = sa.PerHead((RETRIEVAL, STREAMING))
    rope = sa.RoPE(D)
    lengths = [50, 23, 41]
    qs, ks, vs = [], [], []
    for i, n in enumerate(lengths):
        q, k, v = make_qkv(1, 4, 2, n, D, torch.float64, seed=30 + i)
        qs.append(q[0]), ks.append(k[0]), vs.append(v[0])
    attn = sa.StreamingAttention(policy, rope, "cache")
    outs = stream_ragged(attn, qs, ks, vs, [chunk_sizes("random", n, seed=i) for i, n in enumerate(lengths)])
    for i in range(3):
        ref = reference.attention(qs[i][None], ks[i][None], vs[i][None], policy, rope=rope, positions="cache")
        assert max_err(outs[i], ref[0]) < 1e-12
    buf = io.BytesIO()
    torch.save(attn.state_dict(), buf)
    again = sa.StreamingAttention(policy, rope, "cache")
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    q, k, v = make_qkv(3, 4, 2, 9, D, torch.float64, seed=1)
    assert torch.equal(attn(q, k, v), again(q, k, v))


def test_bytes_per_head_are_bounded_and_constant():
    policy = sa.PerHead((RETRIEVAL, STREAMING, STREAMING))
    attn = sa.StreamingAttention(policy, sa.RoPE(D), "absolute")
    q, k, v = make_qkv(1, 3, 3, 300, D, torch.float32, seed=2)
    seen = set()
    for i in range(0, 300, 13):
        attn(q[:, :, i : i + 13], k[:, :, i : i + 13], v[:, :, i : i + 13])
        seen.add(tuple(attn.state.head_nbytes()))
    (per_head,) = seen
    assert per_head[1] == per_head[2] < per_head[0]  # streaming heads hold 8 slots, the retrieval head 17 + index/score
    assert sum(per_head) == attn.state.nbytes


def test_bad_per_head_policies_and_inputs():
    with pytest.raises(ValueError, match="non-empty"):
        sa.PerHead(())
    with pytest.raises(ValueError, match="head 1"):
        sa.PerHead((STREAMING, "window=4"))
    with pytest.raises(ValueError, match="non-PerHead"):
        sa.PerHead((sa.PerHead((STREAMING,)),))
    attn = sa.StreamingAttention(sa.PerHead((RETRIEVAL, STREAMING)), sa.RoPE(D))
    q, k, v = make_qkv(1, 6, 3, 4, D)
    with pytest.raises(ValueError, match="for 2 kv heads"):
        attn(q, k, v)
    assert attn.state is None
    assert sa.policy_from_config(sa.PerHead((RETRIEVAL, STREAMING)).to_config()) == sa.PerHead((RETRIEVAL, STREAMING))


def _profile(tmp_path, retrieval, qfilters=None):
    layers, heads = len(retrieval), len(retrieval[0])
    profile = {"format": FORMAT, "model": "tiny", "layers": layers, "kv_heads": heads, "head_dim": D}
    profile |= {"retrieval": retrieval, "qfilters": qfilters}
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    return path


def test_policies_from_a_profile(tmp_path):
    path = _profile(tmp_path, [[0.1, 0.9, 0.2], [0.8, 0.0, 0.05]])
    assert top_heads(load_profile(path), 2) == [{1}, {0}]
    assert top_heads(load_profile(path), 0.5) == [{1, 2}, {0}]  # half of 6 heads: 0.9, 0.8, 0.2
    layers = sa.PerHead.from_profile(path, retrieval=RETRIEVAL, streaming=STREAMING, heads=2)
    assert layers == [sa.PerHead((STREAMING, RETRIEVAL, STREAMING)), sa.PerHead((RETRIEVAL, STREAMING, STREAMING))]
    assert sa.PerHead.from_profile(path, retrieval=RETRIEVAL, streaming=STREAMING, heads=0) == [STREAMING, STREAMING]
    q = [[[float(i + h + 1)] * D for h in range(3)] for i in range(2)]
    path = _profile(tmp_path, [[0.1, 0.9, 0.2], [0.8, 0.0, 0.05]], q)
    pols = qfilters_policies(path, sinks=2, window=4, budget=12, every=5)
    assert [p.score.directions[0][0] for p in pols] == [1.0, 2.0]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: p.update(format="x"), "not a streamattn profile"),
        (lambda p: p.update(retrieval=[[0.1]]), "'retrieval' must be"),
        (lambda p: p.update(retrieval=[[0.1, float("nan"), 0.2], [0.8, 0.0, 0.05]]), "finite"),
        (lambda p: p.update(qfilters=[[[1.0]]]), "'qfilters' must be"),
        (lambda p: p.pop("layers"), "malformed profile"),
    ],
)
def test_bad_profiles(tmp_path, mutate, match):
    profile = json.loads(_profile(tmp_path, [[0.1, 0.9, 0.2], [0.8, 0.0, 0.05]]).read_text())
    mutate(profile)
    with pytest.raises(ValueError, match=match):
        load_profile(profile)
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
