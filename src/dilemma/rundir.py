"""A run folder and the checkpoints in it: the one place that knows the layout.

    RUN/config.yaml             the resolved config
    RUN/provenance.jsonl        one line per start or resume: command, versions, git commit, device
    RUN/.lock                   held by the one process writing the run (its pid inside)
    RUN/metrics.jsonl           one JSON object per logged step, and a last one with the results
    RUN/checkpoints/step_*.pt   the newest ``train.keep_checkpoints`` checkpoints
    RUN/checkpoints/last.pt     the newest one (a hard link when the file system allows)
    RUN/checkpoints/progress_0250.pt   with ``train.snapshot_every``: kept at 25 % of training, ...

Checkpoints are written atomically (temp file, fsync, rename) and loaded safely
(``weights_only=True``: a checkpoint is untrusted input). A checkpoint is a dict of tensors and
plain Python values: ``format``, ``config`` (the resolved config as a dict), ``step``, ``epoch``,
``elapsed`` (training seconds: with the step, the position of every schedule),
``nonfinite_skips``, ``model`` (the method's state dict: student, teacher / momentum encoder,
heads, buffers such as DINO's centre), ``optimizer``, ``scaler``, ``probe`` (the online probe and
its optimiser) and ``rng`` (``train.seeding.rng_state``; the data order is a function of seed and step).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
import zipfile
from pathlib import Path

import torch
import yaml

from dilemma.config import safe_yaml
from dilemma.errors import DilemmaError
from dilemma.files import Locked, take_lock, written_whole
from dilemma.redact import redacted

FORMAT = "dilemma-checkpoint-v1"
LAST = "last.pt"
LOCK = ".lock"  # held (flock) by the process writing the run


class RunDir:
    """Paths inside one run folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self.path / "config.yaml"
        self.provenance = self.path / "provenance.jsonl"
        self.metrics = self.path / "metrics.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.last = self.checkpoints / LAST
        self._lock_fd: int | None = None

    def record_provenance(self, record: dict) -> None:
        """Append one line (a single ``write`` of a whole line: a reader skips a torn last line)."""
        try:
            with open(self.provenance, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise DilemmaError(f"cannot write {str(self.provenance)!r}: {err}") from None

    def holds_run(self) -> bool:
        return self.checkpoints.exists()

    def holds_checkpoint(self) -> bool:
        """Whether there is a checkpoint to resume (``last.pt`` or a ``step_*.pt``)."""
        return self.last.exists() or any(self.checkpoints.glob("step_*.pt"))

    def run_id(self) -> str | None:
        """The id this folder's run was started with (the first line of ``provenance.jsonl`` that
        has one; None for a folder without, e.g. of an older version)."""
        try:
            lines = self.provenance.read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in lines:
            try:
                run_id = json.loads(line).get("run_id")
            except (json.JSONDecodeError, AttributeError):  # a torn line
                continue
            if isinstance(run_id, str):
                return run_id
        return None

    def check_owns(self, ckpt: dict, frozen: tuple[str, ...]) -> None:
        """Refuse to resume from a checkpoint of another run (copied or moved into this folder)
        before anything here is written: its run id, or where either has none its config's
        ``frozen`` sections, must be this folder's."""
        mine, theirs = self.run_id(), ckpt.get("run_id")
        if mine and theirs:
            if mine != theirs:
                raise DilemmaError(
                    f"{str(self.last)!r} belongs to another run (run id {theirs}; this folder's is {mine}): "
                    "resume that run in its own folder, or start a new one"
                )
            return
        try:
            own = safe_yaml(self.config.read_text(), str(self.config)) if self.config.is_file() else None
        except (OSError, yaml.YAMLError, DilemmaError):
            own = None
        if isinstance(own, dict):
            differ = [s for s in frozen if own.get(s) != ckpt.get("config", {}).get(s)]
            if differ:
                raise DilemmaError(
                    f"{str(self.last)!r} does not belong to the run in {str(self.path)!r} (its config differs "
                    f"in {', '.join(differ)}): resume that run in its own folder, or start a new one"
                )

    def resume_checkpoint(self) -> tuple[Path, dict, str | None]:
        """The newest readable checkpoint ``--resume`` continues from, and a note when it is not
        ``last.pt`` (a hard link to the newest step file, or a copy written after it): when
        ``last.pt`` is missing or damaged (a torn write), or holds an earlier step than the newest
        step file (a kill between writing that file and linking it), the newest ``step_*.pt`` that
        loads. The caller says the note once the checkpoint is known to be this run's."""
        steps = sorted(self.checkpoints.glob("step_*.pt"), reverse=True)
        problems = []
        for path in [self.last, *steps]:
            if not path.exists():
                continue
            try:
                ckpt = load_checkpoint(path)
            except DilemmaError as err:
                problems.append(str(err))
                continue
            newer = [p for p in steps if step_in_name(p) > ckpt["step"]] if path == self.last else []
            if newer:
                later = self._newest_loading(newer)
                if later is not None:
                    name = later[0].name
                    why = f"{LAST} holds step {ckpt['step']}: the run stopped between writing {name} and linking it"
                    return later[0], later[1], f"note: resuming from {name} ({why})"
            if path != self.last or problems:
                why = "; ".join(problems) if problems else f"{LAST} is missing"
                return path, ckpt, f"note: resuming from {path.name} ({why})"
            return path, ckpt, None
        if problems:
            raise DilemmaError(f"--resume: no readable checkpoint in {str(self.checkpoints)!r} ({problems[0]})")
        raise DilemmaError(
            f"--resume: no checkpoint in {str(self.path)!r} (expected checkpoints/last.pt); "
            "start without --resume or point --out at an earlier run"
        )

    @staticmethod
    def _newest_loading(paths: list[Path]) -> tuple[Path, dict] | None:
        for path in paths:
            try:
                return path, load_checkpoint(path)
            except DilemmaError:
                continue
        return None

    def create(self) -> None:
        """Make the folder for a new run and take its lock, refusing one that already holds a run.
        Files of an earlier start that never checkpointed are moved aside (said in one line), so a
        new run never appends to them."""
        if self.checkpoints.exists():
            self.lock()  # a run still writing here is named as such (not "add --resume")
            self.unlock()
            raise DilemmaError(
                f"{str(self.path)!r} already holds a run: add --resume to continue it, or choose another --out"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise DilemmaError(f"cannot write to output folder {str(self.path)!r}: {err}") from None
        self.lock()
        earlier = (
            self.metrics,
            self.config,
            self.provenance,
            *(self.path / n for n in ("tensorboard", "trackers.json", "wandb")),
        )
        leftovers = [p for p in earlier if p.exists()]
        if leftovers and not self.checkpoints.exists():
            aside = self.path / f"unfinished-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
            aside.mkdir()
            for p in leftovers:
                p.rename(aside / p.name)
            print(
                f"note: an earlier start in {self.path} left no checkpoint; its files moved to {aside}", file=sys.stderr
            )

    def lock(self) -> None:
        """Hold the folder's lock while this process runs (the OS releases it when the process dies,
        so a killed run leaves no stale lock); a second writer is refused, with the holder's pid."""
        if self._lock_fd is not None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_fd = take_lock(self.path / LOCK)
        except OSError as err:
            raise DilemmaError(f"cannot write to run folder {str(self.path)!r}: {err.strerror or err}") from None
        except Locked as held:
            raise DilemmaError(
                f"{str(self.path)!r} is in use by another dilemma process (pid {held.holder}): one writer per run "
                "folder. Choose another --out, or wait for that run to end"
            ) from None

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def provenance(device, processes: int) -> dict:
    """Where a number came from: the command, library versions, the git commit of this package's
    checkout (when it runs from one), the machine, device and process count."""
    import platform
    import subprocess
    from importlib import metadata

    import timm
    import torchvision

    try:
        version = metadata.version("dilemma")
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        version = "not installed"
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": redacted(sys.argv),
        "versions": {
            "dilemma": version,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "cuda": torch.version.cuda,
        },
        "host": platform.node(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if torch.device(device).type == "cuda"
        else platform.processor(),
        "processes": processes,
    }
    source = Path(__file__).resolve().parent
    try:
        git = ["git", "-C", str(source)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if commit.returncode == 0:
            dirty = subprocess.run(
                [*git, "status", "--porcelain", "--", "."], capture_output=True, text=True, timeout=5
            )
            record["git"] = {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout
    return record


def step_in_name(path: Path) -> int:
    """The step in a ``step_0000100.pt`` name (-1 for another name)."""
    digits = path.stem.removeprefix("step_")
    return int(digits) if path.name.startswith("step_") and path.suffix == ".pt" and digits.isdigit() else -1


def checkpoint_file(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's last checkpoint (``RUN/checkpoints/last.pt``, or ``RUN/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        return run.last if run.last.exists() else path / LAST
    return path


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` written whole (``files.written_whole``), and the rename made durable."""
    path = Path(path)
    try:
        with written_whole(path) as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as err:
        # torch's zip writer reports a short write on a full disk as a RuntimeError ("inline_container")
        if isinstance(err, RuntimeError) and not any(m in str(err) for m in ("inline_container", "StreamWriter")):
            raise
        reason = str(err).splitlines()[0] if isinstance(err, OSError) else "the file could not be written (disk full?)"
        raise DilemmaError(
            f"could not write checkpoint {str(path)!r}: {reason}; the previous checkpoint is intact"
        ) from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    """Load a dilemma checkpoint (a file or a run folder) with ``weights_only=True``; clear errors for anything else."""
    path = checkpoint_file(path)
    if not path.is_file():
        raise DilemmaError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise DilemmaError(f"{str(path)!r} is not a readable checkpoint: not a PyTorch file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next(
            (line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line), lines[0]
        )
        raise DilemmaError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors and plain values, "
            f"which could run code ({detail})"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse means "not a checkpoint"
        raise DilemmaError(f"{str(path)!r} is not a readable checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DilemmaError(f"{str(path)!r} is not a dilemma checkpoint (expected format {FORMAT})")
    shapes = {"config": dict, "model": dict, "step": int}
    wrong = [key for key, kind in shapes.items() if not isinstance(ckpt.get(key), kind)]
    wrong += [f"config.{k}" for k, v in ckpt.get("config", {}).items() if not isinstance(v, dict)] if not wrong else []
    if wrong:
        raise DilemmaError(
            f"{str(path)!r} is not a whole dilemma checkpoint (missing or malformed: {', '.join(wrong)})"
        )
    return ckpt


def _linked(source: Path, path: Path) -> bool:
    """Make ``path`` a hard link to ``source``, atomically (a reader sees the old file or the new);
    False where the file system has no hard links or ``source`` is gone."""
    tmp = path.with_name(f".{path.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        return False
    return True


class CheckpointDir:
    """``RUN/checkpoints/``: ``step_0000100.pt`` files (the newest ``keep`` kept) and ``last.pt``."""

    def __init__(self, run_dir: str | Path, keep: int):
        self.dir = RunDir(run_dir).checkpoints
        self.keep = keep
        self.saved: tuple[int, Path] | None = None  # (step, file) of the last save() here
        if self.dir.is_dir():  # temp files of a write that was killed: never a checkpoint, remove them
            for stale in [*self.dir.glob(".*.tmp-*"), *self.dir.glob(".*.link-*")]:
                stale.unlink(missing_ok=True)

    @property
    def last(self) -> Path:
        return self.dir / LAST

    def save(self, state: dict, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:07d}.pt"
        atomic_save(state, path)
        self.saved = (step, path)
        if not _linked(path, self.last):  # last.pt: no second copy on disk where links work
            atomic_save(state, self.last)
        for old in sorted(self.dir.glob("step_*.pt"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path

    def snapshot_path(self, fraction: float) -> Path:
        return self.dir / f"progress_{round(fraction * 1000):04d}.pt"

    def save_snapshots(self, state: dict, step: int, fractions: list[float]) -> None:
        """Checkpoints kept at these fractions of training (never rotated): points of a read-out
        curve. All hold the state at ``step``, so one file is written and the others are hard links
        to it (or to the step file this object just wrote at that step); copies where links fail."""
        self.dir.mkdir(parents=True, exist_ok=True)
        source = self.saved[1] if self.saved and self.saved[0] == step else None
        for fraction in fractions:
            path = self.snapshot_path(fraction)
            if source is None or not _linked(source, path):
                atomic_save(state, path)
                source = path

    def snapshots(self) -> list[Path]:
        return sorted(self.dir.glob("progress_*.pt"))
