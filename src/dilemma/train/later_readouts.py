"""Read-outs made after a run (``dilemma eval ... --checkpoint RUN``, ``dilemma compare``) sent to
the run's own tracker runs, at the evaluated checkpoint's step (``train/trackers.py`` reopens them)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from dilemma.config import TrackingConfig, safe_yaml
from dilemma.errors import DilemmaError
from dilemma.redact import redact
from dilemma.rundir import RunDir, load_checkpoint, step_in_name
from dilemma.train.metrics import MetricsLog
from dilemma.train.trackers import STATE_FILE, Trackers, numbers


def run_folder(path: str | Path) -> Path | None:
    """The run folder of a ``--checkpoint`` (the folder, or ``RUN/checkpoints/x.pt``) that tracks, or None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else None
    return folder if folder is not None and (folder / STATE_FILE).is_file() else None


def _tracking_of(folder: Path) -> tuple[list[str], TrackingConfig]:
    """``train.loggers`` and ``train.tracking`` of a run's ``config.yaml`` (nothing else is read)."""
    train = safe_yaml((folder / "config.yaml").read_text(), str(folder / "config.yaml"))["train"]
    known = {f.name for f in dataclasses.fields(TrackingConfig)}
    tracking = TrackingConfig(**{k: v for k, v in (train.get("tracking") or {}).items() if k in known})
    return list(train.get("loggers") or []), tracking


def _step_of(path: Path, folder: Path) -> int:
    """The step a checkpoint was taken at, from its name (``step_0000120.pt``), else the run's last."""
    if not path.is_file() or path.name == "last.pt":
        return max(MetricsLog(folder).last_step(), 0)
    step = step_in_name(path)
    return step if step >= 0 else int(load_checkpoint(path)["step"])  # a snapshot (progress_XXXX.pt): read it


def log_to_run(
    path: str | Path, values: dict, pictures: list[Path] = (), prefix: str = "eval/", step: int | None = None
) -> None:
    """Read-outs and pictures made later for a run go to the same tracker runs (when it tracks):
    numbers as ``eval/<name>`` at the evaluated checkpoint's step (``step``, where the caller has
    read it already), pictures as images. Never fails: a warning at most; skipped while the run is
    still training (its process is the folder's writer)."""
    folder = run_folder(path)
    if folder is None:
        return
    run = RunDir(folder)
    try:
        run.lock()
    except DilemmaError as err:  # still training (its process holds the folder), or not writable
        print(f"note: this read-out is not sent to the trackers of {folder}: {redact(str(err))}", file=sys.stderr)
        return
    try:
        trackers = Trackers(folder, *_tracking_of(folder))
        step = _step_of(Path(path), folder) if step is None else step
        trackers.reopen()
        trackers.readouts({f"{prefix}{k}": v for k, v in numbers(values).items()}, step)
        for picture in pictures:
            trackers.image(picture, step)
        trackers.finish()
    except Exception as err:  # an old or damaged run folder: the read-out itself stands
        print(f"warning: could not log to the trackers of {folder}: {redact(str(err))}", file=sys.stderr)
    finally:
        run.unlock()
