"""Token ids -> text, one token at a time, in bounded time and memory per token.

Decoding everything generated so far at every step costs O(n) per token (O(n^2) for a stream) and
keeps every id. Decoding each token alone is wrong twice over: a character may span several tokens
(byte-level BPE and byte fallback emit UTF-8 bytes; a partial character decodes to ``\\ufffd``), and
some tokenizers decode a token differently at the start of a text (SentencePiece drops the leading
space of the first piece). So text is decoded from a short window of ids that starts a little
before the new ones: the window's text minus the text of its already-emitted head is what the new
ids add, in their real context.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a partial (or invalid) UTF-8 sequence decodes to


class IncrementalDetokenizer:
    """Turns a stream of token ids into text as soon as the text is final.

    ``push(id)`` returns the text that became final with that token (``""`` while a character is
    unfinished); ``flush()`` returns what is still held back (at the end of a stream: a trailing
    partial character, as ``\\ufffd``). Emitted text is never taken back and never splits a
    character; pushes + flush == ``tokenizer.decode(all_ids, skip_special_tokens=...)``. That holds
    for any ids with byte-level BPE (GPT-2, Llama 3, SmolLM2: tested with random ids) and for valid
    text with byte-fallback decoders (Llama 2, Gemma), which decode a run of bytes that is invalid
    as a whole to one ``\\ufffd`` per byte, so later bytes can change earlier text there.

    Bounded: when ``max_pending`` ids in a row leave the text unfinished (a run of invalid bytes;
    valid text needs at most 4 byte ids per character), the text up to the last id boundary that no
    later id can change is let go. So ``buffer`` never holds more than ``2 * max_pending``
    ids; a push normally costs one decode of at most that many ids (tens of microseconds), at most
    ``2 * max_pending`` when letting go, however many ids were pushed.

    ``buffer[:read]`` is context whose text was already emitted (decoded again so that new ids are
    decoded in context: SentencePiece drops the space of a text's first piece); ``buffer[read:]``
    is pending.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True, max_pending: int = 16) -> None:
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 4:
            raise ValueError(
                f"max_pending must be an int >= 4 (a UTF-8 character is up to 4 bytes), got {max_pending!r}"
            )
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_pending = max_pending
        self.buffer: list[int] = []
        self._read = 0  # buffer[:_read] is context, already emitted
        self._context_text = ""  # decode(buffer[:_read])
        # Ids that decode(..., skip_special_tokens=True) drops: the tokenizer removes them before its
        # decoder runs, so dropping them here is exact (and a run of them cannot grow the buffer).
        self._skipped = self._special_ids(tokenizer) if skip_special_tokens else frozenset()

    @staticmethod
    def _special_ids(tokenizer) -> frozenset[int]:
        candidates = set(getattr(tokenizer, "all_special_ids", None) or ())
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        candidates |= {i for i, token in added.items() if getattr(token, "special", False)}
        return frozenset(i for i in candidates if tokenizer.decode([i], skip_special_tokens=True) == "")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens) if ids else ""

    def push(self, token_id: int) -> str:
        """Add one token id; return the text that became final (possibly ``""``)."""
        token_id = int(token_id)
        if token_id in self._skipped:
            return ""
        self.buffer.append(token_id)
        text = self._decode(self.buffer)
        if len(text) > len(self._context_text) and not text.endswith(REPLACEMENT):
            return self._emit(len(self.buffer), text)
        if len(self.buffer) - self._read < self.max_pending:
            return ""
        return self._let_go(text)

    def _let_go(self, text: str) -> str:
        """Stuck for ``max_pending`` ids (a run of invalid bytes, or ids that add no text): emit up to
        the last id boundary that later ids cannot change.

        A boundary qualifies when decoding the two sides apart gives the text of decoding them
        together (so no character, partial or invalid, straddles it), preferring one where the text
        before it is whole (no trailing ``\\ufffd``: byte-fallback decoders write a partial
        character as one ``\\ufffd`` per byte, so only that tells it is not still unfinished).
        """
        if not text.endswith(REPLACEMENT):
            return self._emit(len(self.buffer), text)
        fallback = None
        for end in range(len(self.buffer) - 1, self._read, -1):
            head = self._decode(self.buffer[:end])
            if head + self._decode(self.buffer[end:]) == text:
                if not head.endswith(REPLACEMENT):
                    return self._emit(end, head)
                fallback = fallback or (end, head)
        return self._emit(*(fallback or (len(self.buffer), text)))

    def flush(self) -> str:
        """The text still held back (e.g. a trailing partial character, as ``\\ufffd``)."""
        if len(self.buffer) == self._read:
            return ""
        return self._emit(len(self.buffer), self._decode(self.buffer))

    def _emit(self, end: int, text: str) -> str:
        """Emit ``text`` (the decode of ``buffer[:end]``) past the context; ``buffer[read:end]`` becomes the context."""
        new = text[len(self._context_text) :]
        del self.buffer[: self._read]
        self._read = end - self._read
        self._context_text = self._decode(self.buffer[: self._read])
        return new
