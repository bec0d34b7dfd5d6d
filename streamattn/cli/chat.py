"""Endless terminal chat: the conversation never needs a reset, the cache stays bounded.

Type a message and press Enter. Commands: ``/save FILE`` (conversation and stream state),
``/stats`` (cache use), ``/quit``. ``--resume FILE`` continues a saved conversation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from streamattn.cli.common import add_model_args, cache_line, needs_hf, parse_policy


def add_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--resume", type=Path, default=None, help="a conversation saved with /save")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)


class Conversation:
    """Feeds each turn as the delta between successive chat-template renderings."""

    def __init__(self, stream, tokenizer, messages=None) -> None:
        self.stream, self.tokenizer = stream, tokenizer
        self.messages: list[dict] = messages or []

    def _render(self, messages, prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)

    def reply(self, text: str, max_new_tokens: int, temperature: float, seed: int, out) -> str:
        before = self._render(self.messages, prompt=False) if self.messages else ""
        asked = [*self.messages, {"role": "user", "content": text}]
        prompt = self._render(asked, prompt=True)
        if not prompt.startswith(before):
            raise ValueError("the chat template does not render turns incrementally; cannot stream this model's chat")
        self.stream.feed(prompt[len(before) :])
        pieces = []
        for piece in self.stream.generate(max_new_tokens, temperature, seed=seed):
            out.write(piece)
            out.flush()
            pieces.append(piece)
        answer = "".join(pieces)
        self.messages = [*asked, {"role": "assistant", "content": answer}]
        # close the assistant turn exactly as the template would, minus what generation already fed
        closed = self._render(self.messages, prompt=False)
        tail = closed[len(prompt) + len(answer) :] if closed.startswith(prompt + answer) else ""
        eos = self.stream.last_generated[-1:] == [self.tokenizer.eos_token_id]
        fed = self.tokenizer.decode([self.tokenizer.eos_token_id]) if eos else ""
        if tail.startswith(fed) and tail[len(fed) :]:
            self.stream.feed(tail[len(fed) :])
        return answer

    def save(self, path: Path) -> None:
        torch.save({"stream": self.stream.state_dict(), "messages": self.messages}, path)


@needs_hf
def run(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    from streamattn.hf import Stream, load_model

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if args.max_new_tokens < 1 or args.temperature < 0:
        raise ValueError("--max-new-tokens must be >= 1 and --temperature >= 0")
    policy = parse_policy(args.policy, args.profile)
    saved = None
    if args.resume is not None:
        try:
            saved = torch.load(args.resume, weights_only=True)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"cannot resume from {args.resume}: {exc}") from None
    model, tokenizer = load_model(args.model)
    stream = Stream(model, tokenizer, policy)
    chat = Conversation(stream, tokenizer)
    if saved is not None:
        if not isinstance(saved, dict) or "stream" not in saved or "messages" not in saved:
            raise ValueError(f"{args.resume} is not a conversation saved by streamattn chat")
        stream.load_state_dict(saved["stream"])
        chat.messages = saved["messages"]
        stdout.write(f"resumed {len(chat.messages)} messages {cache_line(stream)}\n")
    stdout.write("streamattn chat: /save FILE, /stats, /quit\n")
    for line in stdin:
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/stats":
            stdout.write(f"{cache_line(stream)}\n")
            continue
        if text.startswith("/save"):
            target = Path(text[len("/save") :].strip() or "chat.pt")
            chat.save(target)
            stdout.write(f"saved to {target}\n")
            continue
        stdout.write("assistant: ")
        chat.reply(text, args.max_new_tokens, args.temperature, args.seed, stdout)
        stdout.write(f"\n{cache_line(stream)}\n")
    return 0
