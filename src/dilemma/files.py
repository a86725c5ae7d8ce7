"""Files written whole: a crash or a full disk leaves the old version or the new one, never half."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import IO, Iterator

from dilemma.errors import DilemmaError


@contextlib.contextmanager
def written_whole(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """A temp file beside ``path`` to write into; when the block ends it is flushed, fsynced and
    renamed over ``path``. On an error it is removed (a failing removal, e.g. in a read-only
    folder, never hides the first error) and the error is raised as it came; an interrupt leaves
    it, as a kill would (run folders remove such leftovers when they open)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
