"""Recurrent memories (``streamattn.recurrent``): training form == recurrent form == float64 reference,
any chunking, ragged batches, save/restore, gradients, and validation before any state changes."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import streamattn as sa
import streamattn.recurrent as rec
from streamattn.recurrent import reference
from tests.conftest import chunk_sizes, max_err

B, H, T, DK, DV = 2, 3, 45, 6, 4
N = 8  # Infini segment and linear chunk size
TOL = 1e-10  # float64

# One row per configuration; every generic test below runs each.
LINEAR = [
    pytest.param(rec.LinearMemory("identity", chunk_size=N), id="lin_identity"),
    pytest.param(rec.LinearMemory("elu1", chunk_size=N), id="lin_elu1"),
    pytest.param(rec.LinearMemory(normalize=True, chunk_size=N), id="lin_norm"),
    pytest.param(rec.LinearMemory(decay=0.9, scale=0.5, chunk_size=N), id="lin_decay"),
    pytest.param(rec.LinearMemory(normalize=True, decay=(0.95, 0.8, 1.0), chunk_size=N), id="lin_norm_decay_per_head"),
    pytest.param(rec.LinearMemory(gated=True, chunk_size=N), id="lin_gated"),
    pytest.param(
        rec.LinearMemory("identity", normalize=False, decay=0.9, gated=True, chunk_size=N), id="lin_decay_gated"
    ),
    pytest.param(rec.LinearMemory(normalize=True, gated=True, chunk_size=N), id="lin_norm_gated"),
]
INFINI = [
    pytest.param(rec.InfiniMemory(segment=N), id="infini"),
    pytest.param(rec.InfiniMemory(segment=N, delta_rule=True), id="infini_delta"),
    pytest.param(rec.InfiniMemory(segment=1, scale=0.7), id="infini_seg1"),
    pytest.param(rec.InfiniMemory(segment=5, delta_rule=True), id="infini_seg5_delta"),
    pytest.param(rec.InfiniMemory(segment=N, rope=sa.RoPE(DK, 100.0)), id="infini_rope"),
    pytest.param(rec.InfiniMemory(segment=7, delta_rule=True, rope=sa.RoPE(DK, 10.0)), id="infini_seg7_delta_rope"),
]
MEMORIES = LINEAR + INFINI
CHUNKINGS = [1, 3, 7, N, 2 * N + 3, "random"]


def linear_kwargs(memory: rec.LinearMemory, chunked: bool = False) -> dict:
    kw = {k: getattr(memory, k) for k in ("feature_map", "normalize", "decay", "scale", "eps")}
    return kw | ({"chunk_size": memory.chunk_size} if chunked else {})


def infini_kwargs(memory: rec.InfiniMemory) -> dict:
    return {k: getattr(memory, k) for k in ("segment", "delta_rule", "rope", "scale", "eps")}


def make(memory, b=B, t=T, dtype=torch.float64, seed=0):
    """``q, k, v`` and the per-call extra: ``log_gate [B, H, T]`` (gated linear), ``beta [H]`` (Infini).

    ``q, k, v`` are ``[B, T, H, D]`` tensors transposed, as a model's projections give them (not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, H, DK, generator=g, dtype=torch.float64).transpose(1, 2) for _ in range(2))
    v = torch.randn(b, t, H, DV, generator=g, dtype=torch.float64).transpose(1, 2)
    if isinstance(memory, rec.InfiniMemory):
        extra = torch.randn(H, generator=g, dtype=torch.float64).to(dtype)
    else:
        extra = -0.5 * torch.rand(b, H, t, generator=g, dtype=torch.float64) if memory.gated else None
    return q.to(dtype), k.to(dtype), v.to(dtype), extra


def call_kwargs(memory, extra, i, j) -> dict:
    if isinstance(memory, rec.InfiniMemory):
        return {"beta": extra}
    return {} if extra is None else {"log_gate": extra[:, :, i:j]}


def oracle(memory, q, k, v, extra) -> torch.Tensor:
    if isinstance(memory, rec.InfiniMemory):
        return reference.infini_attention(q, k, v, extra, **infini_kwargs(memory))[0]
    return reference.linear_attention(q, k, v, extra, **linear_kwargs(memory))[0]


