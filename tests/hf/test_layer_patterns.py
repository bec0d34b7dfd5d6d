"""The model's own attention pattern: sliding-window layers keep their trained window (and RoPE),
the streaming policy runs on the others, ``layer_policies`` overrides; every argument transformers
passes to the attention function is honoured or refused; the Cache methods generate may call."""

from __future__ import annotations

import pytest
import torch
import transformers

import streamattn as sa
from streamattn.hf import Stream, StreamingCache
from tests.hf.test_architectures import COMMON as ARCH_COMMON

COMMON = {key: value for key, value in ARCH_COMMON.items() if key != "num_hidden_layers"}  # set per config below
SLIDING = {  # name -> (config, sliding layers)
    "mistral": (lambda: transformers.MistralConfig(**COMMON, num_hidden_layers=2, sliding_window=16), [0, 1]),
    "qwen2": (
        lambda: transformers.Qwen2Config(
            **COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=16, max_window_layers=1
        ),
        [1, 2],
    ),
    "gemma3": (
        lambda: transformers.Gemma3TextConfig(
            **COMMON,
            num_hidden_layers=4,
            head_dim=16,
            query_pre_attn_scalar=24,  # scaling != 1/sqrt(head_dim): honoured, not refused
            sliding_window=16,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
        ),
        [0, 1, 2],
    ),
}


def _model(name):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(SLIDING[name][0]()).eval()


def _ids(n=80, seed=1):
    return torch.randint(2, 128, (n,), generator=torch.Generator().manual_seed(seed))


def _dense_logprobs(model, ids):
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[None]).logits[0].float(), dim=-1)
    return logprobs[:-1].gather(1, ids[1:, None])[:, 0]


@pytest.mark.parametrize("positions", ["cache", "absolute"])
@pytest.mark.parametrize("name", sorted(SLIDING))
def test_hybrid_model_equals_its_own_dense_forward(name, positions):
    """Sliding layers keep W=16 with their own RoPE; 80 tokens (5x the window) in any chunking."""
    model = _model(name)
    ids = _ids()
    want = _dense_logprobs(model, ids)
    for chunk in (1, 7, 80):
        with Stream(model, policy=sa.Full(), positions=positions, chunk_size=chunk) as stream:
            got = stream.feed(ids)[1:]
            policies = stream.cache.layer_policies
            every_layer_slides = len(stream.cache.layers) == len(SLIDING[name][1])
            assert stream.cache.capacity == (16 if every_layer_slides else None)
            assert stream.cache.cached() == [16 if every_layer_slides else 80]
        assert (got - want).abs().max().item() < 1e-4, chunk
    sliding = SLIDING[name][1]
    assert [i for i, p in enumerate(policies) if p == sa.SinkWindow(0, 16)] == sliding
    assert all(p == sa.Full() for i, p in enumerate(policies) if i not in sliding)


def test_mistral_sliding_window_is_no_longer_silently_lost():
    """The issue's case: Full() asked for, the model's window honoured (it differed by 0.26 before)."""
    model = _model("mistral")
    ids = _ids(60)
    with torch.no_grad():
        want = model(ids[None]).logits[0]
        with Stream(model, policy=sa.Full(), positions="absolute", chunk_size=60) as stream:
            stream.feed(ids)
        cache = StreamingCache(model, sa.Full(), positions="absolute")
        got = model(ids[None], position_ids=torch.arange(60)[None], past_key_values=cache, use_cache=True).logits[0]
    assert (got - want).abs().max().item() < 1e-4


def test_layer_policies_override_and_change_the_result():
    model = _model("gemma3")
    ids = _ids()
    want = _dense_logprobs(model, ids)
    with Stream(model, policy=sa.Full(), layer_policies={0: sa.SinkWindow(2, 8)}) as stream:
        assert stream.cache.layer_policies[0] == sa.SinkWindow(2, 8)
        got = stream.feed(ids)[1:]
    assert (got - want).abs().max().item() > 1e-2  # layer 0 now sees less than its trained window
    global_only = [None, None, None, sa.SinkWindow(4, 12)]
    with Stream(model, policy=sa.Full(), layer_policies=global_only, chunk_size=1) as by_token:
        a = by_token.feed(ids)
    with Stream(model, policy=sa.SinkWindow(4, 12), chunk_size=13) as chunked:
        b = chunked.feed(ids)
        assert chunked.cache.capacity == 16 and chunked.cache.cached() == [16]  # the sliding layers hold the most
    assert torch.allclose(a, b, atol=1e-4, equal_nan=True)  # the same per-layer policies, any chunking


