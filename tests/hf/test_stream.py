"""Real-model streaming with SmolLM2: exact for any chunking, equal to transformers without eviction."""

from __future__ import annotations

import pytest
import torch

import streamattn as sa
from streamattn.hf import Stream, rope_from_config

TOL = 1e-4  # fp32 log-probs


def plain_logprobs(model, ids):
    """What transformers' own forward (SDPA, full cache) gives for each token, NaN for the first."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids[None]).logits[0].float(), dim=-1)
    return torch.cat((torch.tensor([float("nan")]), logprobs[:-1].gather(1, ids[1:, None])[:, 0]))


def test_without_eviction_equals_transformers(smollm2, fresh_model, emma_ids):
    ids = emma_ids[:200]
    want = plain_logprobs(smollm2[0], ids)  # smollm2 itself is never switched to streaming
    got = Stream(fresh_model, smollm2[1], sa.SinkWindow(sinks=4, window=1020), chunk_size=64).feed(ids)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    assert (got[1:] - want[1:]).abs().max().item() < TOL


def test_any_chunking_equals_token_by_token_with_eviction(smollm2, fresh_model, emma_ids):
    ids = emma_ids[:120]
    policy = sa.SinkWindow(sinks=4, window=32)  # evicts from token 36 on
    by_token = Stream(fresh_model, policy=policy, chunk_size=1).feed(ids)
    for size in (7, 64, 120):  # 64 > window; 120 = the whole text at once
        chunked = Stream(fresh_model, policy=policy, chunk_size=size).feed(ids)
        assert (chunked[1:] - by_token[1:]).abs().max().item() < TOL, size
    split = Stream(fresh_model, policy=policy, chunk_size=50)  # several feeds == one feed
    parts = torch.cat([split.feed(ids[:13]), split.feed(ids[13:77]), split.feed(ids[77:])])
    assert (parts[1:] - by_token[1:]).abs().max().item() < TOL
    assert split.seen == 120 and split.cache.layers[0].attn.cached == [36]


def test_text_and_ids_give_the_same_scores(smollm2, fresh_model):
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids = torch.tensor(smollm2[1](text, add_special_tokens=False).input_ids)
    a = Stream(fresh_model, smollm2[1], sa.SinkWindow(sinks=4, window=8)).feed(text)
    b = Stream(fresh_model, smollm2[1], sa.SinkWindow(sinks=4, window=8)).feed(ids)
    assert torch.equal(a[1:], b[1:])


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        ("", ValueError, "empty"),
        (torch.tensor([], dtype=torch.long), ValueError, "empty"),
        (torch.tensor([1.0, 2.0]), TypeError, "int64/int32"),
        (torch.tensor([[1, 2]]), TypeError, "1-D"),
        (torch.tensor([1, 10**7]), ValueError, "token ids must be in"),
        (3.5, TypeError, "str or a 1-D LongTensor"),
    ],
)
def test_bad_feed_raises_and_keeps_the_stream(smollm2, fresh_model, bad, error, match):
    stream = Stream(fresh_model, smollm2[1], sa.SinkWindow(sinks=2, window=8))
    first = stream.feed("Emma Woodhouse, handsome")
    with pytest.raises(error, match=match):
        stream.feed(bad)
    twin = Stream(fresh_model, smollm2[1], sa.SinkWindow(sinks=2, window=8))
    twin.feed("Emma Woodhouse, handsome")
    assert stream.seen == twin.seen == first.numel()
    assert torch.equal(stream.feed(", clever, and rich"), twin.feed(", clever, and rich"))


def test_unsupported_rope_is_a_clear_error(smollm2):
    config = smollm2[0].config.__class__.from_dict(smollm2[0].config.to_dict())
    config.rope_parameters = {"rope_type": "yarn", "rope_theta": 1e5, "factor": 4.0}
    with pytest.raises(NotImplementedError, match="yarn"):
        rope_from_config(config)
    assert rope_from_config(smollm2[0].config) == sa.RoPE(head_dim=64, theta=1e5)


def _prompt(tokenizer, text="Name three novels by Jane Austen."):
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def test_generate_equals_transformers_greedy(smollm2, fresh_model):
    plain, tokenizer = smollm2
    inputs = _prompt(tokenizer)
    with torch.no_grad():
        want = plain.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    stream = Stream(fresh_model, tokenizer, sa.SinkWindow(sinks=4, window=1020))
    stream.feed(inputs["input_ids"][0])
    text = "".join(stream.generate(max_new_tokens=16))
    assert stream.last_generated == want.tolist()
    assert text == tokenizer.decode(want, skip_special_tokens=True)


def test_generated_tokens_are_appended_like_fed_ones(smollm2, fresh_model):
    _, tokenizer = smollm2
    prompt = _prompt(tokenizer)["input_ids"][0]
    policy = sa.SinkWindow(sinks=4, window=16)  # the prompt alone overflows it: generation runs evicting
    talker = Stream(fresh_model, tokenizer, policy)
    talker.feed(prompt)
    list(talker.generate(max_new_tokens=10, temperature=0.8, seed=0))
    reader = Stream(fresh_model, tokenizer, policy, chunk_size=7)
    reader.feed(torch.cat((prompt, torch.tensor(talker.last_generated))))
    assert talker.seen == reader.seen == prompt.numel() + 10
    assert (talker.next_logprobs - reader.next_logprobs).abs().max().item() < TOL


def test_state_dict_round_trip_continues_bitwise(smollm2, fresh_model, emma_ids, tmp_path):
    policy = sa.SinkWindow(sinks=4, window=24)
    stream = Stream(fresh_model, smollm2[1], policy, chunk_size=16)
    stream.feed(emma_ids[:50])
    torch.save(stream.state_dict(), tmp_path / "stream.pt")
    restarted = Stream(fresh_model, smollm2[1], policy, chunk_size=16)  # a new stream (cache) on the model
    restarted.load_state_dict(torch.load(tmp_path / "stream.pt", weights_only=True))
    assert restarted.seen == 50
    assert torch.equal(restarted.feed(emma_ids[50:90]), stream.feed(emma_ids[50:90]))
    assert list(restarted.generate(max_new_tokens=5)) == list(stream.generate(max_new_tokens=5))


@pytest.mark.parametrize(
    "policy",
    [sa.SinkWindow(sinks=4, window=24), sa.Retrieval(sinks=4, window=8, block=4, topk=2, every=3, store="disk")],
    ids=["sinks_window", "retrieval_disk"],
)
def test_save_and_load_a_file_continue_bitwise(smollm2, fresh_model, emma_ids, tmp_path, policy):
    """``save`` writes the live buffers (no snapshot: the saved tensors are the stream's own), and a
    stream loaded from the file continues exactly as the original."""
    stream = Stream(fresh_model, smollm2[1], policy, chunk_size=16)
    stream.feed(emma_ids[:50])
    live = stream.state_dict(copy=False)["layers"][0]["_extra_state"]["state"]
    state = stream.cache.layers[0].attn.state
    live_k, own_k = (live["local"]["k"], state.local.k) if "local" in live else (live["k"], state.k)
    assert live_k.data_ptr() == own_k.data_ptr()
    stream.save(tmp_path / "stream.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.pt"]  # no temporary file left
    restarted = Stream(fresh_model, smollm2[1], policy, chunk_size=16)
    restarted.load(tmp_path / "stream.pt")
    assert restarted.seen == 50
    assert torch.equal(restarted.feed(emma_ids[50:90]), stream.feed(emma_ids[50:90]))


def test_a_failed_save_keeps_the_previous_file_and_bad_files_are_refused(
    smollm2, fresh_model, emma_ids, tmp_path, monkeypatch
):
    import streamattn.storage as storage

    policy = sa.SinkWindow(sinks=4, window=24)
    stream = Stream(fresh_model, smollm2[1], policy, chunk_size=16)
    stream.feed(emma_ids[:30])
    path = tmp_path / "stream.pt"
    stream.save(path)
    stream.feed(emma_ids[30:40])

    def torn(obj, f):  # the disk fills up half way
        f.write(b"PK\x03\x04 half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(storage.torch, "save", torn)
    with pytest.raises(OSError, match="No space"):
        stream.save(path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stream.pt"]
    resumed = Stream(fresh_model, smollm2[1], policy, chunk_size=16)
    resumed.load(path)
    assert resumed.seen == 30  # the previous save, whole
    (tmp_path / "junk.pt").write_bytes(b"not a stream")
    for bad, match in ((tmp_path / "junk.pt", "not a readable stream file"), (tmp_path / "none.pt", "no stream file")):
        with pytest.raises(ValueError, match=match):
            resumed.load(bad)
        assert resumed.seen == 30
    with pytest.raises(ValueError, match="is a directory"):
        resumed.save(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        resumed.save(tmp_path / "missing" / "stream.pt")


def test_state_from_another_stream_configuration_is_refused(smollm2, fresh_model, emma_ids):
    stream = Stream(fresh_model, smollm2[1], sa.SinkWindow(sinks=4, window=24))
    stream.feed(emma_ids[:30])
    other = Stream(fresh_model, smollm2[1], sa.SinkWindow(sinks=4, window=32))
    other.feed(emma_ids[:10])
    with pytest.raises(ValueError, match="another configuration"):
        other.load_state_dict(stream.state_dict())
    broken = stream.state_dict()
    broken["layers"][-1] = {"_extra_state": {"format": "nonsense"}}
    with pytest.raises(ValueError):
        stream.load_state_dict(broken)  # the last layer is bad: no layer may have been replaced
    assert stream.seen == 30 and all(layer.attn.seen == [30] for layer in stream.cache.layers)


def test_generate_bad_arguments(smollm2, fresh_model):
    stream = Stream(fresh_model, smollm2[1], sa.SinkWindow(sinks=4, window=24))
    with pytest.raises(ValueError, match="feed a prompt first"):
        next(stream.generate(4))
    stream.feed("Emma")
    with pytest.raises(ValueError, match="temperature"):
        next(stream.generate(4, temperature=-1.0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        next(stream.generate(-1))


def test_batched_streams_equal_each_stream_alone(smollm2, fresh_model, emma_ids):
    """Three ragged streams fed together (with an empty entry on the way) == each fed alone."""
    policy = sa.SinkWindow(sinks=4, window=24)
    texts = [emma_ids[:70], emma_ids[100:133], emma_ids[200:251]]
    alone = [Stream(fresh_model, policy=policy, chunk_size=16).feed(x) for x in texts]
    batch = Stream(fresh_model, policy=policy, chunk_size=16)
    first = batch.feed([texts[0][:40], texts[1][:5], torch.tensor([], dtype=torch.long)])
    second = batch.feed([texts[0][40:], texts[1][5:], texts[2]])
    assert batch.seen == [70, 33, 51]
    got = [torch.cat((first[0], second[0])), torch.cat((first[1], second[1])), second[2]]
    for mine, want in zip(got, alone, strict=True):
        assert torch.isnan(mine[0]) and (mine[1:] - want[1:]).abs().max().item() < TOL
    with pytest.raises(ValueError, match="holds 3 streams"):
        batch.feed([texts[0]])
    with pytest.raises(ValueError, match="single stream"):
        next(batch.generate(2))


def test_streams_join_and_leave_a_running_batch(smollm2, fresh_model, emma_ids):
    """``add_streams`` / ``select_streams`` / ``state_dict(rows=...)``: a batch that sessions join and
    leave gives each of them what it would get alone."""
    model, tokenizer = fresh_model, smollm2[1]
    policy = sa.SinkWindow(sinks=4, window=24)
    texts = [emma_ids[:40], emma_ids[100:117], emma_ids[200:260]]
    alone = []
    for x in texts:
        s = Stream(model, tokenizer, policy, chunk_size=16)
        s.feed(x[:-8])
        alone.append(s.feed(x[-8:]))
    solos = [Stream(model, tokenizer, policy, chunk_size=16) for _ in texts]
    for s, x in zip(solos, texts, strict=True):
        s.feed(x[:-8])
    batch = Stream(model, tokenizer, policy, chunk_size=16)
    batch.add_streams(solos[0].state_dict())
    batch.add_streams(solos[2].state_dict())
    with pytest.raises(ValueError, match="same model and configuration"):
        batch.add_streams(Stream(model, tokenizer, sa.SinkWindow(4, 32)).state_dict())
    out = batch.feed([texts[0][-8:-4], texts[2][-8:-4]])
    taken = batch.state_dict(rows=[0])
    batch.select_streams([1])
    batch.add_streams(solos[1].state_dict())
    again = Stream(model, tokenizer, policy, chunk_size=16)
    again.add_streams(taken)
    last = batch.feed([texts[2][-4:], texts[1][-8:]])
    assert (torch.cat((out[0], again.feed(texts[0][-4:]))) - alone[0]).abs().max().item() < TOL
    assert (torch.cat((out[1], last[0])) - alone[2]).abs().max().item() < TOL
    assert (last[1] - alone[1]).abs().max().item() < TOL
    with pytest.raises(ValueError, match="rows in"):
        batch.select_streams([2])
