"""Restarts that continue by themselves, and exactly: ``--resume auto``, a worker killed under
``torchrun --max-restarts``, a restart on 1, 2 or 4 processes, two local nodes.

The promise tested: after a restart, whatever the process count (same global batch), the run takes
the steps an uninterrupted run takes. On the same processes that is bit for bit. Across process
counts the processes differ only in the order of float sums (the gradient all-reduce): the first
step after a start or restart agrees to ``FIRST_RTOL`` (one step from the same state: round-off),
later ones to ``RTOL``, as Adam's first steps amplify round-off in near-zero gradients (measured:
1e-7 at step 1, 2e-5 to 6e-4 at step 8). An image, a token draw or an lr out of place moves a loss
by ~1e-2 at once (a loss logged from one process's half of the batch was 3e-2 off at step 1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dilemma.cli import main
from tests.conftest import TINY

FIRST_RTOL, RTOL = 1e-5, 2e-3
STEPS = 8
SETS = [*TINY, "data.batch_size=16", "eval.knn_at_end=false", "train.ckpt_every=4", "train.keep_checkpoints=20"]


def _args(out: Path, steps: int = STEPS, *extra: str) -> list[str]:
    sets = [arg for kv in [*SETS, *extra] for arg in ("--set", kv)]
    return ["pretrain", "--device", "cpu", "--max-steps", str(steps), "--out", str(out), *sets]


def _losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _torchrun(*launcher: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "dilemma.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same_steps(run: Path, reference: dict[int, float], after: int = 0) -> None:
    got = _losses(run)
    assert sorted(got) == sorted(reference), sorted(got)
    for step, loss in reference.items():
        if step > after:
            tolerance = FIRST_RTOL if step == after + 1 else RTOL
            assert got[step] == pytest.approx(loss, rel=tolerance), (step, got[step], loss)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """An uninterrupted run of one process: its folder and its losses by step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(_args(out)) == 0
    return out, _losses(out)


def _stopped_at_4(reference: Path, where: Path) -> Path:
    """The reference run's folder as it was when a kill stopped it after its step-4 checkpoint
    (the steps logged after it are dropped by the resume)."""
    shutil.copytree(reference, where)
    ckpts = where / "checkpoints"
    for later in [p for p in ckpts.iterdir() if p.name != "step_0000004.pt"]:
        later.unlink()
    shutil.copy(ckpts / "step_0000004.pt", ckpts / "last.pt")
    return where


def test_resume_auto_starts_a_new_run_then_continues_it_and_refuses_another(tmp_path, capsys, reference):
    out = tmp_path / "run"
    assert main(_args(out, 4, "train.ckpt_every=2") + ["--resume", "auto"]) == 0  # nothing there: a new run
    assert main(_args(out, STEPS) + ["--resume", "auto"]) == 0  # a checkpoint there: continued to STEPS
    assert "run folder:" in capsys.readouterr().err
    assert sorted(_losses(out)) == list(range(1, STEPS + 1))
    provenance = [json.loads(line) for line in (out / "provenance.jsonl").read_text().splitlines()]
    assert [p["resumed_at_step"] for p in provenance] == [0, 4]
    assert main(_args(out, STEPS, "model.depth=1") + ["--resume", "auto"]) == 2  # another run's checkpoint
    assert "cannot resume: the checkpoint was made with another model" in capsys.readouterr().err


def test_a_kill_between_writing_a_checkpoint_and_linking_last_resumes_from_the_newer_one(tmp_path, reference, capsys):
    """The step file is written (atomically), then last.pt linked to it: a kill in between leaves
    last.pt on the previous checkpoint. Resuming continues from the newest one, and says so."""
    folder, _ = reference
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    ckpts = run / "checkpoints"
    os.link(ckpts / "step_0000004.pt", ckpts / ".last")  # last.pt still the step-4 file, as when it was linked
    os.replace(ckpts / ".last", ckpts / "last.pt")
    assert main(_args(run) + ["--resume", "auto"]) == 0
    resumed = [json.loads(line)["resumed_at_step"] for line in (run / "provenance.jsonl").read_text().splitlines()]
    assert resumed[-1] == STEPS
    assert (
        "note: resuming from step_0000008.pt (last.pt holds step 4: the run stopped between" in capsys.readouterr().err
    )


def test_checkpoint_every_minutes_bounds_the_work_a_failure_loses(tmp_path):
    out = tmp_path / "run"
    assert main(_args(out, 5, "train.ckpt_every=1000", "train.checkpoint_every_minutes=0.000001")) == 0
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.pt")) == [
        f"step_000000{i}.pt" for i in range(1, 6)
    ]


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_a_restart_on_any_process_count_takes_the_steps_of_an_uninterrupted_run(tmp_path, reference, processes):
    folder, losses = reference
    run = _stopped_at_4(folder, tmp_path / "run")
    args = _args(run) + ["--resume", "auto"]
    if processes == 1:
        assert main(args) == 0
    else:
        launcher = ["--standalone", f"--nproc_per_node={processes}"]
        proc = subprocess.run(_torchrun(*launcher) + args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"{processes} process(es)" in proc.stderr
    _same_steps(run, losses, after=4)


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_continues_exactly(tmp_path):
    """torchrun --max-restarts=1, 2 processes: rank 0 is SIGKILLed once a checkpoint exists; the
    agent restarts the group, --resume auto continues from the last checkpoint, and every step's
    loss equals, to the last bit, that of the same 2 processes run without a kill."""
    steps, launcher = 24, ["--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    done = subprocess.run(_torchrun(*launcher) + _args(straight, steps), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    proc = subprocess.Popen(
        _torchrun(*launcher) + _args(run, steps) + ["--resume", "auto"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while not (run / "checkpoints" / "step_0000008.pt").exists():
            assert proc.poll() is None and time.time() < deadline, "the run ended before its step-8 checkpoint"
            time.sleep(0.01)
        rank0 = int((run / ".lock").read_text().split()[0])
        os.kill(rank0, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    resumed = [json.loads(line)["resumed_at_step"] for line in (run / "provenance.jsonl").read_text().splitlines()]
    assert resumed[0] == 0 and len(resumed) == 2 and 8 <= resumed[1] < steps, resumed
    assert _losses(run) == _losses(straight)


def test_two_local_nodes_take_the_steps_of_one_process(tmp_path, reference):
    """Two torchrun agents, one process each, meeting through c10d rendezvous on localhost."""
    _, losses = reference
    run = tmp_path / "run"
    port = _free_port()
    launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                "--rdzv-id=two-nodes"]  # fmt: skip
    nodes = [
        subprocess.Popen(_torchrun(*launcher) + _args(run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    try:
        errors = [node.communicate(timeout=300)[1] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], [e[-2000:] for e in errors]
    assert sum(e.count("run folder:") for e in errors) == 1 and "2 process(es)" in "".join(errors)
    _same_steps(run, losses)
