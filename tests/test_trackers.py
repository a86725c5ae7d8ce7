"""Experiment trackers with the real libraries, offline: W&B in offline mode (its run files read
back), MLflow on a local file store (read back with MlflowClient). The same scalars as
metrics.jsonl, the config once, a resumed run continuing the same tracker run with no duplicate or
missing step, rank 0 alone under 2 processes, later read-outs and pictures in the same run, and a
tracker that fails costing a warning, never the run."""

import json
import shutil
import struct
import subprocess
import sys

import pytest

from dilemma.cli import main
from tests.conftest import TINY

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")


def _sets(*extra):
    return [arg for kv in [*TINY, "eval.knn_at_end=false", "train.log_every=1", *extra] for arg in ("--set", kv)]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and quiet; MLflow on a file store in tmp_path (its file backend is opt-in)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _jsonl_history(run_dir, key):
    """``{step: value}`` of one key in metrics.jsonl (the final record shares the last step)."""
    return {r["step"]: r[key] for r in _records(run_dir) if r.get(key) is not None}


def _wandb_records(path):
    """The protobuf records of a ``run-<id>.wandb`` file (W&B's LevelDB-style log: 7-byte file
    header, 32 KiB blocks of chunks with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = block - pos % block
        if room < 7:  # the rest of a block too small for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding at the end
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_history(run_dir):
    """Every history row (``_step``: the row's step) and run record of every W&B offline file of the
    run (resumed parts included), in order. ``run.finish()`` returns before W&B's service has
    written its last block (seen under load in CI), so first wait for the service as a process
    exit does."""
    import wandb

    wandb.teardown()
    rows, runs = [], []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
                row = {key: json.loads(value) if value else None for key, value in row.items()}
                rows.append({**row, "_step": record.history.step.num})
            elif kind == "run":
                runs.append(record.run)
    return rows, runs


def _wandb_config_keys(run):
    return {item.key or "/".join(item.nested_key) for item in run.config.update}


def test_wandb_offline_gets_the_scalars_and_config_of_metrics_jsonl(tmp_path, offline):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "3", *_sets("train.loggers=[jsonl, wandb]")]) == 0
    rows, runs = _wandb_history(out)
    assert {r.run_id for r in runs} == {json.loads((out / "trackers.json").read_text())["wandb"]["id"]}
    assert runs[0].display_name == "run"
    assert sorted(r["_step"] for r in rows) == [1, 2, 3]  # one row a step: the final record joins step 3
    by_step = {r["_step"]: r for r in rows}
    for key in ("loss", "lr", "det_bce"):
        assert {s: by_step[s][key] for s in by_step} == pytest.approx(_jsonl_history(out, key)), key
    assert by_step[3]["epoch"] == pytest.approx(_records(out)[-1]["epoch"])
    assert {"model", "data", "train", "provenance"} <= _wandb_config_keys(runs[0])  # the config, once


def test_wandb_gets_the_end_of_run_knn_and_pictures_in_the_last_step(tmp_path, offline):
    out = tmp_path / "run"
    argv = ["pretrain", "--out", str(out), "--method", "mae", "--max-steps", "2"]
    assert main([*argv, *_sets("train.loggers=[jsonl, wandb]"), "--set", "eval.knn_at_end=true"]) == 0
    final = _records(out)[-1]
    assert final.get("knn_top1") is not None and final.get("pictures")  # MAE draws its reconstructions
    rows, _ = _wandb_history(out)
    last = next(r for r in rows if r["_step"] == 2)
    assert last["knn_top1"] == pytest.approx(final["knn_top1"])
    assert any(key.endswith("/_type") and value == "image-file" for key, value in last.items())  # the picture


def _mlflow_run(uri, name="run"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("dilemma")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def test_mlflow_gets_the_scalars_config_and_provenance(tmp_path, offline):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "3", *_sets("train.loggers=[jsonl, mlflow]")]) == 0
    client, run = _mlflow_run(offline)
    assert run.info.status == "FINISHED"
    for key in ("loss", "lr", "det_bce", "img_per_s"):
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert history == pytest.approx(_jsonl_history(out, key)), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "provenance.json"} <= artifacts
    config = json.loads(open(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read())
    assert config["model"]["img_size"] == 28 and config["train"]["loggers"] == ["jsonl", "mlflow"]


def _stopped_after_step_3(tmp_path, loggers):
    """A run that trained 3 steps (its trackers hold steps 1-3) but whose last checkpoint is step 2:
    what a kill after step 3 leaves. Returns the run folder."""
    out = tmp_path / "run"
    common = ["--max-steps", "3", *_sets(f"train.loggers={loggers}", "train.ckpt_every=2")]
    assert main(["pretrain", "--out", str(out), *common]) == 0
    (out / "checkpoints" / "last.pt").unlink()  # it may be a hard link to step 3's file
    shutil.copy(out / "checkpoints" / "step_0000002.pt", out / "checkpoints" / "last.pt")
    (out / "checkpoints" / "step_0000003.pt").unlink()
    return out


def test_a_resumed_run_continues_the_same_tracker_runs_without_duplicate_steps(tmp_path, offline):
    out = _stopped_after_step_3(tmp_path, "[jsonl, wandb, mlflow]")
    first_id = json.loads((out / "trackers.json").read_text())
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "5", *_sets("train.ckpt_every=2")]) == 0
    ids = {name: json.loads((out / "trackers.json").read_text())[name] for name in ("wandb", "mlflow")}
    assert ids == {name: first_id[name] for name in ("wandb", "mlflow")}  # the same tracker runs
    # MLflow: one run, every step once, 1..5
    client, run = _mlflow_run(offline)
    assert run.info.run_id == first_id["mlflow"]["run_id"] and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5]
    # W&B: the resumed part is a second offline file of the same run id; together every step once
    rows, runs = _wandb_history(out)
    assert len(runs) == 2 and {r.run_id for r in runs} == {first_id["wandb"]["id"]}
    assert "model" in _wandb_config_keys(runs[0]) and "model" not in _wandb_config_keys(runs[1])  # config once
    assert sorted(r["_step"] for r in rows) == [1, 2, 3, 4, 5]
    # the resumed steps 4-5 are metrics.jsonl's; step 3 is the one the tracker held (not sent twice)
    loss = _jsonl_history(out, "loss")
    assert {r["_step"]: r["loss"] for r in rows if r["_step"] > 3} == pytest.approx({4: loss[4], 5: loss[5]})


def test_only_rank_0_tracks_under_two_processes(tmp_path, offline):
    out = tmp_path / "run"
    sets = _sets("train.loggers=[jsonl, mlflow]", "data.num_workers=0")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "dilemma.cli", "pretrain", "--device", "cpu", "--max-steps", "2", "--out", str(out), *sets]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    client, run = _mlflow_run(offline)  # exactly one MLflow run
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2]


def test_later_read_outs_and_pictures_go_to_the_same_run(tmp_path, offline):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "2", *_sets("train.loggers=[jsonl, mlflow]")]) == 0
    client, run = _mlflow_run(offline)
    client.set_terminated(run.info.run_id, status="KILLED")  # as a run stopped by a signal ends
    assert main(["eval", "knn", "--checkpoint", str(out), "--no-progress"]) == 0
    occlusion = ["eval", "occlusion", "--checkpoint", str(out), "--fractions", "1", "0.5", "--epochs", "1"]
    assert main([*occlusion, "--no-progress"]) == 0
    assert main(["plot", str(out), "--out", str(tmp_path / "curves.png")]) == 0
    client, run = _mlflow_run(offline)
    knn = client.get_metric_history(run.info.run_id, "eval/knn_top1")
    assert len(knn) == 1 and knn[0].step == 2 and 0 <= knn[0].value <= 100
    assert [a.path for a in client.list_artifacts(run.info.run_id, "pictures")] == ["pictures/curves.png"]
    assert len(client.get_metric_history(run.info.run_id, "eval/occlusion/keep_0.5/linear_top1")) == 1
    assert client.get_run(run.info.run_id).info.status == "KILLED"  # a later read-out leaves the status alone
    assert main(["eval", "knn", "--checkpoint", str(out / "checkpoints" / "last.pt"), "--no-progress"]) == 0
    assert len(client.get_metric_history(run.info.run_id, "eval/knn_top1")) == 2  # a checkpoint file of the run too


def test_compare_groups_its_runs(tmp_path, offline):
    out = tmp_path / "cmp"
    argv = ["compare", "--variant", "a=", "--seeds", "0", "--max-steps", "1", "--probe-epochs", "1"]
    argv += ["--curve-points", "1", "--out", str(out), *_sets("train.loggers=[jsonl, mlflow, wandb]")]
    argv += ["--set", "eval.occlusion_fractions=[1]", "--set", "eval.position_fractions=[0]"]
    assert main(argv) == 0
    client, child = _mlflow_run(offline, "a seed 0")
    parent = client.get_run(child.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["dilemma.group"] == "cmp"
    knn = client.get_metric_history(child.info.run_id, "eval/knn_top1")  # the read-outs reach the trackers
    assert len(knn) == 1 and knn[0].step == 1 and 0 <= knn[0].value <= 100
    _, runs = _wandb_history(out / "a" / "seed_0")
    assert runs[0].run_group == "cmp" and runs[0].display_name == "a seed 0"


def test_a_tracker_that_fails_costs_a_warning_not_the_run(tmp_path, offline, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wandb, "init", no_space)
    out = tmp_path / "run"
    argv = ["pretrain", "--out", str(out), "--max-steps", "2", *_sets("train.loggers=[jsonl, mlflow, wandb]")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: mlflow failed" in err and "warning: wandb failed" in err and "No space left" in err
    assert "metrics.jsonl and the checkpoints are unaffected" in err
    assert [r["step"] for r in _records(out)] == [1, 2, 2]
    assert (out / "checkpoints" / "last.pt").exists()


def test_resumed_twice_with_a_tracker_failing_and_one_added_every_step_once(tmp_path, offline, monkeypatch):
    """Part 1 logs 1-4 to MLflow, which fails at step 3 (it holds 1-2); killed after step 4 with the
    step-2 checkpoint. Part 2 adds W&B and runs 3-6; killed after 6 with the step-4 checkpoint. Part 3
    runs 5-7. MLflow must hold 1-7 once each (3-4 from the resume, not lost), W&B too (1-2 backfilled
    from metrics.jsonl), although part 3's metrics.jsonl starts from step 4."""
    from dilemma.train import trackers

    out, sets = tmp_path / "run", ["train.ckpt_every=2"]
    real = trackers.MLflow.scalars

    def fails_at_3(self, values, step):
        if step == 3:
            raise ConnectionError("server gone")
        real(self, values, step)

    monkeypatch.setattr(trackers.MLflow, "scalars", fails_at_3)
    assert (
        main(["pretrain", "--out", str(out), "--max-steps", "4", *_sets("train.loggers=[jsonl, mlflow]", *sets)]) == 0
    )
    monkeypatch.setattr(trackers.MLflow, "scalars", real)

    def killed_after(last: int, checkpoint: int) -> None:
        (out / "checkpoints" / "last.pt").unlink()
        shutil.copy(out / "checkpoints" / f"step_{checkpoint:07d}.pt", out / "checkpoints" / "last.pt")
        for path in (out / "checkpoints").glob("step_*.pt"):
            if int(path.stem[5:]) > checkpoint:
                path.unlink()

    killed_after(4, 2)
    both = _sets("train.loggers=[jsonl, mlflow, wandb]", *sets)
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "6", *both]) == 0
    killed_after(6, 4)
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "7", *both]) == 0
    client, run = _mlflow_run(offline)
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 8))
    rows, _ = _wandb_history(out)
    assert sorted(r["_step"] for r in rows if "loss" in r) == list(range(1, 8))


