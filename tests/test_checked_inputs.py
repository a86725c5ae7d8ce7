"""Inputs that were silently wrong, refused with the wrong words, or refused for nothing (the
second part of the fourth reliability round): each now says what is true and what to do."""

import json
import shutil

import torch

from dilemma.cli import main
from dilemma.rundir import load_checkpoint
from tests.bad_inputs import _png
from tests.conftest import TINY


def _sets(*extra):
    return [arg for kv in [*TINY, "eval.knn_at_end=false", *extra] for arg in ("--set", kv)]


def test_a_resume_compares_only_the_runs_own_method_section(tmp_path, capsys):
    """Another method's settings shape nothing a BYOL run saved: changing them is no reason to refuse."""
    out = tmp_path / "byol"
    assert main(["pretrain", "--out", str(out), "--method", "byol", "--max-steps", "2", *_sets()]) == 0
    resume = ["pretrain", "--out", str(out), "--resume", "--max-steps", "3"]
    assert main([*resume, "--set", "method.dino.out_dim=512"]) == 0
    assert main([*resume, "--set", "method.byol.proj_dim=32"]) == 2  # its own section: refused, named
    assert "method.byol.proj_dim: 64 -> 32" in capsys.readouterr().err


def test_labels_that_spell_one_integer_twice_are_said(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("".join(f"{i}.png,{'007' if i % 2 else '7'}\n" for i in range(8)))
    (tmp_path / "more.csv").write_text("".join(f"m{i}.png,{i % 2}\n" for i in range(8)))
    for i in range(8):
        (tmp_path / f"{i}.png").write_bytes(_png())
        (tmp_path / f"m{i}.png").write_bytes(_png())
    lines = (tmp_path / "list.csv").read_text() + (tmp_path / "more.csv").read_text().replace(",0", ",3")
    (tmp_path / "both.csv").write_text(lines)
    small = ["--set", "model.img_size=8", "--set", "model.patch_size=2", "--set", "data.batch_size=2"]
    assert main(["pretrain", "--data", str(tmp_path / "both.csv"), "--out", str(tmp_path / "r"), "--max-steps", "1",
                 *_sets(), *small]) == 0  # fmt: skip
    assert "labels read as integers: '007' and '7' are class 7" in capsys.readouterr().err


def test_a_folder_whose_images_all_have_a_twin_says_why_none_can_be_held_out(tmp_path, capsys):
    for c in ("a", "b"):
        (tmp_path / "twins" / c).mkdir(parents=True)
        for i in range(4):
            image = _png()
            (tmp_path / "twins" / c / f"{i}.png").write_bytes(image)
            (tmp_path / "twins" / c / f"{i}_copy.png").write_bytes(image)
    assert main(["pretrain", "--data", str(tmp_path / "twins"), "--out", str(tmp_path / "r"), *_sets()]) == 2
    err = capsys.readouterr().err
    assert "16 images, 16 of them with an exact copy" in err and "raise data.val_fraction" not in err


def test_a_name_with_a_newline_is_one_error_line(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "no\nsuch"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "no\\nsuch" in err


def test_a_checkpoint_whose_tracker_state_is_not_a_mapping_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "2", *_sets("train.ckpt_every=2")]) == 0
    ckpt = load_checkpoint(out)
    ckpt["trackers"] = "not a mapping"
    torch.save(ckpt, out / "checkpoints" / "last.pt")
    assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "3"]) == 0, capsys.readouterr().err


