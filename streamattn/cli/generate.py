"""Generate from a prompt, endlessly, streamed to stdout (the cache never grows past its policy).

With ``--max-new-tokens 0`` (the default) it runs until interrupted (Ctrl-C), past end-of-text
tokens too: the stream just goes on. ``--chat`` wraps the prompt in the model's chat template.
"""

from __future__ import annotations

import argparse
import sys

from streamattn.cli.common import add_model_args, cache_line, needs_hf, parse_policy


def add_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="text to continue")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=0, help="0: endless (until Ctrl-C)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")


@needs_hf
def run(args: argparse.Namespace) -> int:
    from streamattn.hf import Stream, load_model

    if args.max_new_tokens < 0 or args.temperature < 0:
        raise ValueError("--max-new-tokens and --temperature must be >= 0")
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    policy = parse_policy(args.policy, args.profile)
    model, tokenizer = load_model(args.model)
    stream = Stream(model, tokenizer, policy)
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        stream.feed(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    else:
        stream.feed(args.prompt)
        sys.stdout.write(args.prompt)
    endless = args.max_new_tokens == 0
    budget = 2**62 if endless else args.max_new_tokens
    try:
        for piece in stream.generate(budget, args.temperature, seed=args.seed, stop_at_eos=not endless):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    print(f"\n{cache_line(stream)}", file=sys.stderr)
    return 0
