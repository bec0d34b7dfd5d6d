"""model.generate on a StreamingCache: same tokens as transformers' DynamicCache, multi-turn, bounded."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import streamattn as sa
from streamattn.hf import StreamingCache


def _turn(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def test_multi_turn_generate_equals_dynamic_cache(smollm2, fresh_model):
    plain, tokenizer = smollm2
    messages = [{"role": "user", "content": "Name a novel by Jane Austen."}]
    dynamic, streaming = (
        DynamicCache(config=plain.config),
        StreamingCache(fresh_model, sa.SinkWindow(sinks=4, window=1020)),
    )
    with torch.no_grad():
        for question in ("Who is its heroine?", None):
            inputs = _turn(tokenizer, messages)
            want = plain.generate(**inputs, max_new_tokens=12, do_sample=False, past_key_values=dynamic)
            got = fresh_model.generate(**inputs, max_new_tokens=12, do_sample=False, past_key_values=streaming)
            assert torch.equal(got, want)
            assert streaming.get_seq_length() == dynamic.get_seq_length()
            answer = tokenizer.decode(got[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            messages += [{"role": "assistant", "content": answer}]
            if question:
                messages += [{"role": "user", "content": question}]


def test_generate_with_eviction_keeps_the_cache_bounded(smollm2, fresh_model):
    _, tokenizer = smollm2
    cache = StreamingCache(fresh_model, sa.SinkWindow(sinks=4, window=16))
    inputs = _turn(tokenizer, [{"role": "user", "content": "Tell me about Emma Woodhouse and Mr. Knightley."}])
    with torch.no_grad():
        out = fresh_model.generate(**inputs, max_new_tokens=24, do_sample=False, past_key_values=cache)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 24
    assert cache.get_seq_length() == out.shape[1] - 1  # the last token is returned, not yet fed
    assert all(layer.attn.cached == [20] for layer in cache.layers)  # 4 sinks + 16 window
    assert all(layer.attn.state.k.shape[2] == 20 for layer in cache.layers)


def test_batched_left_padded_generate_equals_each_prompt_alone(smollm2, fresh_model):
    _, tokenizer = smollm2
    prompts = ["Emma Woodhouse, handsome, clever, and rich,", "Mr. Knightley", "It is a truth universally acknowledged"]
    policy = sa.SinkWindow(sinks=4, window=8)  # the longest prompt and every generation evict
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        alone = []
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            cache = StreamingCache(fresh_model, policy)
            out = fresh_model.generate(**inputs, max_new_tokens=10, do_sample=False, past_key_values=cache)
            alone.append(out[0, inputs["input_ids"].shape[1] :])
        batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        assert not batch["attention_mask"].all()  # really padded
        cache = StreamingCache(fresh_model, policy)
        out = fresh_model.generate(**batch, max_new_tokens=10, do_sample=False, past_key_values=cache, pad_token_id=pad)
    for row, want in zip(out[:, batch["input_ids"].shape[1] :], alone, strict=True):
        assert torch.equal(row, want)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert cache.layers[0].attn.seen == [n + 9 for n in lengths]  # padding never entered a stream


def test_padding_between_valid_tokens_is_refused_before_any_change(smollm2, fresh_model):
    cache = StreamingCache(fresh_model, sa.SinkWindow(sinks=4, window=8))
    ids = torch.tensor([[11, 12, 13, 14]])
    with torch.no_grad(), pytest.raises(ValueError, match="contiguous run"):
        fresh_model(input_ids=ids, attention_mask=torch.tensor([[1, 0, 1, 1]]), past_key_values=cache)
    assert cache.layers[0].attn.seen == []
