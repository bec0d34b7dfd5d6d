"""Linear attention with an explicit state: a chunked form for training, a recurrent form for streaming.

Katharopoulos et al., "Transformers are RNNs", ICML 2020 (arXiv:2006.16236); the scalar decay of
RetNet (Sun et al. 2023, arXiv:2307.08621) and data-dependent gates as in GLA (Yang et al. 2024,
arXiv:2312.06635). Per batch row and head, with feature map ``phi``, decay ``g_t`` in (0, 1] and
scale ``s``:

    S_t = g_t S_{t-1} + phi(k_t)^T v_t                      S: [Dk, Dv]
    z_t = g_t z_{t-1} + phi(k_t)                            z: [Dk]   (normalize=True only)
    o_t = s phi(q_t) S_t                                    (normalize=False)
    o_t = s phi(q_t) S_t / (s phi(q_t) . z_t + eps)         (normalize=True)

with ``g_t = decay[h] * exp(log_gate[b, h, t])``: ``decay`` a fixed constant per head, ``log_gate``
a data-dependent log decay (<= 0). The normaliser is the state of an extra all-ones value column,
so both forms carry ``[S | z]`` as one ``[B, H, Dk, Dv + 1]`` tensor internally.

Functions follow flash-linear-attention's convention: ``initial_state=None, output_final_state=False``
in, ``(o, final_state or None)`` out; tensors are ``[B, H, T, D]``. 16-bit inputs are computed and
their state kept in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from streamattn.policies.base import check_int


def elu1(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``: a positive feature map (Katharopoulos et al. 2020)."""
    return F.elu(x) + 1


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"identity": _identity, "elu1": elu1}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_positive(owner: str, name: str, value: object, *, at_most_one: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive finite number, got {value!r}")
    if at_most_one and value > 1:
        raise ValueError(f"{owner}: {name} must be in (0, 1], got {value!r}")


@dataclass(frozen=True)
class LinearMemory:
    """Configuration of linear attention (the formulas in the module docstring).

    - ``feature_map``: ``"identity"`` or ``"elu1"``.
    - ``normalize``: divide by ``s phi(q_t) . z_t + eps`` (keeps the normaliser ``z`` in the state).
    - ``decay``: fixed decay, one float for every head or a tuple with one per head, each in (0, 1];
      ``None`` = 1 (no decay).
    - ``gated``: every call brings a data-dependent ``log_gate [B, H, T]`` (<= 0); the stateful
      module requires it exactly when ``gated`` (the functions infer it from the argument).
    - ``scale``: ``s``, multiplies ``phi(q)``. ``eps``: the normaliser's floor.
    - ``chunk_size``: tokens per chunk of the training form (never changes results).
    """

    feature_map: str = "elu1"
    normalize: bool = False
    decay: float | tuple[float, ...] | None = None
    gated: bool = False
    scale: float = 1.0
    eps: float = 1e-6
    chunk_size: int = 64

    def __post_init__(self) -> None:
        owner = "LinearMemory"
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"{owner}: feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        for name in ("normalize", "gated"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{owner}: {name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.decay, Sequence):
            object.__setattr__(self, "decay", tuple(self.decay))  # lists become hashable tuples
            if not self.decay:
                raise ValueError(f"{owner}: decay must hold one value per head, got an empty sequence")
            for i, d in enumerate(self.decay):
                check_positive(owner, f"decay[{i}]", d, at_most_one=True)
        elif self.decay is not None:
            check_positive(owner, "decay", self.decay, at_most_one=True)
        check_positive(owner, "scale", self.scale)
        check_positive(owner, "eps", self.eps)
        check_int(owner, "chunk_size", self.chunk_size, 1)

    def to_config(self) -> dict[str, Any]:
        decay = list(self.decay) if isinstance(self.decay, tuple) else self.decay
        return {
            "type": "LinearMemory",
            "feature_map": self.feature_map,
            "normalize": self.normalize,
            "decay": decay,
            "gated": self.gated,
            "scale": self.scale,
            "eps": self.eps,
            "chunk_size": self.chunk_size,
        }


class LinearState(NamedTuple):
    """What a batch of linear-attention streams carries: ``S [B, H, Dk, Dv]``, ``z [B, H, Dk]``
    (``None`` unless normalised) and ``seen[b]``, the tokens stream ``b`` has consumed."""

    S: torch.Tensor
    z: torch.Tensor | None
    seen: tuple[int, ...]


# ---------------------------------------------------------------------- the two forms
def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    feature_map: str = "elu1",
    normalize: bool = False,
    decay: float | Sequence[float] | None = None,
    scale: float = 1.0,
    eps: float = 1e-6,
    chunk_size: int = 64,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, LinearState | None]:
    """Chunked (training) form: ``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]`` -> ``o [B, H, T, Dv]``.

    Each chunk of ``C`` tokens: the intra-chunk part is one causal ``C x C`` matmul weighted by the
    decay mask ``exp(G_i - G_j)`` (``G`` the in-chunk cumulative log decay), the inter-chunk part
    reads the state entering the chunk; then ``S <- exp(G_C) S + sum_j exp(G_C - G_j) phi(k_j)^T v_j``.
    Every exponent is <= 0 (no overflow, no division by a decay). Cost ``O(T C D + T Dk Dv)``.
    """
    memory = LinearMemory(feature_map, normalize, decay, log_gate is not None, scale, eps, chunk_size)
    return _run(memory, q, k, v, log_gate, initial_state, output_final_state, recurrent=False)


