"""The streaming engines: state, kernels, positions. Never imports transformers."""

from streamattn.core.engine import SinkWindowEngine
from streamattn.core.kernels import attend, attend_with_lse, rope_at_write, write_slots
from streamattn.core.registry import engine_for, register_engine
from streamattn.core.rope import RoPE, apply_rotary
from streamattn.core.state import EMPTY, StateSpec, StreamState
from streamattn.core.streaming import StreamingAttention

__all__ = [
    "EMPTY",
    "RoPE",
    "SinkWindowEngine",
    "StateSpec",
    "StreamState",
    "StreamingAttention",
    "apply_rotary",
    "attend",
    "attend_with_lse",
    "engine_for",
    "register_engine",
    "rope_at_write",
    "write_slots",
]
