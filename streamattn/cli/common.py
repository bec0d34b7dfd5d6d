"""Arguments and set-up shared by the LLM subcommands."""

from __future__ import annotations

import argparse

import streamattn as sa


def add_model_args(p: argparse.ArgumentParser, policy: str = "sinks=4,window=1020") -> None:
    p.add_argument("--model", default="smollm2", help="'smollm2', a local HF model dir or a .gguf file")
    p.add_argument("--policy", default=policy, help="'sinks=S,window=W', 'window=W' or 'full'")


def parse_policy(spec: str) -> sa.Policy:
    """'sinks=4,window=1020' -> SinkWindow(4, 1020); 'window=1024' -> SinkWindow(0, 1024); 'full'."""
    if spec.strip().lower() in ("full", "dense"):
        return sa.Full()
    fields = {}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("sinks", "window") or not value.strip().lstrip("-").isdigit():
            raise ValueError(f"bad policy {spec!r}: expected 'sinks=S,window=W', 'window=W' or 'full'")
        fields[key.strip()] = int(value)
    if "window" not in fields:
        raise ValueError(f"bad policy {spec!r}: 'window=W' is required (or 'full')")
    return sa.SinkWindow(sinks=fields.get("sinks", 0), window=fields["window"])


def cache_line(stream) -> str:
    attn = stream.cache.layers[0].attn
    capacity = attn.policy.capacity
    kept = attn.cached[0] if attn.cached else 0
    return f"[cache {kept:,}/{capacity:,} keys, {stream.seen:,} tokens seen]" if capacity else f"[cache {kept:,} keys]"
