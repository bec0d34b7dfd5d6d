"""``Stream``: feed text or token ids through an LLM forever, scoring every token."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator

import torch

import streamattn as sa
from streamattn.hf.cache import StreamingCache
from streamattn.hf.detok import IncrementalDetokenizer
from streamattn.storage import load_mapped, save_atomic


def sample_token(logprobs: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """The next token from log-probabilities ``[V]``: the argmax at ``temperature == 0``, else a draw
    from ``softmax(logprobs / temperature)`` with ``generator`` (what ``generate`` and the server use)."""
    logprobs = logprobs.cpu()
    if temperature == 0:
        return int(logprobs.argmax())
    return int(torch.multinomial(torch.softmax(logprobs / temperature, dim=-1), 1, generator=generator))


class Stream:
    """An endless stream through ``model`` with a bounded cache (``policy``).

    ``feed(text_or_ids)`` returns the log-probability of each fed token given everything before it
    (``NaN`` for the very first token of the stream), whatever the chunking.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        policy: sa.Policy | None = None,
        positions: str = "cache",
        chunk_size: int = 256,
        *,
        layer_policies=None,
    ):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.model, self.tokenizer, self.chunk_size = model, tokenizer, chunk_size
        self.cache = StreamingCache(model, policy, positions, layer_policies=layer_policies)
        self.positions = positions
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._batch: int | None = None  # streams held, fixed by the first feed
        self._next: list[torch.Tensor | None] | None = None  # per stream: log-probs [V] after its last token
        self.last_generated: list[int] = []  # token ids of the last generate() call (its last 4,096)

    def close(self) -> None:
        """Give the model back its own attention (the stream cannot be fed afterwards)."""
        self.cache.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def seen(self) -> int | list[int]:
        """Tokens consumed: an int for a single stream, one int per stream for a batch."""
        seen = self.cache.layers[0].attn.seen or [0]
        return seen[0] if self._batch in (None, 1) else seen

    @property
    def next_logprobs(self) -> torch.Tensor | list[torch.Tensor | None] | None:
        """Log-probabilities ``[V]`` of the next token after everything fed (one per stream for a batch)."""
        if self._next is None:
            return None
        return self._next[0] if self._batch == 1 else list(self._next)

    def _ids(self, data, allow_empty: bool = False) -> torch.Tensor:
        if isinstance(data, str):
            if self.tokenizer is None:
                raise ValueError("feeding text needs a tokenizer: Stream(model, tokenizer, ...)")
            ids = torch.tensor(self.tokenizer(data, add_special_tokens=False).input_ids, dtype=torch.long)
        elif isinstance(data, torch.Tensor):
            if data.dim() != 1 or data.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"token ids must be a 1-D int64/int32 tensor, got {data.dtype} {tuple(data.shape)}")
            ids = data.to(torch.long)
        else:
            raise TypeError(
                f"feed takes a str or a 1-D LongTensor of token ids (or a list of them), got {type(data).__name__}"
            )
        if ids.numel() == 0:
            if allow_empty:
                return ids
            raise ValueError("nothing to feed: the text or id tensor is empty")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        return ids

    @torch.no_grad()
    def feed(self, data, *, scores: bool = True) -> torch.Tensor | list[torch.Tensor] | None:
        """Feed one stream (a str or 1-D id tensor) or a batch (a list with one entry per stream,
        ragged, entries may be empty). Returns each fed token's log-probability given everything
        before it in its stream (``NaN`` for a stream's very first token): a ``[T]`` tensor, or a
        list of them for a batch. Bad input is refused before the model runs.

        ``scores=False`` feeds without scoring (returns ``None``): the model's output head runs only
        on each stream's last token of each call (what ``next_logprobs`` needs), which saves
        ``chunk x vocab`` work per call (most of the cost for large vocabularies).
        """
        batched = isinstance(data, (list, tuple))
        items = [self._ids(x, allow_empty=True) for x in data] if batched else [self._ids(data)]
        if batched and not any(x.numel() for x in items):
            raise ValueError("nothing to feed: every entry of the batch is empty")
        if self._batch is not None and len(items) != self._batch:
            raise ValueError(f"this Stream holds {self._batch} streams; got {len(items)} inputs (one per stream)")
        self._batch = len(items)
        lengths = [x.numel() for x in items]
        ids = torch.zeros(len(items), max(lengths), dtype=torch.long)  # right padding, never attended
        for b, x in enumerate(items):
            ids[b, : x.numel()] = x
        device = self.model.get_output_embeddings().weight.device
        out_scores = [torch.empty(n, dtype=torch.float32) for n in lengths] if scores else None
        if self._next is None:
            self._next = [None] * len(items)
        for start in range(0, ids.shape[1], self.chunk_size):
            counts = [min(max(n - start, 0), self.chunk_size) for n in lengths]
            chunk = ids[:, start : start + max(counts)].to(device)
            self.cache.lengths = None if min(counts) == chunk.shape[1] else counts
            # unscored: logits only at each row's last token (sorted unique columns -> index per row)
            keep = sorted({n - 1 for n in counts if n > 0}) if not scores else None
            try:
                out = self.model(
                    input_ids=chunk,
                    position_ids=torch.zeros_like(chunk),  # the engine owns positions
                    past_key_values=self.cache,
                    use_cache=True,
                    logits_to_keep=0 if keep is None else torch.tensor(keep, device=device),
                )
            finally:
                self.cache.lengths = None
            logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # [B, T or len(keep), V]
            for b, n in enumerate(counts):
                if n == 0:
                    continue
                if keep is not None:
                    self._next[b] = logprobs[b, keep.index(n - 1)]
                    continue
                row = chunk[b, :n]
                out_scores[b][start] = float("nan") if self._next[b] is None else self._next[b][row[0]].item()
                out_scores[b][start + 1 : start + n] = logprobs[b, : n - 1].gather(1, row[1:, None])[:, 0].cpu()
                self._next[b] = logprobs[b, n - 1]
        if out_scores is None:
            return None
        return out_scores if batched else out_scores[0]

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
        if self._batch not in (None, 1):
            raise ValueError(f"generate() continues a single stream; this Stream holds {self._batch}")
        if self._next is None or self._next[0] is None:
            raise ValueError("nothing to continue: feed a prompt first")
        if self.tokenizer is None:
            raise ValueError("generating text needs a tokenizer: Stream(model, tokenizer, ...)")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        eos = self.tokenizer.eos_token_id
        new: deque[int] = deque(maxlen=_KEEP_GENERATED)  # bounded: generation may be endless
        text = IncrementalDetokenizer(self.tokenizer)  # O(1) per token, bounded memory
        self.last_generated = []
        try:
            for _ in range(max_new_tokens):
                token = sample_token(self._next[0], temperature, generator)
                self.feed(torch.tensor([token]))
                new.append(token)
                piece = text.push(token)  # waits for whole characters
                if piece:
                    yield piece
                if stop_at_eos and token == eos:
                    break
            tail = text.flush()
            if tail:
                yield tail
        finally:  # also when the consumer stops early
            self.last_generated = list(new)

    # ------------------------------------------------------------------ save / restore
    def state_dict(self, copy: bool = True, rows=None) -> dict:
        """The whole stream (every layer's cache and the next-token distribution) as plain data;
        ``copy=False``: the live buffers (what ``save`` writes, never to keep); ``rows``: only those
        streams of a batch (copied), as a Stream of ``len(rows)`` streams would save them."""
        if rows is not None:
            rows = self._rows(rows, "state_dict rows must be")
        keep = (lambda t: t.clone()) if copy or rows is not None else (lambda t: t)
        nxt = self._next if self._next is None or rows is None else [self._next[r] for r in rows]
        return {
            "format": _FORMAT,
            "config": self._config(),
            "layers": [{"_extra_state": layer.attn.get_extra_state(copy, rows)} for layer in self.cache.layers],
            "batch": self._batch if rows is None else len(rows),
            "next_logprobs": None if nxt is None else [None if x is None else keep(x) for x in nxt],
        }

    # ------------------------------------------------------------------ batches that change
    def select_streams(self, rows) -> None:
        """Keep streams ``rows`` (in that order), drop the others: e.g. the requests of a batched
        decode that are still running. Rows are checked before anything changes."""
        rows = self._rows(rows, "select_streams takes")
        for layer in self.cache.layers:
            layer.attn.select_streams(rows)
        self._batch = len(rows)
        self._next = None if self._next is None else [self._next[r] for r in rows]

    def _rows(self, rows, what: str) -> list[int]:
        """``rows`` as a non-empty list of this batch's row indices, or ``ValueError`` starting ``what``."""
        n, rows = self._batch or 0, list(rows)
        if not rows or any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < n for r in rows):
            raise ValueError(f"{what} a non-empty list of rows in [0, {n}), got {rows}")
        return rows

    def add_streams(self, state: dict) -> None:
        """Append the streams of ``state`` (a ``state_dict()`` of a Stream of the same configuration,
        any batch size) after this one's: a session joins a running batch. Validated completely
        before anything changes; the state's tensors are copied."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT or state.get("config") != self._config():
            raise ValueError("add_streams takes a state_dict() of a Stream with the same model and configuration")
        layers, nxt = state.get("layers"), state.get("next_logprobs")
        if not isinstance(layers, list) or len(layers) != len(self.cache.layers):
            raise ValueError("add_streams: the state has another number of layers")
        loaded = []
        for layer, saved in zip(self.cache.layers, layers, strict=True):
            if not isinstance(saved, dict) or "_extra_state" not in saved:
                raise ValueError("add_streams: a layer of the state is not a StreamingAttention state")
            loaded.append(layer.attn._parse_state(saved["_extra_state"]))
        if any(st is None for st in loaded):
            raise ValueError("add_streams: the state holds no streams")
        incoming = loaded[0].batch_size
        if nxt is not None and not (isinstance(nxt, list) and len(nxt) == incoming):
            raise ValueError("add_streams: next_logprobs must hold one entry per stream")
        if self._batch is not None:
            for layer, st in zip(self.cache.layers, loaded, strict=True):
                layer.attn.state._check_compatible(st)  # dtype, device, heads: before any layer changes
        for layer, st in zip(self.cache.layers, loaded, strict=True):
            attn = layer.attn
            attn.state = st if attn.state is None else type(attn.state).cat([attn.state, st])
            attn._checked = None
        mine = self._next or [None] * (self._batch or 0)
        self._next = mine + [None if x is None else x.clone() for x in (nxt or [None] * incoming)]
        self._batch = (self._batch or 0) + incoming

    def save(self, path: str | os.PathLike) -> None:
        """Write the stream to ``path`` atomically (``storage.save_atomic``: the file holds the previous
        save or this one, never a torn one), straight from the live buffers: no second copy of the
        cache in memory, whatever its size."""
        save_atomic(self.state_dict(copy=False), path)

    def load(self, path: str | os.PathLike) -> None:
        """Resume a stream from a file written by ``save`` (all or nothing, as ``load_state_dict``);
        the file is memory-mapped while it is read."""
        self.load_state_dict(load_mapped(path, self.model.device))

    def load_state_dict(self, state: dict) -> None:
        """Resume a stream saved by ``state_dict`` (also in another process); all or nothing."""
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"not a Stream state (expected format {_FORMAT!r})")
        if state.get("config") != self._config():
            raise ValueError(f"stream state from another configuration: {state.get('config')} != ours {self._config()}")
        layers, batch, next_logprobs = state.get("layers"), state.get("batch"), state.get("next_logprobs")
        if not isinstance(layers, list) or len(layers) != len(self.cache.layers):
            raise ValueError(
                f"stream state has {len(layers) if isinstance(layers, list) else '?'} layers, model has {len(self.cache.layers)}"
            )
        if next_logprobs is not None and not (
            isinstance(next_logprobs, list)
            and len(next_logprobs) == batch
            and all(x is None or (isinstance(x, torch.Tensor) and x.shape == (self.vocab_size,)) for x in next_logprobs)
        ):
            raise ValueError("stream state: next_logprobs must be None or one [vocab] tensor (or None) per stream")
        for layer, saved in zip(self.cache.layers, layers, strict=True):
            layer.attn.check_state_dict(saved)  # every layer validated before any is replaced
        for layer, saved in zip(self.cache.layers, layers, strict=True):
            layer.attn.load_state_dict(saved)
        self._batch = batch
        self._next = None if next_logprobs is None else [None if x is None else x.clone() for x in next_logprobs]

    def _config(self) -> dict:
        config = self.model.config.get_text_config()
        return {
            "layers": [
                {"policy": sa.policies.state_config(layer.attn.policy.to_config()), "rope": layer.attn.rope.to_config()}
                for layer in self.cache.layers
            ],
            "positions": self.positions,
            "model": {"type": config.model_type, "layers": config.num_hidden_layers, "vocab": self.vocab_size},
        }


_FORMAT = "streamattn.hf.Stream/2"  # /2: a policy and a RoPE per layer
_KEEP_GENERATED = 4096
