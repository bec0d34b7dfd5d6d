"""Compressed (score-based eviction): engine == fp64 step-by-step replay, for every scorer, any chunking.

Exactness is checked in float64, where the engine's scores equal the replay's to ~1e-15 and every
eviction decision is the same; the kept sets are compared too, not only the outputs.
"""

from __future__ import annotations

import io

import pytest
import torch

import streamattn as sa
from streamattn import reference
from tests.conftest import HEADS, POSITIONS, SCORERS, TOL, chunk_sizes, make_qkv, max_err, stream, stream_ragged

D = 16
T = 70
EVERY, BUDGET = 5, 12  # eviction every 5 tokens down to 12 keys: 14 eviction points in 70 tokens
CHUNKINGS = [1, 3, 7, EVERY + 1, BUDGET + 5, "random"]  # {1, 3, 7, > every, > budget, random}


def policy(make, hkv, **kw):
    fields = {"sinks": 2, "window": 4, "budget": BUDGET, "every": EVERY, **kw}
    return sa.Compressed(score=make(hkv, D), **fields)


def kept(attn) -> list[list[list[int]]]:
    """Stream indices each kv head holds, per stream (from the engine's state)."""
    index = attn.slot_index()
    return [[[j for j in row.tolist() if j != sa.core.EMPTY] for row in heads] for heads in index]


@pytest.mark.parametrize("make", SCORERS)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("heads", HEADS)
def test_any_chunking_equals_the_replay(make, positions, heads):
    hq, hkv = heads
    pol = policy(make, hkv)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(2, hq, hkv, T, D, torch.float64, seed=hq + hkv)
    held: list = []
    ref = reference.replay(q, k, v, pol, rope=rope, positions=positions, held_out=held)
    for spec in CHUNKINGS:
        attn = sa.StreamingAttention(pol, rope, positions)
        out = stream(attn, q, k, v, chunk_sizes(spec, T, seed=7))
        assert max_err(out, ref) < 1e-12, spec
        assert kept(attn) == held, spec


@pytest.mark.parametrize("make", SCORERS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_ragged_batch_equals_each_stream_alone(make, positions):
    """B=3 streams of different lengths, each chunked its own way, padded with NaN: each == its replay."""
    hq, hkv = 6, 2
    pol = policy(make, hkv)
    rope = sa.RoPE(D)
    lengths = [70, 33, 51]
    qs, ks, vs = [], [], []
    for i, n in enumerate(lengths):
        q, k, v = make_qkv(1, hq, hkv, n, D, torch.float64, seed=20 + i)
        qs.append(q[0]), ks.append(k[0]), vs.append(v[0])
    attn = sa.StreamingAttention(pol, rope, positions)
    outs = stream_ragged(attn, qs, ks, vs, [chunk_sizes("random", n, seed=i) for i, n in enumerate(lengths)])
    for i in range(3):
        held: list = []
        ref = reference.replay(
            qs[i][None], ks[i][None], vs[i][None], pol, rope=rope, positions=positions, held_out=held
        )
        assert max_err(outs[i], ref[0]) < 1e-12
        assert kept(attn)[i] == held[0]


@pytest.mark.parametrize("make", SCORERS)
def test_heads_evict_independently_and_stay_within_budget(make):
    hq, hkv = 6, 3
    pol = policy(make, hkv)
    q, k, v = make_qkv(1, hq, hkv, T, D, torch.float64, seed=1)
    attn = sa.StreamingAttention(pol, sa.RoPE(D), "cache")
    for t in range(T):
        attn(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1])
        n = t + 1
        held = kept(attn)[0]
        assert all(len(h) == pol.held(n) <= BUDGET + EVERY for h in held)
        assert all(h == sorted(h) for h in held)  # slots in stream order
        assert all(set(range(min(2, n))) <= set(h) for h in held)  # sinks kept
        assert all(set(range(max(0, n - 4), n)) <= set(h) for h in held)  # the window kept
    assert len({tuple(h) for h in kept(attn)[0]}) > 1, "kv heads should keep different keys"