def test_a_saved_file_store_elsewhere_is_not_created_by_a_later_read_out(tmp_path, capsys, monkeypatch):
    """A run folder's trackers.json is untrusted: an MLflow file store it names that does not exist
    is not made (one warning), and the read-out still prints."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())  # the run's store comes from the environment
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "2", *_sets("train.loggers=[jsonl, mlflow]")]) == 0
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # a later shell: the saved URI is what the read-out would use
    state = json.loads((out / "trackers.json").read_text())
    elsewhere = tmp_path / "elsewhere" / "mlruns"
    state["mlflow"]["tracking_uri"] = elsewhere.as_uri()
    (out / "trackers.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(out)]) == 0
    captured = capsys.readouterr()
    assert "kNN top-1" in captured.out and "does not exist here; it is not created" in captured.err
    assert not (tmp_path / "elsewhere").exists()
    shutil.rmtree(store)


def test_compare_keeps_a_step_cap_given_with_set_and_says_none_otherwise(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--variant", "a=", "--seeds", "0", "--time-budget", "5", "--probe-epochs", "1",
            "--curve-points", "1", "--out", str(out), *_sets("train.max_steps=3", "data.batch_size=64")]  # fmt: skip
    assert main(argv) == 0
    (result,) = json.loads((out / "results.json").read_text())
    assert result["steps"] == 3 and result["stopped_by"] == "max_steps"
    assert "(max 3 steps)" in (out / "summary.md").read_text()


def test_compare_refuses_an_arm_that_cannot_run_before_training_any(tmp_path, capsys):
    """I-JEPA's targets covering a 4 x 4 grid, patch-shuffle grids that do not divide the image, a data
    source that is not there: the second arm is refused before the first trains a step."""
    out = tmp_path / "cmp"
    for bad, said in (
        ("method.name=ijepa,model.global_pool=avg,model.class_token=false,dilemma.drop_rate=0,model.patch_size=7",
         "on the 4x4 patch grid"),
        ("eval.shuffle_grids=[3]", "eval.shuffle_grids [3] do not divide the 28-px image"),
        ("data.source=/no/such/folder", "is neither an embedded dataset"),
    ):  # fmt: skip
        argv = ["compare", "--variant", "a=", "--variant", f"b={bad}", "--seeds", "0", "--time-budget", "5",
                "--out", str(out), *_sets()]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: variant 'b' cannot run (nothing was trained)") and said in err, err
        assert not (out / "a").exists()


def test_a_checkpoints_every_config_section_is_checked_before_anything_is_built(tmp_path, capsys):
    """A checkpoint is untrusted input: a method section's sizes (the run's own method or another's)
    are checked like a config file's, in one line, before a model is allocated."""
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "1", *_sets()]) == 0
    capsys.readouterr()
    for section, key, value, said in (
        ("ijepa", "predictor_dim", 2**20, "method.ijepa predictor sizes must be >= 1 (dim <= 2^14"),
        ("mocov3", "proj_dim", -5, "method.mocov3"),
    ):
        ckpt = load_checkpoint(out)
        ckpt["config"]["method"][section][key] = value
        torch.save(ckpt, tmp_path / f"{section}.pt")
        assert main(["eval", "knn", "--checkpoint", str(tmp_path / f"{section}.pt")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: the checkpoint's config is not one this dilemma accepts") and said in err, err
        assert err.count("\n") == 1


def test_a_start_from_the_other_kind_of_vit_says_so(tmp_path, capsys):
    """An average-pooled ViT without class token (I-JEPA's), exported, as the start of a class-token
    model: the message names the difference and the settings that match, not "not a ViT state dict"."""
    out, exported = tmp_path / "avg", tmp_path / "avg.safetensors"
    model = ["model.global_pool=avg", "model.class_token=false"]
    assert main(["pretrain", "--out", str(out), "--max-steps", "1", *_sets(*model)]) == 0
    assert main(["export", str(out), "--out", str(exported)]) == 0
    capsys.readouterr()
    start = ["pretrain", "--out", str(tmp_path / "r"), "--max-steps", "1", *_sets(f"model.pretrained={exported}")]
    assert main(start) == 2
    err = capsys.readouterr().err
    assert "the pretrained ViT has no class token and this model has one" in err, err
    assert "model.class_token=false, model.global_pool=avg" in err and "timm can read" not in err
    assert main([*start, *_sets(*model)]) == 0  # the settings it names work


def test_a_read_out_under_other_settings_than_the_runs_says_which(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "1", *_sets("eval.knn_k=5")]) == 0
    capsys.readouterr()
    assert main(["eval", "knn", "--checkpoint", str(out)]) == 0
    captured = capsys.readouterr()
    assert "was configured with eval.knn_k=5; this read-out uses 20" in captured.err and "k=20" in captured.out
    assert main(["eval", "knn", "--checkpoint", str(out), "--k", "5"]) == 0
    assert "was configured with" not in capsys.readouterr().err


def test_a_method_file_written_for_the_tuple_returning_student_is_one_line(tmp_path, capsys):
    import re
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"
    (code,) = re.findall(r"```python\n(.*?)```", docs.read_text(), flags=re.S)
    old_style = code.replace(
        "        s1 = self.student(x1, draws, with_metrics)  # sparse, some tokens misplaced\n",
        "        cls1, patches1, det1 = self.student(x1, draws, with_metrics)  # the earlier interface\n",
    )
    assert old_style != code
    (tmp_path / "old.py").write_text(old_style)
    argv = ["pretrain", "--method", f"{tmp_path / 'old.py'}:Toy", "--out", str(tmp_path / "r"), "--max-steps", "1"]
    assert main([*argv, *_sets()]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the start line: it fails in its first step
    assert re.match(
        rf"error: method Toy failed at {re.escape(str(tmp_path / 'old.py'))}:\d+: TypeError: cannot unpack", last
    )
    assert "returns a StudentOutput (.embedding, .patches, .detection), not a tuple" in last


def test_a_run_that_stops_on_its_time_budget_says_so_on_its_last_line(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--out", str(out), "--max-steps", "100000", "--time-budget", "0.002", *_sets()]
    assert main(argv) == 0
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("note: stopped by the time budget (train.time_budget = 0.002 min) at step "), last
    assert " of 100000;" in last


def test_compare_help_shows_its_defaults(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: 0 1 2" in text and "(default 10)" in text and "(default 4)" in text
