"""The streaming engines: state, kernels, positions. Never imports transformers."""

from streamattn.core.chunked import ChunkedAttention, ChunkedState
from streamattn.core.conv import ConvState, StreamingConv1d
from streamattn.core.engine import SinkWindowEngine
from streamattn.core.kernels import attend, attend_with_lse, rope_at_write, write_slots
from streamattn.core.registry import engine_for, register_engine
from streamattn.core.rope import RoPE, apply_rotary
from streamattn.core.state import EMPTY, StateSpec, StreamState
from streamattn.core.streaming import StreamingAttention

__all__ = [
    "EMPTY",
    "ChunkedAttention",
    "ChunkedState",
    "ConvState",
    "RoPE",
    "SinkWindowEngine",
    "StateSpec",
    "StreamState",
    "StreamingAttention",
    "StreamingConv1d",
    "apply_rotary",
    "attend",
    "attend_with_lse",
    "engine_for",
    "register_engine",
    "rope_at_write",
    "write_slots",
]
