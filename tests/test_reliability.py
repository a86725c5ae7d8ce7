"""Never lose a run, one clear message for every bad input, safe loading."""

import dataclasses
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dilemma import rundir as checkpoint_module
from dilemma.cli import main
from dilemma.config import load_config
from dilemma.errors import DilemmaError
from dilemma.rundir import CheckpointDir, load_checkpoint
from tests.bad_inputs import CASES, NOTED, TINY_SETS, _first_batch_bad, _png, argv_for, make_fixtures
from tests.imagefolder import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def checkpoint_fixtures(root: Path) -> dict[str, str]:
    """A tiny trained run, a baseline run (no detection head), and a checkpoint whose weights do not fit its config."""
    runs = {}
    for name, extra in [
        ("ckpt", []),
        ("baseline_ckpt", ["--set", "dilemma.misplace_prob=0", "--set", "dilemma.drop_rate=0"]),
        ("avg_pool_ckpt", ["--set", "model.global_pool=avg", "--set", "model.class_token=false"]),  # I-JEPA's ViT
    ]:
        out = root / name
        assert main(["pretrain", *TINY_SETS, "--out", str(out), *extra]) == 0
        runs[f"{{{name}}}"] = str(out)
    ckpt = load_checkpoint(root / "ckpt")
    ckpt["config"]["model"]["depth"] = 3
    torch.save(ckpt, root / "tampered.pt")
    runs["{tampered}"] = str(root / "tampered.pt")
    ckpt = load_checkpoint(root / "ckpt")
    ckpt["config"]["method"]["ijepa"]["predictor_dim"] = 2**20  # another method's section, 2^20 wide
    torch.save(ckpt, root / "huge_predictor.pt")
    runs["{huge_predictor}"] = str(root / "huge_predictor.pt")
    # a run of a method kept in a file of its own (the toy of docs/adding_a_method.md)
    (code,) = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "adding_a_method.md").read_text(), flags=re.S)
    (root / "toy.py").write_text(code)
    runs["{toy}"] = f"{root / 'toy.py'}:Toy"
    assert main(["pretrain", *TINY_SETS, "--method", runs["{toy}"], "--out", str(root / "plugin_run")]) == 0
    runs["{plugin_run}"] = str(root / "plugin_run")
    # a run folder holding another run's checkpoint (copied in by hand)
    shutil.copytree(root / "ckpt", root / "foreign")
    for name in ("last.pt", *[p.name for p in (root / "foreign" / "checkpoints").glob("step_*.pt")]):
        shutil.copy(root / "baseline_ckpt" / "checkpoints" / "last.pt", root / "foreign" / "checkpoints" / name)
    runs["{foreign}"] = str(root / "foreign")
    assert main(["export", str(root / "ckpt"), "--out", str(root / "exported")]) == 0
    runs["{exported}"] = str(root / "exported")
    huge = load_checkpoint(root / "ckpt")
    huge["config"]["model"]["img_size"] = 100_000  # a checkpoint is untrusted input: its sizes decide allocations
    torch.save(huge, root / "huge_model.pt")
    runs["{huge_model}"] = str(root / "huge_model.pt")
    torch.save({"format": "dilemma-checkpoint-v1", "model": {}, "step": 1}, root / "no_config.pt")
    runs["{no_config}"] = str(root / "no_config.pt")
    return runs


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return {**make_fixtures(root), **checkpoint_fixtures(root)}


