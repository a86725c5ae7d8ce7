"""Checkpoints are atomic and loaded safely (docs/method.md, defect 6)."""

import re
from pathlib import Path

import pytest
import torch

from dilemma.errors import DilemmaError
from dilemma.rundir import FORMAT, CheckpointDir, atomic_save, load_checkpoint


class Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/dilemma-pwned"),))


def test_no_bare_torch_load_in_package():
    src = Path(__file__).parents[1] / "src"
    for path in src.rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "payload": Evil()}, path)
    Path("/tmp/dilemma-pwned").unlink(missing_ok=True)
    with pytest.raises(DilemmaError, match="refusing to load"):
        load_checkpoint(path)
    assert not Path("/tmp/dilemma-pwned").exists()


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"hello")
    with pytest.raises(DilemmaError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "x.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "y.pt")
    with pytest.raises(DilemmaError, match="not a dilemma checkpoint"):
        load_checkpoint(tmp_path / "y.pt")
    with pytest.raises(DilemmaError, match="does not exist"):
        load_checkpoint(tmp_path / "z.pt")


def test_atomic_save_keeps_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_save({"format": FORMAT, "config": {}, "model": {}, "step": 1}, path)

    def broken(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(DilemmaError, match="No space left"):
        atomic_save({"format": FORMAT, "config": {}, "model": {}, "step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


def test_checkpoint_dir_keeps_last_k(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep=2)
    for step in (1, 2, 3):
        ckpts.save({"format": FORMAT, "config": {}, "model": {}, "step": step}, step)
    assert sorted(p.name for p in ckpts.dir.glob("step_*.pt")) == ["step_0000002.pt", "step_0000003.pt"]
    assert load_checkpoint(ckpts.last)["step"] == 3
    assert load_checkpoint(tmp_path)["step"] == 3  # a run folder resolves to its last checkpoint


def test_snapshots_at_one_step_share_one_file(tmp_path):
    """A short run crosses several snapshot fractions in one step: one file on disk (hard links),
    shared with the step file written at that step, and a later step gets its own file."""
    ckpts = CheckpointDir(tmp_path, keep=2)
    state = {"format": FORMAT, "config": {}, "model": {"w": torch.zeros(1000)}, "step": 1}
    ckpts.save(state, 1)
    ckpts.save_snapshots(state, 1, [0.1, 0.2, 0.3])
    ckpts.save_snapshots({**state, "step": 2}, 2, [0.5, 0.6])  # no step file at step 2
    inodes = {p.name: p.stat().st_ino for p in ckpts.dir.iterdir()}
    at_step_1 = ("step_0000001.pt", "progress_0100.pt", "progress_0200.pt", "progress_0300.pt")
    assert len({inodes[n] for n in at_step_1}) == 1
    assert inodes["progress_0500.pt"] == inodes["progress_0600.pt"] != inodes["step_0000001.pt"]
    assert [load_checkpoint(p)["step"] for p in ckpts.snapshots()] == [1, 1, 1, 2, 2]
    ckpts.save({**state, "step": 3}, 3)
    ckpts.save({**state, "step": 4}, 4)  # rotation unlinks step 1: its snapshots stay whole
    assert [load_checkpoint(p)["step"] for p in ckpts.snapshots()] == [1, 1, 1, 2, 2]


def test_rng_state_holds_only_dtypes_every_supported_torch_can_save():
    """numpy's keys are uint32, which torch.save handles only from torch 2.6 on: they are stored as
    int64 and restored exactly."""
    import numpy as np

    from dilemma.train.seeding import rng_state, set_rng_state

    generator = torch.Generator().manual_seed(3)
    np.random.seed(5)
    state = rng_state(generator)
    assert state["numpy"][1].dtype == torch.int64
    expected = np.random.random_sample(4)
    np.random.seed(6)
    set_rng_state(state, generator)
    assert np.array_equal(np.random.random_sample(4), expected)


def test_a_run_links_a_snapshot_to_the_step_file_saved_at_that_step(tmp_path):
    """In a real run the snapshot at a step that also saved a step file is that file (one CheckpointDir
    for the run, which remembers what it saved)."""
    from dilemma.cli import main
    from tests.conftest import TINY

    out = tmp_path / "r"
    extra = ["train.ckpt_every=1", "train.snapshot_every=0.5", "eval.knn_at_end=false"]
    assert (
        main(["pretrain", "--out", str(out), "--max-steps", "2", *[a for kv in [*TINY, *extra] for a in ("--set", kv)]])
        == 0
    )
    ckpts = out / "checkpoints"
    assert (ckpts / "progress_0500.pt").stat().st_ino == (ckpts / "step_0000001.pt").stat().st_ino
    assert load_checkpoint(ckpts / "progress_0500.pt")["step"] == 1
