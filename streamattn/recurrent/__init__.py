"""Recurrent memories for models you train: linear attention and Infini-attention, in constant memory.

Each operator has a training form (chunked / parallel, differentiable), a recurrent form (token by
token) and a float64 oracle (``streamattn.recurrent.reference``), all equal; the functions follow
flash-linear-attention's convention (``initial_state``, ``output_final_state`` -> ``(o, state)``).
``RecurrentAttention`` keeps the state for you, like ``StreamingAttention``::

    import streamattn.recurrent as rec
    o, _ = rec.infini_attention(q, k, v, beta, segment=64)             # training, whole sequences
    attn = rec.RecurrentAttention(rec.InfiniMemory(segment=64))
    with torch.no_grad():
        out = attn(q_chunk, k_chunk, v_chunk, beta=beta)                 # streaming, any chunk sizes
"""

from __future__ import annotations

from streamattn.recurrent.infini import InfiniMemory, InfiniState, infini_attention, infini_attention_recurrent
from streamattn.recurrent.linear import LinearMemory, LinearState, linear_attention, linear_attention_recurrent
from streamattn.recurrent.streaming import RecurrentAttention

__all__ = [
    "InfiniMemory",
    "InfiniState",
    "LinearMemory",
    "LinearState",
    "RecurrentAttention",
    "infini_attention",
    "infini_attention_recurrent",
    "linear_attention",
    "linear_attention_recurrent",
]
