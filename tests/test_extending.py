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
    assert main(["eval", "knn", "--checkpoint", str(out)]) == 0  # rebuilt from the checkpoint's config
    assert "kNN top-1" in capsys.readouterr().out


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
