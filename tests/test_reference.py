"""The oracle itself: literal rules, RoPE convention, and the cache-position formula of the issue."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import streamattn as sa
from streamattn import reference
from tests.conftest import POLICIES, make_qkv, max_err


@settings(max_examples=200, deadline=None)
@given(sinks=st.integers(0, 6), window=st.integers(1, 12), t=st.integers(0, 60))
def test_visible_keys_is_the_literal_rule(sinks, window, t):
    policy = sa.SinkWindow(sinks=sinks, window=window)
    brute = [j for j in range(t + 1) if j <= t and (j < sinks or t - j < window)]
    assert reference.visible_keys(policy, t) == brute


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_visible_matches_literal_rule(policy):
    q_idx, kv_idx = torch.arange(80)[:, None], torch.arange(80)[None, :]
    got = policy.visible(q_idx, kv_idx)
    want = torch.tensor([[reference.is_visible(policy, t, j) for j in range(80)] for t in range(80)])
    assert torch.equal(got, want)


def test_rope_is_rotate_half_convention():
    rope = sa.RoPE(head_dim=4, theta=100.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    p = 3
    f0, f1 = 1.0, 100.0 ** (-2 / 4)  # theta^(-2i/D), i = 0, 1
    c0, s0 = torch.cos(torch.tensor(p * f0)), torch.sin(torch.tensor(p * f0))
    c1, s1 = torch.cos(torch.tensor(p * f1)), torch.sin(torch.tensor(p * f1))
    # pairs (x0, x2) and (x1, x3) rotate by p*f0 and p*f1
    want = torch.stack([1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1]).double()
    assert torch.allclose(rope.rotate(x, torch.tensor([p])), want[None], atol=1e-14)
    assert torch.allclose(reference._rope64(x, torch.tensor([p]), 100.0), want[None], atol=1e-14)
    m = rope.rotation_matrices(torch.tensor(p), torch.float64)
    assert torch.allclose(x @ m, want[None], atol=1e-14)


def test_reference_absolute_is_masked_attention_with_rope():
    q, k, v = make_qkv(2, 6, 3, 50, 8, torch.float64)
    rope = sa.RoPE(8, 500.0)
    policy = sa.SinkWindow(sinks=3, window=10)
    got = reference.attention(q, k, v, policy, rope=rope, positions="absolute")
    pos = torch.arange(50)
    qr, kr = rope.rotate(q, pos), rope.rotate(k, pos)
    mask = sa.masks.dense_mask(policy, 50)
    want = F.scaled_dot_product_attention(qr, kr, v, attn_mask=mask, enable_gqa=True)
    assert max_err(got, want) < 1e-12


def test_reference_cache_positions_follow_the_issue_formula():
    """window key at distance t - j; sink key at min(t, S + W - 1) - j."""
    s, w, t_len, d = 2, 5, 30, 8
    q, k, v = make_qkv(1, 2, 1, t_len, d, torch.float64)
    rope = sa.RoPE(d, 50.0)
    policy = sa.SinkWindow(sinks=s, window=w)
    got = reference.attention(q, k, v, policy, rope=rope, positions="cache")
    want = torch.zeros_like(got)
    for t in range(t_len):
        keys = reference.visible_keys(policy, t)
        dist = torch.tensor([(min(t, s + w - 1) - j) if j < s else (t - j) for j in keys])
        # <R(a) q, R(a - dist) k>: rotate each key back by its distance, query at 0
        kk = rope.rotate(k[:, :, keys], -dist)
        scores = (q[:, :, t : t + 1] @ kk.transpose(-1, -2)) / d**0.5  # GQA with Hkv=1 broadcasts
        want[:, :, t : t + 1] = torch.softmax(scores, -1) @ v[:, :, keys]
    assert max_err(got, want) < 1e-12


def test_reference_needs_every_visible_key():
    q, k, v = make_qkv(1, 1, 1, 4, 8, torch.float64)
    with pytest.raises(ValueError, match="kv_idx"):
        reference.attention(q[:, :, :1], k, v, sa.Full(), q_idx=[9], kv_idx=[6, 7, 8, 9])
