"""Scale-out on Ray Serve: the same app in N replicas that share one state directory.

Each replica is a Ray Serve deployment replica running ``create_app`` (its own model copy and
engine thread). Session affinity uses Ray Serve's model multiplexing keyed by the session id:
a request that carries the header ``serve_multiplexed_model_id: <session>`` is routed to the
replica that served that session last (the app registers every session it serves through a
``@serve.multiplexed`` method), so its state is usually in that replica's memory. Correctness never
depends on the routing: every completed request is written to the shared ``--state-dir``, a replica
re-reads a session whose file changed since it last saw it, and a session served in one replica is
locked (``flock``) for the others (409). When a replica dies, Ray Serve starts another, and the
session's next request, wherever it lands, resumes from its last snapshot.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path


def deployment(
    policy: str,
    state_dir: Path,
    *,
    model_name: str = "smollm2",
    replicas: int = 2,
    profile: Path | None = None,
    max_resident: int = 64,
    **app_kwargs,
):
    """The bound Ray Serve application (``serve.run`` it): ``replicas`` copies of ``create_app``
    for the model ``model_name`` (as ``load_model`` takes it) under the policy spec ``policy``."""
    from ray import serve

    if state_dir is None:
        raise ValueError("--ray needs --state-dir: replicas share their sessions through it")

    @serve.deployment(name="streamattn", num_replicas=replicas, max_ongoing_requests=1024)
    @serve.ingress()
    class StreamattnReplica:
        def __serve_build_asgi_app__(self):
            from streamattn import parse_policy
            from streamattn.hf import load_model
            from streamattn.serve.app import create_app

            m, tokenizer = load_model(model_name)
            app = create_app(
                m,
                tokenizer,
                parse_policy(policy, profile),
                model_name=model_name,
                state_dir=state_dir,
                max_resident=max_resident,
                **app_kwargs,
            )
            app.state.affinity = self.hold
            return app

        @serve.multiplexed(max_num_models_per_replica=max_resident)
        async def hold(self, session_id: str) -> str:
            """Registers ``session_id`` with Ray Serve's router as held by this replica."""
            return session_id

    return StreamattnReplica.bind()


def run(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Start a local Ray cluster (or join ``RAY_ADDRESS``), serve ``app`` on ``host:port`` until
    SIGINT/SIGTERM, then shut Serve and Ray down."""
    # a loaded 2-core machine may take longer than Ray Serve's 5 s to answer its proxy's readiness
    # check (Serve then kills the proxy): wait longer, unless the user says otherwise
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    import ray
    from ray import serve

    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, route_prefix="/")
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        done.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