def linear_attention_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None = None,
    *,
    feature_map: str = "elu1",
    normalize: bool = False,
    decay: float | Sequence[float] | None = None,
    scale: float = 1.0,
    eps: float = 1e-6,
    initial_state: LinearState | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, LinearState | None]:
    """Recurrent (streaming) form: the formulas applied token by token, ``O(Dk Dv)`` per token."""
    memory = LinearMemory(feature_map, normalize, decay, log_gate is not None, scale, eps)
    return _run(memory, q, k, v, log_gate, initial_state, output_final_state, recurrent=True)


def _run(memory, q, k, v, log_gate, initial_state, output_final_state, *, recurrent):
    check_qkv(q, k, v)
    b, h, t, dk = q.shape
    if log_gate is not None:
        check_log_gate(log_gate, b, h, t, q.device)
    state = new_state(memory, b, h, dk, v.shape[-1], q.dtype, q.device) if initial_state is None else initial_state
    check_state(memory, state, b, h, dk, v.shape[-1], work_dtype(q.dtype), q.device)
    o, final = forward(memory, q, k, v, log_gate, state, None, recurrent=recurrent)
    return o, (final if output_final_state else None)


def forward(
    memory: LinearMemory,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor | None,
    state: LinearState,
    counts: Sequence[int] | None,
    *,
    recurrent: bool,
) -> tuple[torch.Tensor, LinearState]:
    """Both forms on validated inputs; ``counts[b]`` tokens of row ``b`` are real (right padding):
    padded tokens get ``phi(k) = 0, v = 0, g = 1``, so they leave the state as it was, and output 0."""
    b, h, t, _ = q.shape
    dv = v.shape[-1]
    dtype, work = q.dtype, work_dtype(q.dtype)
    if t == 0:
        return q.new_zeros(b, h, 0, dv), state
    phi = FEATURE_MAPS[memory.feature_map]
    q, k, v = phi(q.to(work)) * memory.scale, phi(k.to(work)), v.to(work)
    if memory.normalize:
        v = torch.cat([v, v.new_ones(b, h, t, 1)], dim=-1)  # the normaliser column
    log_g = _log_decay(memory, log_gate, b, h, t, work, q.device)
    real = None
    if counts is not None and any(c < t for c in counts):
        real = torch.arange(t, device=q.device)[None, :] < torch.tensor(counts, device=q.device)[:, None]  # [B, T]
        q, k, v = (torch.where(real[:, None, :, None], x, 0) for x in (q, k, v))  # where: NaN padding is safe
        log_g = None if log_g is None else torch.where(real[:, None, :], log_g, 0)
    s0 = state.S if state.z is None else torch.cat([state.S, state.z[..., None]], dim=-1)
    o, s = _recurrent(q, k, v, log_g, s0) if recurrent else _chunked(q, k, v, log_g, s0, memory.chunk_size)
    if memory.normalize:
        o = o[..., :dv] / (o[..., dv:] + memory.eps)
    if real is not None:
        o = o.masked_fill(~real[:, None, :, None], 0)
    seen = tuple(n + c for n, c in zip(state.seen, counts or [t] * b, strict=True))
    final = LinearState(s, None, seen) if not memory.normalize else LinearState(s[..., :dv], s[..., dv], seen)
    return o.to(dtype), final


