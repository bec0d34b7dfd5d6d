"""Arguments and set-up shared by the LLM subcommands (CLI only: the package never imports this)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from streamattn import parse_policy

POLICY_HELP = (
    "'sinks=S,window=W', 'window=W', 'full', compressed 'sinks=S,window=W,budget=B,score=NAME,every=E' "
    "(NAME: knorm, tova, h2o, snapkv[:WINDOW[:KERNEL]]), or retrieval "
    "'sinks=S,window=W,block=N,topk=K[,max_blocks=M][,every=E][,store=device|cpu|disk]'"
)

__all__ = [
    "HF_MODULES",
    "POLICY_HELP",
    "SERVE_MODULES",
    "add_model_args",
    "add_profile_arg",
    "cache_line",
    "needs_hf",
    "needs_serve",
    "parse_policy",
]

# top-level modules of the `hf` extra (pyproject.toml); a command that runs a model needs all of them
HF_MODULES = ("transformers", "gguf", "accelerate", "psutil", "matplotlib")
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client")  # the `serve` extra


def add_model_args(p: argparse.ArgumentParser, policy: str = "sinks=4,window=1020") -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', a local HF model dir or a .gguf file")
    p.add_argument("--policy", default=policy, help=POLICY_HELP)
    add_profile_arg(p)


def add_profile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="calibration profile (`streamattn calibrate`) for 'score=qfilters' and per-head policies "
        "'heads=F|RETRIEVAL|STREAMING'",
    )


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked install counts as missing
            found = False
        if not found:
            missing.append(name)
    return missing


def _needs(modules: tuple[str, ...], extras: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    def decorate(run: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(run)
        def checked(args: argparse.Namespace, *rest, **kwargs) -> int:
            missing = _missing(modules)
            if missing:
                command = getattr(args, "command", None) or run.__module__.rpartition(".")[2]
                names = [f"'{x}'" for x in extras.split(",")]
                what = f"the {' and '.join(names)} extra{'s' if len(names) > 1 else ''}"
                print(
                    f"streamattn {command}: error: this command needs {what} "
                    f"(missing: {', '.join(missing)}); install it with: pip install 'streamattn[{extras}]'",
                    file=sys.stderr,
                )
                return 2
            return run(args, *rest, **kwargs)

        return checked

    return decorate


def needs_hf(run: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command's ``run``: without the ``hf`` extra it prints one line and returns 2.

    Checked before any argument is used or model loaded, so the user learns the fix at once rather
    than after a long run (``stream`` needs matplotlib only for its final plot).
    """
    return _needs(HF_MODULES, "hf")(run)


def needs_serve(run: Callable[..., int]) -> Callable[..., int]:
    """``needs_hf`` for the server: the ``hf`` and ``serve`` extras."""
    return _needs(HF_MODULES + SERVE_MODULES, "hf,serve")(run)


def cache_line(stream) -> str:
    capacity = stream.cache.capacity
    kept = stream.cache.cached()[0] if stream.cache.cached() else 0
    return f"[cache {kept:,}/{capacity:,} keys, {stream.seen:,} tokens seen]" if capacity else f"[cache {kept:,} keys]"
