"""Serve endless sessions over HTTP (OpenAI-compatible API; sessions persist in --state-dir).

``POST /v1/chat/completions`` and ``/v1/completions`` (``stream: true`` for server-sent events),
``GET /v1/models``, ``GET``/``DELETE /v1/sessions/{id}``, ``POST /v1/sessions/{id}/feed``,
``/healthz``, ``/metrics``. A request that names a session (``session_id`` in the body, or an
``X-Session-Id`` header) sends only its new messages; the session's stream continues where it was,
with a bounded cache, and is written to ``--state-dir`` after every completed request.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from streamattn.cli.common import add_model_args, needs_serve, parse_policy


def add_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--state-dir", type=Path, default=None, help="where sessions persist (none: in memory only)")
    p.add_argument("--max-sessions", type=int, default=1024, help="sessions held in all")
    p.add_argument("--max-resident", type=int, default=64, help="sessions kept in memory (the rest on disk)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--ray", action="store_true", help="run on Ray Serve (a local cluster, or RAY_ADDRESS)")
    p.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas (with --ray)")


def _limits(args: argparse.Namespace) -> dict:
    """The app's options, the same for one process and for every Ray replica."""
    return {
        "model_name": args.model,
        "max_sessions": args.max_sessions,
        "max_resident": args.max_resident,
        "max_batch": args.max_batch,
        "max_queue": args.max_queue,
        "api_key": args.api_key,
    }


@needs_serve
def run(args: argparse.Namespace) -> int:
    from streamattn.hf import load_model
    from streamattn.serve import create_app, serve

    if args.state_dir is not None:
        args.state_dir.mkdir(parents=True, exist_ok=True)
    policy = parse_policy(args.policy, args.profile)  # a bad spec fails here, before any model loads
    if args.ray:
        return _run_ray(args)
    model, tokenizer = load_model(args.model)
    app = create_app(model, tokenizer, policy, state_dir=args.state_dir, **_limits(args))
    print(f"streamattn serve: {args.model} ({args.policy}) on http://{args.host}:{args.port}", flush=True)
    serve(app, args.host, args.port)
    return 0


def _run_ray(args: argparse.Namespace) -> int:
    try:
        from streamattn.serve import scale
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray Serve (pip install 'streamattn[ray]'): {exc}") from None
    if args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    state_dir = None if args.state_dir is None else args.state_dir.resolve()
    app = scale.deployment(args.policy, state_dir, replicas=args.replicas, profile=args.profile, **_limits(args))
    where = f"on Ray Serve, {args.replicas} replicas, http://{args.host}:{args.port}"
    print(f"streamattn serve: {args.model} ({args.policy}) {where}", flush=True)
    scale.run(app, args.host, args.port)
    return 0