def test_ties_evict_the_older_key_first():
    """Keys of equal norm: K-norm scores tie everywhere, so the newest candidates are the ones kept."""
    pol = sa.Compressed(sinks=1, window=2, budget=6, score=sa.scores.KeyNorm(), every=4)
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 2, (1, 1, 40, D), generator=g).double() * 2 - 1  # +-1 entries: norm sqrt(D) exactly
    q, v = (
        torch.randn(1, 2, 40, D, generator=g, dtype=torch.float64),
        torch.randn(1, 1, 40, D, generator=g, dtype=torch.float64),
    )
    attn = sa.StreamingAttention(pol, sa.RoPE(D), "cache")
    out = stream(attn, q, k, v, [40])
    assert kept(attn)[0][0] == [0, 35, 36, 37, 38, 39]  # sink, newest candidates, window
    held: list = []
    assert max_err(out, reference.replay(q, k, v, pol, rope=sa.RoPE(D), positions="cache", held_out=held)) < 1e-12
    assert held[0][0] == [0, 35, 36, 37, 38, 39]


def test_cache_positions_stay_bounded_and_absolute_rebasing_changes_nothing():
    pol = sa.Compressed(sinks=2, window=4, budget=12, score=sa.scores.TOVA(), every=5)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(1, 4, 2, 300, D, torch.float64, seed=3)
    plain = stream(sa.StreamingAttention(pol, rope, "absolute"), q, k, v, [37] * 8 + [4])
    rebased = stream(sa.StreamingAttention(pol, rope, "absolute", rebase_every=16), q, k, v, [37] * 8 + [4])
    assert max_err(plain, rebased) < 1e-12
    assert max_err(plain, reference.replay(q, k, v, pol, rope=rope, positions="absolute")) < 1e-12


@pytest.mark.parametrize("make", SCORERS)
def test_bytes_constant_after_the_fill(make):
    pol = policy(make, 2)
    attn = sa.StreamingAttention(pol, sa.RoPE(D), "cache")
    q, k, v = make_qkv(2, 4, 2, 400, D, torch.float32, seed=4)
    sizes = []
    for i in range(0, 400, 9):
        attn(q[:, :, i : i + 9], k[:, :, i : i + 9], v[:, :, i : i + 9])
        sizes.append((attn.state.nbytes, attn.state.k.data_ptr()))
        assert max(attn.cached) <= pol.capacity
    assert len(set(sizes)) == 1  # allocated once at capacity, never reallocated


@pytest.mark.parametrize("make", SCORERS)
@pytest.mark.parametrize("positions", POSITIONS)
def test_save_restore_mid_stream_continues_bitwise(make, positions):
    pol = policy(make, 2)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(2, 4, 2, 90, D, torch.float32, seed=6)
    a = sa.StreamingAttention(pol, rope, positions)
    stream(a, q[:, :, :43], k[:, :, :43], v[:, :, :43], [11, 32])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = sa.StreamingAttention(pol, rope, positions)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    rest = (q[:, :, 43:], k[:, :, 43:], v[:, :, 43:])
    assert torch.equal(stream(a, *rest, [1] * 47), stream(b, *rest, [1] * 47))


def test_float32_streams_match_the_replay():
    """fp32 engine vs fp64 replay: here no two scores are close enough for rounding to flip a decision."""
    pol = sa.Compressed(sinks=2, window=4, budget=12, score=sa.scores.KeyNorm(), every=5)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(1, 6, 2, T, D, torch.float32, seed=2)
    ref = reference.replay(q, k, v, pol, rope=rope, positions="cache")
    for spec in (1, 7, "random"):
        out = stream(sa.StreamingAttention(pol, rope, "cache"), q, k, v, chunk_sizes(spec, T, seed=1))
        assert max_err(out, ref) < 2e-5