def feed(attn, memory, q, k, v, extra, sizes) -> torch.Tensor:
    outs, i = [], 0
    for n in sizes:
        outs.append(
            attn(q[:, :, i : i + n], k[:, :, i : i + n], v[:, :, i : i + n], **call_kwargs(memory, extra, i, i + n))
        )
        i += n
    return torch.cat(outs, dim=2)


# ---------------------------------------------------------------------- the forms agree
@pytest.mark.parametrize("memory", LINEAR)
def test_linear_chunked_and_recurrent_forms_equal_the_reference(memory):
    """From a random initial state, with a partial last chunk (T = 45, C = 8): outputs and final states."""
    q, k, v, log_gate = make(memory)
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn(B, H, DK, DV, generator=g, dtype=torch.float64)
    z0 = torch.rand(B, H, DK, generator=g, dtype=torch.float64) + 1 if memory.normalize else None
    want, s_want, z_want = reference.linear_attention(
        q, k, v, log_gate, **linear_kwargs(memory), initial_state=(s0, z0)
    )
    init = rec.LinearState(s0, z0, (0,) * B)
    for fn, kw in (
        (rec.linear_attention, linear_kwargs(memory, chunked=True)),
        (rec.linear_attention_recurrent, linear_kwargs(memory)),
    ):
        o, state = fn(q, k, v, log_gate, **kw, initial_state=init, output_final_state=True)
        assert max_err(o, want) < TOL, fn.__name__
        assert max_err(state.S, s_want) < TOL and state.seen == (T,) * B
        assert (state.z is None) == (z_want is None) and (z_want is None or max_err(state.z, z_want) < TOL)
        assert fn(q, k, v, log_gate, **kw)[1] is None  # output_final_state=False


@pytest.mark.parametrize("memory", INFINI)
def test_infini_parallel_and_recurrent_forms_equal_the_reference(memory):
    q, k, v, beta = make(memory)
    want, mem, z = reference.infini_attention(q, k, v, beta, **infini_kwargs(memory))
    states = []
    for fn in (rec.infini_attention, rec.infini_attention_recurrent):
        o, state = fn(q, k, v, beta, **infini_kwargs(memory), output_final_state=True)
        assert max_err(o, want) < TOL, fn.__name__
        assert max_err(state.mem, mem) < TOL and max_err(state.z, z) < TOL and state.seen == (T,) * B
        states.append(state)
    held = T % memory.segment  # the incomplete segment's tokens, then zeros
    for state in states:
        assert torch.equal(state.k[:, :, :held], k[:, :, T - held :]) and torch.all(state.k[:, :, held:] == 0)


@pytest.mark.parametrize("memory", MEMORIES)
def test_state_passing_between_forms_equals_one_call(memory):
    """The stream cut at 13 and 30 (mid-segment), each part by another form with the carried state."""
    q, k, v, extra = make(memory, seed=3)
    if isinstance(memory, rec.InfiniMemory):
        forms = [rec.infini_attention, rec.infini_attention_recurrent, rec.infini_attention]
        kw = [infini_kwargs(memory)] * 3
    else:
        forms = [rec.linear_attention_recurrent, rec.linear_attention, rec.linear_attention_recurrent]
        kw = [linear_kwargs(memory), linear_kwargs(memory, chunked=True), linear_kwargs(memory)]
    outs, state = [], None
    for fn, kwargs, (i, j) in zip(forms, kw, [(0, 13), (13, 30), (30, T)], strict=True):
        piece = call_kwargs(memory, extra, i, j)
        extra_arg = piece.get("beta", piece.get("log_gate"))
        o, state = fn(
            q[:, :, i:j], k[:, :, i:j], v[:, :, i:j], extra_arg, **kwargs, initial_state=state, output_final_state=True
        )
        outs.append(o)
    assert max_err(torch.cat(outs, 2), oracle(memory, q, k, v, extra)) < TOL
    assert state.seen == (T,) * B


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=str)
@pytest.mark.parametrize("memory", MEMORIES)
def test_module_any_chunking_equals_the_reference(memory, chunking):
    q, k, v, extra = make(memory)
    with torch.no_grad():
        got = feed(rec.RecurrentAttention(memory), memory, q, k, v, extra, chunk_sizes(chunking, T, seed=7))
    assert max_err(got, oracle(memory, q, k, v, extra)) < TOL


