"""Scale-out: `streamattn serve --ray --replicas 2` on a local Ray cluster. A session sticks to one
replica (Ray Serve's multiplexing keyed by the session id); when that replica is killed, the
session's next turn is served from its last snapshot in the shared state directory, and the
conversation equals a local Stream fed the same transcript."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

pytest.importorskip("ray.serve")

from tests.hf.test_serve import Local, Server


def chat(server: Server, session: str, content: str, max_tokens: int = 8) -> httpx.Response:
    return server.http(
        "POST",
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens},
        headers={"serve_multiplexed_model_id": session},
    )


def test_a_session_survives_the_death_of_its_replica(smollm2, model_cache, tmp_path):
    srv = Server(model_cache, tmp_path / "sessions", "--ray", "--replicas", "2", start_s=300)  # a Ray cluster first
    try:
        local = Local(*smollm2)
        first = chat(srv, "ray-session", "Name a novel by Jane Austen.")
        assert first.status_code == 200, first.text
        assert first.json()["choices"][0]["message"]["content"] == local.chat("Name a novel by Jane Austen.", 8)
        replica = first.headers["X-Streamattn-Replica"]
        second = chat(srv, "ray-session", "Who is its heroine?")
        assert second.headers["X-Streamattn-Replica"] == replica  # affinity: the replica that holds it
        assert second.json()["choices"][0]["message"]["content"] == local.chat("Who is its heroine?", 8)
        os.kill(int(replica), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:
            try:
                third = chat(srv, "ray-session", "Describe her.")
                if third.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no replica took over the session"
            time.sleep(1)
        assert third.headers["X-Streamattn-Replica"] != replica
        assert third.json()["choices"][0]["message"]["content"] == local.chat("Describe her.", 8)
        assert srv.http("GET", "/v1/sessions/ray-session").json()["tokens"] == local.stream.seen
        assert httpx.get(f"{srv.url}/v1/models", timeout=30).status_code == 401  # replicas check the API key too
    finally:
        srv.stop()
