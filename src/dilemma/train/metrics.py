"""Where a run's numbers go: ``metrics.jsonl`` (one JSON object per logged step) and, when the
``tensorboard`` package is installed, TensorBoard scalars in ``RUN_DIR/tensorboard``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from dilemma.errors import DilemmaError
from dilemma.files import atomic_write_text


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
    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: pip install 'dilemma[tensorboard]'
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tensorboard = SummaryWriter(str(Path(out_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (a resumed run logs them again)."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [r for r in read_records(self.path) if r.get("step", 0) <= step and "stopped_by" not in r]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

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
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
