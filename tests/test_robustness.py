"""Robustness and shape-bias read-outs: the corruptions at tensor level (cells conserved, every
position moved at q = 1, the shuffle reaching the encoder and nothing else), the intact points equal
to the plain read-outs, the textured set a pure function of its seed with real cue conflicts, and
the shape-bias metric landing at 0 and 1 for a texture-only and an outline-only classifier."""

import json

import numpy as np
import pytest
import torch

from dilemma.cli import main
from dilemma.config import EvalConfig
from dilemma.data import Splits, TensorImageSet, load_source
from dilemma.data.sources import load_cue_conflict, load_textured
from dilemma.data.texture import (
    PHASES,
    TEXTURE_NAMES,
    conflicting_textures,
    fill_with_texture,
    shape_bias,
    texture_pattern,
)
from dilemma.eval.corruptions import default_grids, position_shuffle, shuffle_cells
from dilemma.eval.features import extract_features
from dilemma.eval.knn import knn_eval
from dilemma.eval.linear import train_linear_probe
from dilemma.eval.robustness import robustness
from dilemma.pretext import DetectionHead
from dilemma.weights import encoder_from_checkpoint
from tests.conftest import TINY


def _small(splits: Splits, train: int = 400, val: int = 150) -> Splits:
    def subset(images, n):
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
        return TensorImageSet(images.load(idx), images.labels[idx])

    return Splits(splits.name, subset(splits.train, train), subset(splits.val, val), splits.classes)


