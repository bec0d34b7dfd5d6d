"""Retrieval (memory of evicted blocks): engine == fp64 step-by-step replay, any chunking.

Exactness is checked in float64 (relevance equal to ~1e-15, so every retrieval and every drop is the
same); the retrieved blocks are compared through the outputs and the blocks held through the state.
"""

from __future__ import annotations

import io

import pytest
import torch

import streamattn as sa
from streamattn import reference
from streamattn.core.memory import NO_BLOCK
from tests.conftest import HEADS, POSITIONS, chunk_sizes, make_qkv, max_err, stream, stream_ragged

D = 16
T = 90
# blocks of 3 after 2 sinks, window 5: block b enters at 2 + 3(b + 1) - 1 + 5; ~27 blocks in 90 tokens
POLICIES = [
    pytest.param(sa.Retrieval(sinks=2, window=5, block=3, topk=2), id="sink2_win5_block3_top2"),
    pytest.param(sa.Retrieval(sinks=0, window=4, block=2, topk=1), id="win4_block2_top1"),
    pytest.param(sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=4), id="max4"),
    pytest.param(sa.Retrieval(sinks=1, window=3, block=4, topk=3, max_blocks=3), id="top3_max3"),
    pytest.param(sa.Retrieval(sinks=2, window=5, block=3, topk=2, every=4), id="every4"),
    pytest.param(sa.Retrieval(sinks=1, window=3, block=2, topk=2, max_blocks=3, every=5), id="every5_max3"),
]
CHUNKINGS = [1, 3, 7, 4, 13, "random"]  # {1, 3, 7, > block, > window + block, random}


def blocks_held(attn) -> list[list[list[int]]]:
    """Block numbers each kv head holds, per stream, ascending."""
    ids = attn.state.block_id
    return [[sorted(b for b in row.tolist() if b != NO_BLOCK) for row in heads] for heads in ids]


def replay_blocks(pol, retrieved, t_len) -> list[list[int]]:
    """Blocks each kv head holds after ``t_len`` tokens, from the replay's retrieval log (max_blocks)."""
    out = []
    for log in retrieved:
        memory: dict[int, int] = {}
        for t in range(t_len):
            decides = t % pol.every == 0
            n = pol.blocks_in_memory(t)
            if n and pol.entry(n - 1) == t:
                memory[n - 1] = t
                if pol.max_blocks is not None and len(memory) > pol.max_blocks:
                    kept = set() if decides else set(log[t])
                    del memory[min((b for b in memory if b not in kept), key=lambda b: (memory[b], b))]
            for b in log[t] if decides else ():
                memory[b] = t
        out.append(sorted(memory))
    return out


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("heads", HEADS)
def test_any_chunking_equals_the_replay(policy, positions, heads):
    hq, hkv = heads
    rope = sa.RoPE(D)
    q, k, v = make_qkv(2, hq, hkv, T, D, torch.float64, seed=hq + hkv)
    retrieved: list = []
    ref = reference.replay_retrieval(q, k, v, policy, rope=rope, positions=positions, retrieved_out=retrieved)
    assert any(len(r) == policy.topk for log in retrieved[0] for r in log), "the test must retrieve"
    for spec in CHUNKINGS:
        attn = sa.StreamingAttention(policy, rope, positions)
        out = stream(attn, q, k, v, chunk_sizes(spec, T, seed=7))
        assert max_err(out, ref) < 1e-12, spec
        assert blocks_held(attn) == [replay_blocks(policy, r, T) for r in retrieved], spec