def _log_decay(memory, log_gate, b, h, t, dtype, device) -> torch.Tensor | None:
    """Per-token log decay ``[B, H, T]`` (``log decay[h] + log_gate``), or None when ``g = 1``."""
    if memory.decay is None and log_gate is None:
        return None
    out = torch.zeros(b, h, t, dtype=dtype, device=device)
    if memory.decay is not None:
        decay = memory.decay if isinstance(memory.decay, tuple) else (memory.decay,) * h
        out = out + torch.tensor(decay, dtype=torch.float64).log().to(dtype=dtype, device=device)[None, :, None]
    return out if log_gate is None else out + log_gate.to(dtype)


def _chunked(q, k, v, log_g, s, chunk_size):
    """Chunks of ``C`` tokens: intra-chunk masked matmul + the state entering each chunk."""
    b, h, t, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:  # zero tokens at the end: phi(k) = 0, g = 1, outputs dropped
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_g = None if log_g is None else F.pad(log_g, (0, pad))
    q, k, v = q.reshape(b, h, n, c, dk), k.reshape(b, h, n, c, dk), v.reshape(b, h, n, c, dv)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = q @ k.transpose(-1, -2)  # [B, H, n, C, C]
    if log_g is None:
        intra = scores.masked_fill(~causal, 0) @ v
        contrib = k.transpose(-1, -2) @ v  # [B, H, n, Dk, Dv]: what each chunk adds to the state
        q_in, chunk_decay = q, None
    else:
        g = log_g.reshape(b, h, n, c).cumsum(-1)  # G_i: log decay from the chunk start through token i
        # exp(G_i - G_j) for j <= i; masked to -inf before exp, so no overflow and no NaN gradient
        decay_mask = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        intra = (scores * decay_mask) @ v
        contrib = (k * (g[..., -1:] - g).exp()[..., None]).transpose(-1, -2) @ v
        q_in, chunk_decay = q * g.exp()[..., None], g[..., -1].exp()  # [B, H, n]
    entering = []
    for i in range(n):  # the scan over chunks: n small [Dk, Dv] updates
        entering.append(s)
        s = s + contrib[:, :, i] if chunk_decay is None else chunk_decay[:, :, i, None, None] * s + contrib[:, :, i]
    inter = q_in @ torch.stack(entering, dim=2)  # [B, H, n, C, Dv]
    return (intra + inter).reshape(b, h, n * c, dv)[:, :, :t], s


def _recurrent(q, k, v, log_g, s):
    """One token at a time: ``S <- g_t S + phi(k_t)^T v_t``, ``o_t = q_t S``."""
    outs = []
    for i in range(q.shape[2]):
        if log_g is not None:
            s = log_g[:, :, i, None, None].exp() * s
        s = s + k[:, :, i, :, None] * v[:, :, i, None, :]
        outs.append(q[:, :, i, None, :] @ s)
    return torch.cat(outs, dim=2), s


