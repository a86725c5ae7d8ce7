"""The evaluation suite on a tiny checkpoint: numbers in range, protocols stated, 100 % occlusion
equal to the plain evals, export round trip through timm, pictures written."""

import json
import math

import pytest
import safetensors.torch
import timm
import torch

from dilemma import compare as compare_module
from dilemma.cli import main
from dilemma.config import EvalConfig, FinetuneConfig
from dilemma.data import Splits, load_source
from dilemma.data.sources import TensorImageSet
from dilemma.eval.corruptions import token_drop
from dilemma.eval.features import extract_features
from dilemma.eval.finetune import finetune
from dilemma.eval.knn import knn_eval
from dilemma.eval.linear import train_linear_probe
from dilemma.eval.occlusion import occlusion_curve
from dilemma.weights import encoder_from_checkpoint
from tests.conftest import TINY


def _sets(*extra):
    return [arg for kv in [*TINY, *extra] for arg in ("--set", kv)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    assert main(["pretrain", "--out", str(out), "--max-steps", "4", *_sets("eval.knn_at_end=false")]) == 0
    return out


@pytest.fixture(scope="module")
def small_splits():
    """500 train / 200 val images of the embedded data: enough for the evals to mean something, fast."""
    full = load_source("animal-mnist", img_size=28, in_chans=1, val_fraction=0.2, seed=0)

    def subset(images, n):  # a seeded sample: the splits are ordered by class, their first n images one class
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
        return TensorImageSet(images.load(idx), images.labels[idx])

    return Splits("animal-mnist-small", subset(full.train, 500), subset(full.val, 200), full.classes)


def test_online_probe_is_logged_and_checkpointed(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["probe_acc"] <= 100 for r in records[:-1])
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["probe"]) == {"model", "optimizer"}


def test_eval_commands_state_protocols_and_compare_checkpoints(run_dir, tmp_path, capsys):
    for command, key, words in [("knn", "knn_top1", "k=20"), ("linear", "linear_top1", "SGD momentum 0.9")]:
        out = tmp_path / f"{command}.json"
        extra = ["--epochs", "5"] if command == "linear" else []
        assert main(["eval", command, "--checkpoint", str(run_dir), str(run_dir), "--json", str(out), *extra]) == 0
        printed = capsys.readouterr().out
        results = json.loads(out.read_text())
        assert len(results) == 2 and results[0][key] == results[1][key]  # two checkpoints, same numbers
        assert 10 < results[0][key] <= 100 and words in results[0]["protocol"] and words in printed
        assert printed.count(results[0]["protocol"]) == 1  # one table, the protocol said once
        assert printed.startswith(f"run{' ' * (len(results[0]['label']) - 1)}")  # a row a run, labels aligned
        assert results[0]["label"] == f"MoCo v3 + DILEMMA (p=0.2, r=0.75): {run_dir}"


def test_occlusion_at_full_visibility_equals_the_plain_evals(run_dir, small_splits, tmp_path, capsys):
    encoder, _ = encoder_from_checkpoint(run_dir)
    settings = EvalConfig(linear_epochs=10)
    curve = occlusion_curve(encoder, small_splits, settings)
    assert [p["keep_fraction"] for p in curve.points] == [1.0, 0.75, 0.5, 0.25, 0.1]
    assert [p["tokens"] for p in curve.points] == [49, 37, 25, 12, 5]
    plain_knn = knn_eval(encoder, small_splits, settings)
    train_f, train_y = extract_features(encoder, small_splits.train, l2_normalize=False)
    val_f, val_y = extract_features(encoder, small_splits.val, l2_normalize=False)
    plain_linear = train_linear_probe(train_f, train_y, 10, epochs=10, lr=settings.linear_lr, seed=0).top1(val_f, val_y)
    assert curve.points[0]["knn_top1"] == pytest.approx(plain_knn.top1)
    assert curve.points[0]["linear_top1"] == pytest.approx(plain_linear)
    assert all(0 <= p["knn_top1"] <= 100 and 0 <= p["linear_top1"] <= 100 for p in curve.points)
    assert "true positions" in curve.protocol
    # occluded features really differ (the encoder received fewer tokens)
    occluded, _ = extract_features(encoder, small_splits.val, l2_normalize=False, corrupt=token_drop(0.25))
    assert not torch.allclose(occluded, val_f)

    png, js = tmp_path / "occ.png", tmp_path / "occ.json"
    assert (
        main(
            [
                "eval",
                "occlusion",
                "--checkpoint",
                str(run_dir),
                "--epochs",
                "2",
                "--fractions",
                "1",
                "0.5",
                "--json",
                str(js),
                "--plot",
                str(png),
            ]
        )
        == 0
    )
    assert "kNN top-1" in capsys.readouterr().out and png.stat().st_size > 1000
    assert [p["keep_fraction"] for p in json.loads(js.read_text())[0]["points"]] == [1.0, 0.5]