@pytest.mark.parametrize("policy", POLICIES)
def test_retrieval_changes_the_output_and_needs_its_memory(policy):
    """Not vacuous: before the first block enters, the output is sinks + window's; after, the
    retrieved blocks change it (absolute positions: the same positions in both)."""
    rope = sa.RoPE(D)
    q, k, v = make_qkv(1, 4, 2, T, D, torch.float64, seed=1)
    out = stream(sa.StreamingAttention(policy, rope, "absolute"), q, k, v, [T])
    local = sa.SinkWindow(sinks=policy.sinks, window=policy.window)
    plain = reference.attention(q, k, v, local, rope=rope, positions="absolute")
    before = slice(0, policy.entry(0))  # no block in memory yet: exactly sinks + window
    assert max_err(out[:, :, before], plain[:, :, before]) < 1e-12
    late = slice(policy.entry(0), T)
    assert max_err(out[:, :, late], plain[:, :, late]) > 1e-3


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_ragged_batch_equals_each_stream_alone(policy, positions):
    """B=3 streams of different lengths, each chunked its own way, padded with NaN: each == its replay."""
    hq, hkv = 6, 2
    rope = sa.RoPE(D)
    lengths = [90, 41, 67]
    qs, ks, vs = [], [], []
    for i, n in enumerate(lengths):
        q, k, v = make_qkv(1, hq, hkv, n, D, torch.float64, seed=20 + i)
        qs.append(q[0]), ks.append(k[0]), vs.append(v[0])
    attn = sa.StreamingAttention(policy, rope, positions)
    outs = stream_ragged(attn, qs, ks, vs, [chunk_sizes("random", n, seed=i) for i, n in enumerate(lengths)])
    for i in range(3):
        ref = reference.replay_retrieval(qs[i][None], ks[i][None], vs[i][None], policy, rope=rope, positions=positions)
        assert max_err(outs[i], ref[0]) < 1e-12


def test_no_rope_and_rebasing_change_nothing():
    pol = sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=4)
    q, k, v = make_qkv(1, 4, 2, 200, D, torch.float64, seed=3)
    rope = sa.RoPE(D)
    for positions in POSITIONS:
        plain = stream(sa.StreamingAttention(pol, rope, positions), q, k, v, [37] * 5 + [15])
        rebased = stream(sa.StreamingAttention(pol, rope, positions, rebase_every=16), q, k, v, [37] * 5 + [15])
        assert max_err(plain, rebased) < 1e-12
        assert max_err(plain, reference.replay_retrieval(q, k, v, pol, rope=rope, positions=positions)) < 1e-12
    out = stream(sa.StreamingAttention(pol, None, "cache"), q, k, v, chunk_sizes("random", 200))
    assert max_err(out, reference.replay_retrieval(q, k, v, pol, rope=None)) < 1e-12


