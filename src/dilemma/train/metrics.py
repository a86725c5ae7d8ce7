"""Where a run's numbers go: ``metrics.jsonl`` (one JSON object per logged step), and the same
numbers to the trackers of ``train.loggers`` (``trackers.py``: TensorBoard, W&B, MLflow)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from dilemma.errors import DilemmaError
from dilemma.files import atomic_write_text
from dilemma.train.trackers import Trackers


def read_records(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``. A torn last line (a write cut by a crash or a full disk)
    is dropped with one warning; a bad line before the last is an error (the file was edited)."""
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise DilemmaError(f"{path}:{number} is not a JSON line (was the file edited?)") from None
            print(f"warning: {path}: dropped a torn last line (a write was cut short)", file=sys.stderr)
    return records


def as_json(record: dict) -> dict:
    """Tensors to numbers, non-finite floats to null."""
    out = {}
    for key, value in record.items():
        value = value.item() if isinstance(value, torch.Tensor) else value
        out[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


class MetricsLog:
    """``metrics.jsonl`` (rank 0 only: ``enabled``) and the run's ``trackers``, fed the same records."""

    def __init__(self, out_dir: Path, enabled: bool = True, trackers: Trackers | None = None):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = trackers if trackers is not None and enabled else Trackers(out_dir, [], None, enabled=False)

    def last_step(self) -> int:
        """The last step logged (-1 for none): a resumed run's trackers hold every step up to it."""
        if not (self.enabled and self.path.exists()):
            return -1
        return max((r.get("step", -1) for r in read_records(self.path)), default=-1)

    def truncate_after(self, step: int) -> tuple[int, list[dict]]:
        """Drop records of steps after ``step`` (a resumed run logs them again). Returns the last step
        logged before (what the trackers were sent) and the records kept."""
        if not (self.enabled and self.path.exists()):
            return -1, []
        records = read_records(self.path)
        kept = [r for r in records if r.get("step", 0) <= step and "stopped_by" not in r]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return max((r.get("step", -1) for r in records), default=-1), kept

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        record = as_json(record)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:  # a full disk, a folder made read-only under the run
            raise DilemmaError(
                f"cannot append to {str(self.path)!r}: {err.strerror or err}. The last checkpoint is intact: "
                "free space and continue with --resume"
            ) from None
        self.trackers.scalars(record)

    def picture(self, path: Path, step: int) -> None:
        """A picture made for this run, to the trackers."""
        if self.enabled:
            self.trackers.image(path, step)

    def close(self, status: str = "FINISHED") -> None:
        """End the trackers' runs (FINISHED, FAILED or KILLED); a second close does nothing."""
        self.trackers.finish(status)