@settings(max_examples=25, deadline=None)
@given(
    infini=st.booleans(),
    size=st.integers(1, 9),
    option=st.booleans(),
    sizes=st.lists(st.integers(0, 12), min_size=1, max_size=8),
)
def test_random_configs_and_feedings_equal_the_reference(infini, size, option, sizes):
    """Segment / chunk size 1..9, delta rule or normaliser, any feeding (empty calls included)."""
    if infini:
        memory = rec.InfiniMemory(segment=size, delta_rule=option)
    else:
        memory = rec.LinearMemory(normalize=option, decay=0.9, chunk_size=size)
    t = sum(sizes)
    q, k, v, extra = make(memory, b=1, t=t, seed=len(sizes))
    with torch.no_grad():
        got = feed(rec.RecurrentAttention(memory), memory, q, k, v, extra, sizes)
    assert got.shape == (1, H, t, DV)
    if t:
        assert max_err(got, oracle(memory, q, k, v, extra)) < TOL


@pytest.mark.parametrize("memory", [LINEAR[2], LINEAR[7], INFINI[0], INFINI[1], INFINI[5]])
def test_ragged_batch_equals_each_stream_alone(memory):
    """Three streams of different lengths, each with its own chunking, NaN in every padded slot
    (q, k, v and log_gate), a call where no stream has a token: each equals its reference alone."""
    lengths, seeds = [45, 20, 33], [11, 12, 13]
    streams = [make(memory, b=1, t=n, seed=s) for n, s in zip(lengths, seeds, strict=True)]
    sizes = [chunk_sizes("random", n, seed=s) for n, s in zip(lengths, seeds, strict=True)]
    sizes[1].insert(1, 0)
    attn, pos, step = rec.RecurrentAttention(memory), [0, 0, 0], [0, 0, 0]
    outs: list[list[torch.Tensor]] = [[], [], []]
    with torch.no_grad():
        attn(
            *(torch.zeros(3, H, 4, d, dtype=torch.float64) for d in (DK, DK, DV)),
            [0, 0, 0],
            **_pad_extra(memory, streams, [0] * 3, [0] * 3, 4),
        )
        while any(step[i] < len(sizes[i]) for i in range(3)):
            lens = [sizes[i][step[i]] if step[i] < len(sizes[i]) else 0 for i in range(3)]
            t = max(max(lens), 1)
            q = torch.full((3, H, t, DK), float("nan"), dtype=torch.float64)
            k, v = q.clone(), torch.full((3, H, t, DV), float("nan"), dtype=torch.float64)
            for i, (qi, ki, vi, _) in enumerate(streams):
                q[i, :, : lens[i]], k[i, :, : lens[i]], v[i, :, : lens[i]] = (
                    x[0, :, pos[i] : pos[i] + lens[i]] for x in (qi, ki, vi)
                )
            out = attn(q, k, v, lens, **_pad_extra(memory, streams, pos, lens, t))
            for i in range(3):
                outs[i].append(out[i, :, : lens[i]])
                assert torch.all(out[i, :, lens[i] :] == 0), "padded outputs must be zero"
                pos[i] += lens[i]
                step[i] += 1
    assert attn.seen == lengths
    for i, (qi, ki, vi, extra) in enumerate(streams):
        extra = streams[0][3] if isinstance(memory, rec.InfiniMemory) else extra  # the gate they shared
        assert max_err(torch.cat(outs[i], 1)[None], oracle(memory, qi, ki, vi, extra)) < TOL, f"stream {i}"