def test_linear_probe_learns_separable_features():
    torch.manual_seed(0)
    labels = torch.arange(300) % 3
    feats = torch.randn(300, 8) + 4 * torch.nn.functional.one_hot(labels, 8).float()
    probe = train_linear_probe(feats[:200], labels[:200], 3, epochs=20, lr=0.1, seed=0)
    assert probe.top1(feats[200:], labels[200:]) > 95


def test_finetune_trains_all_weights_with_layer_decay(run_dir, small_splits):
    encoder, _ = encoder_from_checkpoint(run_dir, drop_path_rate=0.1)
    before = encoder.vit.blocks[0].attn.qkv.weight.clone()
    result = finetune(encoder, small_splits, FinetuneConfig(epochs=2, batch_size=50), seed=0, show_progress=False)
    assert not torch.equal(before, encoder.vit.blocks[0].attn.qkv.weight)  # the backbone moved
    assert len(result.history) == 2 and 10 < result.top1 <= 100  # chance is 10 %
    assert "layer decay 0.75" in result.protocol and "drop-path 0.1" in result.protocol
    assert "label smoothing 0.1" in result.protocol


def test_export_round_trip_through_timm(run_dir, tmp_path, capsys):
    out = tmp_path / "backbone.safetensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "timm.create_model" in capsys.readouterr().out
    tensors = safetensors.torch.load_file(out)
    assert not any(k.startswith(("head", "dilemma", "projector")) for k in tensors)
    meta = safetensors.safe_open(str(out), "pt").metadata()
    vit = timm.create_model(meta["timm_model"], **json.loads(meta["timm_kwargs"]))
    vit.load_state_dict(tensors, strict=True)
    vit.eval()
    encoder, _ = encoder_from_checkpoint(run_dir)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        cls, patches = encoder(x)
        tokens = vit.forward_features(x)
    assert torch.allclose(tokens[:, 0], cls, atol=1e-5) and torch.allclose(tokens[:, 1:], patches, atol=1e-5)


