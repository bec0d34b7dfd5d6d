"""The engine architecture: registry, state rows (gather / scatter / join), kernels, slot indices,
and the non-uniform decode path (streams at different fills, one token each) against the reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import streamattn as sa
from streamattn import reference
from streamattn.core import EMPTY, attend, attend_with_lse, engine_for, register_engine
from streamattn.core.budget import BudgetEngine
from streamattn.core.memory import RetrievalEngine
from streamattn.core.per_head import PerHeadEngine
from tests.conftest import HEADS, POLICIES, POSITIONS, TOL, make_qkv, max_err

D = 16


def test_registry_picks_the_engine_by_policy_type_and_names_the_known_ones():
    assert engine_for(sa.SinkWindow(4, 16)) is sa.core.SinkWindowEngine
    assert engine_for(sa.Full()) is sa.core.SinkWindowEngine
    assert engine_for(sa.Compressed()) is BudgetEngine
    assert engine_for(sa.PerHead((sa.Full(),))) is PerHeadEngine
    assert engine_for(sa.Retrieval()) is RetrievalEngine

    @dataclasses.dataclass(frozen=True)
    class Unknown:
        kind = "index"

    with pytest.raises(
        TypeError, match=r"no engine realises policy .*Compressed, Full, PerHead, Retrieval, SinkWindow"
    ):
        sa.StreamingAttention(Unknown())
    with pytest.raises(ValueError, match="already has the engine"):
        register_engine(sa.SinkWindow)(type("Other", (), {}))


def test_policy_kinds_and_protocols():
    for policy in (sa.SinkWindow(4, 16), sa.Full()):
        assert policy.kind == "index"
        assert isinstance(policy, sa.policies.base.WindowPolicy)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("policy", POLICIES)
def test_non_uniform_decode_equals_the_reference(policy, heads, positions):
    """Three streams at different fills (ragged prefill), then 40 steps of one token each: every
    step takes the decode path with streams at different positions (masked SDPA, scattered writes)."""
    rope = sa.RoPE(D, 10000.0)
    prefix, steps = [3, 17, 40], 40
    qkv = [make_qkv(1, *heads, n + steps, D, torch.float32, seed=20 + i) for i, n in enumerate(prefix)]
    attn = sa.StreamingAttention(policy, rope, positions)
    hq, hkv = heads
    t = max(prefix)
    q = torch.zeros(3, hq, t, D)
    k, v = torch.full((3, hkv, t, D), float("nan")), torch.full((3, hkv, t, D), float("nan"))
    for b, n in enumerate(prefix):
        q[b, :, :n], k[b, :, :n], v[b, :, :n] = (x[0, :, :n] for x in qkv[b])
    attn(q, k, v, lengths=prefix)
    outs = []
    for i in range(steps):
        step = [
            torch.cat([x[:, :, n + i : n + i + 1] for x, n in zip(parts, prefix, strict=True)])
            for parts in zip(*qkv, strict=True)
        ]
        outs.append(attn(*step))
    for b, n in enumerate(prefix):
        q_b, k_b, v_b = (x.double() for x in qkv[b])
        want = reference.attention(q_b, k_b, v_b, policy, rope=rope, positions=positions)[:, :, n:]
        got = torch.cat([o[b : b + 1] for o in outs], dim=2)
        assert max_err(got, want) < TOL[torch.float32], f"stream {b}"


def _fed(policy, lengths=(30, 11, 5), positions="cache"):
    attn = sa.StreamingAttention(policy, sa.RoPE(D), positions)
    q, k, v = make_qkv(3, 6, 2, 30, D, seed=3)
    attn(q, k, v, lengths=list(lengths))
    return attn


@pytest.mark.parametrize("policy", POLICIES)
def test_select_streams_continues_like_the_selected_streams(policy):
    """Gather rows (leave, reorder, repeat): each kept stream continues exactly as it would have."""
    full, picked = _fed(policy), _fed(policy)
    picked.select_streams([2, 0, 0])
    q, k, v = make_qkv(3, 6, 2, 9, D, seed=4)
    want = full(q, k, v)
    got = picked(q[[2, 0, 0]], k[[2, 0, 0]], v[[2, 0, 0]])
    assert torch.equal(got, want[[2, 0, 0]])
    assert picked.seen == [full.seen[2], full.seen[0], full.seen[0]]


@pytest.mark.parametrize("policy", POLICIES)
def test_streams_join_and_are_replaced(policy):
    """add_streams (cat) and StreamState.put (scatter) give each stream its own continuation."""
    a, b = _fed(policy, (30, 11, 5)), _fed(policy, (7, 30, 19))
    joined = _fed(policy, (30, 11, 5))
    joined.add_streams(b.state.select([1]))  # a fourth stream joins: b's second one
    q, k, v = make_qkv(4, 6, 2, 5, D, seed=6)
    out = joined(q, k, v)
    assert torch.equal(out[:3], a(q[:3], k[:3], v[:3]))
    assert torch.equal(out[3:], b(torch.cat([q[3:]] * 3), torch.cat([k[3:]] * 3), torch.cat([v[3:]] * 3))[1:2])
    # scatter: row 0 of `joined` becomes a copy of b's row 1 (now both continue identically)
    joined.state.put([0], b.state.select([1]))
    joined._checked = None
    q2, k2, v2 = make_qkv(1, 6, 2, 3, D, seed=8)
    out2 = joined(*(torch.cat([x] * 4) for x in (q2, k2, v2)))
    assert max_err(out2[0], out2[3]) < 1e-6  # same stream, same inputs (batch rows may round apart)


def test_state_rows_are_validated_before_anything_changes():
    attn = _fed(sa.SinkWindow(2, 8))
    before = attn.state.to_dict()
    with pytest.raises(ValueError, match="out of range"):
        attn.select_streams([0, 3])
    with pytest.raises(ValueError, match="distinct rows"):
        attn.state.put([0, 0], attn.state.select([1, 2]))
    other = sa.StreamingAttention(sa.SinkWindow(2, 8), sa.RoPE(D))
    other(*make_qkv(1, 6, 3, 4, D))
    with pytest.raises(ValueError, match="different layouts"):
        attn.add_streams(other.state)
    after = attn.state.to_dict()
    assert all(torch.equal(before[key], after[key]) for key in ("k", "v", "sink_k", "seen", "base"))


def test_full_buffers_of_different_sizes_join():
    small, large = _fed(sa.Full(), (3, 2, 1)), sa.StreamingAttention(sa.Full(), sa.RoPE(D))
    large(*make_qkv(1, 6, 2, 600, D, seed=9))
    small.add_streams(large.state)
    assert small.state.slots >= 600 and small.seen == [3, 2, 1, 600]


@pytest.mark.parametrize("policy", POLICIES)
def test_slot_index_records_the_stream_index_of_each_slot(policy):
    attn = _fed(policy)
    index = attn.slot_index()
    assert index.shape == (*attn.state.k.shape[:3],) and index.dtype == torch.int64
    for b, seen in enumerate(attn.seen):
        held = sorted(int(j) for j in index[b, 0] if j != EMPTY)
        assert held == reference.visible_keys(policy, seen - 1)  # what the next-to-last query saw
        assert torch.equal(index[b, 0], index[b, -1])  # index rules: every kv head holds the same


@pytest.mark.parametrize("heads", HEADS)
def test_attend_with_lse_is_softmax_attention(heads):
    q, k, v = make_qkv(2, *heads, 5, D, torch.float64, seed=2)
    k, v = torch.cat([k] * 3, dim=2), torch.cat([v] * 3, dim=2)  # 15 keys
    mask = torch.rand(2, 1, 5, 15, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[0, 0, 2] = False  # a query that sees nothing
    out, lse, w = attend_with_lse(q, k, v, mask, 0.3, weights=True)
    g = heads[0] // heads[1]
    scores = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * 0.3
    scores = scores.masked_fill(~mask, float("-inf"))
    assert torch.equal(lse[0, :, 2], torch.full_like(lse[0, :, 2], float("-inf")))
    assert torch.all(out[0, :, 2] == 0) and torch.all(w[0, :, 2] == 0)
    seen = lse.isfinite()
    assert torch.allclose(lse[seen], torch.logsumexp(scores, -1)[seen], atol=1e-12)
    assert torch.allclose(w.sum(-1)[seen], torch.ones(()).double(), atol=1e-12)
    fine = mask.any(-1).expand(2, heads[0], 5)
    assert max_err(out[fine], attend(q, k, v, mask, 0.3)[fine]) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attend_lse_and_merge_give_attention_over_the_union(dtype):
    """Attention over keys A + B == merge of the attentions over A (fused, with lse) and over B."""
    from streamattn.core.kernels import attend_grouped_weights, attend_lse, merge_lse

    q, k, v = make_qkv(2, 3, 3, 6, D, dtype, seed=4)
    k, v = torch.cat([k, k.flip(2)], dim=2), torch.cat([v, v.flip(2)], dim=2)  # 12 keys
    mask = torch.rand(2, 1, 6, 12, generator=torch.Generator().manual_seed(1)) > 0.4
    mask[..., 0] = True  # every row sees a key of A (B may be empty for a row)
    mask[1, 0, 3, 5:] = False
    whole = attend(q, k, v, mask, 0.25)
    bias = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    out_a, lse_a = attend_lse(q, k[:, :, :5], v[:, :, :5], bias[..., :5], 0.25)
    scores_b = ((q @ k[:, :, 5:].transpose(-1, -2)) * 0.25).masked_fill(~mask[..., 5:], float("-inf"))
    lse_b = torch.logsumexp(scores_b, -1)
    p_b = torch.exp(scores_b - torch.where(lse_b.isfinite(), lse_b, 0)[..., None])
    merged = merge_lse(out_a, lse_a, p_b @ v[:, :, 5:], lse_b)
    assert max_err(merged, whole) < (1e-12 if dtype == torch.float64 else 1e-5)
    out, w = attend_grouped_weights(q, k, v, mask, 0.25)  # and the grouped-weights kernel agrees
    assert max_err(out, whole) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert torch.allclose(w.sum(-1), torch.ones((), dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_kernels_agree_with_their_plain_forms(dtype):
    """The budget engine's fast kernels == the plain ops they replace: ``attend_accumulate`` ==
    ``attend_grouped_weights`` (output, and the mean weights added in place into a strided view),
    ``take_rows`` == ``gather``, ``apply_rotary(out=)`` == ``apply_rotary``."""
    from streamattn.core.kernels import attend_accumulate, attend_grouped_weights, take_rows
    from streamattn.core.rope import RoPE, apply_rotary

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    q, k, v = make_qkv(3, 6, 2, 1, D, dtype, seed=5)
    k, v = torch.cat([k] + [torch.randn_like(k) for _ in range(9)], 2), torch.cat([v] * 10, 2)  # 10 keys
    buffer = torch.randn(3, 2, 16, dtype=dtype)  # a score buffer; the call adds into its first 10 slots
    before = buffer.clone()
    out = attend_accumulate(q, k, v, buffer.narrow(2, 0, 10), 0.3)
    ref_out, ref_w = attend_grouped_weights(q, k, v, None, 0.3)
    assert max_err(out, ref_out) < tol
    assert max_err(buffer[..., :10], before[..., :10] + ref_w[:, :, 0]) < tol
    assert torch.equal(buffer[..., 10:], before[..., 10:])

    x = torch.randn(3, 2, 16, D, dtype=dtype)
    keep = torch.rand(3, 2, 16).argsort(-1)[..., :7].sort(-1).values
    assert torch.equal(take_rows(x, None, keep), x.gather(2, keep[..., None].expand(-1, -1, -1, D)))
    rows = torch.tensor([2, 0])
    assert torch.equal(take_rows(x, rows, keep[:2]), x[rows].gather(2, keep[:2, ..., None].expand(-1, -1, -1, D)))
    assert torch.equal(take_rows(x[..., 0], rows, keep[:2]), x[rows, ..., 0].gather(2, keep[:2]))

    cos, sin = RoPE(D, 1e4).cos_sin(torch.arange(7), dtype)
    dest = torch.zeros(3, 2, 16, D, dtype=dtype)
    apply_rotary(x[:, :, :7], cos, sin, out=dest[:, :, :7])
    assert max_err(dest[:, :, :7], apply_rotary(x[:, :, :7], cos, sin)) < tol
    assert torch.all(dest[:, :, 7:] == 0)