def test_streams_join_and_leave():
    pol = sa.Compressed(sinks=2, window=4, budget=12, score=sa.scores.H2O(), every=5)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(2, 4, 2, 60, D, torch.float64, seed=8)
    both = sa.StreamingAttention(pol, rope, "cache")
    stream(both, q[:, :, :31], k[:, :, :31], v[:, :, :31], [31])
    alone = sa.StreamingAttention(pol, rope, "cache")
    stream(alone, q[1:, :, :17], k[1:, :, :17], v[1:, :, :17], [17])
    both.select_streams([0])
    both.add_streams(alone.state)  # now stream 0 at 31 tokens and stream 1 at 17
    ref0 = reference.replay(q[:1], k[:1], v[:1], pol, rope=rope, positions="cache")
    ref1 = reference.replay(q[1:], k[1:], v[1:], pol, rope=rope, positions="cache")
    out = stream_ragged(
        both, [q[0, :, 31:], q[1, :, 17:]], [k[0, :, 31:], k[1, :, 17:]], [v[0, :, 31:], v[1, :, 17:]], [[29], [43]]
    )
    assert max_err(out[0], ref0[0, :, 31:]) < 1e-12
    assert max_err(out[1], ref1[0, :, 17:]) < 1e-12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 5, "sinks": 2, "window": 4}, "budget must be >= 6"),
        ({"every": 0}, "every must be >= 1"),
        ({"window": 0}, "window must be >= 1"),
        ({"score": "tova"}, "score must be a scorer"),
        ({"score": sa.scores.SnapKV(window=32), "every": 16}, "use every >= 32"),
    ],
)
def test_bad_policies(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sa.Compressed(**kwargs)


@pytest.mark.parametrize(
    "make", [lambda: sa.scores.SnapKV(window=0), lambda: sa.scores.SnapKV(kernel=4), lambda: sa.scores.QFilters([])]
)
def test_bad_scorers(make):
    with pytest.raises(ValueError):
        make()


def test_qfilters_of_another_shape_refused_before_any_state_change():
    pol = sa.Compressed(sinks=2, window=4, budget=12, score=sa.scores.QFilters(torch.ones(2, D)), every=5)
    attn = sa.StreamingAttention(pol, sa.RoPE(D))
    q, k, v = make_qkv(1, 4, 2, 10, D)
    attn(q, k, v)
    before = {name: t.clone() for name, t in attn.state.to_dict().items() if isinstance(t, torch.Tensor)}
    q3, k3, v3 = make_qkv(1, 3, 3, 4, D)
    with pytest.raises(ValueError, match="calibrated for 2 kv heads"):
        sa.StreamingAttention(pol, sa.RoPE(D))(q3, k3, v3)
    with pytest.raises(ValueError):
        attn(q3, k3, v3)
    after = attn.state.to_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


@pytest.mark.parametrize("make", SCORERS)
def test_config_round_trips(make):
    pol = policy(make, 2)
    assert sa.policy_from_config(pol.to_config()) == pol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("positions", POSITIONS)
def test_low_precision_streams(dtype, positions):
    """bf16/fp16 state, fp32 compute: == the replay while nothing is evicted; bounded and finite after."""
    pol = sa.Compressed(sinks=2, window=4, budget=40, score=sa.scores.H2O(), every=5)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(1, 4, 2, 120, D, dtype, seed=9)
    attn = sa.StreamingAttention(pol, rope, positions)
    out = stream(attn, q, k, v, chunk_sizes("random", 120, seed=3))
    ref = reference.replay(q[:, :, :45], k[:, :, :45], v[:, :, :45], pol, rope=rope, positions=positions)
    assert max_err(out[:, :, :45], ref) < TOL[dtype]  # the first eviction point that evicts is at 45
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert attn.state.k.dtype == dtype and attn.state.score.dtype == torch.float32
    assert attn.cached == [pol.held(120)]