@pytest.mark.parametrize("memory", [LINEAR[7], INFINI[0], INFINI[1], INFINI[5]])
def test_decode_steps_of_streams_at_different_places_equal_the_reference(memory):
    """A ragged prefill leaves three streams at different places in their segments; then 20 calls of
    one token each: the recurrent form with a per-row mask, writing the memory of some rows only."""
    prefix, steps = [3, 10, 6], 20
    streams = [make(memory, b=1, t=n + steps, seed=30 + i) for i, n in enumerate(prefix)]
    attn = rec.RecurrentAttention(memory)
    with torch.no_grad():
        prefill = [torch.zeros(3, H, 10, d, dtype=torch.float64) for d in (DK, DK, DV)]
        for i, n in enumerate(prefix):
            for x, part in zip(prefill, streams[i][:3], strict=True):
                x[i, :, :n] = part[0, :, :n]
        attn(*prefill, prefix, **_pad_extra(memory, streams, [0] * 3, prefix, 10))
        outs = []
        for step in range(steps):
            token = [
                torch.cat([s[a][:, :, n + step : n + step + 1] for s, n in zip(streams, prefix, strict=True)])
                for a in range(3)
            ]
            at = [n + step for n in prefix]
            outs.append(attn(*token, **_pad_extra(memory, streams, at, [1] * 3, 1)))
    for i, (qi, ki, vi, extra) in enumerate(streams):
        extra = streams[0][3] if isinstance(memory, rec.InfiniMemory) else extra
        want = oracle(memory, qi, ki, vi, extra)[:, :, prefix[i] :]
        assert max_err(torch.cat(outs, 2)[i : i + 1], want) < TOL, f"stream {i}"


def _pad_extra(memory, streams, pos, lens, t) -> dict:
    if isinstance(memory, rec.InfiniMemory):
        return {"beta": streams[0][3]}  # one gate per layer: the same for every stream
    if not memory.gated:
        return {}
    log_gate = torch.full((3, H, t), float("nan"), dtype=torch.float64)
    for i, stream in enumerate(streams):
        log_gate[i, :, : lens[i]] = stream[3][0, :, pos[i] : pos[i] + lens[i]]
    return {"log_gate": log_gate}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("memory", [LINEAR[4], INFINI[1]])
def test_low_precision_inputs_keep_a_float32_state(memory, dtype):
    q, k, v, extra = make(memory, t=200, dtype=dtype)
    want = oracle(memory, q, k, v, extra)
    attn = rec.RecurrentAttention(memory)
    with torch.no_grad():
        got = feed(attn, memory, q, k, v, extra, chunk_sizes("random", 200, seed=2))
    assert got.dtype == dtype and attn.state[0].dtype == torch.float32
    assert max_err(got, want) < (1e-4 if dtype == torch.float32 else 3e-2)


# ---------------------------------------------------------------------- the references are the definitions
def test_linear_reference_is_masked_attention_without_softmax():
    """Identity features: ``o = (q k^T * D) v`` with ``D_ij = decay^(i - j)`` for ``j <= i``, else 0."""
    q, k, v, _ = make(rec.LinearMemory(), t=12)
    i, j = torch.arange(12)[:, None], torch.arange(12)[None, :]
    for decay in (None, 0.8):
        weight = (j <= i).double() * (1.0 if decay is None else decay ** (i - j).clamp(min=0).double())
        o, _, _ = reference.linear_attention(q, k, v, feature_map="identity", decay=decay)
        assert max_err(o, (q @ k.transpose(-1, -2) * weight) @ v) < TOL


