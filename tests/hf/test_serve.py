"""The HTTP server, as a user runs it: real `streamattn serve` processes on 127.0.0.1, real clients
(the official `openai` client and `httpx`). Greedy replies are compared with a `Stream` fed the
same transcript in this process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import streamattn as sa  # noqa: E402
from streamattn.hf import Stream  # noqa: E402
from streamattn.hf.chat import ChatTurns  # noqa: E402

POLICY = "sinks=4,window=60"  # small: every conversation here evicts
KEY = "test-key"


class Server:
    """A `streamattn serve` process on a free port of 127.0.0.1, stopped by the test."""

    def __init__(self, cache: Path, state_dir: Path | None, *extra: str, start_s: float = 180) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "streamattn.cli", "serve", "--port", str(self.port), "--policy", POLICY]
        args += ["--api-key", KEY, *extra]
        if state_dir is not None:
            args += ["--state-dir", str(state_dir)]
        env = {**os.environ, "STREAMATTN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + start_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server did not come up in {start_s:.0f} s")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    def http(self, method: str, path: str, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kw.pop("headers", {})}
        return httpx.request(method, f"{self.url}{path}", headers=headers, timeout=120, **kw)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def server(smollm2, model_cache, tmp_path_factory):
    """One server for the tests that need no restart (each uses its own sessions)."""
    srv = Server(model_cache, tmp_path_factory.mktemp("sessions"), "--max-batch", "8", "--max-resident", "2")
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _state_dir(tmp_path):
    (tmp_path / "sessions").mkdir()


class Local:
    """What the server should answer: one `Stream` per session, fed the same transcript."""

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.stream = Stream(model, tokenizer, sa.parse_policy(POLICY))
        self.turns = ChatTurns(tokenizer)

    def chat(self, content: str, max_tokens: int) -> str:
        new = [{"role": "user", "content": content}]
        self.stream.feed(self.turns.prompt(new), scores=False)
        answer = "".join(self.stream.generate(max_tokens))
        eos = self.stream.last_generated[-1:] == [self.tokenizer.eos_token_id]
        tail = self.turns.close(new, answer, eos_fed=eos)
        if tail:
            self.stream.feed(tail, scores=False)
        return answer


def ask(client, session: str | None, content: str, max_tokens: int = 12) -> str:
    extra = {} if session is None else {"session_id": session}
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": content}], max_tokens=max_tokens, extra_body=extra
    )
    return r.choices[0].message.content


TURNS = ["Name a novel by Jane Austen.", "Who is its heroine?", "Describe her in one sentence."]


def test_a_session_is_a_stream_fed_the_transcript_and_survives_restarts(smollm2, model_cache, tmp_path):
    """Three turns on one session, the server restarted between turns 1 and 2 (SIGTERM) and killed
    with SIGKILL in the middle of turn 3's generation: each completed turn equals a local Stream fed
    the same transcript, and after the kill the session is exactly as its last completed turn left it."""
    local = Local(*smollm2)
    server = Server(model_cache, tmp_path / "sessions", "--max-batch", "8")
    client = server.client()
    assert ask(client, "alice", TURNS[0]) == local.chat(TURNS[0], 12)
    server.stop()
    again = Server(model_cache, tmp_path / "sessions", "--max-batch", "8")
    try:
        client = again.client()
        assert ask(client, "alice", TURNS[1]) == local.chat(TURNS[1], 12)
        before = again.http("GET", "/v1/sessions/alice").json()
        assert before["tokens"] == local.stream.seen
        # a long reply, killed after its first pieces: nothing of it may reach the session
        chunks = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": TURNS[2]}],
            max_tokens=400,
            stream=True,
            extra_body={"session_id": "alice"},
        )
        next(iter(chunks))
        next(iter(chunks))
        again.stop(signal.SIGKILL)
    finally:
        again.stop()
    third = Server(model_cache, tmp_path / "sessions", "--max-batch", "8")
    try:
        assert third.http("GET", "/v1/sessions/alice").json()["tokens"] == before["tokens"]
        assert ask(third.client(), "alice", TURNS[2]) == local.chat(TURNS[2], 12)
    finally:
        third.stop()
    files = sorted(p.name for p in (tmp_path / "sessions").iterdir() if p.is_file())
    assert files == ["alice.pt"]  # no temporary file left


def test_concurrent_sessions_are_batched_and_equal_each_alone(server, smollm2):
    """8 sessions at once (one batched decode), each equal to its transcript alone; at most 2 stay
    in the server's memory (--max-resident 2), so their second turns come back from disk."""
    n = 8
    prompts = [f"Write a line about the number {i}." for i in range(n)]
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            answers[i] = ask(server.client(), f"user{i}", prompts[i], max_tokens=10)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    metrics = server.http("GET", "/metrics").text
    assert "streamattn_step_seconds" in metrics and "streamattn_queue_depth" in metrics
    resident = next(line for line in metrics.splitlines() if line.startswith("streamattn_active_sessions "))
    assert float(resident.split()[1]) <= 2  # the other sessions are on disk only
    locals_ = [Local(*smollm2) for _ in range(n)]
    for i in range(n):
        assert answers[i] == locals_[i].chat(prompts[i], 10), i
    for i in range(3):  # offloaded: the least recently used sessions live on disk only
        assert ask(server.client(), f"user{i}", "And then?", max_tokens=6) == locals_[i].chat("And then?", 6), i