def test_bounded_memory_is_constant_bytes_and_unbounded_grows_by_blocks():
    q, k, v = make_qkv(2, 4, 2, 400, D, torch.float32, seed=4)
    bounded = sa.StreamingAttention(sa.Retrieval(sinks=2, window=8, block=4, topk=2, max_blocks=5), sa.RoPE(D))
    growing = sa.StreamingAttention(sa.Retrieval(sinks=2, window=8, block=4, topk=2), sa.RoPE(D))
    sizes, held = set(), []
    for i in range(0, 400, 9):
        chunk = (q[:, :, i : i + 9], k[:, :, i : i + 9], v[:, :, i : i + 9])
        bounded(*chunk)
        growing(*chunk)
        if i > 100:
            sizes.add(bounded.state.nbytes)
        held.append(growing.cached[0])
    assert len(sizes) == 1  # full after the first 5 blocks: never reallocated
    assert max(bounded.cached) <= 2 + 8 + 4 + 5 * 4
    n = 400
    assert held[-1] == 2 + (8 + 4) + ((n - 8 - 2) // 4) * 4  # sinks + ring + every block that entered
    assert all(len(h) == 5 for heads in blocks_held(bounded) for h in heads)


def test_least_recently_retrieved_block_leaves_first():
    """One kv head, topk 1: block 0 is made the most relevant forever (a huge key along the query),
    so it is retrieved by every query and never leaves, while the others leave oldest first."""
    pol = sa.Retrieval(sinks=0, window=2, block=2, topk=1, max_blocks=2)
    g = torch.Generator().manual_seed(0)
    q = torch.ones(1, 1, 30, D, dtype=torch.float64)
    k = torch.randn(1, 1, 30, D, generator=g, dtype=torch.float64) * 0.1
    k[0, 0, 0] = 10.0  # block 0 = tokens 0, 1
    v = torch.randn(1, 1, 30, D, generator=g, dtype=torch.float64)
    attn = sa.StreamingAttention(pol, sa.RoPE(D), "cache")
    out = stream(attn, q, k, v, chunk_sizes("random", 30))
    newest = pol.blocks_in_memory(29) - 1
    assert blocks_held(attn)[0][0] == [0, newest]
    assert max_err(out, reference.replay_retrieval(q, k, v, pol, rope=sa.RoPE(D))) < 1e-12


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_save_restore_mid_stream_continues_bitwise(policy, positions):
    rope = sa.RoPE(D)
    q, k, v = make_qkv(2, 4, 2, 90, D, torch.float32, seed=6)
    a = sa.StreamingAttention(policy, rope, positions)
    stream(a, q[:, :, :43], k[:, :, :43], v[:, :, :43], [11, 32])
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    b = sa.StreamingAttention(policy, rope, positions)
    b.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    rest = (q[:, :, 43:], k[:, :, 43:], v[:, :, 43:])
    assert torch.equal(stream(a, *rest, [1] * 47), stream(b, *rest, [1] * 47))


def test_streams_join_and_leave():
    pol = sa.Retrieval(sinks=2, window=5, block=3, topk=2)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(2, 4, 2, 80, D, torch.float64, seed=8)
    both = sa.StreamingAttention(pol, rope, "cache")
    stream(both, q[:, :, :61], k[:, :, :61], v[:, :, :61], [61])
    alone = sa.StreamingAttention(pol, rope, "cache")
    stream(alone, q[1:, :, :17], k[1:, :, :17], v[1:, :, :17], [17])
    both.select_streams([0])
    both.add_streams(alone.state)  # stream 0 at 61 tokens (more blocks) and stream 1 at 17
    ref0 = reference.replay_retrieval(q[:1], k[:1], v[:1], pol, rope=rope)
    ref1 = reference.replay_retrieval(q[1:], k[1:], v[1:], pol, rope=rope)
    out = stream_ragged(
        both, [q[0, :, 61:], q[1, :, 17:]], [k[0, :, 61:], k[1, :, 17:]], [v[0, :, 61:], v[1, :, 17:]], [[19], [63]]
    )
    assert max_err(out[0], ref0[0, :, 61:]) < 1e-12
    assert max_err(out[1], ref1[0, :, 17:]) < 1e-12


@pytest.mark.parametrize("positions", POSITIONS)
def test_streams_joining_mid_query_block_keep_their_choice(positions):
    """Two streams decoded alone to the middle of a query block (each with its choice and the blocks
    it gathered for it), joined into one batch in step, then decoded together: each == its replay."""
    pol = sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=5, every=4)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(2, 4, 2, 80, D, torch.float64, seed=21)
    first, second = (sa.StreamingAttention(pol, rope, positions) for _ in range(2))
    stream(first, q[:1, :, :46], k[:1, :, :46], v[:1, :, :46], [1] * 46)
    stream(second, q[1:, :, :46], k[1:, :, :46], v[1:, :, :46], [40] + [1] * 6)
    assert first.state.fetched is not None and 46 % pol.every
    first.add_streams(second.state)
    out = stream(first, q[:, :, 46:], k[:, :, 46:], v[:, :, 46:], [1] * 34)
    ref = reference.replay_retrieval(q, k, v, pol, rope=rope, positions=positions)
    assert max_err(out, ref[:, :, 46:]) < 1e-12
    # a stream put in place of another, mid query block, in a batch that gathered its blocks
    pair = sa.StreamingAttention(pol, rope, positions)
    stream(pair, q[[0, 0]][:, :, :46], k[[0, 0]][:, :, :46], v[[0, 0]][:, :, :46], [1] * 46)
    assert pair.state.fetched is not None
    pair.state.put([1], second.state.select([0]))
    out = stream(pair, q[:, :, 46:], k[:, :, 46:], v[:, :, 46:], [1] * 34)
    assert max_err(out, ref[:, :, 46:]) < 1e-12


def test_float32_streams_match_the_replay():
    pol = sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=4)
    rope = sa.RoPE(D)
    q, k, v = make_qkv(1, 6, 2, T, D, torch.float32, seed=2)
    ref = reference.replay_retrieval(q, k, v, pol, rope=rope)
    for spec in (1, 7, "random"):
        out = stream(sa.StreamingAttention(pol, rope, "cache"), q, k, v, chunk_sizes(spec, T, seed=1))
        assert max_err(out, ref) < 2e-5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block": 0}, "block must be >= 1"),
        ({"topk": 0}, "topk must be >= 1"),
        ({"topk": 4, "max_blocks": 3}, "max_blocks must be >= 4"),
        ({"window": 0}, "window must be >= 1"),
        ({"sinks": -1}, "sinks must be >= 0"),
        ({"block": 2.0}, "block must be an int"),
        ({"every": 0}, "every must be >= 1"),
        ({"topk": 2, "max_blocks": 2, "every": 4}, "every > 1 needs max_blocks > topk"),
    ],
)
def test_bad_policies(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sa.Retrieval(**kwargs)


def test_config_round_trips_and_bad_states_are_refused_before_any_change():
    pol = sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=4)
    assert sa.policy_from_config(pol.to_config()) == pol
    rope = sa.RoPE(D)
    q, k, v = make_qkv(1, 4, 2, 40, D, torch.float32, seed=9)
    a = sa.StreamingAttention(pol, rope)
    stream(a, q, k, v, [40])
    saved = a.state_dict()
    before = a.state.to_dict()
    broken = {**saved["_extra_state"], "state": {**saved["_extra_state"]["state"]}}
    broken["state"]["stamp"] = broken["state"]["stamp"][:, :, :2]
    with pytest.raises(ValueError, match="stamp must be"):
        a.load_state_dict({"_extra_state": broken})
    other = sa.StreamingAttention(sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=5), rope)
    with pytest.raises(ValueError, match="another configuration"):
        other.load_state_dict(saved)
    after = a.state.to_dict()
    assert all(torch.equal(before[n], after[n]) for n in ("mem_k", "stamp", "block_id"))


