"""A chat as an endless stream: the text each turn adds, in bounded memory.

A chat template renders a whole conversation; a stream must be fed only what a turn *adds*. The
delta of a turn is the rendering of the conversation with the turn minus the rendering without it.
Rendering the whole history each turn would grow without bound, so ``ChatTurns`` keeps two messages:
the first (templates special-case it: e.g. SmolLM2's default system prompt appears only when the
first message is not a system message) and the last (where the new turn attaches). For templates
that render each message independently of the others but the first (ChatML and its relatives: every
model this project ships) the delta is exactly the full rendering's; a template that is not
incremental in this sense is refused (``ValueError``), never silently mis-fed.
"""

from __future__ import annotations

from typing import Any

ROLES = ("system", "user", "assistant", "tool", "developer")


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Messages as ``[{"role": str, "content": str}, ...]`` (non-empty), or ``ValueError`` saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string 'role' and a string 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {list(ROLES)}, got {m['role']!r}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


class ChatTurns:
    """What to feed for each turn of a chat (``first``/``last``: the kept messages, plain data)."""

    def __init__(self, tokenizer, first: dict | None = None, last: dict | None = None) -> None:
        self.tokenizer = tokenizer
        self.first, self.last = first, last

    def _render(self, messages: list[dict], prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)

    def _context(self) -> list[dict]:
        if self.first is None:
            return []
        return [self.first] if self.last is None else [self.first, self.last]

    def prompt(self, new: list[dict]) -> str:
        """The text that adds ``new`` messages and the assistant's generation prompt to the stream."""
        context = self._context()
        before = self._render(context, prompt=False) if context else ""
        after = self._render([*context, *new], prompt=True)
        if not after.startswith(before):
            raise ValueError("the chat template does not render turns incrementally; cannot stream this model's chat")
        return after[len(before) :]

    def close(self, new: list[dict], answer: str, eos_fed: bool) -> str:
        """After a reply ``answer`` to ``new``: the text that closes the assistant turn as the template
        would, minus what generation fed already (the end-of-sequence token, when ``eos_fed``).
        Records the turn (the kept messages move on)."""
        context = [*self._context(), *new]
        prompt = self._render(context, prompt=True)
        reply = {"role": "assistant", "content": answer}
        closed = self._render([*context, reply], prompt=False)
        tail = closed[len(prompt) + len(answer) :] if closed.startswith(prompt + answer) else ""
        fed = self.tokenizer.decode([self.tokenizer.eos_token_id]) if eos_fed else ""
        self.first = self.first or (new[0] if new else reply)
        self.last = reply
        return tail[len(fed) :] if tail.startswith(fed) else ""

    def to_dict(self) -> dict[str, Any]:
        return {"first": self.first, "last": self.last}