def test_infini_reference_is_local_attention_plus_a_linear_memory_of_earlier_segments():
    """Gate 0: softmax attention under a block-diagonal causal mask. Gate 1 (linear update): normalised
    linear attention with ``elu + 1`` over the tokens of earlier segments only."""
    q, k, v, _ = make(rec.InfiniMemory(), t=20)
    i, j = torch.arange(20)[:, None], torch.arange(20)[None, :]
    local = (j <= i) & (j // 6 == i // 6)
    off = reference.infini_attention(q, k, v, torch.full((H,), -math.inf), segment=6)[0]
    assert max_err(off, F.scaled_dot_product_attention(q, k, v, attn_mask=local)) < TOL
    on = reference.infini_attention(q, k, v, torch.full((H,), math.inf), segment=6, eps=1e-6)[0]
    weight = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2) * (j // 6 < i // 6)
    assert max_err(on, (weight @ v) / (weight.sum(-1, keepdim=True) + 1e-6)) < TOL


# ---------------------------------------------------------------------- gradients of the training forms
def test_gradcheck_linear_chunked():
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 7, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 7, 2, generator=g, dtype=torch.float64, requires_grad=True)
    log_gate = (-torch.rand(1, 2, 7, generator=g, dtype=torch.float64)).requires_grad_()
    s0 = torch.randn(1, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    z0 = (torch.rand(1, 2, 3, generator=g, dtype=torch.float64) + 1).requires_grad_()

    def normalised(q, k, v, log_gate, s0, z0):
        init = rec.LinearState(s0, z0, (0,))
        o, st = rec.linear_attention(
            q, k, v, log_gate, normalize=True, decay=0.9, chunk_size=3, initial_state=init, output_final_state=True
        )
        return o, st.S, st.z

    def plain(q, k, v, log_gate):
        return rec.linear_attention(q, k, v, log_gate, feature_map="identity", chunk_size=3)[0]

    assert torch.autograd.gradcheck(normalised, (q, k, v, log_gate, s0, z0))
    assert torch.autograd.gradcheck(plain, (q, k, v, log_gate))


@pytest.mark.parametrize("delta_rule", [False, True], ids=["linear_update", "delta"])
def test_gradcheck_infini_parallel(delta_rule):
    """Through the memory of earlier segments and from a carried state that holds a partial segment."""
    g = torch.Generator().manual_seed(6)
    q, k = (torch.randn(1, 2, 8, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 8, 2, generator=g, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    kw = {"segment": 3, "delta_rule": delta_rule}
    _, carried = rec.infini_attention(
        q[:, :, :4].detach(), k[:, :, :4].detach(), v[:, :, :4].detach(), beta.detach(), **kw, output_final_state=True
    )
    mem, z, hk, hv = (x.clone().requires_grad_() for x in carried[:4])

    def fn(q, k, v, beta, mem, z, hk, hv):
        o, st = rec.infini_attention(
            q, k, v, beta, **kw, initial_state=rec.InfiniState(mem, z, hk, hv, (4,)), output_final_state=True
        )
        return o, st.mem, st.z

    assert torch.autograd.gradcheck(fn, (q, k, v, beta, mem, z, hk, hv))
    assert torch.autograd.gradcheck(lambda q, k, v, beta: rec.infini_attention(q, k, v, beta, **kw)[0], (q, k, v, beta))


# ---------------------------------------------------------------------- state: save / restore / bounded
@pytest.mark.parametrize("memory", [LINEAR[4], LINEAR[7], INFINI[0], INFINI[3]])
def test_save_restore_mid_stream_continues_bitwise(memory):
    q, k, v, extra = make(memory)
    live = rec.RecurrentAttention(memory)
    with torch.no_grad():
        feed(live, memory, q[:, :, :19], k[:, :, :19], v[:, :, :19], extra, [5, 11, 3])  # mid-segment
        buffer = io.BytesIO()
        torch.save(live.state_dict(), buffer)
        buffer.seek(0)
        restored = rec.RecurrentAttention(memory)
        restored.load_state_dict(torch.load(buffer, weights_only=True))
        assert restored.seen == live.seen == [19] * B
        rest = [1, 1, 9, 15]  # decode steps, then chunks
        tail = [x[:, :, 19:] for x in (q, k, v)]
        extra_tail = extra if extra is None or extra.dim() == 1 else extra[:, :, 19:]
        got = feed(restored, memory, *tail, extra_tail, rest)
        want = feed(live, memory, *tail, extra_tail, rest)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(restored.state[:-1], live.state[:-1], strict=True) if a is not None)


def test_state_bytes_do_not_grow_with_the_stream():
    for memory in (rec.LinearMemory(normalize=True), rec.InfiniMemory(segment=16, delta_rule=True)):
        attn = rec.RecurrentAttention(memory)
        q, k, v, extra = make(memory, b=1, t=250, dtype=torch.float32)
        sizes = []
        with torch.no_grad():
            for _ in range(8):  # 2,000 tokens
                feed(attn, memory, q, k, v, extra, [250])
                sizes.append(attn.nbytes)
        held = 0 if isinstance(memory, rec.LinearMemory) else (memory.segment - 1) * (DK + DV)
        assert sizes == [4 * H * (DK * DV + DK + held)] * 8, memory
        assert attn.seen == [2000]


# ---------------------------------------------------------------------- errors, before any state changes
def _bad_calls(memory, q, k, v, extra):
    kw = call_kwargs(memory, extra, 0, 4)
    infini = isinstance(memory, rec.InfiniMemory)
    calls = [
        (TypeError, "q must be a torch.Tensor", (q.tolist(), k, v), kw),
        (ValueError, "4-D", (q[0], k[0], v[0]), kw),
        (ValueError, "same B, H, T", (q, k, v[:, :, :3]), kw),
        (ValueError, "same B, H, T", (q, k[:, :, :, :3], v), kw),
        (TypeError, "one float dtype", (q.float(), k, v), kw),
        (
            TypeError,
            r"state is torch\.float64",
            (q.float(), k.float(), v.float()),
            kw | ({"beta": extra.float()} if infini else {}),
        ),
        (ValueError, r"reset\(\)", (q[:1], k[:1], v[:1]), kw | ({} if infini else {"log_gate": extra[:1, :, :4]})),
        (ValueError, r"reset\(\)", (q[..., :3], k[..., :3], v), kw),
        (ValueError, r"lengths must be in \[0, T=4\]", (q, k, v, [5, 1]), kw),
        (ValueError, "one per stream", (q, k, v, [1]), kw),
        (TypeError, "lengths must be", (q, k, v, torch.tensor([1.0, 2.0])), kw),
        (ValueError, "inference operator", (q.clone().requires_grad_(), k, v), kw),
    ]
    if infini:
        calls += [
            (ValueError, "needs beta", (q, k, v), {}),
            (ValueError, r"beta must be \[H\]", (q, k, v), {"beta": extra[:2]}),
            (TypeError, "gate logits", (q, k, v), {"beta": extra.long()}),
            (ValueError, "Infini-attention takes beta", (q, k, v), kw | {"log_gate": torch.zeros(B, H, 4)}),
        ]
    else:
        positive = extra[:, :, :4].clone()
        positive[1, 2, 3] = 0.1
        nan = extra[:, :, :4].clone()
        nan[0, 0, 0] = float("nan")
        calls += [
            (ValueError, "pass log_gate", (q, k, v), {}),
            (ValueError, "<= 0", (q, k, v), {"log_gate": positive}),
            (ValueError, "finite", (q, k, v), {"log_gate": nan}),
            (ValueError, r"log_gate must be \[B, H, T\]", (q, k, v), {"log_gate": extra[:, :, :3]}),
            (ValueError, "not an argument of LinearMemory", (q, k, v), kw | {"beta": torch.zeros(H)}),
        ]
    return calls


@pytest.mark.parametrize("memory", [LINEAR[7], INFINI[1]])
def test_bad_inputs_raise_before_any_state_changes(memory):
    q, k, v, extra = make(memory, seed=4)
    attn, fresh = rec.RecurrentAttention(memory), rec.RecurrentAttention(memory)
    with torch.no_grad():
        feed(attn, memory, q, k, v, extra, [6])
    before = [x.clone() for x in attn.state[:-1] if x is not None]
    chunk = [x[:, :, 6:10] for x in (q, k, v)]
    chunk_extra = extra if extra is None or extra.dim() == 1 else extra[:, :, 6:10]
    for error, match, args, kw in _bad_calls(memory, *chunk, chunk_extra):  # grad mode on, as in training code
        with pytest.raises(error, match=match):
            attn(*args, **kw)
        after = [x for x in attn.state[:-1] if x is not None]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)) and attn.seen == [6] * B, match
    with torch.no_grad():
        got = feed(attn, memory, *chunk, chunk_extra, [4])  # continues as if nothing had happened
        want = feed(fresh, memory, q[:, :, :10], k[:, :, :10], v[:, :, :10], extra, [6, 4])[:, :, 6:]
    assert torch.equal(got, want)


