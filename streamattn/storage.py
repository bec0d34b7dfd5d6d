"""Files that hold streams: written atomically, read memory-mapped.

``save_atomic`` writes ``torch.save`` output to a temporary file in the target's directory, flushes
it to the disk (``fsync``), renames it over the target (atomic on POSIX) and syncs the directory, so
the path holds either the previous file or the complete new one, whatever happens in between
(an exception, ``kill -9``, a power cut): a stream is never left unreadable. Tensors are written
from the objects given, so a caller that passes its live buffers (``copy=False`` snapshots) saves a
stream of any size without a second copy in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (the old file or the new one, never a torn one)."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"cannot save a stream to {str(target)!r}: it is a directory")
    if not target.parent.is_dir():
        raise ValueError(f"cannot save a stream to {str(target)!r}: directory {str(target.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a crash
    finally:
        os.close(dir_fd)


def load_mapped(path: str | os.PathLike, device: torch.device | str = "cpu") -> Any:
    """``torch.load`` of a file written by ``save_atomic`` (plain data only: ``weights_only``), its
    tensors memory-mapped from the file rather than read into memory at once (then moved to
    ``device`` if it is not the CPU)."""
    target = Path(path)
    if not target.is_file():
        raise ValueError(f"no stream file at {str(target)!r}")
    try:
        return torch.load(target, map_location=device, weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError) as exc:  # not a torch file, or truncated by hand
        raise ValueError(f"{str(target)!r} is not a readable stream file: {exc}") from None


def publish_directory(target: Path, write: Callable[[Path], None], ready: str = "config.json") -> Path:
    """``write(staging)`` fills a fresh directory beside ``target``, which is then renamed to ``target``
    (atomic: a concurrent or interrupted run never sees half a directory; a concurrent winner's copy
    is kept). ``ready``: a file that only a complete directory holds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        write(staging)
        staging.rename(target)
    except OSError:
        if not (target / ready).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
