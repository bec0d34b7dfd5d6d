"""An HTTP server of endless sessions (OpenAI-compatible): ``create_app`` (FastAPI), ``serve`` (uvicorn).

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client) besides ``hf``.
"""

from __future__ import annotations

from streamattn.serve.app import create_app
from streamattn.serve.engine import Engine, Job, QueueFull
from streamattn.serve.sessions import Session, SessionError, SessionStore

__all__ = ["Engine", "Job", "QueueFull", "Session", "SessionError", "SessionStore", "create_app", "serve"]


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run ``app`` with uvicorn until interrupted (one process; the engine thread batches requests)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
