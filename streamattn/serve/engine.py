"""The serving loop: one thread owns the model; decode steps of concurrent requests share a forward.

A request (a ``Job``) is prefilled alone (its session's state loaded into a one-stream ``Stream``,
the new text fed in chunks), then joins the *decode batch*: one batched ``Stream`` whose rows are
the requests generating now, at whatever positions their sessions are (ragged streams: the engine
takes them). Each step samples one token per row from its own next-token distribution and feeds
all of them in one forward; a row that finishes (length, end of sequence, a stop string, or its
client gone) leaves the batch with its state, which is committed to its session (or, when the
client went away, dropped: the session stays as it was before the request). The queue of waiting
requests is bounded; ``submit`` refuses past it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from streamattn.hf import Stream
from streamattn.hf.chat import ChatTurns
from streamattn.hf.detok import IncrementalDetokenizer
from streamattn.hf.stream import sample_token
from streamattn.serve.sessions import Session, SessionStore


class QueueFull(Exception):
    """The waiting queue is full (HTTP 429)."""


@dataclass
class Job:
    """One request. ``feed``: text to append to the stream; ``new_messages``: for chat, the turn's
    messages (its assistant turn is closed after the reply); ``max_tokens=0``: feed only."""

    feed: str
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    session: Session | None = None
    new_messages: list[dict] | None = None
    emit: Callable[[dict], None] = lambda event: None  # called from the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled by the engine
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Row:
    job: Job
    text: IncrementalDetokenizer
    generator: torch.Generator | None
    pieces: list[str] = field(default_factory=list)
    sent: int = 0  # characters of the reply already emitted
    last_token: int | None = None
    finish: str | None = None


class Engine:
    """Owns the model; ``submit`` jobs from any thread, results come through each job's ``emit``."""

    def __init__(
        self,
        model,
        tokenizer,
        policy,
        store: SessionStore,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        chunk_size: int = 256,
        on_step: Callable[[int, float], None] | None = None,
    ) -> None:
        self.model, self.tokenizer, self.policy, self.store = model, tokenizer, policy, store
        self.max_batch, self.chunk_size = max_batch, chunk_size
        self.on_step = on_step or (lambda rows, seconds: None)
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self._batch: Stream | None = None
        self._rows: list[_Row] = []
        self._thread = threading.Thread(target=self._run, name="streamattn-engine", daemon=True)
        self._writes: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="streamattn-writer", daemon=True)
        self._stopping = False
        self._thread.start()
        self._writer.start()

    # ------------------------------------------------------------------ API (any thread)
    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def stop(self) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._writes.put(None)
        self._writer.join(timeout=30)

    # ------------------------------------------------------------------ the loop (engine thread)
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._admit(block=not self._rows)
                if self._rows:
                    self._step()
            except Exception as exc:  # never let the loop die: fail the rows in flight, keep serving
                for row in self._rows:
                    self._finish(row, error=exc)
                if self._batch is not None:
                    self._batch.close()  # give the model back (attachments are counted)
                self._rows, self._batch = [], None

    def _admit(self, block: bool) -> None:
        while len(self._rows) < self.max_batch:
            try:
                job = self._queue.get(block=block, timeout=None if block else 0)
            except queue.Empty:
                return
            if job is None:
                return
            block = False
            try:
                self._start(job)
            except Exception as exc:
                job.emit({"type": "error", "error": exc})
                if job.session is not None:
                    self.store.release(job.session)

    def _stream(self) -> Stream:
        return Stream(self.model, self.tokenizer, self.policy, chunk_size=self.chunk_size)

    def _start(self, job: Job) -> None:
        """Prefill ``job`` alone, then reply (feed-only jobs) or join the decode batch."""
        if job.cancelled.is_set():
            raise ConnectionAbortedError("the client went away before its request started")
        solo = self._stream()
        try:
            if job.session is not None and job.session.state is not None:
                solo.load_state_dict(job.session.state)
            ids = torch.tensor(self.tokenizer(job.feed, add_special_tokens=False).input_ids, dtype=torch.long)
            job.prompt_tokens = int(ids.numel())
            if ids.numel():
                solo.feed(ids, scores=False)
            if job.max_tokens == 0:
                self._done(job, solo.state_dict(), "", None, {"type": "done", "finish_reason": "fed", "text": ""})
                return
            if solo.next_logprobs is None:
                raise ValueError("nothing to continue: the session is empty and the request added no text")
            state = solo.state_dict(copy=False)
            if self._batch is None:
                self._batch = self._stream()
            self._batch.add_streams(state)
        finally:
            solo.close()
        gen = None if job.seed is None else torch.Generator().manual_seed(job.seed)
        self._rows.append(_Row(job, IncrementalDetokenizer(self.tokenizer), gen))

    def _step(self) -> None:
        t0 = time.perf_counter()
        eos = self.tokenizer.eos_token_id
        rows = zip(self._rows, self._batch._next, strict=True)
        tokens = [sample_token(logprobs, row.job.temperature, row.generator) for row, logprobs in rows]
        self._batch.feed([torch.tensor([t]) for t in tokens], scores=False)
        self.on_step(len(self._rows), time.perf_counter() - t0)
        leaving = []
        for i, (row, token) in enumerate(zip(self._rows, tokens, strict=True)):
            job = row.job
            job.completion_tokens += 1
            row.last_token = token
            piece = row.text.push(token)
            if piece:
                row.pieces.append(piece)
            text = "".join(row.pieces)
            cut = min((text.find(s) for s in job.stop if s and s in text), default=-1)
            if cut >= 0:
                row.finish, text = "stop", text[:cut]
            else:
                if token == eos:
                    row.finish = "stop"
                elif job.completion_tokens >= job.max_tokens:
                    row.finish = "length"
                if row.finish:
                    text += row.text.flush()
            if job.cancelled.is_set():
                row.finish = "cancelled"
            # a stop string may be arriving: hold back what could be its beginning
            hold = 0 if row.finish else max((len(s) - 1 for s in job.stop if s), default=0)
            ready = text[: max(row.sent, len(text) - hold)]
            if len(ready) > row.sent:
                job.emit({"type": "delta", "text": ready[row.sent :]})
                row.sent = len(ready)
            if row.finish:
                row.pieces = [text]
                leaving.append(i)
        if leaving:
            states = {i: self._batch.state_dict(rows=[i]) for i in leaving}
            keep = [i for i in range(len(self._rows)) if i not in states]
            for i in leaving:
                row = self._rows[i]
                self._finish(row, state=states[i])
            self._rows = [self._rows[i] for i in keep]
            if keep:
                self._batch.select_streams(keep)
            else:
                self._batch.close()
                self._batch = None

    def _finish(self, row: _Row, state: dict | None = None, error: Exception | None = None) -> None:
        job = row.job
        if error is not None or row.finish == "cancelled" or state is None:
            if job.session is not None:
                self.store.release(job.session)  # the session stays as before the request
            job.emit({"type": "error", "error": error or ConnectionAbortedError("cancelled")})
            return
        answer = row.pieces[0] if row.pieces else ""
        self._done(job, state, answer, row.last_token, {"type": "done", "finish_reason": row.finish, "text": answer})

    def _done(self, job: Job, state: dict, answer: str, last_token: int | None, event: dict) -> None:
        """Close the turn here (it may feed the template's end of turn: a forward), then hand the
        session to the writer thread, which acknowledges the request once its file is written."""
        try:
            done = self._close_turn(job, state, answer, last_token)
        except Exception as exc:
            if job.session is not None:
                self.store.release(job.session)
            job.emit({"type": "error", "error": exc})
            return
        self._writes.put((job, done, event))

    def _write_loop(self) -> None:
        """Commits sessions off the engine thread (a write and an fsync per request), in order."""
        while (item := self._writes.get()) is not None:
            job, done, event = item
            try:
                if job.session is not None:
                    self.store.release(job.session, commit=done)
            except Exception as exc:  # the reply cannot be made durable: do not acknowledge it
                job.emit({"type": "error", "error": exc})
                continue
            job.emit(event)

    def _close_turn(self, job: Job, state: dict, answer: str, last_token: int | None) -> Session | None:
        """The session after ``job`` (``state``: a copy, the stream after the reply): a chat turn
        is closed as the template closes it (its end-of-turn text fed)."""
        if job.session is None:
            return None
        session = job.session
        chat = ChatTurns(self.tokenizer, **session.chat)
        if job.new_messages is not None and job.max_tokens > 0:
            tail = chat.close(job.new_messages, answer, eos_fed=last_token == self.tokenizer.eos_token_id)
            if tail:
                solo = self._stream()
                try:
                    solo.load_state_dict(state)
                    solo.feed(tail, scores=False)
                    state = solo.state_dict()
                finally:
                    solo.close()
        nbytes = sum(_nbytes(layer["_extra_state"]["state"]) for layer in state["layers"])
        return Session(session.id, state, chat.to_dict(), _seen(state), nbytes)


def _seen(state: dict) -> int:
    """Tokens the (one) stream of a Stream state has seen (any engine's layout)."""

    def seen(raw: dict) -> int:
        if "seen" in raw:
            return int(raw["seen"][0])
        return seen(raw["local"]) if "local" in raw else seen(raw["parts"][0])

    return seen(state["layers"][0]["_extra_state"]["state"])


def _nbytes(raw: Any) -> int:
    if isinstance(raw, torch.Tensor):
        return raw.numel() * raw.element_size()
    if isinstance(raw, dict):
        return sum(_nbytes(v) for v in raw.values())
    if isinstance(raw, (list, tuple)):
        return sum(_nbytes(v) for v in raw)
    return 0