def test_a_logger_that_is_not_installed_is_one_error_line(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "wandb" else real(name, *a, **k)
    )
    assert main(["pretrain", "--out", str(tmp_path / "run"), *_sets("train.loggers=[jsonl, wandb]")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "pip install 'dilemma[wandb]'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    assert main(["pretrain", "--out", str(tmp_path / "r2"), *_sets("train.loggers=[jsonl, neptune]")]) == 2
    assert "unknown logger 'neptune'" in capsys.readouterr().err


def test_tensorboard_gets_the_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "3", *_sets("train.loggers=[jsonl, tensorboard]")]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(_jsonl_history(out, "loss"))


def test_credentials_in_a_tracking_uri_reach_no_file_and_no_message(tmp_path, offline, monkeypatch, capsys):
    """MLflow's basic-auth URI form (and a token in its query): the run uses it, but no file of the
    run folder (config, provenance, checkpoints, trackers.json) and no line on the terminal holds
    the user, the password or the token; the note says where credentials belong."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    uri = "http://alice:s3cretPW@127.0.0.1:9/?token=t0kenXYZ"  # nothing listens there: MLflow fails too
    out = tmp_path / "run"
    argv = ["pretrain", "--out", str(out), "--max-steps", "2",
            *_sets("train.loggers=[jsonl, mlflow]", f"train.tracking.tracking_uri={uri}")]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["dilemma", *argv])  # provenance records the command line
    assert main(argv) == 0
    printed = "".join(capsys.readouterr())
    assert "holds credentials" in printed and "MLFLOW_TRACKING_PASSWORD" in printed
    assert "warning: mlflow failed" in printed  # the failure is still said, its URI without credentials
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.suffix == ".pt" for path in files) and (out / "provenance.jsonl") in files
    for secret in ("s3cretPW", "t0kenXYZ", "alice"):
        assert secret not in printed
        for path in files:
            assert secret.encode() not in path.read_bytes(), path
    assert "http://127.0.0.1:9/?token=***" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
@pytest.mark.parametrize("disk", ["size=4k", "ro"], ids=["full disk", "read-only"])
def test_a_tracker_on_a_full_or_read_only_disk_is_one_warning_never_a_traceback(tmp_path, monkeypatch, capsys,
                                                                                  tracker, disk):  # fmt: skip
    """Each tracker writing to a real full (4 KiB tmpfs) or read-only disk: TensorBoard's writer
    thread, W&B's own log file (Python's logging would print a traceback per record), MLflow's file
    store. At most one warning line, never a traceback, and the run goes on. (W&B moves to the
    system's temp folder by itself when its folder is read-only: then nothing is said.)"""
    out, disk_dir = tmp_path / "run", tmp_path / "disk"
    sets = _sets("train.ckpt_every=2", "model.depth=1")
    if tracker == "tensorboard":  # its folder is the run's: mounted there before a resume opens it
        assert main(["pretrain", "--out", str(out), "--max-steps", "2", *sets]) == 0
        disk_dir = out / "tensorboard"
    disk_dir.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", disk, "tmpfs", str(disk_dir)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(disk_dir))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (disk_dir / "mlruns").as_uri())
    try:
        capsys.readouterr()
        resume = ["--resume"] if tracker == "tensorboard" else []
        assert main(["pretrain", "--out", str(out), *resume, "--max-steps", "12", *sets,
                     "--set", f"train.loggers=[jsonl, {tracker}]"]) == 0  # fmt: skip
    finally:
        wandb.teardown()  # W&B's service keeps its log file on the disk open
        if subprocess.run(["umount", str(disk_dir)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk_dir)], capture_output=True)  # detached once nothing uses it
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Logging error" not in err and "Exception in thread" not in err, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) <= 1 and (warnings or (tracker, disk) == ("wandb", "ro")), err
    assert all(f"{tracker} failed" in line and ("No space left" in line or "Read-only" in line) for line in warnings)
    assert [r["step"] for r in _records(out)][-1] == 12