def _cells(images: torch.Tensor, grid: int) -> list[bytes]:
    """Each image's cells as sorted bytes: a permutation of cells leaves this list unchanged."""
    b, c, h, w = images.shape
    cells = images.reshape(b, c, grid, h // grid, grid, w // grid).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(b, grid * grid, -1)
    return [sorted(bytes(cell.numpy()) for cell in image) for image in cells]


@pytest.mark.parametrize("grid", [2, 4, 7, 28])
def test_patch_shuffle_permutes_cells_and_conserves_pixels(grid):
    images = torch.randint(0, 256, (6, 3, 28, 28), dtype=torch.uint8)
    shuffled = shuffle_cells(images, grid, torch.Generator().manual_seed(1))
    assert shuffled.shape == images.shape and shuffled.dtype == images.dtype
    assert _cells(shuffled, grid) == _cells(images, grid)  # the same cells, each intact
    assert not torch.equal(shuffled, images)  # and moved
    again = shuffle_cells(images, grid, torch.Generator().manual_seed(1))
    assert torch.equal(again, shuffled)  # seeded
    assert torch.equal(shuffle_cells(images, 1, torch.Generator()), images)


def test_default_grids_follow_the_image_and_token_grid():
    assert default_grids(28, 4) == [1, 2, 4, 7]
    assert default_grids(224, 16) == [1, 2, 4, 8, 14]


def test_position_shuffle_moves_every_token_at_q_1_and_none_at_q_0():
    images = torch.zeros(5, 1, 28, 28, dtype=torch.uint8)
    out, keep, positions = position_shuffle(1.0)(images, 49, torch.Generator().manual_seed(0))
    assert out is images and torch.equal(keep, torch.arange(49).expand(5, 49))  # every token enters, in order
    assert (positions != keep).all()  # every one with another position's embedding
    assert ((positions >= 0) & (positions < 49)).all()
    assert position_shuffle(0.0)(images, 49, torch.Generator())[1:] == (None, None)
    _, keep, positions = position_shuffle(0.5)(torch.zeros(200, 1, 28, 28), 49, torch.Generator().manual_seed(0))
    assert 0.45 < (positions != keep).float().mean().item() < 0.55


def test_position_shuffle_reaches_the_encoder_and_only_through_positions(tiny_encoder):
    encoder = tiny_encoder()
    images = load_source("animal-mnist", img_size=28, in_chans=1).val
    images = TensorImageSet(images.load(torch.arange(32)), images.labels[:32])
    intact, _ = extract_features(encoder, images, l2_normalize=False)
    shuffled, _ = extract_features(encoder, images, l2_normalize=False, corrupt=position_shuffle(1.0))
    assert not torch.allclose(shuffled, intact, atol=1e-3)  # the wrong positions reach the encoder
    with torch.no_grad():
        encoder.vit.pos_embed.zero_()  # without positional embeddings, positions are all it changes
    intact, _ = extract_features(encoder, images, l2_normalize=False)
    shuffled, _ = extract_features(encoder, images, l2_normalize=False, corrupt=position_shuffle(1.0))
    torch.testing.assert_close(shuffled, intact, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("robust") / "run"
    sets = [a for kv in [*TINY, "eval.knn_at_end=false"] for a in ("--set", kv)]
    assert main(["pretrain", "--out", str(out), "--max-steps", "3", *sets]) == 0
    return out


def test_intact_points_equal_the_plain_read_outs(run_dir):
    encoder, _ = encoder_from_checkpoint(run_dir)
    splits = _small(load_source("animal-mnist", img_size=28, in_chans=1))
    settings = EvalConfig(linear_epochs=5, position_fractions=[0.0, 1.0], occlusion_fractions=[1.0, 0.5])
    head = DetectionHead(encoder.embed_dim)
    report = robustness(encoder, splits, settings, detector=(encoder, head, 0.5))
    knn = knn_eval(encoder, splits, settings).top1
    train_f, train_y = extract_features(encoder, splits.train, l2_normalize=False)
    val_f, val_y = extract_features(encoder, splits.val, l2_normalize=False)
    linear = train_linear_probe(train_f, train_y, 10, epochs=5, lr=settings.linear_lr, seed=0).top1(val_f, val_y)
    intact = [report.patch_shuffle[0], report.position_shuffle[0], report.token_drop[0]]
    assert [report.patch_shuffle[0]["grid"], report.position_shuffle[0]["fraction"]] == [1, 0.0]
    for point in intact:
        assert point["knn_top1"] == pytest.approx(knn) and point["linear_top1"] == pytest.approx(linear)
    assert [p["grid"] for p in report.patch_shuffle] == [1, 2, 4, 7]
    moved, intact_point = report.position_shuffle[1], report.position_shuffle[0]
    assert (moved["knn_top1"], moved["linear_top1"]) != (intact_point["knn_top1"], intact_point["linear_top1"])
    assert report.intact == {"knn_top1": pytest.approx(knn), "linear_top1": pytest.approx(linear)}
    assert abs(report.detection_auroc - 0.5) < 0.15 and report.chance == 10.0  # an untrained head: chance
    assert set(report.protocols) == {"patch_shuffle", "position_shuffle", "token_drop", "detection"}


def test_robustness_command_writes_json_and_plot(run_dir, tmp_path, capsys):
    """Two checkpoints: one table with a column each, every protocol said once, labels by method and arm."""
    js, png, step_file = tmp_path / "r.json", tmp_path / "r.png", max((run_dir / "checkpoints").glob("step_*.pt"))
    args = ["eval", "robustness", "--checkpoint", str(run_dir), str(step_file), "--epochs", "2", "--grids", "1", "7"]
    args += ["--position-fractions", "0", "1", "--fractions", "1", "0.5", "--json", str(js), "--plot", str(png)]
    assert main(args) == 0
    result, again = json.loads(js.read_text())
    assert [p["grid"] for p in result["patch_shuffle"]] == [1, 7]
    assert [p["fraction"] for p in result["position_shuffle"]] == [0.0, 1.0]
    assert result["detection_auroc"] is not None  # the tiny run trains with DILEMMA: its head is read out
    assert all(result["protocols"][k] for k in ("patch_shuffle", "position_shuffle", "token_drop", "detection"))
    # the same weights twice: the same label, so each is told by its path too
    assert result["label"] == f"MoCo v3 + DILEMMA (p=0.2, r=0.75): {run_dir}" and again["label"].endswith(".pt")
    out = capsys.readouterr().out
    assert png.stat().st_size > 1000
    row = next(line for line in out.splitlines() if line.startswith("patch shuffle 7 x 7"))
    cell = f"{result['patch_shuffle'][1]['linear_top1']:.2f} / {result['patch_shuffle'][1]['knn_top1']:.2f}"
    assert row.split()[-3:] == cell.split() and row.count(cell) == 2  # side by side, equal weights
    assert "[1] linear / kNN  [2] linear / kNN" in out
    assert all(out.count(text) == 1 for text in result["protocols"].values())


def test_textured_set_is_a_pure_function_of_its_seed():
    a, b = load_textured(28, 1, 0.2, 0), load_textured(28, 1, 0.2, 0)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.images, b.val.images)
    silhouettes = np.full((4, 8, 8), 255, np.uint8)
    labels = np.arange(4)
    assert np.array_equal(fill_with_texture(silhouettes, labels, 3), fill_with_texture(silhouettes, labels, 3))
    assert not np.array_equal(fill_with_texture(silhouettes, labels, 3), fill_with_texture(silhouettes, labels, 4))
    plain = load_source("animal-mnist", img_size=28, in_chans=1)
    assert torch.equal(a.train.labels, plain.train.labels)  # the same silhouettes split the same way
    assert not (a.val.images > 0)[plain.val.images == 0].any()  # texture only inside the silhouette
    assert (a.val.images > 0)[plain.val.images > 3].all()  # and all of it (faint edge pixels may round to 0)
    conflict, textures = load_cue_conflict(28, 1, 0.2, 0)
    again, textures_again = load_cue_conflict(28, 1, 0.2, 0)
    assert torch.equal(conflict.images, again.images) and torch.equal(textures, textures_again)
    assert (textures != conflict.labels).all()  # every pair a != b
    assert torch.equal(conflict.labels, plain.val.labels)
    assert (
        len(set(zip(conflict.labels.tolist(), textures.tolist(), strict=True))) == 90
    )  # every (a, b != a) pair occurs


def test_conflicting_textures_are_uniform_over_the_other_classes():
    shapes = np.repeat(np.arange(10), 900)
    textures = conflicting_textures(shapes, 10, seed=0)
    assert (textures != shapes).all()
    counts = np.bincount((textures - shapes) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 850 and counts[1:].max() < 1150


def _texture_only(train: TensorImageSet, test: TensorImageSet) -> np.ndarray:
    """Blind to the outline: the class whose texture, at its best phase, agrees with most of the
    pixels well inside the silhouette (nothing learned, so no outline can leak in)."""
    x = test.images[:, 0].numpy()
    inside, bright = x >= 90, x > 200
    ys, xs = np.mgrid[0 : x.shape[1], 0 : x.shape[2]]
    scores = np.zeros((len(x), len(TEXTURE_NAMES)))
    for texture in range(len(TEXTURE_NAMES)):
        for dy in range(PHASES):
            for dx in range(PHASES):
                agree = (bright == texture_pattern(texture, ys + dy, xs + dx)) & inside
                fit = agree.sum((1, 2)) / np.maximum(inside.sum((1, 2)), 1)
                scores[:, texture] = np.maximum(scores[:, texture], fit)
    return scores.argmax(1)


def _outline_only(train: TensorImageSet, test: TensorImageSet) -> np.ndarray:
    """Blind to the texture: a linear probe on which pixels are inside the silhouette."""

    def outline(images):
        return (images > 0).flatten(1).float()

    probe = train_linear_probe(outline(train.images), train.labels, 10, epochs=30, lr=0.1, seed=0)
    return probe.predict(outline(test.images)).argmax(1).numpy()


@pytest.mark.parametrize("classify,low,high", [(_texture_only, 0.0, 0.05), (_outline_only, 0.9, 1.0)])
def test_shape_bias_is_0_for_texture_and_1_for_outline(classify, low, high):
    train = load_textured(28, 1, 0.2, 0).train
    conflict, textures = load_cue_conflict(28, 1, 0.2, 0)
    found = shape_bias(classify(train, conflict), conflict.labels.numpy(), textures.numpy())
    assert low <= found["shape_bias"] <= high, found
    assert found["shape_decisions"] + found["texture_decisions"] > 0.5 * found["images"]


def test_fill_keeps_the_outline_and_draws_the_class_texture():
    silhouettes = np.zeros((2, 8, 8), np.uint8)
    silhouettes[:, 2:6, 2:6] = 255
    filled = fill_with_texture(silhouettes, np.array([0, 1]), seed=0)
    assert ((filled > 0) == (silhouettes > 0)).all()
    rows, cols = filled[0, 2:6, 2:6], filled[1, 2:6, 2:6]
    assert (rows == rows[:, :1]).all() and not (rows == rows[:1]).all()  # horizontal stripes: constant along rows
    assert (cols == cols[:1]).all() and not (cols == cols[:, :1]).all()  # vertical stripes
    assert PHASES % 8 == 0


def test_shape_bias_command(run_dir, tmp_path, capsys):
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    argv = ["eval", "shape-bias", "--checkpoint", str(run_dir), "--epochs", "2", "--json", str(js), "--plot", str(png)]
    assert main(argv) == 0
    (result,) = json.loads(js.read_text())
    assert result["label"] == "MoCo v3 + DILEMMA (p=0.2, r=0.75)" and png.stat().st_size > 1000
    for name in ("knn", "linear"):
        found = result[name]
        assert 0.0 <= found["shape_bias"] <= 1.0 and found["images"] == 2000
        assert found["shape_decisions"] + found["texture_decisions"] <= 2000
    assert "cue-conflict" in result["protocol"] and "shape bias" in capsys.readouterr().out


def test_compare_reads_shape_bias_out_on_animal_texture(tmp_path):
    out = tmp_path / "cmp"
    fewer = ["eval.position_fractions=[0, 1]", "eval.occlusion_fractions=[1]", "eval.shuffle_grids=[1, 7]"]
    sets = [a for kv in [*TINY, "data.source=animal-texture", *fewer] for a in ("--set", kv)]
    argv = ["compare", "--variant", "plain=dilemma.misplace_prob=0,dilemma.drop_rate=0", "--variant", "dilemma="]
    argv += ["--seeds", "0", "--max-steps", "1", "--probe-epochs", "1", "--curve-points", "1", "--out", str(out)]
    assert main([*argv, *sets, "--readouts", "shape-bias"]) == 0
    results = json.loads((out / "results.json").read_text())
    for r in results:
        assert 0 <= r["shape_bias"]["linear"]["shape_bias"] <= 1 and r["shape_bias"]["knn"]["images"] == 2000
    summary = (out / "summary.md").read_text()
    assert "| dilemma | shape bias % (linear) | 1 |" in summary and "shape bias % (knn)" in summary
    assert (out / "shape_bias.png").stat().st_size > 1000
