"""streamattn: streaming attention over endless streams, in bounded memory, exactly.

import streamattn as sa
attn = sa.StreamingAttention(policy=sa.SinkWindow(sinks=4, window=1020),
                             rope=sa.RoPE(head_dim=64, theta=10000.0), positions="cache")
out = attn(q, k, v)   # q [B, Hq, T, D], k/v [B, Hkv, T, D]
"""

from streamattn import masks, policies, reference
from streamattn.core import RoPE, StateSpec, StreamingAttention, StreamState, engine_for, register_engine
from streamattn.policies import (
    Compressed,
    Full,
    IndexPolicy,
    PerHead,
    PerLayer,
    Policy,
    Retrieval,
    SinkWindow,
    WindowPolicy,
    parse_policy,
    policy_from_config,
    scores,
)

__version__ = "0.1.0"

__all__ = [
    "Compressed",
    "Full",
    "IndexPolicy",
    "PerHead",
    "PerLayer",
    "Policy",
    "Retrieval",
    "RoPE",
    "SinkWindow",
    "StateSpec",
    "StreamState",
    "StreamingAttention",
    "WindowPolicy",
    "engine_for",
    "masks",
    "parse_policy",
    "policies",
    "policy_from_config",
    "reference",
    "register_engine",
    "scores",
]