def test_plot_and_inspect_write_pictures(run_dir, tmp_path, capsys):
    curves, heat = tmp_path / "curves.png", tmp_path / "detection.png"
    assert main(["plot", str(run_dir), "--out", str(curves)]) == 0
    assert main(["inspect", str(run_dir), "--out", str(heat), "--num-images", "4"]) == 0
    assert curves.stat().st_size > 5000 and heat.stat().st_size > 5000
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_needs_a_detection_head_and_plot_needs_a_run(tmp_path, capsys):
    base = tmp_path / "base"
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(base),
                "--max-steps",
                "1",
                *_sets("dilemma.misplace_prob=0", "dilemma.drop_rate=0", "eval.knn_at_end=false"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", str(base)]) == 2
    assert "has no detection head" in capsys.readouterr().err
    assert main(["plot", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_compare_trains_each_variant_and_seed_reads_them_out_and_reuses_finished_runs(tmp_path, capsys):
    from tests.bad_inputs import _png

    data = tmp_path / "images"  # 2 classes x 20 images: the read-outs take a moment, not minutes
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(20):
            (data / c / f"{i}.png").write_bytes(_png())
    out = tmp_path / "cmp"
    variants = ["--variant", "plain=dilemma.misplace_prob=0,dilemma.drop_rate=0", "--variant", "dilemma="]
    budget = ["--seeds", "0", "1", "--max-steps", "4", "--time-budget", "10", "--probe-epochs", "1"]
    argv = ["compare", *variants, *budget, "--curve-points", "2", "--readouts", "all", "--out", str(out)]
    argv += _sets(f"data.source={data}", "data.batch_size=8", "train.log_every=1")
    capsys.readouterr()
    assert main(argv) == 0
    said = capsys.readouterr().out.splitlines()  # progress: the run, its phase, the time left
    assert said[0] == "[1/4] plain seed 0: 40 min of training left, and the read-outs"
    assert said[1] == "[1/4] plain seed 0: training (10 min or 4 steps)"
    assert said[2].startswith("[1/4] plain seed 0: reading out the final backbone (knn, linear, occlusion, patch-")
    assert said[3] == "[1/4] plain seed 0: reading out snapshot 1/1"
    assert said[4].startswith("[1/4] plain seed 0: 4 steps, ") and said[5].startswith("[2/4] dilemma seed 0: about ")
    results = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in results] == [("plain", 0), ("dilemma", 0), ("plain", 1), ("dilemma", 1)]
    assert all(r["steps"] == 4 and r["stopped_by"] == "max_steps" and 0 <= r["knn_top1"] <= 100 for r in results)
    assert [r["det_bce"] is not None for r in results] == [False, True, False, True]
    # read-outs over time: the snapshot at half the run (step 2), then the end (the 100 % occlusion point)
    assert all([p["step"] for p in r["over_time"]] == [2, 4] for r in results)
    assert all(r["over_time"][-1]["linear_top1"] == r["linear_top1"] for r in results)
    summary = (out / "summary.md").read_text()
    assert "| plain | 2 |" in summary and "| dilemma | 2 |" in summary
    assert all(line.count("(") == line.count(")") for line in summary.splitlines())  # no sentence cut short
    plain, dilemma = ([r["knn_top1"] for r in results if r["variant"] == v] for v in ("plain", "dilemma"))
    mean, half = compare_module.mean_ci95([d - p for d, p in zip(dilemma, plain, strict=True)])
    assert f"| dilemma | kNN | 2 | {mean:+.2f} ± {half:.2f} |" in summary  # paired by seed, with a 95 % CI
    assert (out / "occlusion.png").stat().st_size > 1000 and (out / "over_time.png").stat().st_size > 1000
    assert (out / "detection.png").stat().st_size > 1000  # the detection AUROC over time of the detecting arm
    # the layout read-outs: patch and position shuffle for every run, the val detection AUROC where a head was trained
    assert all([p["grid"] for p in r["patch_shuffle"]] == [1, 2, 4, 7] for r in results)
    assert all([p["fraction"] for p in r["position_shuffle"]] == [0.0, 0.2, 0.5, 1.0] for r in results)
    assert all(r["patch_shuffle"][0]["linear_top1"] == r["linear_top1"] for r in results)  # g = 1 is intact
    assert [r["det_auroc_val"] is not None for r in results] == [False, True, False, True]
    assert "| dilemma | linear, 7x7 shuffled | 2 |" in summary and "| dilemma | retained % at q=1 | 2 |" in summary
    assert "| dilemma | det AUROC (val) |" not in summary  # the plain arm has no detector to pair with
    assert "Layout and shape" in summary and all(r["shape_bias"] is None for r in results)  # not Animal-Texture
    assert (out / "patch_shuffle.png").stat().st_size > 1000 and (out / "position_shuffle.png").stat().st_size > 1000
    first = (out / "dilemma" / "seed_1" / "result.json").stat().st_mtime_ns
    assert main(argv) == 0  # a finished run is read back, not trained again
    assert (out / "dilemma" / "seed_1" / "result.json").stat().st_mtime_ns == first
    assert json.loads((out / "results.json").read_text()) == results


def test_confidence_interval_of_the_mean():
    mean, half = compare_module.mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 / 3**0.5, rel=1e-4)  # t(2) = 4.303, sd 1
    assert math.isnan(compare_module.mean_ci95([5.0])[1])  # one seed: no interval


def test_knn_votes_stay_finite_at_any_temperature():
    """exp(similarity / T) overflows float32 for T <= 0.01 (cosine 1 / 0.01 = 100 > 88.7): every vote
    was inf, and argmax then picked class 0. The votes are scaled by each query's best similarity
    first, which changes no ranking; at a tiny T the weighted vote is the nearest neighbour's."""
    from dilemma.eval.knn import knn_predict

    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    labels = torch.randint(0, 5, (200,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(50, 16, generator=g), dim=1)
    nearest = labels[(queries @ bank.T).argmax(1)]
    for temperature in (0.001, 0.005, 0.01):
        scores = knn_predict(bank, labels, queries, k=20, temperature=temperature, num_classes=5)
        assert torch.isfinite(scores).all() and torch.equal(scores.argmax(1), nearest), temperature
    usual = knn_predict(bank, labels, queries, k=20, temperature=0.07, num_classes=5)
    reference = torch.zeros(50, 5)  # the unscaled vote, where it does not overflow
    top = (queries @ bank.T).topk(20, dim=1)
    reference.scatter_add_(1, labels[top.indices], (top.values / 0.07).exp())
    assert torch.equal(usual.argmax(1), reference.argmax(1))


def _mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's util/lr_decay.py ``get_layer_id_for_vit``, as written there (the reference)."""
    if name in ["cls_token", "pos_embed"]:
        return 0
    elif name.startswith("patch_embed"):
        return 0
    elif name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    else:
        return num_layers


def test_finetune_layer_decay_is_maes_rule():
    """Every parameter's lr scale is MAE's (``decay ** (num_layers - layer_id)``, num_layers = depth + 1):
    the final norm and the head train at the full lr, as in MAE and BEiT (timm's grouping gave the
    final norm the last block's 0.75)."""
    from dilemma.eval.finetune import layer_decay_groups

    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, in_chans=1, depth=3, num_classes=10)
    groups = layer_decay_groups(vit, weight_decay=0.05, layer_decay=0.65)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, param in vit.named_parameters():
        assert scale[id(param)] == pytest.approx(0.65 ** (4 - _mae_layer_id(name, 4))), name
        no_decay = param.ndim == 1 or name in ("cls_token", "pos_embed")
        assert decay[id(param)] == (0.0 if no_decay else 0.05), name
    assert scale[id(vit.norm.weight)] == scale[id(vit.head.weight)] == 1.0
    assert scale[id(vit.blocks[2].mlp.fc2.weight)] == pytest.approx(0.65)


def test_linear_protocol_names_the_features_it_reads(tmp_path, capsys):
    """A class-token ViT's probe reads the final-norm class token; an average-pooled one (I-JEPA's)
    its pooled patch tokens: the protocol line says which."""
    for pool, expected, absent in (("token", "final-norm class tokens", "pooled"),
                                   ("avg", "avg-pooled patch tokens", "class token")):  # fmt: skip
        out = tmp_path / pool
        model = [] if pool == "token" else ["model.global_pool=avg", "model.class_token=false"]
        assert main(["pretrain", "--out", str(out), "--max-steps", "1", *_sets("eval.knn_at_end=false", *model)]) == 0
        capsys.readouterr()
        assert main(["eval", "linear", "--checkpoint", str(out), "--epochs", "1"]) == 0
        line = capsys.readouterr().out
        assert f"frozen dense backbone, {expected}" in line and absent not in line.split("]")[0].split("[", 1)[1]


def test_export_chooses_a_file_by_its_extension_in_any_case(run_dir, tmp_path):
    out = tmp_path / "backbone.SafeTensors"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert out.is_file()
    assert set(safetensors.torch.load_file(out)) == set(encoder_from_checkpoint(run_dir)[0].vit.state_dict())
