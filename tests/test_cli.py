"""The command line end to end: a short run with kNN, eval, resume, and clear errors for bad input."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dilemma.cli import main
from dilemma.methods import METHODS
from dilemma.rundir import load_checkpoint
from tests.conftest import TINY


def _sets(*extra):
    return [arg for kv in [*TINY, *extra] for arg in ("--set", kv)]


def test_pretrain_smoke_then_eval_knn(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "3", *_sets()]) == 0
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "k=20, T=0.07" in printed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[:3]] == [1, 2, 3]
    assert {"loss", "det_bce", "det_entropy", "det_auroc", "lr"} <= set(records[0])
    assert 0 <= records[-1]["knn_top1"] <= 100 and "k=20" in records[-1]["knn_protocol"]
    assert (out / "config.yaml").exists() and (out / "checkpoints" / "last.pt").exists()

    result = tmp_path / "knn.json"
    assert main(["eval", "knn", "--checkpoint", str(out), "--json", str(result)]) == 0
    printed = capsys.readouterr().out
    top1 = json.loads(result.read_text())[0]["knn_top1"]
    assert f"{top1:.2f}%" in printed and top1 == pytest.approx(records[-1]["knn_top1"], abs=1e-6)


def test_baseline_runs(tmp_path):
    out = tmp_path / "base"
    args = [
        "pretrain",
        "--out",
        str(out),
        "--max-steps",
        "2",
        *_sets("dilemma.misplace_prob=0", "dilemma.drop_rate=0", "eval.knn_at_end=false"),
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "det_bce" not in records[0] and records[-1]["step"] == 2


@pytest.mark.parametrize("method", ["mocov3", "dino", "byol", "ibot", "ijepa"])
def test_resume_continues_exactly(tmp_path, method):
    straight = tmp_path / "straight"
    common = ["--max-steps", "4", "--method", method, *_sets("train.ckpt_every=2", "eval.knn_at_end=false")]
    assert main(["pretrain", "--out", str(straight), *common]) == 0
    # a run that stopped after step 2: its folder holds only the step-2 checkpoint
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step_0000002.pt", stopped / "checkpoints" / "last.pt")
    assert main(["pretrain", "--out", str(stopped), "--resume", *common]) == 0
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(stopped / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    centres = {"dino": ["center"], "ibot": ["center", "patch_center"]}.get(method, [])
    for centre in centres:  # a centre is state: saved, restored, and moved by the resumed steps
        mid = load_checkpoint(straight / "checkpoints" / "step_0000002.pt")["model"][centre]
        assert mid.abs().sum() > 0 and not torch.equal(mid, a["model"][centre]), centre


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("dilemma", [True, False])
def test_every_method_plain_and_with_dilemma_runs_two_steps(tmp_path, method, dilemma):
    switches = [] if dilemma else list(METHODS[method].plain)
    out = tmp_path / "run"
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(out),
                "--method",
                method,
                "--max-steps",
                "2",
                *_sets(*switches, "eval.knn_at_end=false"),
            ]
        )
        == 0
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2] and all(r["loss"] > 0 for r in records[:2])
    assert ("det_bce" in records[0]) == (dilemma and method != "droppos")  # DropPos predicts: pos_ce


def test_resume_refuses_another_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "1", *_sets("eval.knn_at_end=false")]) == 0
    capsys.readouterr()
    assert main(["pretrain", "--out", str(out), "--resume", *_sets("model.depth=3")]) == 2
    assert "another model, method or data config" in capsys.readouterr().err


def test_help_imports_neither_torch_nor_timm():
    """``dilemma --help`` (and each sub-command's) in well under a second: the heavy imports wait for a
    sub-command's work. The method names in the help are the built-in ones."""
    from dilemma.cli import METHOD_NAMES

    assert METHOD_NAMES == tuple(METHODS)
    check = (
        "import sys\nfrom dilemma.cli import main\n"
        "for argv in (['--help'], ['pretrain', '--help'], ['eval', 'knn', '--help'], ['compare', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'timm', 'torchvision', 'numpy') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    assert "mocov3, dino, simclr" in proc.stdout


def test_real_process_exits_nonzero_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "dilemma.cli", "pretrain", "--data", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error: data source" in proc.stderr