def test_stateless_requests_streaming_and_completions(server, smollm2):
    client = server.client()
    model, tokenizer = smollm2
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True
        )
    ]
    assert "".join(pieces) == Local(model, tokenizer).chat("Say hello.", 8)
    text = client.completions.create(model="smollm2", prompt="It is a truth universally", max_tokens=6).choices[0].text
    plain = Stream(model, tokenizer, sa.parse_policy(POLICY))
    plain.feed("It is a truth universally", scores=False)
    assert text == "".join(plain.generate(6))
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert server.http("GET", "/v1/sessions/nobody").status_code == 404  # stateless requests keep nothing


def test_feed_appends_a_document_to_a_session(server, smollm2):
    r = server.http("POST", "/v1/sessions/doc/feed", json={"text": "Emma Woodhouse, handsome, clever, and rich."})
    assert r.status_code == 200, r.text
    fed = r.json()["tokens"]
    assert fed == len(smollm2[1]("Emma Woodhouse, handsome, clever, and rich.", add_special_tokens=False).input_ids)
    assert server.http("DELETE", "/v1/sessions/doc").json()["deleted"] is True
    assert server.http("GET", "/v1/sessions/doc").status_code == 404


BAD = [
    (b"{not json", {}, 400, "invalid_json"),
    (json.dumps({"messages": "hi"}).encode(), {}, 400, "invalid_request"),
    (
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}).encode(),
        {},
        400,
        "invalid_request",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(),
        {},
        400,
        "invalid_request",
    ),
    (json.dumps({"messages": []}).encode(), {}, 400, "invalid_messages"),
    (json.dumps({"messages": [{"role": "user", "content": ""}]}).encode(), {}, 400, "invalid_length"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), {}, 400, "invalid_messages"),
    (
        json.dumps({"messages": [{"role": "user", "content": "x" * ((1 << 20) + 1)}]}).encode(),
        {},
        400,
        "invalid_length",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "session_id": "../etc"}).encode(),
        {},
        400,
        "invalid_session_id",
    ),
    (
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
        {"Authorization": "Bearer wrong"},
        401,
        "invalid_api_key",
    ),
]


def test_bad_requests_get_openai_errors_and_leave_the_session_unchanged(server):
    client = server.client()
    ask(client, "bob", "Hello!", max_tokens=4)
    before = server.http("GET", "/v1/sessions/bob").json()
    for body, headers, status, code in BAD:
        r = server.http(
            "POST",
            "/v1/chat/completions",
            content=body,
            headers={"Content-Type": "application/json", "X-Session-Id": "bob", **headers},
        )
        assert r.status_code == status, (body[:60], r.text)
        assert r.json()["error"]["code"] == code, (body[:60], r.text)
        assert isinstance(r.json()["error"]["message"], str)
    assert server.http("GET", "/v1/sessions/bob").json() == before
    assert server.http("GET", "/v1/sessions/nobody").json()["error"]["code"] == "session_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert server.http("GET", "/healthz").json()["status"] == "ok"


