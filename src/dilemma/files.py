"""Files written whole: a crash or a full disk leaves the old version or the new one, never half."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dilemma.errors import DilemmaError


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path``, fsync, rename over ``path``; one clear error
    (with the temp file removed) when the disk is full or the folder read-only."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DilemmaError(f"cannot write {str(path)!r}: {err.strerror or err}") from None
    return path
