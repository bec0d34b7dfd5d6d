"""The HTTP API: OpenAI-compatible completions over endless sessions (FastAPI).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` as server-sent
events, or one JSON answer), ``GET /v1/models``, ``GET``/``DELETE /v1/sessions/{id}``, ``POST
/v1/sessions/{id}/feed``, ``GET /healthz``, ``GET /metrics`` (Prometheus). A request names its session
with a ``session_id`` field (the ``openai`` client's ``extra_body``) or an ``X-Session-Id`` header and
then sends only its new messages; without one it is stateless (its prompt streamed from scratch).
Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx status
for anything the client did wrong; a rejected request leaves its session as it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from streamattn.hf.chat import ChatTurns, check_messages
from streamattn.policies.spec import policy_spec
from streamattn.serve.engine import Engine, Job, QueueFull
from streamattn.serve.sessions import SessionError, SessionStore, check_session_id

MAX_TEXT = 1 << 20  # characters of new text per request (1 MiB): a document goes in several feeds
MAX_TOKENS = 4096  # tokens generated per request


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use

    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(default=None, ge=0, le=MAX_TOKENS)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=0, le=MAX_TOKENS)
    temperature: StrictFloat | StrictInt | None = Field(default=None, ge=0, le=2)
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    session_id: StrictStr | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=1)


class ChatBody(_Body):
    messages: list[dict[str, Any]]


class CompletionBody(_Body):
    prompt: StrictStr


class FeedBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr


def _error(status: int, message: str, code: str, param: str | None = None, headers=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Metrics:
    def __init__(self, engine_ref, store: SessionStore) -> None:
        self.registry = CollectorRegistry()
        self.tokens = Counter("streamattn_generated_tokens", "tokens generated", registry=self.registry)
        self.requests = Counter("streamattn_requests", "requests answered", ["status"], registry=self.registry)
        self.step = Histogram(
            "streamattn_step_seconds",
            "decode step latency (one token for every running request)",
            registry=self.registry,
        )
        self.batch = Gauge("streamattn_batch_rows", "requests in the decode batch", registry=self.registry)
        queue_depth = Gauge("streamattn_queue_depth", "requests waiting", registry=self.registry)
        queue_depth.set_function(lambda: engine_ref().waiting if engine_ref() else 0)
        sessions = Gauge("streamattn_active_sessions", "sessions held in memory", registry=self.registry)
        sessions.set_function(store.resident)

    def on_step(self, rows: int, seconds: float) -> None:
        self.tokens.inc(rows)
        self.step.observe(seconds)
        self.batch.set(rows)


def create_app(
    model,
    tokenizer,
    policy,
    *,
    model_name: str = "smollm2",
    state_dir=None,
    max_sessions: int = 1024,
    max_resident: int = 64,
    max_batch: int = 16,
    max_queue: int = 64,
    api_key: str | None = None,
    chunk_size: int = 256,
) -> FastAPI:
    """The app, with its engine thread started (stopped at shutdown)."""
    store = SessionStore(state_dir, max_sessions, max_resident)
    holder: dict[str, Engine] = {}
    metrics = _Metrics(lambda: holder.get("engine"), store)
    engine = Engine(
        model,
        tokenizer,
        policy,
        store,
        max_batch=max_batch,
        max_queue=max_queue,
        chunk_size=chunk_size,
        on_step=metrics.on_step,
    )
    holder["engine"] = engine
    app = FastAPI(title="streamattn", version="0.1.0")
    app.state.engine, app.state.store = engine, store
    policy_text = policy_spec(policy)

    @app.on_event("shutdown")
    def _shutdown() -> None:
        engine.stop()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        wrong = request.headers.get("authorization", "") != f"Bearer {api_key}"
        if api_key is not None and request.url.path.startswith("/v1/") and wrong:
            metrics.requests.labels("401").inc()
            response = _error(401, "missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key")
        else:
            response = await call_next(request)
        response.headers["X-Streamattn-Replica"] = str(os.getpid())  # which process served it (replicas)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        what = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid" or first.get("loc") == ("body",):
            return _error(400, f"the body must be a JSON object ({what})", "invalid_json")
        return _error(400, f"{where}: {what}" if where else what, "invalid_request", where)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "not_found" if exc.status_code == 404 else "http_error")

    @app.exception_handler(SessionError)
    async def _session(request: Request, exc: SessionError):
        return _error(exc.status, str(exc), exc.code, "session_id")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model": model_name, "policy": policy_text, "pid": os.getpid()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "streamattn"}],
        }

    def _describe(session_id: str) -> dict:
        s = store.get(session_id)
        return {
            "id": s.id,
            "object": "session",
            "tokens": s.tokens,
            "cache_bytes": s.cache_bytes,
            "policy": policy_text,
        }

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str):
        return _describe(session_id)

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str):
        store.delete(session_id)
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{session_id}/feed")
    async def feed(request: Request, session_id: str, body: FeedBody):
        if not body.text or len(body.text) > MAX_TEXT:
            return _error(400, f"text must be 1..{MAX_TEXT} characters", "invalid_text", "text")
        session = store.acquire(await _session_of(request, None, session_id))
        job = Job(feed=body.text, max_tokens=0, session=session)
        events = await _run(job, session)
        return events if isinstance(events, JSONResponse) else _describe(session_id)

    def _submit(job: Job, session) -> asyncio.Queue | JSONResponse:
        """Queue ``job``; its events arrive in the returned queue (or 429, the session released)."""
        q = _attach(job)
        try:
            engine.submit(job)
        except QueueFull:
            if session is not None:
                store.release(session)
            return _error(
                429, "the server is busy: too many requests waiting", "queue_full", headers={"Retry-After": "1"}
            )
        return q

    async def _run(job: Job, session) -> list[dict] | JSONResponse:
        """Submit and wait for the whole answer (non-streaming)."""
        q = _submit(job, session)
        if isinstance(q, JSONResponse):
            return q
        events = []
        while True:
            event = await q.get()
            events.append(event)
            if event["type"] == "error":
                return _engine_error(event["error"])
            if event["type"] == "done":
                return events

    def _attach(job: Job) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        job.emit = lambda event: loop.call_soon_threadsafe(q.put_nowait, event)
        return q

    async def _session_of(request: Request, body: _Body | None, path_id: str | None = None) -> str | None:
        """The request's session: in the path, ``session_id`` in the body, or the ``X-Session-Id``
        header, or Ray Serve's ``serve_multiplexed_model_id`` header (what routes a session to its replica)."""
        sid = path_id or (body.session_id if body is not None else None) or request.headers.get("x-session-id")
        sid = sid or request.headers.get("serve_multiplexed_model_id")
        if sid is None:
            return None
        check_session_id(sid)
        affinity = getattr(app.state, "affinity", None)
        if affinity is not None:  # Ray Serve: tell the router this replica holds the session
            await affinity(sid)
        return sid

    async def _complete(request: Request, body: _Body, chat: bool):
        sid = await _session_of(request, body)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        max_tokens = 256 if max_tokens is None else max_tokens
        if max_tokens < 1:
            return _error(400, "max_tokens must be >= 1", "invalid_max_tokens", "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if chat:
            try:
                new = check_messages(body.messages)
            except ValueError as exc:
                return _error(400, str(exc), "invalid_messages", "messages")
            size = sum(len(m["content"]) for m in new)
        else:
            new, size = None, len(body.prompt)
        if size == 0 or size > MAX_TEXT:
            return _error(
                400,
                f"the new text must be 1..{MAX_TEXT} characters",
                "invalid_length",
                "messages" if chat else "prompt",
            )
        session = store.acquire(sid) if sid is not None else None
        try:
            if chat:
                turns = ChatTurns(tokenizer, **session.chat) if session is not None else ChatTurns(tokenizer)
                text = turns.prompt(new)
            else:
                text = body.prompt
        except ValueError as exc:
            if session is not None:
                store.release(session)
            return _error(400, str(exc), "invalid_messages", "messages")
        temperature = float(body.temperature or 0.0)
        job = Job(
            text, max_tokens, temperature, body.seed, stop, session, new if chat and session is not None else None
        )
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not body.stream:
            events = await _run(job, session)
            if isinstance(events, JSONResponse):
                return events
            done = events[-1]
            metrics.requests.labels("200").inc()
            usage = {
                "prompt_tokens": job.prompt_tokens,
                "completion_tokens": job.completion_tokens,
                "total_tokens": job.prompt_tokens + job.completion_tokens,
            }
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": done["text"]},
                    "finish_reason": done["finish_reason"],
                }
                return {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model_name,
                    "choices": [choice],
                    "usage": usage,
                }
            choice = {"index": 0, "text": done["text"], "logprobs": None, "finish_reason": done["finish_reason"]}
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": [choice],
                "usage": usage,
            }
        q = _submit(job, session)
        if isinstance(q, JSONResponse):
            return q

        async def events():
            kind = "chat.completion.chunk" if chat else "text_completion"

            def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
                if chat:
                    d = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
                    choice = {"index": 0, "delta": d, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                return f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model_name, 'choices': [choice]})}\n\n"

            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    event = await q.get()
                    if event["type"] == "delta":
                        yield chunk(event["text"], None)
                    elif event["type"] == "done":
                        metrics.requests.labels("200").inc()
                        yield chunk(None, event["finish_reason"])
                        yield "data: [DONE]\n\n"
                        return
                    else:
                        err = _engine_error(event["error"])
                        yield f"data: {err.body.decode()}\n\n"
                        return
            finally:  # the client went away (or we are done): a running job stops, its session untouched
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _engine_error(exc: Exception) -> JSONResponse:
        if isinstance(exc, SessionError):
            return _error(exc.status, str(exc), exc.code)
        if isinstance(exc, ValueError):
            return _error(400, str(exc), "invalid_request")
        if isinstance(exc, ConnectionAbortedError):
            return _error(499, "the request was cancelled", "cancelled")
        metrics.requests.labels("500").inc()
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatBody):
        return await _complete(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionBody):
        return await _complete(request, body, chat=False)

    return app