def test_busy_sessions_full_queues_and_vanishing_clients(smollm2, model_cache, tmp_path):
    """One request decodes at a time and one may wait: a second request to a busy session gets 409,
    one more request 429 with Retry-After; a client that disconnects mid-stream stops its generation
    and leaves its session as it was."""
    srv = Server(model_cache, tmp_path / "sessions", "--max-batch", "1", "--max-queue", "1")
    try:
        client = srv.client()
        ask(client, "carol", "Hi.", max_tokens=3)
        before = srv.http("GET", "/v1/sessions/carol").json()
        long = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Tell me a very long story."}],
            max_tokens=400,
            stream=True,
            extra_body={"session_id": "carol"},
        )
        it = iter(long)
        next(it), next(it)  # it is decoding now
        busy = srv.http(
            "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "session_id": "carol"}
        )
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "session_busy"
        waiting = threading.Thread(target=ask, args=(srv.client(), "dave", "Hello.", 3))
        waiting.start()
        deadline = time.monotonic() + 30
        while "streamattn_queue_depth 1.0" not in srv.http("GET", "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        full = srv.http("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert full.status_code == 429 and full.headers["Retry-After"] == "1"
        long.close()  # the client goes away: its row leaves the batch, and the waiting request runs
        waiting.join(timeout=120)
        assert not waiting.is_alive()
        assert srv.http("GET", "/v1/sessions/carol").json() == before
        assert ask(client, "carol", "Hi again.", max_tokens=3)  # not stuck busy
    finally:
        srv.stop()


def test_chat_turns_render_like_the_whole_conversation(smollm2):
    """The per-turn text (first + last message kept) equals the difference of full renderings."""
    tokenizer = smollm2[1]
    turns, history, fed = ChatTurns(tokenizer), [], ""
    for i in range(4):
        new = [{"role": "user", "content": f"question {i}"}]
        fed += turns.prompt(new)
        answer = f"answer {i}"
        fed += answer + turns.close(new, answer, eos_fed=False)
        history += [*new, {"role": "assistant", "content": answer}]
    assert fed == tokenizer.apply_chat_template(history, tokenize=False)


@pytest.mark.parametrize(
    "policy",
    ["sinks=4,window=24,budget=40,score=h2o,every=8", "sinks=4,window=24,block=8,topk=2,every=4"],
    ids=["compressed", "retrieval"],
)
def test_the_engine_serves_any_policy(smollm2, policy):
    """The serving engine in-process (no HTTP): two turns of a session and a concurrent stateless
    request under compressed and retrieval policies equal local Streams."""
    import queue

    from streamattn.serve import Engine, Job, SessionStore

    model, tokenizer = smollm2
    pol = sa.parse_policy(policy)
    store = SessionStore(None)
    engine = Engine(model, tokenizer, pol, store, max_batch=4)

    def run(jobs):
        events: queue.Queue = queue.Queue()
        for i, job in enumerate(jobs):
            job.emit = lambda e, i=i: events.put((i, e))
            engine.submit(job)
        done = {}
        while len(done) < len(jobs):
            i, e = events.get(timeout=300)
            assert e["type"] != "error", e
            if e["type"] == "done":
                done[i] = e["text"]
        return [done[i] for i in range(len(jobs))]

    try:
        local, other = Local(model, tokenizer), Stream(model, tokenizer, pol)
        local.stream = Stream(model, tokenizer, pol)
        for text in ("Name a novel by Jane Austen.", "Who wrote it?"):
            new = [{"role": "user", "content": text}]
            session = store.acquire("s")
            prompt = ChatTurns(tokenizer, **session.chat).prompt(new)
            got = run([Job(prompt, 10, session=session, new_messages=new), Job("Once upon a time", 10)])
            assert got[0] == local.chat(text, 10)
            other.feed("Once upon a time", scores=False)
            assert got[1] == "".join(other.generate(10))
            other = Stream(model, tokenizer, pol)
        assert store.get("s").tokens == local.stream.seen
    finally:
        engine.stop()
