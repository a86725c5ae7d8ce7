"""Foundation starts (``model.pretrained`` with a timm name, issue 35): the weights come from the
local Hugging Face cache (random ones put where it keeps them), the model and input contract from
their pretrained config, stated on the start line; the student and its teacher start from them."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from dilemma.cli import main
from tests.test_real_data import _cache_timm_weights

# family -> (the smallest timm model of it with weights, its patch size, mean, img size)
FAMILIES = {
    "dinov2": ("vit_small_patch14_dinov2", 14, (0.485, 0.456, 0.406), 518),
    "dinov3": ("vit_small_patch16_dinov3", 16, (0.485, 0.456, 0.406), 256),
    "siglip": ("vit_base_patch16_siglip_224", 16, (0.5, 0.5, 0.5), 224),
    "clip": ("vit_xsmall_patch16_clip_224", 16, (0.48145466, 0.4578275, 0.40821073), 224),
}


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A Hugging Face cache in ``tmp_path`` and a socket that fails the test on any connection."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("a network request was made"))
    return tmp_path / "hub"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_foundation_start_takes_the_weights_input_contract(family, offline_cache):
    from dilemma.build import build_method
    from dilemma.cli import _pretrained_inputs
    from dilemma.config import load_config
    from dilemma.weights import pretrained_state

    name, patch, mean, size = FAMILIES[family]
    _cache_timm_weights(offline_cache, name)
    given = [f"model.pretrained={name}", f"model.img_size={2 * patch}"]  # made small here: a given key is kept
    inputs = _pretrained_inputs(None, given)
    cfg = load_config(None, [*inputs, *given]).model
    assert (cfg.name, cfg.depth, cfg.patch_size, cfg.in_chans, cfg.img_size) == (name, None, patch, 3, 2 * patch)
    assert cfg.mean == pytest.approx(mean) and f"model.img_size={size}" not in inputs
    state = pretrained_state(name)
    built = build_method(load_config(None, [*inputs, *given]), state)
    for encoder in (built.encoder, built.momentum_encoder):  # the student and its teacher start from it
        own = encoder.vit.state_dict()
        assert all(torch.equal(own[k], v) for k, v in state[0].items() if k in own and own[k].shape == v.shape)
        assert own["blocks.0.attn.qkv.weight"].shape == state[0]["blocks.0.attn.qkv.weight"].shape


def test_the_start_line_states_the_contract_taken(tmp_path, offline_cache, capsys):
    from dilemma.weights import method_from_checkpoint, pretrained_state

    name = "vit_xsmall_patch16_clip_224"
    _cache_timm_weights(offline_cache, name)
    run = tmp_path / "r"
    argv = ["pretrain", "--out", str(run), "--max-steps", "1", "--set", f"model.pretrained={name}",
            "--set", "model.img_size=32", "--set", "data.batch_size=8", "--set", "eval.knn_at_end=false",
            "--set", "train.show_progress=false", "--set", "train.online_probe=false"]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    start = next(line for line in err.splitlines() if line.startswith("run folder:"))
    mean = ", ".join(f"{v:g}" for v in FAMILIES["clip"][2])
    assert f"32 px x 3 channel(s), patch 16, mean ({mean})" in start and f"on {name}" in start
    note = next(line for line in err.splitlines() if line.startswith("note: model.pretrained"))
    assert "model.patch_size=16" in note and "model.img_size" not in note  # given: not taken
    state, _ = pretrained_state(name)
    built, cfg = method_from_checkpoint(run)
    assert cfg.model.depth is None and cfg.model.std == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    started = "blocks.1.mlp.fc2.weight"  # one warm-up step (lr 0 at step 0) moves no weight far
    assert torch.allclose(built.encoder.vit.state_dict()[started], state[started], atol=1e-3)


def test_a_given_key_wins_and_a_run_start_takes_nothing(tmp_path, offline_cache):
    from dilemma.cli import _pretrained_inputs

    _cache_timm_weights(offline_cache, "vit_small_patch14_dinov2")
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  pretrained: vit_small_patch14_dinov2\n  mean: [0.5]\n")
    taken = dict(kv.split("=", 1) for kv in _pretrained_inputs(str(config), ["model.img_size=224"]))
    assert "model.mean" not in taken and "model.img_size" not in taken and taken["model.patch_size"] == "14"
    assert taken["model.pos_embed"] == '"learned"'  # its learned PE is kept, not replaced by sin-cos
    assert _pretrained_inputs(None, [f"model.pretrained={tmp_path}"]) == []  # a folder that is no export
    assert _pretrained_inputs(None, ["model.pretrained=run/last.pt"]) == []


def test_names_that_bring_no_contract_are_left_to_the_weights_loader():
    from dilemma.weights import pretrained_inputs

    # an unknown tag, a name timm makes without patches, a trailing dot: nothing taken, no traceback
    assert pretrained_inputs("vit_small_patch16_224.no_such_tag") == {}
    assert pretrained_inputs("resnet18.a1_in1k") == {} and pretrained_inputs("vit_small_patch16_224.") == {}


def test_an_exported_folder_brings_its_contract(tmp_path):
    from dilemma.weights import pretrained_inputs

    run = tmp_path / "r"
    argv = ["pretrain", "--out", str(run), "--max-steps", "1", "--set", "model.patch_size=7", "--set",
            "model.mean=[0.25]", "--set", "eval.knn_at_end=false", "--set", "train.show_progress=false"]  # fmt: skip
    assert main(argv) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "x")]) == 0
    inputs = pretrained_inputs(str(tmp_path / "x"))
    assert (inputs["model.patch_size"], inputs["model.img_size"], inputs["model.in_chans"]) == (7, 28, 1)
    assert inputs["model.mean"] == [0.25] and inputs["model.depth"] == 6
    assert inputs["model.pos_embed"] == "sincos"  # the run's own PE, which the export wrote down
    (tmp_path / "x" / "config.json").write_text("{")  # torn: one clear line
    with pytest.raises(Exception, match="has no readable config.json"):
        pretrained_inputs(str(tmp_path / "x"))


def test_the_dinov3_continuation_recipe_runs_from_the_cache(tmp_path, offline_cache, capsys):
    """configs/continue_dinov3_vits16.yaml as shipped, every size reduced (the model's depth and
    width are the weights'): it starts from DINOv3 with the weights' input and its epochs end it."""
    from tests.test_real_data import HEADS, ROOT, make_image_folder

    _cache_timm_weights(offline_cache, "vit_small_patch16_dinov3")
    folder = make_image_folder(tmp_path / "data", classes=3, per_class=4, sizes=(40, 90))
    small = ["model.img_size=32", "data.batch_size=4", "data.num_workers=0", "train.show_progress=false",
             "train.precision=fp32", "train.epochs=1", "eval.batch_size=16", "train.snapshot_every=null",
             *(f"method.dino.{kv}" for kv in HEADS["dino"])]  # fmt: skip
    out = tmp_path / "run"
    args = ["pretrain", "--config", str(ROOT / "configs" / "continue_dinov3_vits16.yaml"), "--data", str(folder),
            "--out", str(out), *(a for kv in small for a in ("--set", kv))]  # fmt: skip
    assert main(args) == 0
    start = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("run folder:"))
    assert "32 px x 3 channel(s), patch 16, mean (0.485, 0.456, 0.406)" in start
    assert "dino on vit_small_patch16_dinov3" in start and "from vit_small_patch16_dinov3" in start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["stopped_by"] == "max_steps"  # 1 epoch = 2 steps of 4
