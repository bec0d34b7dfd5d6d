"""Calibration on a model's own attention: retrieval heads (for ``PerHead``) and Q-Filter directions.

- **Retrieval heads** (DuoAttention's question, answered the cheap way): recall trials (a needle
  "The magic word of <name> is <word>." then ``distance`` tokens of text, then the question) are
  streamed with full attention; at the last token of the question (the query that produces the
  answer) each (layer, kv head)'s attention mass on the needle's *word* tokens is read (mean over the
  kv head's query heads), averaged over trials. High mass = the head retrieves.
- **Q-Filters**: the model's own un-rotated queries on ``qfilter_tokens`` tokens of text; per kv head
  the first right-singular vector of its (GQA-pooled) queries, signed so the queries project
  positively (``streamattn.scores.QFilters``).

Both read the queries a ``StreamingAttention`` layer receives (un-rotated: the cache undoes the
model's RoPE) through a forward hook, and the keys from the ``Full`` engine's state (slot ``j`` holds
token ``j`` rotated at ``j - base``). The result is a profile dict (``streamattn.policies.profile``).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable

import torch

import streamattn as sa
from streamattn.eval.recall import NAMES, NEEDLE, QUESTION, WORDS
from streamattn.hf.cache import layer_types
from streamattn.hf.stream import Stream
from streamattn.policies.profile import FORMAT


@contextlib.contextmanager
def _capture(stream: Stream, keep: Callable[[int, torch.Tensor], None]):
    """Call ``keep(layer, q)`` with the un-rotated queries ``[B, Hq, T, D]`` every layer receives."""
    handles = [
        layer.attn.register_forward_hook(lambda _m, args, _out, i=i: (keep(i, args[0]), None)[1])  # None: output kept
        for i, layer in enumerate(stream.cache.layers)
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def retrieval_scores(
    model, tokenizer, haystack: torch.Tensor, *, trials: int = 8, distance: int = 1024, prefix: int = 256, seed: int = 0
) -> list[list[float]]:
    """``[layer][kv head]`` mean attention mass of the answering query on the needle's word tokens."""
    if haystack.numel() < prefix + distance:
        raise ValueError(f"the haystack has {haystack.numel()} tokens; prefix + distance need {prefix + distance}")
    rng = random.Random(seed)
    total: list[torch.Tensor] | None = None
    for _ in range(trials):
        name, word = rng.choice(NAMES), rng.choice(WORDS)
        needle = NEEDLE.format(name=name, word=word)
        head = needle[: needle.index(word)].rstrip()  # the needle up to the word (a token boundary)
        start = prefix + _ids(tokenizer, head).numel()
        stop = prefix + _ids(tokenizer, head + " " + word).numel()
        context = torch.cat(
            [
                haystack[:prefix],
                _ids(tokenizer, needle),
                haystack[prefix : prefix + distance],
                _ids(tokenizer, QUESTION.format(name=name)),
            ]
        )
        masses: dict[int, torch.Tensor] = {}
        with Stream(model, tokenizer, sa.Full(), positions="absolute") as stream:
            stream.feed(context[:-1], scores=False)
            layers = stream.cache.layers
            with _capture(stream, lambda i, q: masses.setdefault(i, _mass(layers[i].attn, q, start, stop))):  # noqa: B023
                stream.feed(context[-1:], scores=False)
        trial = torch.stack([masses[i] for i in range(len(masses))])  # [L, Hkv]
        total = trial if total is None else total + trial
    return (total / trials).tolist()


def _mass(attn: sa.StreamingAttention, q: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """``[Hkv]`` attention mass of the last query ``q[:, :, -1]`` on keys ``[start, stop)`` of a ``Full``
    absolute-position layer that has just taken it (slot ``j`` = token ``j``, rotated at ``j - base``)."""
    st = attn.state
    n = st.seen[0]
    qr = attn.rope.rotate(q[:, :, -1:].double(), torch.tensor([n - 1 - st.base[0]]))
    keys, values = st.k[:, :, :n].double(), st.v[:, :, :n].double()
    _, _, w = sa.core.attend_with_lse(qr, keys, values, None, attn.scale, weights=True)  # [1, Hq, 1, n]
    return w[0, :, 0, start:stop].sum(-1).view(st.kv_heads, -1).mean(-1)


def qfilter_directions(model, tokenizer, ids: torch.Tensor, *, chunk: int = 256) -> list[list[list[float]]]:
    """``[layer][kv head][D]`` unit directions of the model's un-rotated queries on ``ids``."""
    queries: dict[int, list[torch.Tensor]] = {}
    with Stream(model, tokenizer, sa.SinkWindow(4, 1020), chunk_size=chunk) as stream:
        with _capture(stream, lambda i, q: queries.setdefault(i, []).append(q[0].double())):
            stream.feed(ids, scores=False)
        hkv = [layer.attn.state.kv_heads for layer in stream.cache.layers]
    out = []
    for i in range(len(queries)):
        q = torch.cat(queries[i], dim=1)  # [Hq, T, D]
        g = q.shape[0] // hkv[i]
        layer = []
        for h in range(hkv[i]):
            x = q[h * g : (h + 1) * g].reshape(-1, q.shape[-1])  # the kv head's queries, pooled
            f = torch.linalg.svd(x, full_matrices=False).Vh[0]
            if (x @ f).mean() < 0:
                f = -f
            layer.append(f.tolist())
        out.append(layer)
    return out


def calibrate(
    model,
    tokenizer,
    text_ids: torch.Tensor,
    *,
    model_name: str = "",
    trials: int = 8,
    distance: int = 1024,
    prefix: int = 256,
    qfilter_tokens: int = 2048,
    seed: int = 0,
) -> dict:
    """A profile: retrieval scores per (layer, kv head) and Q-Filter directions (see the module docstring)."""
    config = model.config.get_text_config()
    sliding = [t == "sliding_attention" for t in layer_types(config)]
    retrieval = retrieval_scores(model, tokenizer, text_ids, trials=trials, distance=distance, prefix=prefix, seed=seed)
    qfilters = qfilter_directions(model, tokenizer, text_ids[-qfilter_tokens:])
    return {
        "format": FORMAT,
        "model": model_name or getattr(config, "_name_or_path", "") or config.model_type,
        "layers": len(retrieval),
        "kv_heads": len(retrieval[0]),
        "head_dim": len(qfilters[0][0]),
        "retrieval": retrieval,
        "qfilters": qfilters,
        "sliding_layers": [i for i, s in enumerate(sliding) if s],
        "calibration": {
            "trials": trials,
            "distance": distance,
            "prefix": prefix,
            "qfilter_tokens": qfilter_tokens,
            "seed": seed,
            "what": "retrieval = attention mass of the answering query on the needle word (full attention); "
            "qfilters = first right-singular vector of the un-rotated queries per kv head",
        },
    }
