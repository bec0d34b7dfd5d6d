"""The streaming engine: fixed buffers, positions, attention kernels. Never imports transformers."""

from streamattn.core.engine import SinkWindowEngine
from streamattn.core.rope import RoPE, apply_rotary
from streamattn.core.state import StreamState
from streamattn.core.streaming import StreamingAttention

__all__ = ["RoPE", "SinkWindowEngine", "StreamState", "StreamingAttention", "apply_rotary"]
