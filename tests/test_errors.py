"""Bad input never loses a stream: a clear error, raised before any state changes."""

from __future__ import annotations

import pytest
import torch

import streamattn as sa
from tests.conftest import make_qkv

D = 16


def _snapshot(attn):
    st = attn.state
    return [t.clone() for t in (st.k, st.v, st.sink_k)], list(st.seen), list(st.base)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0], strict=True)) and a[1:] == b[1:]


def _good(b=2, t=3, seed=0):
    return make_qkv(b, 6, 2, t, D, seed=seed)


def _with(i, x):
    q, k, v = _good()
    args = [q, k, v]
    args[i] = x
    return tuple(args)


BAD_CALLS = [
    ("q not a tensor", lambda: (_good()[0].tolist(), *_good()[1:]), {}, TypeError, "q must be a torch.Tensor"),
    ("q 3-D", lambda: _with(0, _good()[0][0]), {}, ValueError, "q must be 4-D"),
    ("k/v shapes differ", lambda: _with(2, _good()[2][:, :, :2]), {}, ValueError, "same shape"),
    ("T differs", lambda: _with(1, make_qkv(2, 6, 2, 2, D)[1][:, :, :2]), {}, ValueError, "same shape"),
    ("Hq % Hkv", lambda: _with(0, make_qkv(2, 5, 2, 3, D)[0]), {}, ValueError, "Hq % Hkv"),
    ("head_dim != rope", lambda: make_qkv(2, 6, 2, 3, 8), {}, ValueError, "head_dim"),
    ("int dtype", lambda: _with(0, torch.ones(2, 6, 3, D, dtype=torch.int64)), {}, TypeError, "float dtype"),
    ("mixed dtypes", lambda: _with(1, _good()[1].double()), {}, TypeError, "one float dtype"),
    ("dtype != state", lambda: tuple(x.double() for x in _good()), {}, TypeError, "state is torch.float32"),
    ("device mismatch", lambda: _with(2, _good()[2].to("meta")), {}, ValueError, "one device"),
    ("device != state", lambda: tuple(x.to("meta") for x in _good()), {}, ValueError, "state is on cpu"),
    ("batch != state", lambda: make_qkv(3, 6, 2, 3, D), {}, ValueError, "holds 2 streams"),
    ("Hkv != state", lambda: make_qkv(2, 6, 3, 3, D), {}, ValueError, "Hkv=2"),
    ("lengths count", _good, {"lengths": [1, 2, 3]}, ValueError, "one per stream"),
    ("lengths > T", _good, {"lengths": [1, 4]}, ValueError, r"in \[0, T=3\]"),
    ("lengths < 0", _good, {"lengths": [-1, 2]}, ValueError, r"in \[0, T=3\]"),
    ("lengths float", _good, {"lengths": torch.tensor([1.0, 2.0])}, TypeError, "integer"),
    ("lengths 2-D", _good, {"lengths": torch.ones(2, 1, dtype=torch.long)}, TypeError, "1-D"),
    ("lengths junk", _good, {"lengths": "12"}, TypeError, "sequence of ints"),
]


@pytest.mark.parametrize("positions", ["cache", "absolute"])
@pytest.mark.parametrize(("case", "make", "kwargs", "error", "match"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_raises_and_changes_nothing(case, make, kwargs, error, match, positions):
    policy, rope = sa.SinkWindow(sinks=2, window=4), sa.RoPE(D)
    attn, twin = sa.StreamingAttention(policy, rope, positions), sa.StreamingAttention(policy, rope, positions)
    for step in range(3):  # fill past the window so eviction has happened
        attn(*_good(seed=step))
        twin(*_good(seed=step))
    before = _snapshot(attn)
    with pytest.raises(error, match=match):
        attn(*make(), **kwargs)
    assert _same(_snapshot(attn), before)
    for step in (10, 11):  # the next valid calls continue as if the bad one never happened
        assert torch.equal(attn(*_good(seed=step)), twin(*_good(seed=step)))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: sa.SinkWindow(sinks=4, window=0), "window must be >= 1"),
        (lambda: sa.SinkWindow(sinks=-1, window=8), "sinks must be >= 0"),
        (lambda: sa.SinkWindow(sinks=1.5, window=8), "sinks must be an int"),
        (lambda: sa.SinkWindow(sinks=True, window=8), "sinks must be an int"),
        (lambda: sa.RoPE(head_dim=63), "even int"),
        (lambda: sa.RoPE(head_dim=64, theta=0.5), "theta"),
        (lambda: sa.StreamingAttention(sa.Full(), positions="relative"), "positions"),
        (lambda: sa.StreamingAttention(sa.Full(), scale=-1.0), "scale"),
        (lambda: sa.StreamingAttention(sa.Full(), rebase_every=0), "rebase_every"),
        (lambda: sa.StreamingAttention(sa.Full(), block_size=0), "block_size"),
    ],
)
def test_bad_config_raises_value_error(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_config_types_raise_type_error():
    with pytest.raises(TypeError, match="policy"):
        sa.StreamingAttention(policy="sinks=4")
    with pytest.raises(TypeError, match="rope"):
        sa.StreamingAttention(sa.Full(), rope=64)


def _fed(policy=None, rope=None, positions="cache"):
    attn = sa.StreamingAttention(policy or sa.SinkWindow(sinks=2, window=4), rope or sa.RoPE(D), positions)
    attn(*_good())
    return attn


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (lambda: _fed(policy=sa.SinkWindow(sinks=2, window=5)), "another configuration"),
        (lambda: _fed(policy=sa.Full()), "another configuration"),
        (lambda: _fed(rope=sa.RoPE(D, 500.0)), "another configuration"),
        (lambda: _fed(positions="absolute"), "another configuration"),
    ],
)
def test_state_from_another_configuration_is_refused(other, match):
    attn = _fed()
    before = _snapshot(attn)
    with pytest.raises(ValueError, match=match):
        attn.load_state_dict(other().state_dict())
    assert _same(_snapshot(attn), before)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: {},
        lambda s: {"_extra_state": {"format": "something else"}},
        lambda s: {"_extra_state": {**s["_extra_state"], "state": {**s["_extra_state"]["state"], "k": torch.zeros(1)}}},
        lambda s: {"_extra_state": {**s["_extra_state"], "state": {**s["_extra_state"]["state"], "seen": [1]}}},
        lambda s: {"_extra_state": {**s["_extra_state"], "state": {**s["_extra_state"]["state"], "sink_k": None}}},
    ],
    ids=["empty", "format", "k shape", "seen", "sink_k"],
)
def test_malformed_state_is_refused(corrupt):
    attn = _fed()
    before = _snapshot(attn)
    with pytest.raises(ValueError):
        attn.load_state_dict(corrupt(_fed().state_dict()))
    assert _same(_snapshot(attn), before)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_inputs_requiring_grad_are_refused_unless_grad_is_off(which):
    attn = sa.StreamingAttention(sa.SinkWindow(sinks=2, window=4), sa.RoPE(D))
    attn(*_good())
    before = _snapshot(attn)
    args = list(_good(seed=5))
    args[which] = args[which].requires_grad_()
    with pytest.raises(ValueError, match="inference operator"):
        attn(*args)
    assert _same(_snapshot(attn), before)
    with torch.no_grad():  # the supported way
        out = attn(*args)
    assert not out.requires_grad and not attn.state.k.requires_grad
