"""``Stream``: feed text or token ids through an LLM forever, scoring every token."""

from __future__ import annotations

from collections.abc import Iterator

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
        self.positions = positions
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._next_logprobs: torch.Tensor | None = None  # [V] after the last fed token
        self.last_generated: list[int] = []  # token ids of the last generate() call

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

    @torch.no_grad()
    def generate(
        self, max_new_tokens: int = 64, temperature: float = 0.0, *, seed: int | None = None, stop_at_eos: bool = True
    ) -> Iterator[str]:
        """Continue the stream, yielding text as it is produced (greedy when ``temperature == 0``).

        Each new token is fed back exactly like a fed token, so the stream afterwards is the same as
        if the prompt and the generated text had been fed.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
        if self._next_logprobs is None:
            raise ValueError("nothing to continue: feed a prompt first")
        if self.tokenizer is None:
            raise ValueError("generating text needs a tokenizer: Stream(model, tokenizer, ...)")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        eos = self.tokenizer.eos_token_id
        new: list[int] = []
        text = ""
        for _ in range(max_new_tokens):
            logprobs = self._next_logprobs.cpu()
            if temperature == 0:
                token = int(logprobs.argmax())
            else:
                token = int(torch.multinomial(torch.softmax(logprobs / temperature, dim=-1), 1, generator=generator))
            self.feed(torch.tensor([token]))
            new.append(token)
            full = self.tokenizer.decode(new, skip_special_tokens=True)
            if len(full) > len(text) and not full.endswith("\ufffd"):  # wait for whole characters
                yield full[len(text) :]
                text = full
            if stop_at_eos and token == eos:
                break
        self.last_generated = new

    # ------------------------------------------------------------------ save / restore
    def state_dict(self) -> dict:
        """The whole stream (every layer's cache and the next-token distribution) as plain data."""
        return {
            "format": _FORMAT,
            "config": self._config(),
            "layers": [layer.attn.state_dict() for layer in self.cache.layers],
            "next_logprobs": None if self._next_logprobs is None else self._next_logprobs.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume a stream saved by ``state_dict`` (also in another process); all or nothing."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"not a Stream state (expected format {_FORMAT!r})")
        if state.get("config") != self._config():
            raise ValueError(f"stream state from another configuration: {state.get('config')} != ours {self._config()}")
        layers, next_logprobs = state.get("layers"), state.get("next_logprobs")
        if not isinstance(layers, list) or len(layers) != len(self.cache.layers):
            raise ValueError(
                f"stream state has {len(layers) if isinstance(layers, list) else '?'} layers, model has {len(self.cache.layers)}"
            )
        if next_logprobs is not None and (
            not isinstance(next_logprobs, torch.Tensor) or next_logprobs.shape != (self.vocab_size,)
        ):
            raise ValueError("stream state: next_logprobs must be None or a [vocab] tensor")
        for layer, saved in zip(self.cache.layers, layers, strict=True):
            layer.attn.check_state_dict(saved)  # every layer validated before any is replaced
        for layer, saved in zip(self.cache.layers, layers, strict=True):
            layer.attn.load_state_dict(saved)
        self._next_logprobs = None if next_logprobs is None else next_logprobs.clone()

    def _config(self) -> dict:
        config = self.model.config.get_text_config()
        return {
            "policy": self.cache.policy.to_config(),
            "positions": self.positions,
            "rope": self.cache.rope.to_config(),
            "model": {"type": config.model_type, "layers": config.num_hidden_layers, "vocab": self.vocab_size},
        }


_FORMAT = "streamattn.hf.Stream/1"
