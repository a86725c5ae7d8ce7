"""A new method is one file: the toy method of docs/adding_a_method.md, written to a folder outside
the package, trains 2 steps through the command line, keeps its config section in the checkpoint,
and evaluates from it. Nothing in the package is touched."""

import json
import re
from pathlib import Path

import pytest
import yaml

from dilemma.cli import main
from dilemma.config import load_config
from dilemma.errors import DilemmaError
from tests.bad_inputs import TINY_SETS

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding_a_method.md"


def _toy_file(folder: Path) -> Path:
    (code,) = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    path = folder / "toy.py"
    path.write_text(code)
    return path


def test_a_method_in_one_new_file_trains_through_the_cli_and_evaluates(tmp_path, capsys):
    toy = _toy_file(tmp_path)
    out = tmp_path / "run"
    argv = [
        "pretrain",
        *TINY_SETS,
        "--method",
        f"{toy}:Toy",
        "--max-steps",
        "2",
        "--out",
        str(out),
        "--set",
        "method.toy.scale=2",
        "--set",
        "eval.knn_at_end=false",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[:2]] == [1, 2]
    assert all(r["ssl_loss"] > 0 and r["det_bce"] > 0 for r in records[:2])  # its loss and DILEMMA's
    saved = yaml.safe_load((out / "config.yaml").read_text())["method"]
    assert saved["name"] == f"{toy}:Toy" and saved["toy"] == {"proj_dim": 64, "scale": 2.0}
    capsys.readouterr()
    # reading the checkpoint imports nothing unless the command line names the method's file
    assert main(["eval", "knn", "--checkpoint", str(out)]) == 2
    assert "pass --method with that name to trust it" in capsys.readouterr().err
    assert main(["eval", "knn", "--checkpoint", str(out), "--method", f"{toy}:Toy"]) == 0  # rebuilt from it
    assert "kNN top-1" in capsys.readouterr().out


def test_a_checkpoint_or_config_never_imports_code_it_names(tmp_path, capsys, monkeypatch):
    """A method file that leaves a mark when imported: training with --method imports it; eval,
    export, inspect, resume, model.pretrained and a YAML config that only name it do not."""
    marker = tmp_path / "imported"
    evil = tmp_path / "evil.py"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n" + _toy_file(tmp_path).read_text())
    out = tmp_path / "run"
    argv = ["pretrain", *TINY_SETS, "--method", f"{evil}:Toy", "--max-steps", "1", "--out", str(out)]
    assert main(argv) == 0 and marker.exists()
    marker.unlink()
    from dilemma import methods

    methods._import_method.cache_clear()  # a new process would start with no method imported
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(f"method:\n  name: {evil}:Toy\n")
    refused = [
        ["eval", "knn", "--checkpoint", str(out)],
        ["export", str(out), "--out", str(tmp_path / "exported")],
        ["inspect", str(out), "--out", str(tmp_path / "d.png")],
        ["pretrain", *TINY_SETS, "--out", str(out), "--resume", "--max-steps", "2"],
        ["pretrain", *TINY_SETS, "--out", str(tmp_path / "b"), "--set", f"model.pretrained={out}"],
        ["pretrain", *TINY_SETS, "--out", str(tmp_path / "c"), "--config", str(yaml_file)],
    ]
    for argv in refused:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert "--method" in capsys.readouterr().err and not marker.exists(), argv
    monkeypatch.chdir(tmp_path)  # a relative --method resolves to the same file as the saved absolute one
    assert main(["eval", "knn", "--checkpoint", str(out), "--method", "evil.py:Toy"]) == 0 and marker.exists()


def test_a_methods_own_checks_and_bad_method_specs(tmp_path):
    toy = _toy_file(tmp_path)
    with pytest.raises(DilemmaError, match=r"method.toy.scale must be > 0"):
        load_config(None, [f"method.name={toy}:Toy", "method.toy.scale=-1"])
    with pytest.raises(DilemmaError, match=r"unknown config key 'method.toy.scale'"):
        load_config(None, ["method.toy.scale=2"])  # the section exists only when the method is chosen
    with pytest.raises(DilemmaError, match="does not exist"):
        load_config(None, [f"method.name={tmp_path / 'nope.py'}:Toy"])
    with pytest.raises(DilemmaError, match="has no Method subclass named 'Nope'"):
        load_config(None, [f"method.name={toy}:Nope"])
    with pytest.raises(DilemmaError, match="cannot import"):
        load_config(None, ["method.name=no_such_package.module:Toy"])