def test_mlflow_works_with_the_skinny_extra_and_a_local_store_and_gets_params(tmp_path, monkeypatch, capsys):
    """As the README shows: MLFLOW_TRACKING_URI=file:... and nothing else (MLflow 3 keeps its file
    store behind MLFLOW_ALLOW_FILE_STORE: set here), or no URI at all (the installed MLflow's default
    where it can open it, else ./mlruns, said); the config arrives as params too."""
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    out = tmp_path / "run"
    argv = ["pretrain", "--out", str(out), "--max-steps", "2", *_sets("train.loggers=[jsonl, mlflow]")]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]["run_id"]
    params = MlflowClient((tmp_path / "store").as_uri()).get_run(run_id).data.params
    assert params["optim.lr"] == "0.001" and params["method.name"] == "mocov3" and params["model.depth"] == "2"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--out", str(tmp_path / "run2"), "--max-steps", "1",
                 *_sets("train.loggers=[jsonl, mlflow]")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "warning" not in err
    # skinny cannot open MLflow's default sqlite store: the file store ./mlruns, and the note saying so
    assert ("note: mlflow: no tracking URI set" in err) == (tmp_path / "mlruns").is_dir()


def test_a_wandb_offline_run_is_reopened_offline_by_a_later_read_out(tmp_path, offline, monkeypatch, capsys):
    """trackers.json keeps W&B's mode: a read-out in a new shell (no WANDB_MODE) goes to the same run
    offline, with no "No API key configured" warning."""
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "2", *_sets("train.loggers=[jsonl, wandb]")]) == 0
    assert json.loads((out / "trackers.json").read_text())["wandb"]["mode"] == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "API key" not in err and "warning" not in err, err
    wandb.teardown()
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2  # the read-out's offline part of the same run


def test_a_token_in_a_working_tracking_uri_is_not_written_to_the_trackers_state(tmp_path, monkeypatch):
    """The tracking URI a resume needs goes to trackers.json and every checkpoint: without its
    credentials, query tokens included (a file store with a query connects, so the state is written)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri() + "?token=t0kenXYZ")
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "2", *_sets("train.loggers=[jsonl, mlflow]")]) == 0
    saved = json.loads((out / "trackers.json").read_text())["mlflow"]["tracking_uri"]
    assert saved == (tmp_path / "store").as_uri() + "?token=***"
    for path in [path for path in out.rglob("*") if path.is_file()]:
        assert b"t0kenXYZ" not in path.read_bytes(), path
