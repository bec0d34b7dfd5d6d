"""The encoder engine (``ChunkedContext``): the policy's rule, masks, the streaming attention
(``ChunkedAttention``) and convolution (``StreamingConv1d``) against their offline forms, and whole
encoders (``StreamingEncoder``: a Conformer-style stack, a Whisper-shaped one) streamed in pieces ==
one offline forward with the same mask. Emission counts, bounded state, save/restore, errors."""

from __future__ import annotations

import io
import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import streamattn as sa
from streamattn import reference
from streamattn.core.chunked import ChunkedAttention
from tests.conftest import make_qkv, max_err

D = 4
F64 = torch.float64


def rule(chunk, left, lookahead, t, j):
    """The rule as the docstring states it, in plain Python."""
    c = t // chunk
    return (left is None or j // chunk >= c - left // chunk) and j < (c + 1) * chunk + lookahead


def schedule(spec, total, policy, seed=0):
    """Piece sizes summing to ``total``: an int, "big" (more than chunk + lookahead), "whole" or "random"."""
    if spec == "whole":
        return [total]
    rng, sizes = random.Random(seed), []
    while sum(sizes) < total:
        size = {"big": policy.chunk + policy.lookahead + 4, "random": rng.randint(1, 12)}.get(spec, spec)
        sizes.append(min(size, total - sum(sizes)))
    return sizes


def pieces(x, counts, dim, fill=float("nan")):
    """Rows of a ragged call: row ``b`` gets ``x[b]``'s frames ``[at_b, at_b + n_b)``, NaN padding after."""
    t = max(n for _, n in counts)
    shape = list(x.shape)
    shape[dim] = t
    out = torch.full(shape, fill, dtype=x.dtype)
    for b, (at, n) in enumerate(counts):
        out[b].narrow(dim - 1, 0, n).copy_(x[b].narrow(dim - 1, at, n))
    return out


def stream_attention(attn, q, k, v, schedules):
    """Feed B streams together, row b by its own piece sizes; returns per-row outputs and the emissions."""
    state = attn.new_state(q.shape[0], q.shape[1], k.shape[1], q.shape[3], q.dtype)
    at, step, log = [0] * q.shape[0], 0, []
    outs = [[] for _ in at]
    while any(step < len(s) for s in schedules):
        counts = [(at[b], s[step] if step < len(s) else 0) for b, s in enumerate(schedules)]
        out, emitted = attn(state, *(pieces(x, counts, 2) for x in (q, k, v)), [n for _, n in counts])
        log.append(emitted)
        for b, (_, n) in enumerate(counts):
            outs[b].append(out[b, :, : emitted[b]])
            at[b] += n
        step += 1
    out, emitted = attn.finish(state)
    log.append(emitted)
    for b in range(q.shape[0]):
        outs[b].append(out[b, :, : emitted[b]])
    return [torch.cat(o, dim=1) for o in outs], log


def same(a, b):
    """Saved states equal to the bit (tensors: dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


# ---------------------------------------------------------------------- policy
def test_policy_validation_and_config():
    for kwargs, match in [
        ({"chunk": 0}, "chunk must be >= 1"),
        ({"chunk": True}, "chunk must be an int"),
        ({"chunk": 4.0}, "chunk must be an int"),
        ({"chunk": 4, "left": 6}, "left must be a multiple of chunk"),
        ({"chunk": 4, "left": -4}, "left must be >= 0"),
        ({"chunk": 4, "lookahead": -1}, "lookahead must be >= 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            sa.ChunkedContext(**kwargs)
    policy = sa.ChunkedContext(chunk=4, left=8, lookahead=2)
    assert policy.kind == "encoder" and policy.capacity == 14 and policy.name == "chunk4_left8_ahead2"
    assert sa.ChunkedContext(4).capacity is None and sa.ChunkedContext(4).name == "chunk4_leftinf_ahead0"
    assert sa.policy_from_config(policy.to_config()) == policy
    assert sa.parse_policy("chunk=50,left=400,lookahead=10") == sa.ChunkedContext(50, 400, 10)
    assert sa.parse_policy("chunk=4") == sa.ChunkedContext(4, None, 0)
    with pytest.raises(ValueError, match="an encoder policy is"):
        sa.parse_policy("chunk=4,window=8")
    with pytest.raises(TypeError, match=r"encoder policy.*ChunkedAttention"):
        sa.StreamingAttention(policy)


@pytest.mark.parametrize("c, left, r", [(1, None, 0), (1, 0, 0), (4, 8, 2), (5, 0, 7), (3, None, 1), (2, 6, 0)])
def test_visible_is_the_literal_rule(c, left, r):
    policy = sa.ChunkedContext(c, left, r)
    t = torch.arange(40)
    mask = policy.visible(t[:, None], t[None, :])
    for i in range(40):
        for j in range(40):
            assert bool(mask[i, j]) == rule(c, left, r, i, j) == reference.chunked_visible(policy, i, j), (i, j)
    assert torch.equal(sa.masks.dense_mask(policy, 40), mask)
    # the most keys a query sees (keys beyond the stream's start)
    if policy.capacity is not None:
        assert int(sa.masks.dense_mask(policy, 10, 200, q_offset=100).sum(-1).max()) == policy.capacity


def test_named_mask_and_flex_attention():
    policy = sa.ChunkedContext(4, 8, 3)
    mod = sa.masks.generate_chunked_context(4, 8, 3)
    assert mod.__name__ == "chunk4_left8_ahead3"
    t = torch.arange(48)
    zero = torch.tensor(0)
    assert torch.equal(mod(zero, zero, t[:, None], t[None, :]), sa.masks.dense_mask(policy, 48))
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = make_qkv(1, 2, 2, 48, D, F64, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns that it is not compiled
        out = flex_attention(q, k, v, block_mask=sa.masks.block_mask(policy, 48, block_size=16))
    assert max_err(out, reference.chunked_context_attention(q, k, v, policy)) < 1e-12


# ---------------------------------------------------------------------- attention: streamed == reference
MATRIX = [
    pytest.param(c, left, r, id=f"c{c}_l{left}_r{r}")
    for c in (1, 4, 5)
    for left in (None, 0, c, 3 * c)
    for r in (0, 1, 3, c + 2)
]
SCHEDULES = (1, 3, 7, "big", "whole", "random")


@pytest.mark.parametrize("c, left, r", MATRIX)
def test_streaming_equals_the_reference(c, left, r):
    """Any pieces (1 frame, 3, 7, more than chunk + lookahead, the whole utterance, random) == the fp64
    reference over the whole utterance; GQA and MHA alternate over the matrix."""
    policy = sa.ChunkedContext(c, left, r)
    heads = (6, 2) if (c + r + (left or 0)) % 2 else (4, 4)
    q, k, v = make_qkv(1, *heads, 23, D, F64, seed=c * 100 + r)
    want = reference.chunked_context_attention(q, k, v, policy)
    for spec in SCHEDULES:
        got, _ = stream_attention(ChunkedAttention(policy, block=8), q, k, v, [schedule(spec, 23, policy, seed=c)])
        assert max_err(got[0][None], want) < 1e-10, spec


@pytest.mark.parametrize("c, left, r", [(4, 8, 2), (5, None, 1), (1, 0, 3)])
def test_float32_streaming_equals_the_reference(c, left, r):
    policy = sa.ChunkedContext(c, left, r)
    q, k, v = make_qkv(1, 6, 2, 30, D, torch.float32, seed=3)
    want = reference.chunked_context_attention(q, k, v, policy)
    for spec in (1, 7, "random"):
        got, _ = stream_attention(ChunkedAttention(policy), q, k, v, [schedule(spec, 30, policy, seed=4)])
        assert max_err(got[0][None], want) < 1e-5, spec


@pytest.mark.parametrize("policy", [sa.ChunkedContext(4, 8, 2), sa.ChunkedContext(3, None, 4)], ids=str)
def test_ragged_batch_equals_each_stream_alone(policy):
    """Three streams of different lengths, each with its own pieces (NaN padding): each equals itself
    fed alone and the reference; no NaN reaches an output or the state."""
    lengths = [31, 12, 5]
    qkv = [make_qkv(1, 6, 2, n, D, F64, seed=10 + i) for i, n in enumerate(lengths)]
    padded = [
        torch.cat([F.pad(x[0], (0, 0, 0, max(lengths) - x.shape[2]), value=float("nan"))[None] for x in parts])
        for parts in zip(*qkv, strict=True)
    ]
    schedules = [schedule("random", n, policy, seed=20 + i) for i, n in enumerate(lengths)]
    attn = ChunkedAttention(policy, block=5)
    got, _ = stream_attention(attn, *padded, schedules)
    for b, (q, k, v) in enumerate(qkv):
        alone, _ = stream_attention(attn, q, k, v, [schedules[b]])
        assert torch.isfinite(got[b]).all()
        assert max_err(got[b], alone[0]) < 1e-12
        assert max_err(got[b][None], reference.chunked_context_attention(q, k, v, policy)) < 1e-10
    # the reference's own padding: lengths mask the batch
    want = reference.chunked_context_attention(*(x.nan_to_num() for x in padded), policy, lengths)
    for b, n in enumerate(lengths):
        assert max_err(got[b], want[b, :, :n]) < 1e-10 and torch.all(want[b, :, n:] == 0)


# ---------------------------------------------------------------------- emission and state
def test_emitted_counts_are_the_documented_ones():
    """chunk=4, lookahead=2: chunk c is emitted when frame (c + 1) * 4 + 2 - 1 arrives, all 4 frames
    together; finish() emits the rest with whatever lookahead exists."""
    attn = ChunkedAttention(sa.ChunkedContext(4, 4, 2))
    state = attn.new_state(1, 2, 2, D, F64)
    emitted = []
    for _ in range(11):  # frames 0..10, one at a time
        out, e = attn(state, *(torch.randn(1, 2, 1, D, dtype=F64) for _ in range(3)))
        emitted.append(e[0])
        assert out.shape[2] == e[0]
    assert emitted == [0, 0, 0, 0, 0, 4, 0, 0, 0, 4, 0]  # after frames 5 (= 4 + 2 - 1) and 9
    assert (state.seen, state.done) == ([11], [8])
    assert attn.finish(state)[1] == [3] and state.done == [11] and state.closed == [True]
    # a batch: frontier(seen) = 4 * floor((seen - 2) / 4), final rows emit everything
    state = attn.new_state(3, 2, 2, D, F64)
    x = torch.randn(3, 2, 9, D, dtype=F64)
    _, e = attn(state, x, x, x, [9, 6, 5], final=[False, False, True])
    assert e == [4, 4, 5] and state.done == [4, 4, 5]
    _, e = attn(state, x[:, :, :5], x[:, :, :5], x[:, :, :5], [5, 1, 0])
    assert e == [8, 0, 0] and state.done == [12, 4, 5]  # 14 frames -> chunks 0..2; 7 frames -> chunk 0
    _, e = attn.finish(state, rows=[1])
    assert e == [0, 3, 0] and state.closed == [False, True, True]


def test_state_bytes_are_bounded_by_the_policy():
    """left bounded: the state's bytes are the same at every length (left + chunk + lookahead - 1 keys,
    chunk + lookahead - 1 queries); left=None: they grow with the stream."""
    for policy, bounded in ((sa.ChunkedContext(4, 8, 2), True), (sa.ChunkedContext(4, None, 2), False)):
        attn = ChunkedAttention(policy)
        state = attn.new_state(2, 2, 1, D, F64)
        sizes, fed = {}, 0
        x = torch.randn(2, 2, 7, D, dtype=F64)
        while fed < 700:
            attn(state, x, x[:, :1], x[:, :1])
            fed += 7
            if fed in (14, 70, 700):
                sizes[fed] = state.nbytes
        if bounded:
            assert len(set(sizes.values())) == 1
            assert state.k.shape[2] == 8 + 4 + 2 - 1 and state.q.shape[2] == 4 + 2 - 1
        else:
            assert sizes[14] < sizes[70] < sizes[700]


def test_save_restore_mid_stream_is_bitwise():
    policy = sa.ChunkedContext(4, 8, 2)
    attn = ChunkedAttention(policy)
    q, k, v = make_qkv(2, 4, 2, 40, D, torch.float32, seed=5)
    state = attn.new_state(2, 4, 2, D)
    attn(state, q[:, :, :13], k[:, :, :13], v[:, :, :13], [13, 9])
    buffer = io.BytesIO()
    torch.save(state.to_dict(), buffer)
    buffer.seek(0)
    restored = attn.load_state(torch.load(buffer, weights_only=True))
    for lo, hi in ((13, 20), (20, 40)):
        a = attn(state, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        b = attn(restored, q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi])
        assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert torch.equal(attn.finish(state)[0], attn.finish(restored)[0])


def test_streams_leave_and_join():
    policy = sa.ChunkedContext(3, 3, 1)
    attn = ChunkedAttention(policy)
    q, k, v = make_qkv(3, 2, 2, 20, D, F64, seed=6)
    state = attn.new_state(3, 2, 2, D, F64)
    attn(state, q[:, :, :8], k[:, :, :8], v[:, :, :8], [8, 5, 2])
    picked = state.select([2, 0])
    joined = type(state).cat([picked, picked.fresh(1)])
    want, _ = attn(state, q[:, :, 8:], k[:, :, 8:], v[:, :, 8:])
    got, e = attn(joined, q[[2, 0, 1], :, 8:], k[[2, 0, 1], :, 8:], v[[2, 0, 1], :, 8:])
    assert (
        max_err(got[0, :, : e[0]], want[2, :, : e[0]]) < 1e-12
        and max_err(got[1, :, : e[1]], want[0, :, : e[1]]) < 1e-12
    )
    fresh, _ = stream_attention(attn, q[1:2, :, 8:], k[1:2, :, 8:], v[1:2, :, 8:], [[12]])
    assert max_err(got[2, :, : e[2]], fresh[0][:, : e[2]]) < 1e-12


def test_bad_inputs_raise_before_any_change():
    policy = sa.ChunkedContext(4, 8, 2)
    attn = ChunkedAttention(policy)
    state = attn.new_state(2, 4, 2, D, F64)
    q, k, v = make_qkv(2, 4, 2, 6, D, F64)
    attn(state, q, k, v, [6, 3], final=[False, True])
    before = state.to_dict()
    bad = [
        (ValueError, "must be \\[B, H, T, D\\]", lambda: attn(state, q[0], k, v)),
        (ValueError, "expected q", lambda: attn(state, q[:, :3], k, v)),
        (ValueError, "expected q", lambda: attn(state, q, k[:, :, :5], v)),
        (ValueError, "expected q", lambda: attn(state, q[:1], k[:1], v[:1])),
        (TypeError, "float32", lambda: attn(state, q.float(), k.float(), v.float())),
        (TypeError, "must be a tensor", lambda: attn(state, q, k, None)),
        (ValueError, "lengths must be in", lambda: attn(state, q, k, v, [7, 0])),
        (ValueError, "lengths must be in", lambda: attn(state, q, k, v, [-1, 0])),
        (ValueError, "one per stream", lambda: attn(state, q, k, v, [1])),
        (ValueError, "were finished", lambda: attn(state, q, k, v, [2, 1])),
        (ValueError, "final has 3 entries", lambda: attn(state, q, k, v, [2, 0], final=[True] * 3)),
        (ValueError, "belongs to", lambda: ChunkedAttention(sa.ChunkedContext(4, 4, 2))(state, q, k, v, [2, 0])),
        (ValueError, "out of range", lambda: attn.finish(state, rows=[2])),
    ]
    for error, match, call in bad:
        with pytest.raises(error, match=match):
            call()
        assert same(before, state.to_dict()), match
    with torch.enable_grad(), pytest.raises(ValueError, match="inference operator"):
        attn(state, q.requires_grad_(), k, v, [2, 0])
    assert same(before, state.to_dict())
    # saved states: every field checked
    raw = state.to_dict()
    for key, value, match in [
        ("config", sa.ChunkedContext(4, 4, 2).to_config(), "another policy"),
        ("done", torch.tensor([4, 0]), "emits"),
        ("seen", torch.tensor([6]), "shape \\(2,\\)"),
        ("q", torch.zeros(2, 4, 3, D, dtype=F64), "query slots"),
        ("k", torch.zeros(2, 2, 12, D, dtype=F64), "do not agree"),
        ("closed", torch.tensor([0, 2]), "0 or 1"),
        ("format", "other", "not a saved ChunkedState"),
    ]:
        with pytest.raises(ValueError, match=match):
            attn.load_state({**raw, key: value})


# ---------------------------------------------------------------------- convolutions
def _conv(name):
    g = torch.Generator().manual_seed(CONVS.index(name))
    conv, pads = {
        "causal_depthwise": (nn.Conv1d(6, 6, 4, groups=6), {"pad_left": 3}),
        "centered_k3": (nn.Conv1d(6, 5, 3, padding=1), {}),
        "stride2": (nn.Conv1d(6, 5, 3, stride=2, padding=1), {}),
        "dilated_same": (nn.Conv1d(6, 6, 3, dilation=2, padding="same", bias=False), {}),
        "k1_stride3": (nn.Conv1d(6, 4, 1, stride=3), {}),
        "k2_stride3_pad4": (nn.Conv1d(6, 3, 2, stride=3, padding=4, groups=3), {}),
    }[name]
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return sa.StreamingConv1d(conv.double(), **pads)


CONVS = ["causal_depthwise", "centered_k3", "stride2", "dilated_same", "k1_stride3", "k2_stride3_pad4"]


@pytest.mark.parametrize("name", CONVS)
def test_streaming_conv_equals_the_offline_conv(name):
    """B=3 ragged streams (NaN padding), each by its own pieces (1, 3, random): == the conv over each
    zero-padded utterance; every output comes out as soon as its receptive field has arrived."""
    conv = _conv(name)
    lengths = [29, 10, 1]
    x = torch.randn(3, 6, 29, dtype=F64)
    want, out_lengths = conv.offline(x, lengths)
    for specs in ((1, 3, "random"), ("random", "whole", 1), ("whole", "whole", "whole")):
        state = conv.new_state(3)
        plans = [
            schedule(s, n, sa.ChunkedContext(1), seed=i) for i, (s, n) in enumerate(zip(specs, lengths, strict=True))
        ]
        at, outs = [0] * 3, [[] for _ in range(3)]
        for step in range(max(map(len, plans))):
            counts = [(at[b], p[step] if step < len(p) else 0) for b, p in enumerate(plans)]
            y, emitted = conv(state, pieces(x, counts, 2), [n for _, n in counts])
            for b, (_, n) in enumerate(counts):
                outs[b].append(y[b, :, : emitted[b]])
                at[b] += n
            assert state.emitted == [conv.out_length(n, final=False) for n in at]  # as soon as possible
        y, emitted = conv.finish(state)
        for b in range(3):
            got = torch.cat([*outs[b], y[b, :, : emitted[b]]], dim=1)
            assert got.shape[1] == out_lengths[b] == conv.out_length(lengths[b])
            assert max_err(got, want[b, :, : out_lengths[b]]) < 1e-12, (specs, b)
            if name in ("centered_k3", "stride2", "dilated_same"):  # the module itself (its own padding)
                assert max_err(got, conv.conv(x[b : b + 1, :, : lengths[b]])[0]) < 1e-12
        assert state.nbytes == conv.new_state(3).nbytes  # max(pad_left, (kernel - 1) * dilation) frames


def test_conv_state_errors_and_restore():
    conv = _conv("stride2")
    state = conv.new_state(2)
    x = torch.randn(2, 6, 9, dtype=F64)
    conv(state, x, [9, 4])
    before = state.to_dict()
    for error, match, call in [
        (ValueError, "must be \\[B, C_in, T\\]", lambda: conv(state, x[:, :5])),
        (TypeError, "float32", lambda: conv(state, x.float())),
        (ValueError, "lengths must be in", lambda: conv(state, x, [10, 0])),
        (ValueError, "belongs to a conv", lambda: _conv("centered_k3")(state, x)),
    ]:
        with pytest.raises(error, match=match):
            call()
        assert same(before, state.to_dict())
    restored = conv.load_state(state.to_dict())
    assert torch.equal(conv(state, x)[0], conv(restored, x)[0])
    with pytest.raises(ValueError, match="emits"):
        conv.load_state({**state.to_dict(), "emitted": torch.tensor([3, 3])})
    with pytest.raises(ValueError, match="padding_mode"):
        sa.StreamingConv1d(nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"))


# ---------------------------------------------------------------------- whole encoders
def _rand(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module.double()


CONFORMER_POLICIES = (sa.ChunkedContext(2, 4, 1), sa.ChunkedContext(3, 3, 2))
WHISPER_POLICY = sa.ChunkedContext(2, 4, 1)


def conformer(f_in=5, d=8, policies=CONFORMER_POLICIES):
    """A stride-2 conv front end, then per block: pre-norm MHSA (GQA 4 query heads on 2 kv heads of 4),
    a convolution module (pointwise + GLU, causal depthwise conv, SiLU, pointwise) on a residual path,
    and a feed-forward; random weights."""
    stages = [sa.ConvStage(_rand(nn.Conv1d(f_in, d, 3, stride=2, padding=1), 0)), sa.FrameStage(F.gelu)]
    for i, policy in enumerate(policies):
        m = _rand(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d),
                    "q": nn.Linear(d, 4 * 4),
                    "kv": nn.Linear(d, 2 * 2 * 4),
                    "o": nn.Linear(4 * 4, d),
                    "ln2": nn.LayerNorm(d),
                    "pw1": nn.Linear(d, 2 * d),
                    "pw2": nn.Linear(d, d),
                    "ln3": nn.LayerNorm(d),
                    "ff": nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d)),
                }
            ),
            10 + i,
        )

        def pre(x, m=m):
            h = m["ln1"](x)
            b, t = x.shape[:2]
            k, v = m["kv"](h).view(b, t, 2, 2, 4).permute(2, 0, 3, 1, 4)
            return m["q"](h).view(b, t, 4, 4).transpose(1, 2), k, v

        stages += [
            sa.AttentionStage(policy, pre, lambda x, a, m=m: x + m["o"](a.transpose(1, 2).flatten(2))),
            sa.Residual(
                [
                    sa.FrameStage(lambda x, m=m: F.glu(m["pw1"](m["ln2"](x)), dim=-1)),
                    sa.ConvStage(_rand(nn.Conv1d(d, d, 5, groups=d), 20 + i), pad_left=4),
                    sa.FrameStage(lambda x, m=m: m["pw2"](F.silu(x))),
                ]
            ),
            sa.FrameStage(lambda x, m=m: x + 0.5 * m["ff"](m["ln3"](x))),
        ]
    return sa.StreamingEncoder([*stages, sa.FrameStage(_rand(nn.LayerNorm(d), 30))])


def whisper_like(n_mels=6, d=8, heads=2, layers=2, policy=WHISPER_POLICY):
    """Whisper's encoder at toy size, as stages: conv(k=3, pad=1) + GELU, conv(k=3, stride=2, pad=1) +
    GELU, sinusoidal positions by absolute frame index, pre-norm blocks (q/k/v/out projections, MLP),
    final LayerNorm. Input: a log-mel ``[B, n_mels, T]`` pushed as ``mel.transpose(1, 2)``."""
    conv1, conv2 = _rand(nn.Conv1d(n_mels, d, 3, padding=1), 1), _rand(nn.Conv1d(d, d, 3, stride=2, padding=1), 2)
    inv = torch.exp(-torch.arange(d // 2, dtype=F64) * (torch.log(torch.tensor(1e4, dtype=F64)) / (d // 2 - 1)))
    angle = torch.arange(1500, dtype=F64)[:, None] * inv[None, :]
    positions = torch.cat([angle.sin(), angle.cos()], dim=1)  # [1500, d]
    stages = [sa.ConvStage(conv1), sa.FrameStage(F.gelu), sa.ConvStage(conv2), sa.FrameStage(F.gelu)]
    stages.append(sa.FrameStage(lambda x, t: x + positions[t], index=True))
    for i in range(layers):
        blk = _rand(
            nn.ModuleDict(
                {
                    "ln1": nn.LayerNorm(d),
                    "q": nn.Linear(d, d),
                    "k": nn.Linear(d, d, bias=False),
                    "v": nn.Linear(d, d),
                    "out": nn.Linear(d, d),
                    "ln2": nn.LayerNorm(d),
                    "mlp": nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)),
                }
            ),
            40 + i,
        )

        def pre(x, blk=blk):
            h = blk["ln1"](x)
            split = lambda y: y.view(*y.shape[:2], heads, d // heads).transpose(1, 2)  # noqa: E731  [B, H, T, Dh]
            return split(blk["q"](h)), split(blk["k"](h)), split(blk["v"](h))

        def post(x, attn, blk=blk):
            x = x + blk["out"](attn.transpose(1, 2).flatten(2))
            return x + blk["mlp"](blk["ln2"](x))

        stages.append(sa.AttentionStage(policy, pre, post))
    return sa.StreamingEncoder([*stages, sa.FrameStage(_rand(nn.LayerNorm(d), 50))])


def push_ragged(enc, x, schedules, finish=True):
    """Push B streams ``x [B, T, F]`` together, row b by its own pieces (NaN padding); per-row outputs."""
    at, outs = [0] * x.shape[0], [[] for _ in range(x.shape[0])]
    for step in range(max(map(len, schedules))):
        counts = [(at[b], s[step] if step < len(s) else 0) for b, s in enumerate(schedules)]
        y, emitted = enc.push(pieces(x, counts, 1), [n for _, n in counts])
        for b, (_, n) in enumerate(counts):
            outs[b].append(y[b, : emitted[b]])
            at[b] += n
    if finish:
        y, emitted = enc.finish()
        for b in range(x.shape[0]):
            outs[b].append(y[b, : emitted[b]])
    return [torch.cat(o) for o in outs]


@pytest.mark.parametrize("build", [conformer, whisper_like], ids=["conformer", "whisper_like"])
def test_encoder_streamed_in_pieces_equals_its_offline_forward(build):
    enc = build()
    feats = 5 if build is conformer else 6
    lengths = [41, 26, 7]
    x = torch.randn(3, 41, feats, dtype=F64)
    want, out_lengths = enc.forward(x, lengths)
    policy = sa.ChunkedContext(1)
    for seeds in ((0, 1, 2), (3, 4, 5)):
        got = push_ragged(enc, x, [schedule("random", n, policy, seed=s) for n, s in zip(lengths, seeds, strict=True)])
        enc.reset()
        for b, n in enumerate(out_lengths):
            assert got[b].shape[0] == n
            assert max_err(got[b], want[b, :n]) < 1e-10, (seeds, b)
    alone = push_ragged(enc, x[1:2, :26], [[1] * 26])  # frame by frame, alone
    assert max_err(alone[0], want[1, : out_lengths[1]]) < 1e-10


def test_attention_stage_offline_is_the_reference():
    policy = sa.ChunkedContext(3, 3, 2)
    q, k, v = make_qkv(2, 4, 2, 17, D, F64, seed=8)
    x = torch.cat([q.transpose(1, 2).flatten(2), k.transpose(1, 2).flatten(2), v.transpose(1, 2).flatten(2)], -1)

    def pre(x):
        b, t = x.shape[:2]
        q, kv = x[..., :16].view(b, t, 4, D), x[..., 16:].view(b, t, 2, 2, D)
        return q.transpose(1, 2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    stage = sa.AttentionStage(policy, pre, lambda x, a: a)
    out, lengths = stage.forward(x, [17, 9])
    want = reference.chunked_context_attention(q, k, v, policy, [17, 9])
    assert lengths == [17, 9] and max_err(out, want) < 1e-12


def test_encoder_emission_latency_compounds_with_depth():
    """chunk=2, lookahead=1, no convolution: one layer emits chunk c when input frame 2c + 2 arrives;
    two layers when frame 2c + 4 arrives (layer 2's chunk c needs layer 1's frame 2c + 2, in its chunk c + 1)."""
    policy = sa.ChunkedContext(2, 2, 1)
    block = sa.AttentionStage(policy, lambda x: (x[:, None], x[:, None], x[:, None]), lambda x, a: x + a[:, 0])
    for depth, lag in ((1, 2), (2, 4)):
        enc = sa.StreamingEncoder([block] * depth)
        arrival = []
        for t in range(12):
            _, emitted = enc.push(torch.randn(1, 1, D, dtype=F64))
            arrival += [t] * emitted[0]
        assert arrival[::2] == [2 * c + lag for c in range(len(arrival) // 2)]
        assert enc.finish()[1] == [12 - len(arrival)]


def test_encoder_state_is_bounded_saved_restored_and_moved():
    enc = whisper_like()
    x = torch.randn(3, 60, 6, dtype=F64)
    sizes = []
    for lo in range(0, 60, 6):
        enc.push(x[:, lo : lo + 6])
        sizes.append(enc.nbytes)
    assert len(set(sizes[1:])) == 1  # fixed bytes once the stages' states exist
    buffer = io.BytesIO()
    torch.save(enc.state_dict(), buffer)
    buffer.seek(0)
    restored = whisper_like()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    more = torch.randn(3, 9, 6, dtype=F64)
    a, b = enc.push(more, [9, 4, 0]), restored.push(more, [9, 4, 0])
    assert same(enc.state_dict(), restored.state_dict())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert torch.equal(enc.finish(rows=[1])[0], restored.finish(rows=[1])[0])
    # streams leave (row 1, finished), reorder, and join (fresh, or a saved one)
    saved_row = enc.state_dict()
    enc.select_streams([2, 0])
    restored.select_streams([2, 0])
    enc.add_streams(1)
    tail = torch.randn(3, 15, 6, dtype=F64)
    y, e = enc.push(tail)
    y2, e2 = restored.push(tail[:2])
    assert max_err(y[:2, : max(e2)], y2) < 1e-12 and e[:2] == e2
    fresh = whisper_like()
    y3, e3 = fresh.push(tail[2:])
    assert e[2] == e3[0] > 0 and max_err(y[2, : e[2]], y3[0, : e3[0]]) < 1e-12
    other = whisper_like()
    other.push(torch.randn(1, 4, 6, dtype=F64))
    enc.add_streams(other.state_dict())
    assert enc.batch == 4 and enc.seen[3] == 4
    with pytest.raises(ValueError, match="stage 5"):
        whisper_like(policy=sa.ChunkedContext(2, 2, 1)).load_state_dict(saved_row)


def test_encoder_errors_change_nothing():
    enc = conformer()
    x = torch.randn(2, 10, 5, dtype=F64)
    enc.push(x, [10, 6], final=[False, True])
    before = enc.state_dict()
    for error, match, call in [
        (ValueError, "were finished", lambda: enc.push(x, [3, 2])),
        (ValueError, "streams 2 streams of frames", lambda: enc.push(torch.randn(2, 3, 4, dtype=F64))),
        (TypeError, "float32", lambda: enc.push(x.float(), [3, 0])),
        (ValueError, "lengths must be in", lambda: enc.push(x, [11, 0])),
        (ValueError, "not a StreamingEncoder state", lambda: enc.load_state_dict({"format": "x"})),
        (ValueError, "does not follow", lambda: enc.load_state_dict({**before, "seen": torch.tensor([12, 6])})),
        (
            ValueError,
            "stage 2 .*another policy",
            lambda: conformer(policies=(sa.ChunkedContext(2),) * 2).load_state_dict(before),
        ),
    ]:
        with pytest.raises(error, match=match):
            call()
        assert same(before, enc.state_dict()), match
    # a user callable failing midway (in the second attention block) changes no stage
    failing = conformer()
    failing.load_state_dict(before)
    failing.stages[5].post = lambda x, a: 1 / 0
    with pytest.raises(ZeroDivisionError):
        failing.push(x, [10, 0])
    assert same(before, failing.state_dict())
