"""Checkpoints: written atomically, loaded safely (``weights_only=True``: a checkpoint is untrusted).

A checkpoint is a dict of tensors and plain Python values: ``format``, ``config`` (the resolved
config as a dict), ``step``, ``epoch``, ``elapsed`` (training seconds: with the step, the
position of every schedule), ``nonfinite_skips``, ``model`` (the method's state dict: student,
teacher / momentum encoder, heads, buffers such as DINO's centre), ``optimizer``, ``probe`` (the
online probe and its optimiser) and ``rng`` (python, numpy, torch, CUDA and token-sampler states;
the data order is a function of seed and step).
"""

from __future__ import annotations

import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch

from dilemma.errors import DilemmaError

FORMAT = "dilemma-checkpoint-v1"
LAST = "last.pt"


def atomic_save(obj, path: Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DilemmaError(f"could not write checkpoint {str(path)!r}: {err}; the previous checkpoint is intact") from None
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path) -> dict:
    """Load a dilemma checkpoint with ``weights_only=True``; clear errors for anything else."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / LAST if (path / "checkpoints" / LAST).exists() else path / LAST
    if not path.is_file():
        raise DilemmaError(f"checkpoint {str(path)!r} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since PyTorch 1.6
        raise DilemmaError(f"{str(path)!r} is not a readable checkpoint: not a PyTorch file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = next((line for line in lines if "Unsupported global" in line or "WeightsUnpickler error" in line), lines[0])
        raise DilemmaError(f"refusing to load {str(path)!r}: it holds objects other than tensors and plain values, "
                           f"which could run code ({detail})") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse means "not a checkpoint"
        raise DilemmaError(f"{str(path)!r} is not a readable checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise DilemmaError(f"{str(path)!r} is not a dilemma checkpoint (expected format {FORMAT})")
    return ckpt


def rng_state(generator: torch.Generator) -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],  # this process's GPU
        "tokens": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])
    generator.set_state(state["tokens"])


class CheckpointDir:
    """``run/checkpoints/``: ``step_000100.pt`` files (the newest ``keep`` kept) and ``last.pt``."""

    def __init__(self, run_dir: Path, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep
        if self.dir.is_dir():  # temp files of a write that was killed: never a checkpoint, remove them
            for stale in [*self.dir.glob(".*.tmp-*"), *self.dir.glob(f".{LAST}.link-*")]:
                stale.unlink(missing_ok=True)

    @property
    def last(self) -> Path:
        return self.dir / LAST

    def save(self, state: dict, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"step_{step:07d}.pt"
        atomic_save(state, path)
        # last.pt: a hard link when possible (no second copy on disk), else a copy; both atomic.
        tmp = self.dir / f".{LAST}.link-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
            os.replace(tmp, self.last)
        except OSError:
            atomic_save(state, self.last)
        for old in sorted(self.dir.glob("step_*.pt"))[: -self.keep]:
            old.unlink(missing_ok=True)
        return path
