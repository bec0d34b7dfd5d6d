"""``RecurrentAttention``: a recurrent memory kept for you over streams fed in chunks of any size."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from streamattn.core.streaming import check_lengths
from streamattn.recurrent import infini, linear
from streamattn.recurrent.infini import InfiniMemory, InfiniState
from streamattn.recurrent.linear import LinearMemory, LinearState

_FORMAT = "streamattn.RecurrentAttention/1"
# memory type -> its module, which provides new_state, forward (both forms, ragged counts), to_dict, from_dict
_OPS = {LinearMemory: linear, InfiniMemory: infini}


class RecurrentAttention(nn.Module):
    """A recurrent memory over streams fed in chunks of any size, in constant memory.

    ``out = attn(q, k, v, lengths=None, *, log_gate=None, beta=None)`` with ``q, k [B, H, T, Dk]``,
    ``v [B, H, T, Dv]`` returns ``[B, H, T, Dv]``: what the training form returns for these tokens
    given everything fed before (to floating-point rounding), whatever the chunking. ``B`` independent
    streams go in one call; ``lengths[b]`` (default ``T``) real tokens per stream (right padding:
    padded tokens never reach the state, their outputs are zero).

    Args:
        memory: ``LinearMemory(...)`` (then ``log_gate [B, H, T]`` with every call iff
            ``memory.gated``) or ``InfiniMemory(segment, ...)`` (then ``beta [H]``, the learned gate
            logits, with every call).

    One call of one token per stream takes the recurrent form, any other call the chunked/parallel
    form. ``state`` is a ``LinearState``/``InfiniState`` value; ``state_dict()`` holds it.
    Errors in the inputs raise ``ValueError``/``TypeError`` before any state changes.
    """

    def __init__(self, memory: LinearMemory | InfiniMemory) -> None:
        super().__init__()
        if type(memory) not in _OPS:
            raise TypeError(f"memory must be a LinearMemory or an InfiniMemory, got {memory!r}")
        self.memory = memory
        self._ops = _OPS[type(memory)]
        self.state: LinearState | InfiniState | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        lengths: torch.Tensor | Sequence[int] | None = None,
        *,
        log_gate: torch.Tensor | None = None,
        beta: torch.Tensor | None = None,
    ) -> torch.Tensor:
        counts = self._check(q, k, v, lengths, log_gate, beta)
        b, h, t, dk = q.shape
        if self.state is None:
            self.state = self._ops.new_state(self.memory, b, h, dk, v.shape[-1], q.dtype, q.device)
        step = t == 1 and all(c == 1 for c in counts)
        ragged = None if all(c == t for c in counts) else counts
        extra = beta if isinstance(self.memory, InfiniMemory) else log_gate
        out, self.state = self._ops.forward(self.memory, q, k, v, extra, self.state, ragged, recurrent=step)
        return out

    def reset(self) -> None:
        """Forget every stream; the next call may bring a new batch size, heads, dims, dtype or device."""
        self.state = None

    @property
    def seen(self) -> list[int]:
        """Tokens consumed so far by each stream (empty before the first call)."""
        return [] if self.state is None else list(self.state.seen)

    @property
    def nbytes(self) -> int:
        """Bytes of the state's tensors: fixed by ``B, H, Dk, Dv`` (and ``segment``), never by ``seen``."""
        tensors = [] if self.state is None else [x for x in self.state if isinstance(x, torch.Tensor)]
        return sum(x.numel() * x.element_size() for x in tensors)

    def extra_repr(self) -> str:
        return f"memory={self.memory}"

    # ------------------------------------------------------------------ validation
    def _check(self, q, k, v, lengths, log_gate, beta) -> list[int]:
        """Every check on the inputs, before anything is touched."""
        linear.check_qkv(q, k, v)
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, beta)):
            raise ValueError(
                "RecurrentAttention is an inference operator: its state carries no gradient across calls. "
                "Call it under torch.no_grad(); to train use linear_attention / infini_attention."
            )
        b, h, t, dk = q.shape
        dv = v.shape[-1]
        counts = check_lengths(lengths, b, t)
        if isinstance(self.memory, InfiniMemory):
            if log_gate is not None:
                raise ValueError("log_gate is an argument of LinearMemory; Infini-attention takes beta")
            if beta is None:
                raise ValueError("InfiniMemory needs beta: the gate logits [H] of the trained layer, every call")
            infini.check_beta(beta, h, q.device)
            infini.check_rope(self.memory, dk)
        else:
            if beta is not None:
                raise ValueError("beta (the Infini-attention gate) is not an argument of LinearMemory")
            self._check_log_gate(log_gate, b, h, t, counts, q.device)
            decay = self.memory.decay
            if isinstance(decay, tuple) and len(decay) != h:
                raise ValueError(f"memory.decay has {len(decay)} values, one per head, but the inputs have H={h}")
        if self.state is not None:
            held = tuple(self.state[0].shape)  # S / mem: [B, H, Dk, Dv]
            if held != (b, h, dk, dv):
                raise ValueError(
                    f"this module holds streams with [B, H, Dk, Dv] = {list(held)}, got inputs with "
                    f"{[b, h, dk, dv]}. Call reset() to start new streams."
                )
            if linear.work_dtype(q.dtype) != self.state[0].dtype:
                raise TypeError(
                    f"the streams' state is {self.state[0].dtype}, inputs of {q.dtype} need "
                    f"{linear.work_dtype(q.dtype)}; call reset() to change dtype"
                )
            if q.device != self.state[0].device:
                raise ValueError(f"the streams' state is on {self.state[0].device}, got inputs on {q.device}")
        return counts

    def _check_log_gate(self, log_gate, b, h, t, counts, device) -> None:
        if log_gate is None:
            if self.memory.gated:
                raise ValueError("memory.gated is True: pass log_gate [B, H, T] (log decays <= 0) with every call")
            return
        if not self.memory.gated:
            raise ValueError("log_gate given but memory.gated is False: use LinearMemory(gated=True)")
        if torch.is_grad_enabled() and log_gate.requires_grad:
            raise ValueError("log_gate requires grad: call RecurrentAttention under torch.no_grad()")
        linear.check_log_gate(log_gate, b, h, t, device)
        real = torch.arange(t, device=device)[None, :] < torch.tensor(counts, device=device)[:, None]
        values = log_gate.masked_select(real[:, None, :])  # padding may hold anything
        if not bool(torch.isfinite(values).all() and (values <= 0).all()):
            raise ValueError("log_gate must be finite and <= 0 (a decay exp(log_gate) in (0, 1]) on real tokens")

    # ------------------------------------------------------------------ save / restore
    def get_extra_state(self) -> dict[str, Any]:
        """Config and state as plain dicts, ints and tensors (``torch.load(weights_only=True)``-safe)."""
        state = None if self.state is None else self._ops.to_dict(self.state)
        return {"format": _FORMAT, "config": self.memory.to_config(), "state": state}

    def set_extra_state(self, extra: Any) -> None:
        self.state = self._parse_state(extra)  # validated completely before anything is replaced

    def check_state_dict(self, state_dict: Any) -> None:
        """Raise ``ValueError`` unless ``state_dict`` would load into this module; changes nothing."""
        if not isinstance(state_dict, Mapping) or "_extra_state" not in state_dict:
            raise ValueError(
                "expected a dict from RecurrentAttention.state_dict() (with key '_extra_state'), "
                f"got {type(state_dict).__name__}"
            )
        self._parse_state(state_dict["_extra_state"])

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        self.check_state_dict(state_dict)  # ValueError before torch touches anything
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _parse_state(self, extra: Any) -> LinearState | InfiniState | None:
        if not isinstance(extra, Mapping) or extra.get("format") != _FORMAT:
            raise ValueError(f"not a RecurrentAttention state (expected format {_FORMAT!r})")
        theirs, ours = extra.get("config"), self.memory.to_config()
        if theirs != ours:
            raise ValueError(f"state comes from another memory configuration: theirs {theirs}, ours {ours}")
        raw = extra.get("state")
        return None if raw is None else self._ops.from_dict(self.memory, raw)
