"""streamattn: streaming attention over endless streams, in bounded memory, exactly.

import streamattn as sa
attn = sa.StreamingAttention(policy=sa.SinkWindow(sinks=4, window=1020),
                             rope=sa.RoPE(head_dim=64, theta=10000.0), positions="cache")
out = attn(q, k, v)   # q [B, Hq, T, D], k/v [B, Hkv, T, D]
"""

from streamattn import encoder, masks, policies, reference
from streamattn.core import RoPE, StateSpec, StreamingAttention, StreamState, engine_for, register_engine
from streamattn.core.chunked import ChunkedAttention, ChunkedState
from streamattn.core.conv import ConvState, StreamingConv1d
from streamattn.encoder import AttentionStage, ConvStage, FrameStage, Residual, StreamingEncoder
from streamattn.policies import (
    ChunkedContext,
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
    "AttentionStage",
    "ChunkedAttention",
    "ChunkedContext",
    "ChunkedState",
    "Compressed",
    "ConvStage",
    "ConvState",
    "FrameStage",
    "Full",
    "IndexPolicy",
    "PerHead",
    "PerLayer",
    "Policy",
    "Residual",
    "Retrieval",
    "RoPE",
    "SinkWindow",
    "StateSpec",
    "StreamState",
    "StreamingAttention",
    "StreamingConv1d",
    "StreamingEncoder",
    "WindowPolicy",
    "encoder",
    "engine_for",
    "masks",
    "parse_policy",
    "policies",
    "policy_from_config",
    "reference",
    "register_engine",
    "scores",
]
