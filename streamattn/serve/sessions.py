"""Sessions: endless streams kept by id, in memory (bounded, least recently used) and on disk.

A session is one stream's state (``Stream.state_dict(rows=[i])``: every layer's bounded cache and
the next-token distribution) plus the chat messages its template needs (``ChatTurns``: the first and
the last) and a few counters. With a state directory every committed session is also a file
``<id>.pt`` written atomically (``storage.save_atomic``), so a restarted server finds every session
as of its last completed request, and sessions beyond ``max_resident`` live only on disk until
asked for again. Without one, sessions live in memory only and ``max_sessions`` bounds them.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamattn.storage import load_mapped, save_atomic

SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_FORMAT = "streamattn.serve.Session/1"


class SessionError(ValueError):
    """A request about a session that cannot be served: ``status`` is the HTTP status to answer."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def check_session_id(session_id: Any) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise SessionError(
            f"session id must be 1-128 characters of letters, digits, '_', '-', '.', starting with a letter or "
            f"digit; got {session_id!r}",
            400,
            "invalid_session_id",
        )
    return session_id


@dataclass
class Session:
    id: str
    state: dict | None = None  # a one-stream Stream.state_dict; None: new (nothing fed yet)
    chat: dict = field(default_factory=lambda: {"first": None, "last": None})
    tokens: int = 0
    cache_bytes: int = 0

    def to_file(self) -> dict:
        return {
            "format": _FORMAT,
            "id": self.id,
            "state": self.state,
            "chat": self.chat,
            "tokens": self.tokens,
            "cache_bytes": self.cache_bytes,
        }

    @staticmethod
    def from_file(raw: Any, session_id: str) -> Session:
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT or raw.get("id") != session_id:
            raise SessionError(f"the file of session {session_id!r} is not a session file", 500, "corrupt_session")
        return Session(session_id, raw["state"], raw["chat"], int(raw["tokens"]), int(raw["cache_bytes"]))


class SessionStore:
    """Sessions by id: ``max_resident`` in memory (least recently used first out: to disk with a
    state directory, refused without one), ``max_sessions`` in all. One request at a time per
    session: ``acquire`` answers 409 while another holds it. Thread-safe."""

    def __init__(self, state_dir: Path | None, max_sessions: int = 1024, max_resident: int = 64) -> None:
        if state_dir is not None and not Path(state_dir).is_dir():
            raise ValueError(f"--state-dir {str(state_dir)!r} is not a directory")
        if max_sessions < 1 or max_resident < 1:
            raise ValueError("max_sessions and max_resident must be >= 1")
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.max_sessions, self.max_resident = max_sessions, max_resident
        self._resident: OrderedDict[str, Session] = OrderedDict()
        self._stamps: dict[str, tuple[int, int]] = {}  # (mtime_ns, size) of the file a resident copy matches
        self._busy: set[str] = set()
        self._locks: dict[str, int] = {}  # lock files of the sessions this process serves now
        if self.state_dir is not None:
            (self.state_dir / ".locks").mkdir(exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, session_id: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"{session_id}.pt"

    def _on_disk(self) -> set[str]:
        if self.state_dir is None:
            return set()
        return {p.stem for p in self.state_dir.glob("*.pt") if SESSION_ID.match(p.stem)}

    def resident(self) -> int:
        with self._lock:
            return len(self._resident)

    def _stamp(self, session_id: str) -> tuple[int, int] | None:
        try:
            st = self._path(session_id).stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _find(self, session_id: str) -> Session | None:
        if session_id in self._resident:
            # another process sharing the state directory (a replica) may have moved it on or deleted it
            if self.state_dir is None or self._stamp(session_id) == self._stamps.get(session_id):
                self._resident.move_to_end(session_id)
                return self._resident[session_id]
            del self._resident[session_id]
        if self.state_dir is not None and self._path(session_id).is_file():
            stamp = self._stamp(session_id)
            try:
                session = Session.from_file(load_mapped(self._path(session_id)), session_id)
            except ValueError as exc:
                raise SessionError(f"session {session_id!r} cannot be read: {exc}", 500, "corrupt_session") from None
            if stamp is not None:
                self._stamps[session_id] = stamp
            self._keep(session)
            return session
        return None

    def _keep(self, session: Session) -> None:
        self._resident[session.id] = session
        self._resident.move_to_end(session.id)
        while len(self._resident) > self.max_resident:
            victim = next((k for k in self._resident if k not in self._busy), None)
            if victim is None or self.state_dir is None:
                break  # without a state directory nothing is dropped (max_sessions bounds them)
            del self._resident[victim]  # its file holds it (written at every commit)
            self._stamps.pop(victim, None)

    def get(self, session_id: str) -> Session:
        """The session (loaded from disk if it is only there) or 404."""
        check_session_id(session_id)
        with self._lock:
            session = self._find(session_id)
        if session is None:
            raise SessionError(f"no session {session_id!r}", 404, "session_not_found")
        return session

    def acquire(self, session_id: str, create: bool = True) -> Session:
        """The session for one request (created when new and ``create``); 409 while another request
        holds it, in this process or in another sharing the state directory (a replica)."""
        check_session_id(session_id)
        with self._lock:
            if session_id in self._busy:
                raise SessionError(
                    f"session {session_id!r} is serving another request; retry when it is done", 409, "session_busy"
                )
            self._lock_file(session_id)
            try:
                session = self._find(session_id)
                if session is None and not create:
                    raise SessionError(f"no session {session_id!r}", 404, "session_not_found")
                if session is None and len(set(self._resident) | self._on_disk()) >= self.max_sessions:
                    raise SessionError(
                        f"the server holds its maximum of {self.max_sessions} sessions", 429, "too_many_sessions"
                    )
            except SessionError:
                self._unlock_file(session_id)
                raise
            self._busy.add(session_id)
            return session if session is not None else Session(session_id)

    def release(self, session: Session, commit: Session | None = None) -> None:
        """End a request: ``commit`` (the session after it) is written, atomically, before the
        session is released; without one the session stays as it was before the request."""
        try:
            if commit is not None:
                if self.state_dir is not None:
                    save_atomic(commit.to_file(), self._path(commit.id))
                with self._lock:
                    if self.state_dir is not None:
                        self._stamps[commit.id] = self._stamp(commit.id)
                    self._keep(commit)
        finally:
            with self._lock:
                self._busy.discard(session.id)
                self._unlock_file(session.id)

    def delete(self, session_id: str) -> None:
        check_session_id(session_id)
        with self._lock:
            if session_id in self._busy:
                raise SessionError(f"session {session_id!r} is serving a request", 409, "session_busy")
            self._lock_file(session_id)
            try:
                found = self._resident.pop(session_id, None) is not None
                self._stamps.pop(session_id, None)
                if self.state_dir is not None and self._path(session_id).is_file():
                    self._path(session_id).unlink()
                    found = True
            finally:
                self._unlock_file(session_id)
        if not found:
            raise SessionError(f"no session {session_id!r}", 404, "session_not_found")

    def _lock_file(self, session_id: str) -> None:
        """Hold ``.locks/<id>`` (``flock``: released by the kernel when the process dies) or 409."""
        if self.state_dir is None:
            return
        fd = os.open(self.state_dir / ".locks" / session_id, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SessionError(
                f"session {session_id!r} is serving another request (in another replica); retry when it is done",
                409,
                "session_busy",
            ) from None
        self._locks[session_id] = fd

    def _unlock_file(self, session_id: str) -> None:
        fd = self._locks.pop(session_id, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
