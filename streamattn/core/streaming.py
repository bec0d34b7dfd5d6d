"""``StreamingAttention``: the public, stateful operator over batches of endless streams."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

# engines register themselves on import: budget, sinks + window, retrieval, and per-head (just below)
import streamattn.core.budget
import streamattn.core.engine  # noqa: F401
from streamattn.core.memory import MemoryState
from streamattn.core.per_head import PerHeadState
from streamattn.core.registry import engine_for
from streamattn.core.rope import RoPE
from streamattn.core.state import StreamState
from streamattn.policies import Policy, SinkWindow, policy_from_config, state_config

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FORMAT = "streamattn.StreamingAttention/1"


class StreamingAttention(nn.Module):
    """Attention over streams fed in chunks of any size, in bounded memory, exactly.

    ``out = attn(q, k, v)`` with ``q [B, Hq, T, D]``, ``k``/``v`` ``[B, Hkv, T, D]`` (un-rotated,
    ``Hq % Hkv == 0``) returns ``[B, Hq, T, D]``: what ``streamattn.reference.attention`` returns for
    these tokens given everything fed before, whatever the chunking. ``B`` independent streams go
    in one call; ``lengths[b]`` (default ``T``) says how many of the ``T`` tokens of stream ``b``
    are real (right padding): padded tokens never enter the state and their outputs are zero.

    Args:
        policy: any policy with a registered engine (``streamattn.core.registry``):
            ``SinkWindow(sinks, window)``, ``Full()``.
        rope: ``RoPE(head_dim, theta)`` to rotate q/k, or ``None`` to use them as given.
        positions: ``"cache"`` (StreamingLLM: a token's position is its slot in the cache when it is
            attended) or ``"absolute"`` (its index in the stream: plain masked attention).
        scale: softmax scale, default ``1/sqrt(D)``.
        rebase_every: tokens after which a stream's RoPE frame origin moves forward (keeps angles
            small forever; costs one re-rotation of the ring per ``rebase_every`` tokens).
        block_size: longest block the chunk path attends at once (memory bound; never affects
            results).

    Errors in the inputs raise ``ValueError``/``TypeError`` before any state changes.
    """

    def __init__(
        self,
        policy: Policy | None = None,
        rope: RoPE | None = None,
        positions: str = "cache",
        scale: float | None = None,
        *,
        rebase_every: int = 2**20,
        block_size: int = 256,
    ) -> None:
        super().__init__()
        policy = SinkWindow() if policy is None else policy
        engine_cls = engine_for(policy)  # TypeError naming the policies that have an engine
        if rope is not None and not isinstance(rope, RoPE):
            raise TypeError(f"rope must be a streamattn.RoPE or None, got {rope!r}")
        if positions not in ("cache", "absolute"):
            raise ValueError(f"positions must be 'cache' or 'absolute', got {positions!r}")
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0
        ):
            raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")
        for name, value in (("rebase_every", rebase_every), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.policy, self.rope, self.positions = policy, rope, positions
        self.scale = None if scale is None else float(scale)
        self.engine = engine_cls(policy, rope, positions, self.scale, rebase_every, block_size)
        self.state: StreamState | PerHeadState | MemoryState | None = None
        self._checked: tuple | None = None  # signature of inputs last validated against self.state

    # ------------------------------------------------------------------ streaming
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor | Sequence[int] | None = None,
    ) -> torch.Tensor:
        counts = self._check(q, k, v, lengths)
        if q.shape[2] == 0 or max(counts) == 0:
            return q.new_zeros(q.shape)
        if self.state is None:
            b, hkv, _, d = k.shape
            self.state = self.engine.new_state(b, hkv, d, k.dtype, k.device)
        return self.engine.forward(self.state, q, k, v, counts)

    def reset(self) -> None:
        """Forget every stream; the next call may bring a new batch size, heads, dtype or device."""
        self.state, self._checked = None, None

    @property
    def seen(self) -> list[int]:
        """Tokens consumed so far by each stream (empty before the first call)."""
        return [] if self.state is None else list(self.state.seen)

    @property
    def cached(self) -> list[int]:
        """Keys currently held per stream (bounded by ``sinks + window`` for ``SinkWindow``)."""
        return [] if self.state is None else self.engine.cached(self.state)

    def slot_index(self) -> torch.Tensor | None:
        """``[B, Hkv, N]`` int64: the stream index each slot holds (``EMPTY`` if none); None before the first call."""
        return None if self.state is None else self.engine.slot_index(self.state)

    # ------------------------------------------------------------------ streams leave and join
    def select_streams(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Keep streams ``rows`` (in that order; repeats allowed, e.g. beams), drop the others."""
        if self.state is None:
            raise ValueError("no streams yet: select_streams needs a first call (or load_state_dict)")
        self.state, self._checked = self.state.select(rows), None

    def add_streams(self, state: StreamState) -> None:
        """Append the streams of ``state`` (e.g. ``other.state`` or ``other.state.select(...)``) to the batch."""
        if not isinstance(state, (StreamState, PerHeadState, MemoryState)):
            raise TypeError(f"add_streams takes a StreamState, got {type(state).__name__}")
        self._check_layout(state)
        self.state = (
            state.select(range(state.batch_size)) if self.state is None else type(self.state).cat([self.state, state])
        )
        self._checked = None

    def _check_layout(self, state: StreamState) -> None:
        """``state`` must be what this operator's engine produces (validated like a saved state)."""
        self.engine.spec.load(state.to_dict())

    def extra_repr(self) -> str:
        return f"policy={self.policy}, rope={self.rope}, positions={self.positions!r}, scale={self.scale}"

    # ------------------------------------------------------------------ validation
    def _check(self, q, k, v, lengths) -> list[int]:
        """Every check on the inputs, before anything is touched.

        Decode loops call this per token: when the tensors' shapes, dtypes and devices equal those
        of the last call that passed every check against the same state, the checks below would
        pass again, so the comparison of that signature is all that runs.
        """
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v)):
            raise ValueError(
                "StreamingAttention is an inference operator: its state is updated in place and carries no "
                "gradient, so autograd would chain every step into one growing graph. Call it under "
                "torch.no_grad() or torch.inference_mode(); to train with the same mask use streamattn.masks."
            )
        signature = _signature(q, k, v) if lengths is None and self.state is not None else None
        if signature is not None and signature == self._checked:
            return [q.shape[2]] * q.shape[0]
        counts = self._check_all(q, k, v, lengths)
        if signature is not None:
            self._checked = signature
        return counts

    def _check_all(self, q, k, v, lengths) -> list[int]:
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 4:
                raise ValueError(f"{name} must be 4-D [B, H, T, D], got shape {tuple(x.shape)}")
        if k.shape != v.shape:
            raise ValueError(
                f"k and v must have the same shape [B, Hkv, T, D], got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        b, hq, t, d = q.shape
        hkv = k.shape[1]
        if (k.shape[0], k.shape[2], k.shape[3]) != (b, t, d):
            raise ValueError(
                f"q [B, Hq, T, D] = {tuple(q.shape)} and k/v [B, Hkv, T, D] = {tuple(k.shape)} must agree on B, T and D"
            )
        if b < 1 or d < 1 or hkv < 1 or hq % hkv:
            raise ValueError(f"need B >= 1, D >= 1 and Hq % Hkv == 0, got B={b}, D={d}, Hq={hq}, Hkv={hkv}")
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"q, k, v must share one float dtype (float16/bfloat16/float32/float64), got {q.dtype}, {k.dtype}, {v.dtype}"
            )
        if not (q.device == k.device == v.device):
            raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
        if self.rope is not None and d != self.rope.head_dim:
            raise ValueError(f"head_dim {d} of q/k/v does not match rope.head_dim {self.rope.head_dim}")
        self.engine.check_inputs(hkv, d)
        st = self.state
        if st is not None:
            if (st.batch_size, st.kv_heads, st.head_dim) != (b, hkv, d):
                raise ValueError(
                    f"this operator holds {st.batch_size} streams with Hkv={st.kv_heads}, D={st.head_dim}; "
                    f"got B={b}, Hkv={hkv}, D={d}. Call reset() to start new streams."
                )
            if q.dtype != st.dtype:
                raise TypeError(
                    f"the streams' state is {st.dtype}, got inputs of {q.dtype}; call reset() to change dtype"
                )
            if q.device != st.device:
                raise ValueError(
                    f"the streams' state is on {st.device}, got inputs on {q.device}; call reset() to move"
                )
        return check_lengths(lengths, b, t)

    # ------------------------------------------------------------------ save / restore
    def _config(self) -> dict[str, Any]:
        return {
            "policy": state_config(self.policy.to_config()),
            "rope": None if self.rope is None else self.rope.to_config(),
            "positions": self.positions,
            "scale": self.scale,
            "rebase_every": self.engine.rebase_every,
        }

    def get_extra_state(self, copy: bool = True, rows: Sequence[int] | None = None) -> dict[str, Any]:
        """The whole stream state as plain dicts, ints and tensors (``torch.load(weights_only=True)``-safe);
        ``copy=False``: the live buffers, for writing straight to a file (``hf.Stream.save``);
        ``rows``: those streams only (a copy)."""
        if rows is not None:
            state = self.state.select(rows).to_dict(copy=False)
        else:
            state = None if self.state is None else self.state.to_dict(copy)
        return {"format": _FORMAT, "config": self._config(), "state": state}

    def set_extra_state(self, extra: Any) -> None:
        self.state = self._parse_state(extra)  # validated completely before anything is replaced
        self._checked = None

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError`` unless ``state_dict`` would load into this operator; changes nothing."""
        if not isinstance(state_dict, Mapping) or "_extra_state" not in state_dict:
            raise ValueError(
                "expected a dict from StreamingAttention.state_dict() (with key '_extra_state'), "
                f"got {type(state_dict).__name__} with keys {list(state_dict)[:5] if isinstance(state_dict, Mapping) else '-'}"
            )
        self._parse_state(state_dict["_extra_state"])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        self.check_state_dict(state_dict)  # raise ValueError before torch touches anything
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _parse_state(self, extra: Any) -> StreamState | None:
        if not isinstance(extra, Mapping) or extra.get("format") != _FORMAT:
            raise ValueError(f"not a StreamingAttention state (expected format {_FORMAT!r})")
        config = extra.get("config")
        if config != self._config():
            diff = {
                key: (config.get(key) if isinstance(config, Mapping) else None, mine)
                for key, mine in self._config().items()
                if not isinstance(config, Mapping) or config.get(key) != mine
            }
            raise ValueError(f"state comes from another configuration: (theirs, ours) = {diff}")
        policy_from_config(config["policy"])
        raw = extra.get("state")
        return None if raw is None else self.engine.spec.load(raw)


def _signature(q: Any, k: Any, v: Any) -> tuple | None:
    """Shapes, dtypes and devices of the inputs (None unless all three are tensors)."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device)


def check_lengths(lengths: Any, b: int, t: int) -> list[int]:
    """Valid tokens per stream (``lengths``, default ``T`` each) as ints, or ``TypeError``/``ValueError``."""
    if lengths is None:
        return [t] * b
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(
                f"lengths must be a 1-D integer tensor or a sequence of ints, got {lengths.dtype} {tuple(lengths.shape)}"
            )
        values = lengths.tolist()
    elif isinstance(lengths, Sequence) and all(isinstance(x, int) and not isinstance(x, bool) for x in lengths):
        values = list(lengths)
    else:
        raise TypeError(f"lengths must be a 1-D integer tensor or a sequence of ints, got {lengths!r}")
    if len(values) != b:
        raise ValueError(f"lengths has {len(values)} entries, expected one per stream (B={b})")
    if any(x < 0 or x > t for x in values):
        raise ValueError(f"lengths must be in [0, T={t}], got {values}")
    return values