@pytest.mark.parametrize("memory", [LINEAR[4], INFINI[0]])
def test_bad_state_dicts_raise_value_errors_and_change_nothing(memory):
    q, k, v, extra = make(memory)
    attn = rec.RecurrentAttention(memory)
    with torch.no_grad():
        feed(attn, memory, q, k, v, extra, [10])
    good = attn.state_dict()
    inner = good["_extra_state"]["state"]
    first = next(iter(inner))  # S or mem: [B, H, Dk, Dv]

    def edited(**changes):
        extra_state = dict(good["_extra_state"])
        extra_state.update({key: value for key, value in changes.items() if key in ("format", "config")})
        extra_state["state"] = dict(inner) | {key: value for key, value in changes.items() if key in inner}
        return {"_extra_state": extra_state}

    other = rec.LinearMemory() if isinstance(memory, rec.InfiniMemory) else rec.InfiniMemory()
    second = list(inner)[1]
    cases = [
        ("_extra_state", {"state": inner}),
        ("format", edited(format="streamattn.StreamingAttention/1")),
        ("another memory configuration", edited(config=other.to_config())),
        ("float32/float64 tensor", edited(**{first: inner[first].long()})),
        ("must have shape", edited(**{second: inner[second][:, :, :2]})),
        (r"must be torch\.float64", edited(**{second: inner[second].float()})),
        ("tuple of 2 ints", edited(seen=torch.tensor([10], dtype=torch.int64))),
        ("int64 tensor", edited(seen=[10, 10])),
    ]
    before = [x.clone() for x in attn.state[:-1] if x is not None]
    for match, state_dict in cases:
        with pytest.raises(ValueError, match=match):
            attn.load_state_dict(state_dict)
        assert all(
            torch.equal(a, b) for a, b in zip(before, [x for x in attn.state[:-1] if x is not None], strict=True)
        )
    missing = edited()
    del missing["_extra_state"]["state"][second]
    with pytest.raises(ValueError, match="keys"):
        attn.load_state_dict(missing)
    attn.load_state_dict(good)  # and a good one loads
    assert attn.seen == [10] * B