@pytest.mark.parametrize(
    ("layer_policies", "error", "match"),
    [
        ({9: sa.Full()}, ValueError, "layer 9"),
        ([sa.Full()], ValueError, "4 layers"),
        ({0: "full"}, TypeError, "no engine"),
        ("full", TypeError, "dict"),
    ],
)
def test_bad_layer_policies_are_refused(layer_policies, error, match):
    model = _model("gemma3")
    with pytest.raises(error, match=match):
        StreamingCache(model, layer_policies=layer_policies)
    assert model.config._attn_implementation != "streamattn"  # nothing attached


def _call_kwargs(name, value):
    """Run one streaming forward whose attention calls receive ``name=value`` too."""
    model = _model("mistral")
    cache = StreamingCache(model, sa.Full())
    with torch.no_grad():
        return model(
            _ids(5)[None], position_ids=torch.zeros(1, 5, dtype=torch.long), past_key_values=cache, **{name: value}
        )


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("softcap", 50.0, "softcap"),
        ("output_attentions", True, "output_attentions"),
        ("cu_seq_lens_q", torch.tensor([0, 5]), "cu_seq_lens_q"),
        ("s_aux", torch.zeros(4), "s_aux"),
        ("made_up_option", 3, "made_up_option"),
    ],
)
def test_attention_arguments_are_honoured_or_refused(name, value, match):
    with pytest.raises(NotImplementedError, match=match):
        _call_kwargs(name, value)


def test_wrong_sliding_window_and_scaling_are_refused():
    model = _model("gemma3")
    for layer in model.model.layers:
        layer.self_attn.sliding_window = 8 if layer.self_attn.sliding_window else None
    with pytest.raises(NotImplementedError, match="sliding_window=8"), Stream(model) as stream:
        stream.feed(_ids(4))
    model = _model("gemma3")
    cache = StreamingCache(model)
    model.model.layers[0].self_attn.scaling = 0.5
    with pytest.raises(NotImplementedError, match=r"scaling 0\.5"), torch.no_grad():
        model(_ids(4)[None], past_key_values=cache)


def test_softcapping_models_are_refused():
    config = transformers.Gemma2Config(**COMMON, num_hidden_layers=2, head_dim=16, attn_logit_softcapping=50.0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(NotImplementedError, match="softcapping"):
        StreamingCache(model)


def test_cache_methods_generate_may_call():
    model = _model("gemma3")
    prompt = _ids(20)[None]
    with StreamingCache(model, sa.SinkWindow(4, 12)) as cache:
        model.generate(torch.cat([prompt] * 3), max_new_tokens=2, do_sample=False, past_key_values=cache)
        layer = cache.layers[3].attn
        seen = layer.seen
        cache.batch_select_indices(torch.tensor([2, 0]))
        assert layer.seen == [seen[2], seen[0]]
        cache.batch_repeat_interleave(2)
        assert layer.seen == [seen[2], seen[2], seen[0], seen[0]]
        cache.reorder_cache(torch.tensor([3, 3, 0, 1]))
        assert layer.seen == [seen[0], seen[0], seen[2], seen[2]]
        with pytest.raises(NotImplementedError, match="cannot be cropped"):
            cache.crop(5)
        cache.reset()
        assert cache.get_seq_length() == 0 and layer.state is None
        assert cache.is_sliding == [True, True, True, False]


def test_beam_search_equals_dynamic_cache_without_eviction():
    model = _model("gemma3")
    prompt = _ids(12)[None]
    args = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False}
    want = model.generate(prompt, **args)
    with StreamingCache(model, sa.Full()) as cache:
        got = model.generate(prompt, past_key_values=cache, **args)
    assert torch.equal(got, want)
