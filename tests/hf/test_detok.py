"""IncrementalDetokenizer with the real SmolLM2 tokenizer (byte-level BPE): exact and bounded."""

from __future__ import annotations

import random

import pytest

from streamattn.eval import read_text
from streamattn.hf.detok import IncrementalDetokenizer

TEXTS = [
    pytest.param("Emma Woodhouse, handsome, clever, and rich.", id="ascii"),
    pytest.param("Un café crème, naïve résumé: déjà vu à Noël.", id="accents"),
    pytest.param("Smile 🙂, thumbs 👍🏽, family 👨‍👩‍👧 and flags 🇫🇷🇯🇵!", id="emoji"),
    pytest.param("東京は日本の首都です。북한산 — 中文，标点。", id="cjk"),
    pytest.param("  leading spaces\n\n\ttabs\r\nand ‘quotes’ “here” … ∑ x² ≤ ∞ ", id="mixed"),
]


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return smollm2[1]


def stream_text(tokenizer, ids, **kwargs) -> tuple[str, list[str]]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return "".join(pieces), pieces


@pytest.fixture(scope="module")
def raw(tokenizer) -> list[int]:
    """Ids that decode alone to a partial or invalid UTF-8 sequence (single bytes >= 0x80 and others)."""
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("\ufffd")]


@pytest.mark.parametrize("text", TEXTS)
def test_pushes_and_flush_equal_one_decode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    got, pieces = stream_text(tokenizer, ids)
    assert got == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)  # whole characters only, never a partial one
    assert pieces[-1] == ""  # valid text: nothing was held back at the end


def test_multi_token_characters_wait_for_their_last_byte(tokenizer):
    ids = tokenizer("🙂", add_special_tokens=False).input_ids
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_special_tokens_are_skipped_like_decode_does(tokenizer):
    ids = tokenizer("Hello there, général.", add_special_tokens=False).input_ids
    specials = sorted(IncrementalDetokenizer(tokenizer)._skipped)
    assert tokenizer.eos_token_id in specials and 5 in specials  # <file_sep>: special, not in all_special_ids
    rng = random.Random(0)
    mixed = []
    for i in ids:
        mixed += [rng.choice(specials) for _ in range(rng.randrange(3))] + [i]
    got, _ = stream_text(tokenizer, mixed)
    assert got == tokenizer.decode(mixed, skip_special_tokens=True) == "Hello there, général."
    kept, _ = stream_text(tokenizer, mixed, skip_special_tokens=False)
    assert kept == tokenizer.decode(mixed, skip_special_tokens=False)


@pytest.mark.parametrize("seed", range(20))
def test_random_token_sequences(tokenizer, raw, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) if rng.random() < 0.7 else rng.choice(raw) for _ in range(400)]
    got, _ = stream_text(tokenizer, ids)
    assert got == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("max_pending", [4, 5, 16])
def test_runs_of_raw_bytes_are_let_go_exactly(tokenizer, raw, max_pending):
    """Worst case: nothing but byte tokens (partial, invalid and completed characters mixed)."""
    for seed in range(30):
        rng = random.Random(seed)
        ids = [rng.choice(raw) for _ in range(200)]
        detok, pieces, longest = IncrementalDetokenizer(tokenizer, max_pending=max_pending), [], 0
        for i in ids:
            pieces.append(detok.push(i))
            longest = max(longest, len(detok.buffer))
        assert "".join(pieces) + detok.flush() == tokenizer.decode(ids)
        assert longest <= 2 * max_pending


def test_emitted_text_is_always_a_prefix_of_the_final_text(tokenizer):
    text = read_text()[:3000] + " Ça va? 🙂 東京."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok, so_far = IncrementalDetokenizer(tokenizer), ""
    for n, i in enumerate(ids, 1):
        so_far += detok.push(i)
        assert tokenizer.decode(ids[:n]).startswith(so_far)
    assert so_far + detok.flush() == text


def test_buffer_stays_bounded_over_10k_pushes(tokenizer, raw):
    emma = tokenizer(read_text()[:20_000], add_special_tokens=False).input_ids
    rng = random.Random(1)
    eos = tokenizer.eos_token_id
    ids = []
    while len(ids) < 10_000:  # text, runs of end-of-text, runs of invalid bytes, random ids
        ids += emma[: rng.randrange(1, 200)] + [eos] * rng.randrange(100)
        ids += [rng.choice(raw) for _ in range(rng.randrange(60))] + [rng.randrange(len(tokenizer))]
    detok, pieces, longest = IncrementalDetokenizer(tokenizer, max_pending=8), [], 0
    for i in ids:
        pieces.append(detok.push(i))
        longest = max(longest, len(detok.buffer))
    pieces.append(detok.flush())
    assert len(ids) >= 10_000 and longest <= 16
    # runs of invalid bytes are let go after max_pending ids, only where later bytes change nothing
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_flush_returns_a_trailing_partial_character_and_resets(tokenizer):
    ids = tokenizer("ok 🙂", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    head = "".join(detok.push(i) for i in ids[:-1])
    assert head + detok.flush() == tokenizer.decode(ids[:-1])
    assert detok.flush() == ""


def test_bad_max_pending_is_refused(tokenizer):
    with pytest.raises(ValueError, match="max_pending must be an int >= 4"):
        IncrementalDetokenizer(tokenizer, max_pending=2)


def sentencepiece_like():
    """A Llama-style decoder (▁ -> space, byte fallback, the text's first space stripped) on a toy vocab."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "▁Hello": 2, "▁world": 3, "!": 4, "▁": 5, "é": 6, "▁a": 7}
    vocab.update({f"<0x{b:02X}>": 8 + b for b in range(256)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    tok.decoder = decoders.Sequence(steps)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def test_decode_of_a_suffix_differs_from_the_suffix_of_a_decode():
    tokenizer = sentencepiece_like()
    assert tokenizer.decode([3]) == "world" and tokenizer.decode([2, 3]) == "Hello world"  # the premise
    pieces = [[2], [3], [4], [5], [6], [7], [1], [8 + b for b in "€".encode()], [8 + b for b in "🙂".encode()]]
    for seed in range(50):
        rng = random.Random(seed)
        ids = [i for _ in range(60) for i in rng.choice(pieces)]
        for max_pending in (4, 16):
            got, _ = stream_text(tokenizer, ids, max_pending=max_pending)
            assert got == tokenizer.decode(ids, skip_special_tokens=True)
