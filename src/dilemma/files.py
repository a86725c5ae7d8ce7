"""Files written whole: a crash or a full disk leaves the old version or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import IO, Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

from dilemma.errors import DilemmaError


@contextlib.contextmanager
def written_whole(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A temp file beside ``path`` to write into; when the block ends it is flushed, fsynced and
    renamed over ``path``. On an error it is removed (a failing removal, e.g. in a read-only
    folder, never hides the first error) and the error is raised as it came; an interrupt leaves
    it, as a kill would (run folders remove such leftovers when they open)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # one per writing thread
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """``text`` written whole to ``path``; one clear error when the disk is full or the folder read-only."""
    try:
        with written_whole(path, "w") as f:
            f.write(text)
    except OSError as err:
        raise DilemmaError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    return Path(path)


class Locked(Exception):
    """Another process holds the lock; ``holder`` is the pid it wrote (or "unknown")."""

    def __init__(self, holder: str):
        super().__init__(f"locked by pid {holder}")
        self.holder = holder


def take_lock(path: str | Path, exclusive: bool = True) -> int | None:
    """An advisory lock (``flock``) on ``path``, which the OS releases when the process dies (no
    stale locks after a kill). Exclusive: held on the returned descriptor, with this pid written
    into the file; shared: only a check that no one holds it exclusively (None returned). Raises
    ``Locked`` when another process holds it, ``OSError`` when the file cannot be opened; None
    where the platform has no ``flock``."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if exclusive else os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise Locked(holder) from None
    if not exclusive:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