@pytest.mark.parametrize("union", [0, 1000], ids=["gathered", "union"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_both_memory_paths_equal_the_replay(monkeypatch, union, positions):
    """The memory part attends either the union of the blocks a segment chose (masked per query) or
    each query's own blocks (gathered, in tiles of queries); which one runs depends on how much the
    queries agree, so each is forced here."""
    import streamattn.core.memory as memory

    monkeypatch.setattr(memory, "_UNION", union)
    monkeypatch.setattr(memory, "_GATHER_BYTES", 3 * 2 * 3 * D * 8)  # tiles of 3 queries in the gathered path
    calls = []
    for name in ("_attend_union", "_attend_gathered"):
        real = getattr(memory.RetrievalEngine, name)
        monkeypatch.setattr(
            memory.RetrievalEngine, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw)
        )
    pol = sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=4)
    q, k, v = make_qkv(2, 6, 2, 80, D, torch.float64, seed=11)
    out = stream(sa.StreamingAttention(pol, sa.RoPE(D), positions), q, k, v, chunk_sizes("random", 80, seed=3))
    assert max_err(out, reference.replay_retrieval(q, k, v, pol, rope=sa.RoPE(D), positions=positions)) < 1e-12
    assert set(calls) == {"_attend_gathered" if union == 0 else "_attend_union"}


