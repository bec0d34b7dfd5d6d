"""streamattn: streaming attention over endless streams, in bounded memory, exactly.

import streamattn as sa
attn = sa.StreamingAttention(policy=sa.SinkWindow(sinks=4, window=1020),
                             rope=sa.RoPE(head_dim=64, theta=10000.0), positions="cache")
out = attn(q, k, v)   # q [B, Hq, T, D], k/v [B, Hkv, T, D]
"""

from streamattn import masks, reference
from streamattn.core import RoPE, StreamingAttention, StreamState
from streamattn.policies import Full, Policy, SinkWindow, policy_from_config

__version__ = "0.1.0"

__all__ = [
    "Full",
    "Policy",
    "RoPE",
    "SinkWindow",
    "StreamState",
    "StreamingAttention",
    "masks",
    "policy_from_config",
    "reference",
]