@pytest.mark.parametrize("name,case,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_message(fixtures, tmp_path, capsys, monkeypatch, name, case, message):
    monkeypatch.chdir(tmp_path)  # runs without --out go to ./runs
    assert main(argv_for(case, fixtures)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists(), "a failed start must not leave an empty run folder"


@pytest.mark.parametrize("name,case,fragment", NOTED, ids=[c[0] for c in NOTED])
def test_odd_but_valid_input_runs_and_says_what_it_did(fixtures, tmp_path, capsys, monkeypatch, name, case, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(argv_for(case, fixtures)) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert fragment in out.out + out.err and "Traceback" not in out.err


def test_the_catalogue_has_at_least_130_distinct_cases():
    names = [name for name, _, _ in CASES + NOTED]
    assert len(names) >= 130 and len(set(names)) == len(names)


# ---- round three: special files, loops, bounds, in real processes (a hang fails by timeout) ----


def _real_process(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dilemma.cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _small_folder(root: Path) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{i}.png").write_bytes(_png())
    return root


SMALL_RUN = ["--set", "model.img_size=8", "--set", "model.patch_size=2", "--set", "data.batch_size=2"]


def test_a_fifo_named_like_an_image_is_skipped_not_opened(tmp_path):
    data = _small_folder(tmp_path / "d")
    os.mkfifo(data / "a" / "pipe.png")  # opening it for reading would block forever
    os.mkfifo(data / "stuck.csv")
    done = _real_process(["check-data", str(data), "--workers", "1", "--no-progress"], tmp_path, timeout=60)
    assert done.returncode == 0 and "1 skipped (special files" in done.stdout, done.stderr
    done = _real_process(["pretrain", *TINY_SETS, *SMALL_RUN, "--data", str(data), "--out", "r"], tmp_path)
    assert done.returncode == 0 and "1 skipped (special files" in done.stderr, done.stderr
    done = _real_process(["pretrain", *TINY_SETS, "--data", str(data / "stuck.csv"), "--out", "s"], tmp_path, 60)
    assert (
        done.returncode == 2 and done.stderr.startswith("error: ") and "not a folder or a regular file" in done.stderr
    )
    idx = tmp_path / "idx"
    idx.mkdir()
    os.mkfifo(idx / "train-images-idx3-ubyte")  # an IDX set is read whole: never from a FIFO
    (idx / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 1, 0]))
    for argv in (["pretrain", *TINY_SETS, "--data", str(idx), "--out", "t"], ["check-data", str(idx)]):
        done = _real_process(argv, tmp_path, timeout=60)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is not a regular file" in done.stderr


def test_a_link_loop_is_entered_once(tmp_path):
    data = _small_folder(tmp_path / "d")
    (data / "a" / "again").symlink_to(data, target_is_directory=True)  # d/a/again/a/again/... forever
    (data / "b" / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    done = _real_process(["pretrain", *TINY_SETS, *SMALL_RUN, "--data", str(data), "--out", "r"], tmp_path)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if x.startswith("run folder:"))
    assert "6 train / 2 val" in line and "1 skipped (folders reached again" in line  # 8 images, each once
    assert "1 skipped (special files (FIFOs, sockets, devices) or broken links" in line


def test_the_worker_bound_stops_before_any_process_is_forked(tmp_path):
    done = _real_process(["pretrain", *TINY_SETS, "--set", "data.num_workers=100000", "--out", "r"], tmp_path, 60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "is more than" in done.stderr
    assert not (tmp_path / "r").exists()


def test_unreadable_folders_and_files_are_named_or_skipped(tmp_path, monkeypatch, capsys):
    """Root ignores permission bits, so the file system's refusal is simulated where it happens."""
    import dilemma.data.sources as sources
    from dilemma.data import load_source

    data = _small_folder(tmp_path / "d")
    (data / "c").mkdir()
    (data / "c" / "0.png").write_bytes(_png())
    real_scandir, real_fingerprint = os.scandir, sources.fingerprint

    def scandir(path):
        if str(path).endswith(os.sep + "c"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DilemmaError, match=r"cannot read folder .*/c': Permission denied.*skip_bad_images"):
        load_source(str(data), img_size=8, in_chans=1)
    splits = load_source(str(data), img_size=8, in_chans=1, skip_bad=True)
    assert splits.classes == ["a", "b"] and "1 skipped (unreadable folders)" in splits.notes
    monkeypatch.setattr(os, "scandir", real_scandir)

    def fingerprint(path):
        if path.endswith("a/0.png"):
            raise PermissionError(13, "Permission denied")
        return real_fingerprint(path)

    monkeypatch.setattr(sources, "fingerprint", fingerprint)
    with pytest.raises(DilemmaError, match=r"cannot read image .*a/0.png: Permission denied"):
        load_source(str(data), img_size=8, in_chans=1)
    splits = load_source(str(data), img_size=8, in_chans=1, skip_bad=True)
    assert len(splits.train) + len(splits.val) == 8 and "1 skipped (unreadable files)" in splits.notes


def test_command_line_mistakes_are_one_error_line_too(capsys):
    for argv in (
        ["pretrain", "--bogus"],
        ["eval", "knn"],
        ["pretrain", "--max-steps", "many"],
        ["nothing"],
        ["pretrain", "--resume", "maybe", "--out", "x"],
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_check_data_names_what_it_could_not_read(tmp_path, monkeypatch, capsys):
    data = _small_folder(tmp_path / "d")
    (data / "c").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith(os.sep + "c"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(SystemExit):
        main(["check-data", str(data), "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert f"bad: {data / 'c'}: Permission denied (a folder; its images not counted)" in out
    assert "1 of 9 images cannot be used" in out


def test_a_full_disk_while_appending_metrics_is_one_line(tmp_path, capsys, monkeypatch):
    import builtins

    from dilemma.train import metrics

    real_open = builtins.open

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(metrics, "open", full, raising=False)
    assert main(["pretrain", *TINY_SETS, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: cannot append to") and "No space left on device" in err and "--resume" in err


def test_the_internal_error_handler_survives_names_in_any_encoding(tmp_path, capsys, monkeypatch):
    import dilemma.train.loop as loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom \udcff")))
    monkeypatch.setattr(sys, "argv", ["dilemma", "pretrain", "--out", "caf\udce9"])  # a non-UTF-8 byte
    assert main(["pretrain", *TINY_SETS, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: internal error (RuntimeError: boom") and "traceback saved to" in err
    saved = Path(err.rsplit(" ", 1)[-1])
    assert "caf\\udce9" in saved.read_text() and "Traceback" in saved.read_text()
    saved.unlink()


def test_max_steps_epochs_and_the_budget_are_caps_and_the_start_line_says_which_binds(tmp_path, capsys):
    recipe = ROOT / "configs" / "paper_mocov3_vits16.yaml"  # epochs: 300
    data = _small_folder(tmp_path / "d")
    argv = ["pretrain", "--config", str(recipe), "--data", str(data), "--out", str(tmp_path / "r"),
            "--max-steps", "2", "--set", "model.img_size=16", "--set", "model.patch_size=4", "--set", "model.depth=1",
            "--set", "data.batch_size=2",
            "--set", "data.num_workers=0", "--set", "train.precision=fp32", "--set", "train.show_progress=false",
            "--set", "eval.knn_at_end=false", "--set", "method.mocov3.proj_hidden_dim=32"]  # fmt: skip
    assert main(argv) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("run folder:"))
    assert "ends at step 2 (train.max_steps = 0.667 epochs; train.epochs would be 900 steps)" in line
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["stopped_by"] == "max_steps"
    cfg = load_config(None, ["train.epochs=0.5", "data.batch_size=64"])
    from dilemma.build import build_views, load_splits, run_length, total_steps
    from dilemma.data import PretrainBatches

    batches = PretrainBatches(load_splits(cfg).train, 64, build_views(cfg), seed=0)
    assert total_steps(cfg, batches) == 62  # half an epoch of 125 steps comes before max_steps=220
    assert run_length(cfg, batches).startswith("ends at step 62 (train.epochs; train.max_steps would be 220 steps)")


def test_compare_reads_out_again_when_a_read_out_setting_changes(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=5, sizes=(28, 36))
    out = tmp_path / "cmp"
    argv = ["compare", "--variant", "a=", "--seeds", "0", "--max-steps", "1", "--probe-epochs", "1",
            "--curve-points", "1", "--out", str(out), *TINY_SETS, "--set", f"data.source={data}",
            "--set", "data.batch_size=2"]  # fmt: skip
    assert main(argv) == 0
    first = json.loads((out / "a" / "seed_0" / "result.json").read_text())
    metrics = (out / "a" / "seed_0" / "metrics.jsonl").read_text()
    assert main([*argv, "--probe-epochs", "3"]) == 0
    again = json.loads((out / "a" / "seed_0" / "result.json").read_text())
    assert first["readout"]["linear_epochs"] == 1 and again["readout"]["linear_epochs"] == 3
    # the default read-outs are what --help says: kNN, linear and the occlusion curve, no layout panels
    assert again["readout"]["readouts"] == ["knn", "linear", "occlusion"] and len(again["occlusion"]) > 1
    assert again["patch_shuffle"] == again["position_shuffle"] == [] and again["det_auroc_val"] is None
    assert again["shape_bias"] is None and "detection" not in again["protocols"]
    assert (out / "a" / "seed_0" / "metrics.jsonl").read_text() == metrics  # read out again, not trained again
    (out / "a" / "seed_0" / "result.json").write_text("{ half a file")
    capsys.readouterr()
    assert main([*argv, "--probe-epochs", "3"]) == 2
    assert "result.json is damaged (not a JSON object): remove it" in capsys.readouterr().err


def test_bad_images_can_be_skipped_and_counted(tmp_path, capsys):
    data = _first_batch_bad(tmp_path, "mixed", {"broken.png": b"junk", "zero.png": b""})
    out = tmp_path / "run"
    argv = [
        "pretrain",
        *TINY_SETS,
        "--data",
        str(data),
        "--out",
        str(out),
        "--set",
        "model.img_size=8",
        "--set",
        "model.patch_size=2",
        "--set",
        "data.batch_size=3",
        "--set",
        "data.skip_bad_images=true",
    ]
    assert main(argv) == 0  # the first batch meets both: each replaced by a readable image, named once
    err = capsys.readouterr().err
    assert "skipped unreadable image" in err and "broken.png: unreadable" in err and "zero.png: empty" in err


def test_mixed_grayscale_and_rgb_images_are_converted(tmp_path):
    folder = tmp_path / "mixed" / "cls"
    folder.mkdir(parents=True)
    for i in range(8):
        (folder / f"{i}.png").write_bytes(_png(mode="RGB" if i % 2 else "L"))
    for chans in (1, 3):
        argv = [
            "pretrain",
            *TINY_SETS,
            "--data",
            str(tmp_path / "mixed"),
            "--out",
            str(tmp_path / f"run{chans}"),
            "--set",
            "model.img_size=8",
            "--set",
            "model.patch_size=2",
            "--set",
            "data.batch_size=4",
            "--set",
            f"model.in_chans={chans}",
        ]
        assert main(argv) == 0


def test_huge_image_is_refused(tmp_path, capsys, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # a 12 x 12 image is then over twice the limit: a "bomb"
    data = _first_batch_bad(tmp_path, "huge", {"a.png": _png()})  # every image is a "bomb" now
    argv = ["pretrain", *TINY_SETS, "--data", str(data), "--out", str(tmp_path / "run"), "--set", "data.batch_size=2"]
    assert main(argv) == 2
    assert "too large (over PIL's decompression-bomb limit" in capsys.readouterr().err


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_full)
    out = tmp_path / "run"
    assert (
        main(["pretrain", *TINY_SETS, "--out", str(out), "--set", "train.max_steps=3", "--set", "train.ckpt_every=1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "No space left on device" in err and "the previous checkpoint is intact" in err
    assert load_checkpoint(out)["step"] == 1
    assert not list((out / "checkpoints").glob(".*tmp*"))


def test_kill_during_a_checkpoint_write_never_damages_the_previous_one(tmp_path, monkeypatch):
    ckpts = CheckpointDir(tmp_path, keep=2)
    ckpts.save({"format": checkpoint_module.FORMAT, "config": {}, "model": {}, "step": 1, "w": torch.ones(3)}, 1)

    def killed_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands for the process dying here

    monkeypatch.setattr(checkpoint_module.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save({"format": checkpoint_module.FORMAT, "config": {}, "model": {}, "step": 2, "w": torch.zeros(3)}, 2)
    assert load_checkpoint(tmp_path)["step"] == 1 and torch.equal(load_checkpoint(tmp_path)["w"], torch.ones(3))
    assert list(ckpts.dir.glob(".*.tmp-*"))  # the torn temp file is there ...
    CheckpointDir(tmp_path, keep=2)  # ... and the next run's checkpoint folder removes it
    assert not list(ckpts.dir.glob(".*.tmp-*"))


def _nan_after(monkeypatch, calls_ok: int):
    from dilemma.methods.mocov3 import MoCoV3

    real, calls = MoCoV3.forward, []

    def forward(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(1)
        return dataclasses.replace(out, loss=out.loss * float("nan")) if len(calls) > calls_ok else out

    monkeypatch.setattr(MoCoV3, "forward", forward)


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    _nan_after(monkeypatch, 2)
    out = tmp_path / "run"
    assert (
        main(["pretrain", *TINY_SETS, "--out", str(out), "--set", "train.max_steps=5", "--set", "train.ckpt_every=1"])
        == 2
    )
    err = capsys.readouterr().err
    assert "loss became nan at step 2" in err and "last good checkpoint is kept" in err
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nonfinite_loss_can_be_skipped_up_to_a_limit(tmp_path, capsys, monkeypatch):
    _nan_after(monkeypatch, 2)
    common = [*TINY_SETS, "--set", "train.max_steps=5", "--set", "train.on_nonfinite=skip"]
    assert main(["pretrain", *common, "--out", str(tmp_path / "a"), "--set", "train.max_nonfinite_skips=3"]) == 0
    assert "step skipped (3 so far)" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "a")["nonfinite_skips"] == 3
    assert main(["pretrain", *common, "--out", str(tmp_path / "b"), "--set", "train.max_nonfinite_skips=1"]) == 2
    assert "for the 2th time" in capsys.readouterr().err


def _train_process(out: Path, steps: int):
    cmd = [
        sys.executable,
        "-m",
        "dilemma.cli",
        "pretrain",
        *TINY_SETS,
        "--out",
        str(out),
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "train.ckpt_every=1",
    ]
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def _wait_for_step(out: Path, proc, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and any(
            json.loads(line)["step"] >= step for line in metrics.read_text().splitlines() if line.strip()
        ):
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {step}: {proc.poll()}")


def _assert_same(x, y, where="state"):
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for key in x:
            _assert_same(x[key], y[key], f"{where}.{key}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _assert_same(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 10
    straight = tmp_path / "straight"
    assert main(["pretrain", *TINY_SETS, "--out", str(straight), "--set", f"train.max_steps={steps}"]) == 0

    killed = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(2, steps - 2)
    proc = _train_process(killed, steps)
    _wait_for_step(killed, proc, kill_at)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    stopped_at = load_checkpoint(killed)["step"]
    assert kill_at - 1 <= stopped_at < steps

    assert main(["pretrain", *TINY_SETS, "--out", str(killed), "--resume", "--set", f"train.max_steps={steps}"]) == 0
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert a["step"] == b["step"] == steps
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), f"{key} differs after kill at step {stopped_at} + resume"
    _assert_same(a["optimizer"]["state"], b["optimizer"]["state"])  # AdamW moments too
    _assert_same(a["probe"], b["probe"])
    logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert logged[:-1] == list(range(1, steps + 1))  # no step logged twice after the resume


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit_cleanly(tmp_path, sig):
    out = tmp_path / "run"
    proc = _train_process(out, 10_000)
    _wait_for_step(out, proc, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and f"stopped by {signal.Signals(sig).name} at step" in err and "--resume" in err
    last_logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert load_checkpoint(out)["step"] == last_logged


# ---- one writer per run folder ----------------------------------------------------------------


def test_a_running_folder_refuses_a_second_writer_and_a_killed_one_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "run"
    proc = _train_process(out, 10_000)  # a real second process, holding the folder
    try:
        _wait_for_step(out, proc, 1)
        assert main(["pretrain", *TINY_SETS, "--out", str(out)]) == 2
        assert f"is in use by another dilemma process (pid {proc.pid})" in capsys.readouterr().err
        assert main(["pretrain", *TINY_SETS, "--out", str(out), "--resume"]) == 2
        assert f"(pid {proc.pid})" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    steps = load_checkpoint(out)["step"]
    assert main(["pretrain", *TINY_SETS, "--out", str(out), "--resume", "--set", f"train.max_steps={steps + 1}"]) == 0


def test_a_start_that_never_checkpointed_is_moved_aside_not_appended_to(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    (out / "config.yaml").write_text("stale: true\n")
    assert main(["pretrain", *TINY_SETS, "--out", str(out), "--set", "train.max_steps=2"]) == 0
    assert "left no checkpoint; its files moved to" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # two logged steps and the final record; nothing of the earlier start
    (aside,) = out.glob("unfinished-*")
    assert (aside / "metrics.jsonl").read_text().count("\n") == 2 and "stale" in (aside / "config.yaml").read_text()


def test_resume_survives_a_torn_last_metrics_line(tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY_SETS, "--out", str(out), "--set", "train.ckpt_every=1"]
    assert main(["pretrain", *common, "--set", "train.max_steps=2"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a write cut by a full disk or a crash
    assert main(["pretrain", *common, "--resume", "--set", "train.max_steps=3"]) == 0
    assert capsys.readouterr().err.count("dropped a torn last line") == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]


def test_default_run_folders_of_simultaneous_starts_differ(tmp_path):
    cmd = [sys.executable, "-m", "dilemma.cli", "pretrain", *TINY_SETS, "--set", "train.max_steps=2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2
    for run in runs:
        assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2]


def test_resume_falls_back_to_the_newest_readable_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY_SETS, "--out", str(out), "--set", "train.ckpt_every=1", "--set", "train.keep_checkpoints=3"]
    assert main(["pretrain", *common, "--set", "train.max_steps=3"]) == 0
    last = out / "checkpoints" / "last.pt"
    newest = out / "checkpoints" / "step_0000003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn; last.pt is a hard link to it, torn too
    assert main(["pretrain", *common, "--resume", "--set", "train.max_steps=4"]) == 0
    assert "note: resuming from step_0000002.pt" in capsys.readouterr().err
    last.unlink()  # missing: the step files still serve, instead of a "start without --resume" loop
    assert main(["pretrain", *common, "--resume", "--set", "train.max_steps=5"]) == 0
    assert "note: resuming from step_0000004.pt (last.pt is missing)" in capsys.readouterr().err
    assert load_checkpoint(out)["step"] == 5


def test_compare_knows_its_runs_by_their_config(tmp_path, capsys):
    """Rerunning a comparison with other settings under the same variant name is refused, not
    silently answered with the old runs."""
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=5, sizes=(28, 36))
    out = tmp_path / "cmp"
    argv = ["compare", "--variant", "a=", "--seeds", "0", "--max-steps", "1", "--probe-epochs", "1",
            "--curve-points", "1", "--out", str(out), *TINY_SETS, "--set", f"data.source={data}",
            "--set", "data.batch_size=2"]  # fmt: skip
    assert main(argv) == 0
    assert main(argv) == 0  # the same comparison: read back
    assert main([*argv, "--set", "optim.lr=5e-4"]) == 2
    assert "holds a finished run of another configuration" in capsys.readouterr().err


def test_real_disk_full_and_torchs_own_write_error_keep_the_previous_checkpoint(tmp_path, monkeypatch):
    """A real ENOSPC (the temp file opened on /dev/full) and the RuntimeError torch's zip writer
    raises on a short write: one clear error, no temp file left, the previous checkpoint intact."""
    import builtins

    from dilemma import files  # where checkpoints and every other file are written whole

    ckpt_dir = CheckpointDir(tmp_path, keep=2)
    ckpt_dir.save({"step": 1, "w": torch.ones(3)}, 1)
    real_open = builtins.open
    if os.path.exists("/dev/full"):
        monkeypatch.setattr(files, "open", lambda p, *a, **k: real_open("/dev/full", *a, **k), raising=False)
        with pytest.raises(DilemmaError, match=r"No space left on device; the previous checkpoint is intact"):
            ckpt_dir.save({"step": 2, "w": torch.zeros(10_000)}, 2)
        monkeypatch.undo()

    def short_write(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoint_module.torch, "save", short_write)
    with pytest.raises(DilemmaError, match=r"could not be written \(disk full\?\); the previous checkpoint is intact"):
        ckpt_dir.save({"step": 2}, 2)
    monkeypatch.undo()
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))
    assert torch.load(ckpt_dir.last, weights_only=True)["step"] == 1


def test_an_internal_error_is_one_line_and_a_saved_traceback(tmp_path, capsys, monkeypatch):
    import dilemma.train.loop as loop

    def broken(*args, **kwargs):
        raise ValueError("something we did not foresee")

    monkeypatch.setattr(loop, "train", broken)
    assert main(["pretrain", *TINY_SETS, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("run folder:")  # the start line, then one error line
    assert err[1].startswith("error: internal error (ValueError: something we did not foresee); traceback saved to")
    saved = Path(err[1].rsplit(" ", 1)[-1])
    assert "Traceback" in saved.read_text() and "something we did not foresee" in saved.read_text()
    saved.unlink()


def test_files_are_written_whole(tmp_path, monkeypatch):
    """A write cut short (here: the rename fails as on a full disk) leaves the old file and no temp file."""
    from dilemma import files

    target = tmp_path / "summary.md"
    files.atomic_write_text(target, "old\n")

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    with pytest.raises(DilemmaError, match="No space left on device"):
        files.atomic_write_text(target, "new\n")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["summary.md"]


def _mount_tmpfs(where: Path, size: str) -> Path:
    where.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if made.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return where


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a real full disk (skipped where mounting is not allowed, e.g. without root)."""
    yield _mount_tmpfs(tmp_path / "small", "2m")
    subprocess.run(["umount", str(tmp_path / "small")], capture_output=True)


@pytest.fixture
def read_only_run(tmp_path):
    """A trained run on a tmpfs remounted read-only (root ignores permission bits; a read-only
    mount it cannot)."""
    mount = _mount_tmpfs(tmp_path / "ro", "64m")
    try:
        assert main(["pretrain", *TINY_SETS, "--out", str(mount / "run"), "--set", "train.log_every=1"]) == 0
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount / "run"
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.parametrize(
    "argv",
    [
        ["plot", "{run}"],
        ["inspect", "{run}"],
        ["export", "{run}", "--out", "{run}/exported"],
        ["export", "{run}", "--out", "{run}/backbone.safetensors"],
        ["eval", "knn", "--checkpoint", "{run}", "--json", "{run}/knn.json"],
        ["pretrain", "--out", "{run}", "--resume", "--max-steps", "2"],
    ],
    ids=["plot", "inspect", "export folder", "export file", "eval json", "resume"],
)
def test_a_read_only_run_folder_gives_one_line(read_only_run, capsys, argv):
    argv = [a.replace("{run}", str(read_only_run)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Read-only file system" in err[-1] and "Traceback" not in "".join(err)


def test_a_real_full_disk_stops_training_with_one_line_and_no_temp_files(small_disk, capsys):
    out = small_disk / "run"
    assert main(["pretrain", *TINY_SETS, "--out", str(out), "--set", "train.ckpt_every=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: could not write checkpoint") and "the previous checkpoint is intact" in err[-1]
    assert "No space left on device" in err[-1] or "disk full" in err[-1]  # torch raises either, by write size
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # the partial checkpoint is gone
