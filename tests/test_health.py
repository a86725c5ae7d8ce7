"""The collapse monitors: RankMe and the spread of the normalised embeddings, on made-up batches and
on a run whose embeddings are forced to collapse."""

import dataclasses
import json

import pytest
import torch

from dilemma.cli import main
from dilemma.train import step as step_module
from dilemma.train.health import collapse_warning, embedding_health
from tests.conftest import TINY


def test_the_numbers_on_spread_and_on_collapsed_embeddings():
    spread = embedding_health(torch.randn(256, 64, generator=torch.Generator().manual_seed(0)))
    assert 50 < spread["rankme"] <= 64 and 0.9 < spread["emb_std"] < 1.1  # spread over the sphere: ~1
    one_way = embedding_health(torch.ones(256, 64) + 1e-6 * torch.randn(256, 64))
    assert one_way["rankme"] < 1.1 and one_way["emb_std"] < 1e-3
    two_dims = torch.zeros(256, 64)
    two_dims[:, :2] = torch.randn(256, 2)  # dimensional collapse: rank 2, yet spread in those two
    assert 1.5 < embedding_health(two_dims)["rankme"] < 2.1
    assert embedding_health(torch.randn(1, 8)) == {}
    assert collapse_warning({"step": 3, **one_way}).startswith("warning: the embeddings look collapsed at step 3")
    assert collapse_warning({"step": 3, **spread}) is None and collapse_warning({"step": 3}) is None


def _run(tmp_path, monkeypatch=None):
    out = tmp_path / "r"
    sets = [a for kv in [*TINY, "eval.knn_at_end=false"] for a in ("--set", kv)]
    assert main(["pretrain", "--out", str(out), "--max-steps", "4", *sets]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "rankme" in line]


def test_a_run_logs_the_monitors_and_warns_once_when_forced_to_collapse(tmp_path, monkeypatch, capsys):
    healthy = _run(tmp_path / "a")
    assert [r["step"] for r in healthy] == [1, 2, 3, 4] and all(r["emb_std"] > 0.2 and r["rankme"] > 3 for r in healthy)
    assert all(-1 <= r["teacher_agreement"] <= 1 for r in healthy)  # MoCo v3: the momentum teacher's
    assert "collapsed" not in capsys.readouterr().err
    real_step = step_module.Stepper.step

    def collapsed(self, *args, **kwargs):  # every image's embedding the first one's: complete collapse
        result = real_step(self, *args, **kwargs)
        features = result.probe_features
        return dataclasses.replace(result, probe_features=features[:1].expand_as(features).clone())

    monkeypatch.setattr(step_module.Stepper, "step", collapsed)
    records = _run(tmp_path / "b")
    assert all(r["rankme"] < 1.01 and r["emb_std"] < 1e-4 for r in records)
    err = capsys.readouterr().err
    assert err.count("warning: the embeddings look collapsed at step 1 ") == 1 and err.count("collapsed") == 1


def test_teacher_entropy_spans_one_prototype_to_uniform():
    import math

    from dilemma.methods.dino import teacher_entropy

    center = torch.zeros(1, 16)
    assert teacher_entropy(torch.zeros(8, 16), center, 0.04).item() == pytest.approx(math.log(16), rel=1e-5)
    one = torch.zeros(8, 16)
    one[:, 3] = 10.0
    assert teacher_entropy(one, center, 0.04).item() < 1e-6  # one prototype takes all
    assert teacher_entropy(one, one[:1], 0.04).item() == pytest.approx(math.log(16), rel=1e-5)  # centred away


def test_teacher_agreement_is_the_mean_cosine_of_the_positive_pairs():
    from dilemma.losses import agreement

    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    assert agreement((z, 3 * z)).item() == pytest.approx(1.0)  # the student predicts the teacher
    assert agreement((z, -z), (z, z)).item() == pytest.approx(0.0, abs=1e-6)  # the mean over the pairs
    eye = torch.eye(8)
    assert agreement((eye, eye.roll(1, dims=0))).item() == pytest.approx(0.0)  # unrelated directions