# ---------------------------------------------------------------------- where the store lives
@pytest.mark.parametrize("store", ["cpu", "disk"])
@pytest.mark.parametrize("max_blocks", [None, 4], ids=["growing", "max4"])
@pytest.mark.parametrize("every", [1, 3])
def test_store_placement_changes_nothing(store, max_blocks, every, tmp_path):
    """The store on the CPU or memory-mapped on disk gives the device store's results bitwise, also
    through growth, streams joining and leaving and save/restore (a state saved from the device
    store resumes in the other placement); the disk store's tensors are file-backed (files
    unlinked at once: the directory stays empty) and so is a restored one."""
    from streamattn.core.placement import mapped_file

    kw = {"store_dir": str(tmp_path)} if store == "disk" else {}
    pols = [
        sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=max_blocks, every=every),
        sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=max_blocks, every=every, store=store, **kw),
    ]
    q, k, v = make_qkv(3, 4, 2, T, D, torch.float32, seed=12)
    ops = [sa.StreamingAttention(p, sa.RoPE(D), "cache") for p in pols]
    outs = [stream(op, q[:, :, :50], k[:, :, :50], v[:, :, :50], [7, 1, 30, 12]) for op in ops]
    assert torch.equal(outs[0], outs[1])
    for op in ops:  # streams leave and join
        op.select_streams([2, 0])
        op.add_streams(op.state.select([1]))
    if store == "disk":
        assert all(mapped_file(t) for t in (ops[1].state.mem_k, ops[1].state.mem_v))
        assert mapped_file(ops[1].state.lo) is None  # bounds stay with the attention
        assert list(tmp_path.iterdir()) == []
    restored = sa.StreamingAttention(pols[1], sa.RoPE(D), "cache")
    restored.load_state_dict(ops[0].state_dict())  # saved with the store on the device, resumed here
    if store == "disk":
        assert mapped_file(restored.state.mem_k) is not None
    rest = [x[[2, 0, 0], :, 50:] for x in (q, k, v)]
    a, b, c = (stream(op, *rest, [1] * 13 + [27]) for op in (ops[0], ops[1], restored))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(ops[0].state.mem_k, ops[1].state.mem_k.to(ops[0].state.mem_k.device))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"store": "floppy"}, "store must be one of"),
        ({"store": "cpu", "store_dir": "/tmp"}, "store_dir is for store='disk'"),
        ({"store": "disk", "store_dir": "/nonexistent/dir"}, "store_dir must be an existing directory"),
    ],
)
def test_bad_store_placements(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sa.Retrieval(**kwargs)


@pytest.mark.parametrize("positions", POSITIONS)
def test_ties_at_the_cut_take_the_newer_block(positions):
    """Every memory block holds the same keys (no RoPE: bit-identical bounds), so every block is
    equally relevant to every query: the tie rule alone picks, and it must pick the newest ``topk``
    blocks, as the replay does (values differ per token, so another pick changes the output)."""
    pol = sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=6)
    q, _, v = make_qkv(2, 4, 2, T, D, torch.float64, seed=13)
    pattern = torch.randn(2, 2, pol.block, D, dtype=torch.float64)
    body = pattern.repeat(1, 1, T // pol.block + 1, 1)[:, :, : T - pol.sinks]
    k = torch.cat((torch.randn(2, 2, pol.sinks, D, dtype=torch.float64), body), dim=2)
    retrieved: list = []
    ref = reference.replay_retrieval(q, k, v, pol, rope=None, positions=positions, retrieved_out=retrieved)
    n = pol.blocks_in_memory(T - 1)
    assert sorted(retrieved[0][0][T - 1]) == [n - 2, n - 1]
    for spec in (1, 7, "random"):
        out = stream(sa.StreamingAttention(pol, None, positions), q, k, v, chunk_sizes(spec, T, seed=5))
        assert max_err(out, ref) < 1e-12, spec


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("positions", POSITIONS)
def test_decode_steps_take_the_one_softmax_path(monkeypatch, policy, positions):
    """Token by token, streams in step and past the sinks take ``_decode`` (one softmax over sinks,
    window and blocks) and equal the replay; a ragged batch takes the general path."""
    import streamattn.core.memory as memory

    calls = []
    real = memory.RetrievalEngine._decode
    monkeypatch.setattr(memory.RetrievalEngine, "_decode", lambda *a: calls.append(1) or real(*a))
    q, k, v = make_qkv(2, 6, 2, T, D, torch.float64, seed=17)
    out = stream(sa.StreamingAttention(policy, sa.RoPE(D), positions), q, k, v, [1] * T)
    ref = reference.replay_retrieval(q, k, v, policy, rope=sa.RoPE(D), positions=positions)
    assert max_err(out, ref) < 1e-12
    assert len(calls) == T - policy.sinks
    calls.clear()
    attn = sa.StreamingAttention(policy, sa.RoPE(D), positions)
    outs = stream_ragged(
        attn, [q[0], q[1, :, :40]], [k[0], k[1, :, :40]], [v[0], v[1, :, :40]], [[1] * T, [3] + [1] * 37]
    )
    assert calls == []  # streams out of step, then one of them padded: the general path
    assert max_err(outs[0], ref[0]) < 1e-12


def test_states_saved_before_choice_existed_load_and_bad_choices_are_refused():
    pol = sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=4)
    q, k, v = make_qkv(1, 4, 2, 60, D, torch.float64, seed=19)
    a = sa.StreamingAttention(pol, sa.RoPE(D))
    stream(a, q[:, :, :40], k[:, :, :40], v[:, :, :40], [40])
    raw = a.state.to_dict()
    old = {name: t for name, t in raw.items() if name != "choice"}  # what earlier versions saved
    b = sa.StreamingAttention(pol, sa.RoPE(D))
    b.state = b.engine.spec.load(old)
    rest = [x[:, :, 40:] for x in (q, k, v)]
    assert torch.equal(stream(a, *rest, [20]), stream(b, *rest, [20]))
    every = sa.Retrieval(sinks=2, window=5, block=3, topk=2, max_blocks=4, every=3)
    c = sa.StreamingAttention(every, sa.RoPE(D))
    stream(c, q[:, :, :40], k[:, :, :40], v[:, :, :40], [40])
    for bad in (c.state.choice[..., :1], c.state.choice + 9, c.state.choice.int()):
        with pytest.raises(ValueError, match="choice must be"):
            c.engine.spec.load({**c.state.to_dict(), "choice": bad})
