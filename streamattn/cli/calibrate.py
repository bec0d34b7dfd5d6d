"""Calibrate a model: find its retrieval heads and its Q-Filter directions, write a profile.

Retrieval heads: ``--trials`` recall prompts (a needle, ``--distance`` tokens of the haystack, the
question) streamed with full attention; each (layer, kv head) is scored by the attention mass the
answering query puts on the needle's word. Q-Filters: the first singular direction of each kv head's
un-rotated queries over ``--qfilter-tokens`` tokens of text. The profile (JSON) feeds
``--policy 'heads=0.25|RETRIEVAL|STREAMING' --profile FILE`` and ``--policy '...,score=qfilters'
--profile FILE`` of the other commands, and ``streamattn.PerHead.from_profile``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from streamattn.cli.common import needs_hf
from streamattn.eval import read_text


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', 'gemma3-270m', a local HF model dir or a .gguf file")
    p.add_argument("--out", type=Path, default=Path("profile.json"), help="where to write the profile")
    p.add_argument("--haystack", type=Path, default=None, help="text file (.txt or .gz); default: Emma (shipped)")
    p.add_argument("--trials", type=int, default=8, help="recall prompts averaged (default: %(default)s)")
    p.add_argument("--distance", type=int, default=1024, help="tokens between needle and question")
    p.add_argument("--prefix", type=int, default=256, help="haystack tokens before the needle")
    p.add_argument("--qfilter-tokens", type=int, default=2048, help="tokens whose queries give the Q-Filters")
    p.add_argument("--seed", type=int, default=0)


@needs_hf
def run(args: argparse.Namespace) -> int:
    from streamattn.hf import load_model
    from streamattn.hf.calibrate import calibrate

    for name in ("trials", "distance", "prefix", "qfilter_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.out.exists() and args.out.is_dir():
        raise ValueError(f"--out {args.out} is a directory; give a file path")
    text = read_text(args.haystack)
    model, tokenizer = load_model(args.model)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    need = max(args.prefix + args.distance, args.qfilter_tokens)
    if ids.numel() < need:
        raise ValueError(f"the haystack has {ids.numel():,} tokens; these settings need {need:,}")
    profile = calibrate(
        model,
        tokenizer,
        ids,
        model_name=args.model,
        trials=args.trials,
        distance=args.distance,
        prefix=args.prefix,
        qfilter_tokens=args.qfilter_tokens,
        seed=args.seed,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(profile))
    tmp.replace(args.out)
    ranked = sorted(
        ((s, layer, h) for layer, row in enumerate(profile["retrieval"]) for h, s in enumerate(row)), reverse=True
    )
    print(f"wrote {args.out}: {profile['layers']} layers x {profile['kv_heads']} kv heads")
    print("top retrieval heads (layer, kv head: attention mass on the needle word):")
    for s, layer, h in ranked[:10]:
        print(f"  layer {layer:2d}, head {h}: {s:.3f}")
    return 0
