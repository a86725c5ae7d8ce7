"""Real data: streamed image folders and file lists, image conversions, RGB views, the paper
recipes, pretrained starts, the timm folder export, provenance."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dilemma.cli import main
from dilemma.config import load_config
from dilemma.data import BadImage, decode, load_source
from dilemma.data.sources import list_image_source
from dilemma.errors import DilemmaError
from tests.imagefolder import make_image_folder

ROOT = Path(__file__).parents[1]
SMALL = [  # a recipe at a size a CPU test can run: every tensor shape shrinks, nothing else changes
    "--set", "model.img_size=32", "--set", "model.depth=1", "--set", "data.batch_size=4",
    "--set", "data.num_workers=0", "--set", "train.show_progress=false", "--set", "train.precision=fp32",
    "--set", "train.epochs=1", "--set", "eval.batch_size=16",
]  # fmt: skip


# The heads at test widths too (4096-wide MLPs and a 65536-way DINO head: seconds of init and
# AdamW per step, and checkpoints of hundreds of MB).
HEADS = {
    "mocov3": ["proj_hidden_dim=64", "proj_dim=32"],
    "simclr": ["proj_hidden_dim=64", "proj_dim=32"],
    "byol": ["proj_hidden_dim=64", "proj_dim=32"],
    "vicreg": ["expander_dim=64"],
    "dino": ["out_dim=256", "hidden_dim=64", "local_crop_size=16"],
    "ibot": ["out_dim=256", "hidden_dim=64", "patch_out_dim=256", "local_crop_size=16"],
    "mae": ["decoder_dim=64", "decoder_depth=1"],
    "droppos": ["decoder_dim=64", "decoder_depth=1"],
    "ijepa": ["predictor_dim=64", "predictor_heads=2", "predictor_depth=1", "targets=2"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("imgs") / "data", classes=3, per_class=4, sizes=(40, 90))


# ---- layouts -----------------------------------------------------------------------------------


def test_class_folders_ignore_hidden_and_loose_files(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=5)
    make_image_folder(root / ".ipynb_checkpoints", classes=1, per_class=3)  # hidden: never read
    Image.new("RGB", (30, 30)).save(root / "loose.jpg")  # beside the class folders
    (root / "notes.txt").write_text("not an image")
    train, val, notes = list_image_source(root, 0.2, 0)
    assert train.classes == ["class_0", "class_1"] and len(train.paths) + len(val.paths) == 10
    assert not any(".ipynb" in p or "loose" in p for p in train.paths + val.paths)
    assert "1 image files beside the class folders ignored" in notes


def test_train_val_and_train_test_layouts(tmp_path):
    tv = make_image_folder(tmp_path / "tv", classes=2, per_class=3, split=("train", "val"))
    s = load_source(str(tv), img_size=16, in_chans=3)
    assert len(s.train) == len(s.val) == 6 and s.notes == ["train/ + val/"]
    tt = make_image_folder(tmp_path / "tt", classes=2, per_class=3, split=("train", "test"))
    assert load_source(str(tt), img_size=16, in_chans=3).notes == ["train/ + test/"]
    alone = make_image_folder(tmp_path / "alone", classes=2, per_class=5, split=("train",))
    s = load_source(str(alone), img_size=16, in_chans=3, val_fraction=0.2)
    assert len(s.val) == 2 and "split by data.val_fraction" in s.notes[0]


def test_val_folder_must_match_train_classes(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=2, split=("train",))
    make_image_folder(tmp_path / "d" / "val", classes=3, per_class=1)
    with pytest.raises(DilemmaError, match="class folders that train/ lacks"):
        load_source(str(root), img_size=16, in_chans=3)
    flat = make_image_folder(tmp_path / "e", classes=2, per_class=2, split=("train",))
    (flat / "val").mkdir()
    Image.new("RGB", (30, 30)).save(flat / "val" / "x.jpg")
    with pytest.raises(DilemmaError, match="no class folders.*valprep"):
        load_source(str(flat), img_size=16, in_chans=3)


def test_file_list(tmp_path, folder):
    files = sorted(folder.rglob("*.jpg"))
    listing = folder.parent / "list.csv"  # paths relative to the list's folder
    listing.write_text("\n".join(["path,label", *[f"{p.relative_to(folder.parent)},{p.parent.name}" for p in files]]))
    s = load_source(str(listing), img_size=16, in_chans=3, val_fraction=0.25)
    assert s.classes == ["class_0", "class_1", "class_2"] and len(s.train) + len(s.val) == len(files)
    (tmp_path / "bad.txt").write_text("missing.jpg 0\n")
    with pytest.raises(DilemmaError, match="names 1 missing files"):
        load_source(str(tmp_path / "bad.txt"), img_size=16, in_chans=3)


def test_listing_reads_no_pixels(tmp_path, monkeypatch):
    """Start-up lists files (and fingerprints their ends for the split); it decodes nothing."""
    root = make_image_folder(tmp_path / "d", classes=2, per_class=5)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("an image was decoded at start-up"))
    s = load_source(str(root), img_size=16, in_chans=3)
    assert len(s.train) + len(s.val) == 10


# ---- decoding ----------------------------------------------------------------------------------


def _save(img: Image.Image, path: Path, **kwargs) -> str:
    img.save(path, **kwargs)
    return str(path)


def test_conversions(tmp_path):
    sixteen = Image.fromarray(np.array([[0, 32768, 65535, 1000]] * 8, dtype=np.uint16))
    grey = np.asarray(decode(_save(sixteen, tmp_path / "a.png"), "L"))
    assert grey[0].tolist() == [0, 128, 255, 4]  # scaled by 255/65535, not clipped at 255
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(decode(_save(rgba, tmp_path / "b.png"), "RGB"))
    assert out[1, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 255]  # on white
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    assert np.asarray(decode(_save(cmyk, tmp_path / "c.jpg"), "RGB"))[4, 4, 0] > 200  # red stays red
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([0, 255, 0] * 256)
    assert np.asarray(decode(_save(palette, tmp_path / "d.png"), "RGB"))[0, 0].tolist() == [0, 255, 0]
    wide = Image.new("RGB", (20, 10))
    exif = wide.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    assert decode(_save(wide, tmp_path / "e.jpg", exif=exif), "RGB").size == (10, 20)


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.jpg", b"", "empty"),
        ("text.jpg", b"hello", "unreadable"),
        ("tiny.png", None, "smaller than"),
        ("cut.jpg", "truncated", "unreadable"),
    ],
)
def test_bad_files_are_named(tmp_path, name, content, reason):
    path = tmp_path / name
    if content is None:
        Image.new("RGB", (2, 2)).save(path)
    elif content == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
        path.write_bytes(buffer.getvalue()[:600])
    else:
        path.write_bytes(content)
    with pytest.raises(BadImage, match=reason):
        decode(str(path), "RGB")


# ---- views -------------------------------------------------------------------------------------


# ---- training on a folder ----------------------------------------------------------------------


def test_bad_image_mid_training_fails_or_is_skipped(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=6, sizes=(36, 48))
    train, _, _ = list_image_source(root, 0.17, 0)
    bad = Path(train.paths[0])  # a training image: every epoch of 2 steps x 5 images reads it
    bad.write_bytes(b"garbage")
    base = ["pretrain", "--data", str(root), "--set", "model.in_chans=3", "--set", "data.batch_size=5",
            "--set", "train.show_progress=false", "--set", "train.epochs=1",
            "--set", "data.val_fraction=0.17"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "strict")]) == 2
    assert f"error: cannot read image {bad}: unreadable" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "skip"), "--set", "data.skip_bad_images=true"]) == 0
    err = capsys.readouterr().err  # replaced in training views, left out of the final kNN
    assert f"warning: skipped unreadable image {bad}" in err and err.count("skipped unreadable image") == 1
    assert f"warning: left out of evaluation: {bad}" in err


def test_start_line_says_what_was_understood(tmp_path, folder, capsys):
    args = ["pretrain", "--data", str(folder), "--out", str(tmp_path / "r"), "--max-steps", "1",
            "--set", "model.in_chans=3", "--set", "data.batch_size=4",
            "--set", "train.show_progress=false"]  # fmt: skip
    assert main(args) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("run folder:"))
    assert "3 classes; class folders; 28 px x 3 channel(s)" in line and "ends at step 1 (train.max_steps" in line
    record = json.loads((tmp_path / "r" / "provenance.jsonl").read_text().splitlines()[0])
    assert record["command"][0] and record["versions"]["torch"] == torch.__version__ and record["processes"] == 1


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("paper_*.yaml")))
def test_paper_recipe_runs_on_a_folder(tmp_path, folder, recipe):
    """Each paper recipe as shipped, on a generated folder with every size reduced; the recipe's
    epochs key is the one that ends it (1 epoch = 2 steps of 4 images)."""
    cfg = load_config(ROOT / "configs" / recipe)
    name = cfg.method.name
    small = [*SMALL, *[a for kv in HEADS.get(name, ()) for a in ("--set", f"method.{name}.{kv}")]]
    small += ["--set", "train.snapshot_every=null"]  # a checkpoint per 10 % of 2 steps: disk, not the recipe
    if name == "mae":
        small += ["--set", "train.accum_steps=1"]
    if name == "ijepa":  # 2 x 2 patches leave 4 targets nothing to be predicted from
        small += ["--set", "model.patch_size=8"]
    out = tmp_path / "run"
    args = ["pretrain", "--config", str(ROOT / "configs" / recipe), "--data", str(folder), "--out", str(out), *small]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["stopped_by"] == "max_steps"


def test_epochs_and_batch_scaled_lr():
    from dilemma.build import peak_lr

    cfg = load_config(None, ["optim.lr=1.5e-4", "optim.scale_lr_with_batch=true", "data.batch_size=1024"])
    assert peak_lr(cfg)[0] == pytest.approx(6e-4)
    with pytest.raises(DilemmaError, match="model.mean needs 1 or model.in_chans=1 values"):
        load_config(None, ["model.mean=[0.1, 0.2, 0.3]"])
    with pytest.raises(DilemmaError, match=r"train.epochs must be in \(0, 1e5\]"):
        load_config(None, ["train.epochs=0"])


# ---- pretrained starts and the export ------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder):
    out = tmp_path_factory.mktemp("run") / "r"
    args = ["pretrain", "--data", str(folder), "--out", str(out), "--max-steps", "2", "--set", "model.in_chans=3",
            "--set", "model.mean=[0.485,0.456,0.406]", "--set", "model.std=[0.229,0.224,0.225]",
            "--set", "model.crop_pct=0.875", "--set", "data.batch_size=4",
            "--set", "train.show_progress=false"]  # fmt: skip
    assert main(args) == 0
    return out


def test_export_folder_loads_with_timm_and_its_data_config(tmp_path, trained):
    timm = pytest.importorskip("timm")
    if "local-dir" not in getattr(timm.models._factory, "_MODEL_SOURCES", ()):
        pytest.skip("this timm has no local-dir: source")
    from dilemma.weights import encoder_from_checkpoint

    out = tmp_path / "export"
    assert main(["export", str(trained), "--out", str(out)]) == 0
    vit = timm.create_model(f"local-dir:{out}", pretrained=True)
    config = timm.data.resolve_data_config(model=vit)
    assert config["input_size"] == (3, 28, 28) and config["crop_pct"] == 0.875
    assert tuple(config["mean"]) == (0.485, 0.456, 0.406) and tuple(config["std"]) == (0.229, 0.224, 0.225)
    encoder, _ = encoder_from_checkpoint(trained)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(encoder(x)[0], vit.forward_head(vit.forward_features(x), pre_logits=True), atol=1e-5)
    assert main(["export", str(trained), "--out", str(out)]) == 2  # never over an existing folder


def test_pretrained_from_run_file_and_adapted_channels(tmp_path, trained, folder, capsys):
    from safetensors.torch import save_file

    from dilemma.weights import encoder_from_checkpoint

    source, _ = encoder_from_checkpoint(trained)
    out = tmp_path / "cont"
    common = ["--data", str(folder), "--max-steps", "1", "--set", "data.batch_size=4",
              "--set", "train.show_progress=false", "--set", "optim.lr=1e-12", "--set", "optim.min_lr=0"]  # fmt: skip
    assert (
        main(
            [
                "pretrain",
                "--out",
                str(out),
                "--set",
                "model.in_chans=3",
                "--set",
                f"model.pretrained={trained}",
                *common,
            ]
        )
        == 0
    )
    assert "pretrained: " in capsys.readouterr().err
    continued, _ = encoder_from_checkpoint(out)
    block = "vit.blocks.0.attn.qkv.weight"
    assert torch.allclose(continued.state_dict()[block], source.state_dict()[block], atol=1e-6)
    # RGB weights into a 1-channel model: the patch kernels are summed over colours (timm's adapt_input_conv)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.vit.state_dict().items()}, str(weights))
    gray = tmp_path / "gray"
    assert main(["pretrain", "--out", str(gray), "--set", f"model.pretrained={weights}", *common]) == 0
    kernel, _ = encoder_from_checkpoint(gray)
    expected = source.vit.patch_embed.proj.weight.sum(1, keepdim=True)
    assert torch.allclose(kernel.vit.patch_embed.proj.weight, expected, atol=1e-5)


def _cache_timm_weights(cache: Path, name: str) -> None:
    """Random weights of timm model ``name`` where the Hugging Face cache keeps its pretrained ones."""
    import timm
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    repo = cache / ("models--" + get_pretrained_cfg(name).hf_hub_id.replace("/", "--"))
    (repo / "snapshots" / "0").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0")
    state = timm.create_model(name, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / "0" / "model.safetensors"))


@pytest.mark.parametrize(
    "spec,match",
    [
        ("no/such/run", "does not exist"),
        ("not_a_model_name", "neither a file, a run folder, nor a timm model name"),
        ("vit_base_patch16_224", "are not on this machine, and dilemma downloads nothing"),
        ("vit_small_patch16_224", "does not fit"),  # width 384 into a width-192 model
    ],
)
def test_pretrained_errors_and_no_network(tmp_path, spec, match, capsys, monkeypatch):
    """A timm name is looked up in the local caches only: no request is ever made."""
    import socket

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_timm_weights(tmp_path / "hub", "vit_small_patch16_224")
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("a network request was made"))
    argv = ["pretrain", "--out", str(tmp_path / "r"), "--max-steps", "1", "--set", f"model.pretrained={spec}",
            "--set", "model.name=vit_tiny_patch16_224", "--set", "model.img_size=32"]  # fmt: skip

    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_timm_weights_on_this_machine_load_without_network(tmp_path, capsys, monkeypatch):
    import socket

    from dilemma.weights import pretrained_state

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _cache_timm_weights(tmp_path / "hub", "vit_tiny_patch16_224")
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("a network request was made"))
    state, where = pretrained_state("vit_tiny_patch16_224")
    assert state["pos_embed"].shape == (1, 197, 192) and "model.safetensors" in where
    argv = ["pretrain", "--out", str(tmp_path / "r"), "--max-steps", "1", "--set", "model.depth=null",
            "--set", "model.pretrained=vit_tiny_patch16_224", "--set", "train.show_progress=false",
            "--set", "model.img_size=32", "--set", "data.batch_size=16",
            "--set", "eval.knn_at_end=false"]  # fmt: skip
    assert main(argv) == 0 and "from vit_tiny_patch16_224" in capsys.readouterr().err


def test_check_data_lists_bad_files(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d", classes=2, per_class=3)
    assert main(["check-data", str(root), "--workers", "1", "--no-progress"]) == 0
    assert "0 of 6 images cannot be used" in capsys.readouterr().out
    (root / "class_0" / "img_00000.jpg").write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["check-data", str(root), "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "img_00000.jpg: empty (0-byte) file" in out and "1 of 6 images cannot be used" in out


def test_finetune_with_timm_pieces_saves_a_timm_classifier(tmp_path, trained, capsys):
    """RandAugment, mixup / cutmix and random erasing (timm's) run; --save writes a timm folder
    whose classifier gives the same logits as the fine-tuned model."""
    timm = pytest.importorskip("timm")
    if "local-dir" not in getattr(timm.models._factory, "_MODEL_SOURCES", ()):
        pytest.skip("this timm has no local-dir: source")
    out = tmp_path / "ft"
    args = ["eval", "finetune", "--checkpoint", str(trained), "--epochs", "1", "--batch-size", "4",
            "--auto-augment", "rand-m9-mstd0.5-inc1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
            "--workers", "0", "--no-progress", "--save", str(out), "--json", str(tmp_path / "ft.json")]  # fmt: skip
    assert main(args) == 0
    protocol = json.loads((tmp_path / "ft.json").read_text())[0]["protocol"]
    assert "RandAugment rand-m9-mstd0.5-inc1" in protocol and "mixup 0.8 / cutmix 1.0" in protocol
    vit = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert vit.num_classes == 3 and json.loads((out / "config.json").read_text())["label_names"][0] == "class_0"
    assert timm.data.resolve_data_config(model=vit)["input_size"] == (3, 28, 28)


def test_evaluation_uses_the_encoders_normalisation():
    """A checkpoint's ``model.mean`` / ``model.std`` travel with its encoder into every read-out."""
    from dilemma.data import TensorImageSet
    from dilemma.eval.features import extract_features
    from dilemma.models import create_encoder, normalize

    mean, std = (0.1, 0.2, 0.3), (0.5, 0.4, 0.3)
    encoder = create_encoder(img_size=16, patch_size=8, in_chans=3, depth=1, mean=mean, std=std).eval()
    pixels = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    feats, _ = extract_features(encoder, TensorImageSet(pixels, torch.zeros(4, dtype=torch.long)), l2_normalize=False)
    with torch.no_grad():
        expected = encoder(normalize(pixels, mean, std))[0]
        default = encoder(normalize(pixels))[0]
    assert torch.allclose(feats, expected, atol=1e-5) and not torch.allclose(feats, default, atol=1e-3)
