"""`streamattn chat` and `streamattn generate` on the shipped model (short runs)."""

from __future__ import annotations

import io
import sys

import pytest

import streamattn as sa
from streamattn.cli import main
from streamattn.cli.chat import Conversation
from streamattn.hf import Stream


@pytest.fixture(autouse=True)
def _shared_model_cache(model_cache, monkeypatch):
    monkeypatch.setenv("STREAMATTN_CACHE", str(model_cache))


def test_conversation_feeds_exactly_the_rendered_transcript(smollm2, fresh_model):
    _, tokenizer = smollm2
    stream = Stream(fresh_model, tokenizer, sa.SinkWindow(sinks=4, window=1020))
    chat = Conversation(stream, tokenizer)
    for question in ("Name a novel by Jane Austen.", "Who is its heroine?"):
        chat.reply(question, 12, 0.0, 0, io.StringIO())
    transcript = tokenizer.apply_chat_template(chat.messages, tokenize=False)
    assert stream.seen == len(tokenizer(transcript, add_special_tokens=False).input_ids)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]


def test_chat_saves_and_resumes(smollm2, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "conversation.pt"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Hello! Who are you?\n/stats\n/save {saved}\n/quit\n"))
    assert main(["chat", "--max-new-tokens", "8", "--policy", "sinks=4,window=60"]) == 0
    first = capsys.readouterr().out
    assert "assistant: " in first and "saved to" in first and "tokens seen]" in first
    monkeypatch.setattr(sys, "stdin", io.StringIO("/stats\nAnd your name?\n"))
    assert main(["chat", "--max-new-tokens", "8", "--policy", "sinks=4,window=60", "--resume", str(saved)]) == 0
    second = capsys.readouterr().out
    assert "resumed 2 messages" in second and second.count("assistant: ") == 1


def test_chat_resume_refuses_another_policy(smollm2, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "c.pt"
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"Hi\n/save {saved}\n"))
    assert main(["chat", "--max-new-tokens", "4", "--policy", "sinks=4,window=60"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert main(["chat", "--policy", "sinks=4,window=61", "--resume", str(saved)]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_generate_streams_text(smollm2, capsys):
    assert main(["generate", "Emma Woodhouse, handsome, clever,", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Emma Woodhouse, handsome, clever,") and len(captured.out) > 40
    assert "tokens seen]" in captured.err
    assert main(["generate", "   "]) == 2