@pytest.mark.parametrize(
    "make_config, match",
    [
        (lambda: rec.LinearMemory(feature_map="relu"), "feature_map"),
        (lambda: rec.LinearMemory(decay=0.0), "positive"),
        (lambda: rec.LinearMemory(decay=1.5), r"\(0, 1\]"),
        (lambda: rec.LinearMemory(decay=(0.5, float("nan"))), r"decay\[1\]"),
        (lambda: rec.LinearMemory(decay=()), "one value per head"),
        (lambda: rec.LinearMemory(normalize=1), "bool"),
        (lambda: rec.LinearMemory(scale=-1.0), "scale"),
        (lambda: rec.LinearMemory(eps=0.0), "eps"),
        (lambda: rec.LinearMemory(chunk_size=0), "chunk_size"),
        (lambda: rec.InfiniMemory(segment=0), "segment"),
        (lambda: rec.InfiniMemory(segment=2.5), "segment"),
        (lambda: rec.InfiniMemory(delta_rule="yes"), "delta_rule"),
        (lambda: rec.InfiniMemory(scale=float("inf")), "scale"),
        (lambda: rec.InfiniMemory(rope=32), "rope"),
        (lambda: rec.infini_attention(*make(rec.InfiniMemory()), segment=4, rope=sa.RoPE(8)), r"rope\.head_dim is 8"),
        (lambda: rec.linear_attention(*make(rec.LinearMemory())[:3], chunk_size=-2), "chunk_size"),
        (lambda: rec.infini_attention(*make(rec.InfiniMemory()), segment=0), "segment"),
    ],
)
def test_configs_are_validated(make_config, match):
    with pytest.raises(ValueError, match=match):
        make_config()


def test_module_and_functions_refuse_what_they_do_not_take():
    with pytest.raises(TypeError, match="LinearMemory or an InfiniMemory"):
        rec.RecurrentAttention(sa.SinkWindow(4, 16))
    q, k, v, beta = make(rec.InfiniMemory())
    with pytest.raises(ValueError, match=r"rope\.head_dim is 8"):
        rec.RecurrentAttention(rec.InfiniMemory(rope=sa.RoPE(8)))(q, k, v, beta=beta)
    memory = rec.LinearMemory(decay=(0.9, 0.8))
    with pytest.raises(ValueError, match="one per head"):
        rec.RecurrentAttention(memory)(q, k, v)
    with pytest.raises(ValueError, match="one per head"):
        rec.linear_attention(q, k, v, decay=(0.9, 0.8))
    with pytest.raises(TypeError, match=r"must be torch\.float64"):
        rec.linear_attention(q, k, v, initial_state=rec.LinearState(torch.zeros(B, H, DK, DV), None, (0,) * B))
    with pytest.raises(ValueError, match="must be None for normalize=False"):
        rec.linear_attention(
            q,
            k,
            v,
            initial_state=rec.LinearState(torch.zeros(B, H, DK, DV).double(), torch.zeros(B, H, DK).double(), (0,) * B),
        )
