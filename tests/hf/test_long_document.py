"""A whole 32K-token document in one model call through a StreamingCache (SmolLM2, real weights).

The longest test of the suite (~2-4 min on 2 cores): one 32,768-token forward, and the same text
fed in 256-token chunks with its last 64 tokens fed one at a time.
"""

from __future__ import annotations

import torch

import streamattn as sa
from streamattn.eval import read_text
from streamattn.hf import Stream, StreamingCache

TOKENS = 32_768
TAIL = 64  # scored token by token at the end of the reference


@torch.no_grad()
def test_whole_32k_document_in_one_call_equals_chunks_and_token_by_token(smollm2, fresh_model):
    model, tokenizer = fresh_model, smollm2[1]
    ids = torch.tensor(tokenizer(read_text(None), add_special_tokens=False).input_ids[:TOKENS])
    assert ids.numel() == TOKENS
    policy = sa.SinkWindow(sinks=4, window=124)  # evicts all the way: the document is 256x the cache

    reference = Stream(model, policy=policy, chunk_size=256)
    head = reference.feed(ids[: TOKENS - TAIL])
    tail = torch.cat([reference.feed(t[None]) for t in ids[TOKENS - TAIL :]])
    want = torch.cat((head, tail))

    # one forward over all 32K tokens; logits in slices (a [32K, 49K] fp32 logit matrix is 6 GB).
    # SmolLM2 is a Llama: logits = lm_head(final hidden state), nothing else.
    cache = StreamingCache(model, policy)
    hidden = model.model(
        input_ids=ids[None], position_ids=torch.zeros(1, TOKENS, dtype=torch.long), past_key_values=cache
    ).last_hidden_state[0]
    got = torch.full((TOKENS,), float("nan"))
    for start in range(0, TOKENS - 1, 2048):
        rows = hidden[start : min(start + 2048, TOKENS - 1)]
        logprobs = torch.log_softmax(model.lm_head(rows).float(), dim=-1)
        got[start + 1 : start + 1 + rows.shape[0]] = logprobs.gather(
            1, ids[start + 1 : start + 1 + rows.shape[0], None]
        )[:, 0]

    assert cache.layers[0].attn.seen == [TOKENS] and cache.layers[0].attn.cached == [128]
    assert torch.isnan(want[0]) and not torch.isnan(want[1:]).any() and not torch.isnan(got[1:]).any()
    assert (got[1:] - want[1:]).abs().max().item() < 1e-4
