"""``Stream``: feed text or token ids through an LLM forever, scoring every token."""

from __future__ import annotations

import torch

import streamattn as sa
from streamattn.hf.cache import StreamingCache


class Stream:
    """An endless stream through ``model`` with a bounded cache (``policy``).

    ``feed(text_or_ids)`` returns the log-probability of each fed token given everything before it
    (``NaN`` for the very first token of the stream), whatever the chunking.
    """

    def __init__(
        self, model, tokenizer=None, policy: sa.Policy | None = None, positions: str = "cache", chunk_size: int = 256
    ):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.model, self.tokenizer, self.chunk_size = model, tokenizer, chunk_size
        self.cache = StreamingCache(model, policy, positions)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._next_logprobs: torch.Tensor | None = None  # [V] after the last fed token

    @property
    def seen(self) -> int:
        return self.cache.get_seq_length()

    def _ids(self, data) -> torch.Tensor:
        if isinstance(data, str):
            if self.tokenizer is None:
                raise ValueError("feeding text needs a tokenizer: Stream(model, tokenizer, ...)")
            ids = torch.tensor(self.tokenizer(data, add_special_tokens=False).input_ids, dtype=torch.long)
        elif isinstance(data, torch.Tensor):
            if data.dim() != 1 or data.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"token ids must be a 1-D int64/int32 tensor, got {data.dtype} {tuple(data.shape)}")
            ids = data.to(torch.long)
        else:
            raise TypeError(f"feed takes a str or a 1-D LongTensor of token ids, got {type(data).__name__}")
        if ids.numel() == 0:
            raise ValueError("nothing to feed: the text or id tensor is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        return ids

    @torch.no_grad()
    def feed(self, data) -> torch.Tensor:
        ids = self._ids(data)  # validated before anything runs: a bad call leaves the stream as it was
        device = self.model.get_output_embeddings().weight.device
        scores = torch.empty(ids.numel(), dtype=torch.float32)
        for start in range(0, ids.numel(), self.chunk_size):
            chunk = ids[start : start + self.chunk_size].to(device)
            out = self.model(
                input_ids=chunk[None],
                position_ids=torch.zeros_like(chunk)[None],  # the engine owns positions
                past_key_values=self.cache,
                use_cache=True,
            )
            logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)  # [T, V]
            first = float("nan") if self._next_logprobs is None else self._next_logprobs[chunk[0]].item()
            scores[start] = first
            scores[start + 1 : start + chunk.numel()] = logprobs[:-1].gather(1, chunk[1:, None])[:, 0].cpu()
            self._next_logprobs = logprobs[-1]
        return scores
