"""Which layers and heads of a model retrieve the needle's block? (the diagnosis of ``Retrieval``)

A recall trial (prefix | needle | ``d`` haystack tokens | question) is streamed through the model
with ``Retrieval(sinks, window, block, topk)``; at the question's last token (the query that answers)
every layer's memory is read back and each memory block is scored, per kv head, by several
relevance rules. For each rule the table gives, per layer, how many of its kv heads rank the block
holding the needle's answer word within their ``topk`` (the block the query must retrieve):

- ``quest``: Quest's bound ``sum_g sum_d max(q lo, q hi)`` on un-rotated keys (distance 0: the first rule tried);
- ``centroid``: ``sum_g q . mean(k)`` (a block's mean key);
- ``max-key``: ``max_j sum_g q . k_j`` (the best single key, un-rotated: what ``quest`` bounds);
- ``attention``: the full-attention mass of the block (softmax over every stored key at distance 0);
- ``quest@pos`` (the shipped rule, cache positions), ``attention@pos``: the same two with the query
  rotated as in cache mode, i.e. at the positions the retrieved block is attended at (its token ``u``
  at distance ``window + block - 1 - u``): bounds of the store's keys (rotated at ``u``).

    python -m benchmarks.retrieval_probe [--distances 4K,16K] [--trials 4] [--block 128 --topk 4]
"""

from __future__ import annotations

import argparse

import torch
from rich.console import Console
from rich.table import Table

import streamattn as sa
from streamattn.core.memory import NO_BLOCK, RetrievalEngine
from streamattn.eval import read_text
from streamattn.eval.recall import RecallConfig, context_ids, encode_trial, make_trials, parse_distances
from streamattn.hf import Stream, load_model

RULES = ("quest", "centroid", "max-key", "attention", "quest@pos", "attention@pos")


def scores(engine: RetrievalEngine, st, q: torch.Tensor) -> dict[str, torch.Tensor]:
    """Relevance of every block slot under each rule: ``{rule: [Hkv, C]}`` for one query ``q [Hq, D]``."""
    hkv, c, size, d = st.kv_heads, st.capacity, engine.block, st.head_dim
    qg = q.double().view(hkv, -1, d)  # [Hkv, G, D]
    stored = st.mem_k[0].double()  # [Hkv, C, block, D], token u rotated at u (cache mode)
    keys = stored if engine.rope is None else engine.rope.rotate(stored, -torch.arange(size))  # un-rotated
    qr = qg if engine.rope is None else engine.rope.rotate(qg, torch.tensor(engine.window + size - 1))
    at_pos = torch.einsum("hgd,hcud->hcgu", qr, stored)
    slo, shi = stored.min(dim=2).values, stored.max(dim=2).values  # [Hkv, C, D]
    lo, hi = st.lo[0].double(), st.hi[0].double()
    dots = torch.einsum("hgd,hcud->hcgu", qg, keys)  # [Hkv, C, G, block]
    out = {
        "quest": torch.maximum(qg[:, None] * lo[:, :, None], qg[:, None] * hi[:, :, None]).sum(dim=(2, 3)),
        "centroid": dots.mean(dim=3).sum(dim=2),
        "max-key": dots.sum(dim=2).max(dim=2).values,
        "attention": torch.softmax(dots.flatten(1) * d**-0.5, dim=-1).view(hkv, c, -1).sum(dim=-1),
        "quest@pos": torch.maximum(qr[:, None] * slo[:, :, None], qr[:, None] * shi[:, :, None]).sum(dim=(2, 3)),
        "attention@pos": torch.softmax(at_pos.flatten(1) * d**-0.5, dim=-1).view(hkv, c, -1).sum(dim=-1),
    }
    empty = st.block_id[0] == NO_BLOCK
    return {rule: s.masked_fill(empty, float("-inf")) for rule, s in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--distances", default="4K")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--topk", type=int, default=4)
    args = parser.parse_args()
    console = Console(width=160)
    model, tokenizer = load_model(args.model)
    policy = sa.Retrieval(sinks=4, window=1020, block=args.block, topk=args.topk)
    distances = parse_distances(args.distances)
    config = RecallConfig(distances=distances, trials=args.trials)
    haystack = torch.tensor(tokenizer(read_text(None), add_special_tokens=False).input_ids)
    captured: dict[int, torch.Tensor] = {}
    segment = RetrievalEngine._segment

    def spy(self, st, q, k, v, n):  # the last query of each call, per engine (= per layer)
        captured[id(self)] = q[0, :, n[0] - 1].detach().clone()
        return segment(self, st, q, k, v, n)

    RetrievalEngine._segment = spy
    layers = model.config.num_hidden_layers
    hits = {(d, rule): torch.zeros(layers, dtype=torch.long) for d in distances for rule in RULES}
    heads = 0
    for trial in make_trials(config):
        tokens = encode_trial(tokenizer, trial)
        answer = tokens.needle.numel() - 2  # the answer word's token (before the final ".")
        for d in distances:
            stream = Stream(model, tokenizer, policy)
            stream.feed(context_ids(haystack, config.prefix, tokens, d), scores=False)
            needle_block = (config.prefix + answer - policy.sinks) // policy.block
            for i, layer in enumerate(stream.cache.layers):
                attn = layer.attn
                st = attn.state
                heads = st.kv_heads
                for rule, s in scores(attn.engine, st, captured[id(attn.engine)]).items():
                    top = s.topk(min(args.topk, s.shape[-1]), dim=-1).indices  # [Hkv, K] slots
                    got = (st.block_id[0].gather(-1, top) == needle_block).any(dim=-1)
                    hits[(d, rule)][i] += int(got.sum())
            stream.close()
    RetrievalEngine._segment = segment
    for d in distances:
        table = Table(
            title=f"needle block in the top {args.topk} at distance {d:,} ({args.trials} trials x {heads} kv heads)"
        )
        table.add_column("layer", justify="right")
        for rule in RULES:
            table.add_column(rule, justify="right")
        for i in range(layers):
            table.add_row(str(i), *(f"{int(hits[(d, r)][i])}/{args.trials * heads}" for r in RULES))
        total = args.trials * heads * layers
        table.add_row("all", *(f"{int(hits[(d, r)].sum()) / total:.2f}" for r in RULES))
        console.print(table)


if __name__ == "__main__":
    main()
