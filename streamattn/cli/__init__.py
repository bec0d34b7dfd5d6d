"""``streamattn <command>``: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import sys

from streamattn.cli import calibrate, chat, engine_demo, generate, recall, serve, stream, transcribe

COMMANDS = {
    "stream": stream,
    "chat": chat,
    "generate": generate,
    "engine-demo": engine_demo,
    "recall": recall,
    "calibrate": calibrate,
    "serve": serve,
    "transcribe": transcribe,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamattn", description="Streaming attention over endless streams.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_parser(sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args)
    except (ValueError, TypeError, NotImplementedError, FileNotFoundError) as exc:  # one clear line
        print(f"streamattn {args.command}: error: {exc}", file=sys.stderr)
        return 2