# ---------------------------------------------------------------------- states and validation
def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs (state and accumulation), else the input dtype."""
    return torch.promote_types(dtype, torch.float32)


def new_state(
    memory: LinearMemory, b: int, h: int, dk: int, dv: int, dtype: torch.dtype, device: torch.device
) -> LinearState:
    """Zero state for ``b`` streams (in ``work_dtype(dtype)``)."""
    like = {"dtype": work_dtype(dtype), "device": device}
    z = torch.zeros(b, h, dk, **like) if memory.normalize else None
    return LinearState(torch.zeros(b, h, dk, dv, **like), z, (0,) * b)


def check_state(memory, state, b, h, dk, dv, dtype, device) -> None:
    """``ValueError``/``TypeError`` unless ``state`` is a ``LinearState`` for these shapes."""
    if not isinstance(state, LinearState):
        raise TypeError(f"state must be a LinearState, got {type(state).__name__}")
    if isinstance(memory.decay, tuple) and len(memory.decay) != h:
        raise ValueError(f"decay has {len(memory.decay)} values, expected one per head (H={h})")
    expect = {"S": (b, h, dk, dv), "z": (b, h, dk) if memory.normalize else None}
    for name, shape in expect.items():
        x = getattr(state, name)
        if shape is None:
            if x is not None:
                raise ValueError(f"state.{name} must be None for normalize={memory.normalize}")
            continue
        check_tensor(f"state.{name}", x, shape, dtype, device)
    check_seen(state.seen, b)


def to_dict(state: LinearState) -> dict[str, Any]:
    return {"S": state.S, "z": state.z, "seen": torch.tensor(state.seen, dtype=torch.int64)}


def from_dict(memory: LinearMemory, raw: Any) -> LinearState:
    """Validated, cloned ``LinearState`` from ``to_dict`` output (``ValueError`` naming what is wrong)."""
    check_keys(raw, ("S", "z", "seen"))
    S = raw["S"]
    if not isinstance(S, torch.Tensor) or S.dim() != 4 or S.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state 'S' must be a float32/float64 tensor [B, H, Dk, Dv], got {describe(S)}")
    b, h, dk, dv = S.shape
    state = LinearState(S, raw["z"], seen_from_tensor(raw["seen"]))
    try:
        check_state(memory, state, b, h, dk, dv, S.dtype, S.device)
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    return LinearState(S.clone(), None if state.z is None else state.z.clone(), state.seen)


# ---------------------------------------------------------------------- checks shared with infini.py and the module
def check_qkv(q: Any, k: Any, v: Any) -> None:
    """``q, k [B, H, T, Dk]``, ``v [B, H, T, Dv]``: one float dtype, one device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, T, D], got shape {tuple(x.shape)}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"need q, k [B, H, T, Dk] and v [B, H, T, Dv] with the same B, H, T; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if min(q.shape[0], q.shape[1], q.shape[3], v.shape[3]) < 1:
        raise ValueError(f"need B, H, Dk, Dv >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_log_gate(log_gate: Any, b: int, h: int, t: int, device: torch.device) -> None:
    if not isinstance(log_gate, torch.Tensor) or not log_gate.dtype.is_floating_point:
        raise TypeError(f"log_gate must be a float tensor [B, H, T], got {describe(log_gate)}")
    if tuple(log_gate.shape) != (b, h, t) or log_gate.device != device:
        raise ValueError(
            f"log_gate must be [B, H, T] = {(b, h, t)} on {device}, got {tuple(log_gate.shape)} on {log_gate.device}"
        )


def check_tensor(name: str, x: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor {list(shape)}, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype} (the state of {dtype} streams), got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on {device}, got {x.device}")


def check_seen(seen: Any, b: int) -> None:
    if not isinstance(seen, tuple) or len(seen) != b or not all(isinstance(n, int) and n >= 0 for n in seen):
        raise ValueError(f"state.seen must be a tuple of {b} ints >= 0 (tokens consumed per stream), got {seen!r}")


def seen_from_tensor(x: Any) -> tuple[int, ...]:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.dtype != torch.int64:
        raise ValueError(f"state 'seen' must be a 1-D int64 tensor, got {describe(x)}")
    return tuple(int(n) for n in x.tolist())


def check_keys(raw: Any, keys: Sequence[str]) -> None:
    if not isinstance(raw, Mapping) or set(raw) != set(keys):
        got = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        raise ValueError(f"a saved state must be a dict with keys {sorted(keys)}, got {got}")


def describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__
