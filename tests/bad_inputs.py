"""The catalogue of bad inputs: each case is a command line that must end with one clear message.

Used by tests/test_reliability.py; ``python -m tests.bad_inputs`` prints every case with the
message a user sees (the list in the reliability issue's closing note comes from it).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.conftest import TINY

TINY_SETS = [arg for kv in [*TINY, "train.max_steps=1", "eval.knn_at_end=false"] for arg in ("--set", kv)]
SMALL_IMAGES = ["--set", "model.img_size=8", "--set", "model.patch_size=2", "--set", "data.batch_size=2"]


_draws = iter(range(10**9))


def _png(size=(12, 12), mode="L") -> bytes:
    """A random PNG; every call draws a different image (identical images would all be kept out of val)."""
    buffer = io.BytesIO()
    Image.fromarray(
        (np.random.default_rng(next(_draws)).random((size[1], size[0], 3 if mode == "RGB" else 1)) * 255)
        .astype("uint8")
        .squeeze()
    ).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def _first_batch_bad(root: Path, name: str, bad: dict[str, bytes]) -> Path:
    """``train/`` holding the bad files and one good image (the first batch of 2 reads them all), ``val/`` two good."""
    for split, files in (("train", {**bad, "ok.png": _png()}), ("val", {"v0.png": _png(), "v1.png": _png()})):
        folder = root / name / split / "cls"
        folder.mkdir(parents=True)
        for file, data in files.items():
            (folder / file).write_bytes(data)
    return root / name


class Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/dilemma-pwned"),))


def make_fixtures(root: Path) -> dict[str, str]:
    """Create every file the cases need under ``root``; returns placeholders -> paths."""
    root = Path(root)
    (root / "empty").mkdir()
    png = _png()
    fixtures = {
        "{empty}": root / "empty",
        "{corrupt}": _first_batch_bad(root, "corrupt", {"broken.png": b"\x89PNG not really"}),
        "{truncated}": _first_batch_bad(root, "truncated", {"cut.png": png[: len(png) // 2]}),
        "{zero}": _first_batch_bad(root, "zero", {"zero.png": b""}),
        "{tiny}": _first_batch_bad(root, "tiny", {"dot.png": _png((2, 2))}),
        "{file}": root / "a_file.bin",
        "{list}": root / "a_file.txt",
        "{yaml_bad}": root / "bad.yaml",
        "{yaml_list}": root / "list.yaml",
        "{not_ckpt}": root / "random.pt",
        "{evil}": root / "evil.pt",
        "{blocked}": root / "a_file.txt" / "run",
        "{png_under_file}": root / "a_file.bin" / "curves.png",
        "{latin1}": root / "latin1.yaml",
        "{under_file}": root / "a_file.bin" / "exported",
        "{unlabelled}": root / "unlabelled",
        "{missing}": root / "no.yaml",
        "{out}": root / "out",
    }
    (root / "a_file.txt").write_text("not a folder")
    (root / "a_file.bin").write_bytes(b"not a folder")
    (root / "latin1.yaml").write_bytes("optim:\n  lr: 0.001  # r\xe9glage\n".encode("latin-1"))
    (root / "bad.yaml").write_text("optim:\n  lr: [1e-3\n")
    (root / "list.yaml").write_text("- optim\n- lr\n")
    (root / "random.pt").write_bytes(np.random.default_rng(0).bytes(1000))
    torch.save({"format": "dilemma-checkpoint-v1", "payload": Evil()}, root / "evil.pt")
    (root / "unlabelled").mkdir()
    for i in range(12):
        (root / "unlabelled" / f"{i}.png").write_bytes(_png())
    fixtures.update(_round_three_fixtures(root))
    return {k: str(v) for k, v in fixtures.items()}


def _folder(root: Path, classes: dict[str, int], data: bytes | None = None) -> Path:
    """Class folders of random PNGs (or ``data`` in every file)."""
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(data if data is not None else _png())
    return root


def _file_list(path: Path, text: str, encoding: str = "utf-8") -> Path:
    """A list of PNGs written beside ``path``: ``{png:NAME}`` in ``text`` becomes that file."""
    import re

    for name in re.findall(r"\{png:([^}]+)\}", text):
        (path.parent / name).write_bytes(_png())
    path.write_bytes(re.sub(r"\{png:([^}]+)\}", r"\1", text).encode(encoding))
    return path


def _round_three_fixtures(root: Path) -> dict[str, Path]:
    """Files for the third round of bad inputs: YAML bombs, method files that fail, file lists as
    other tools write them, folders of duplicates or one class, special files and link loops."""
    lists = root / "lists"
    lists.mkdir()
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
    )
    (root / "bomb.yaml").write_text(bomb)  # ~400 bytes, 9^9 values once expanded
    (root / "deep.yaml").write_text("optim: " + "[" * 3000 + "]" * 3000 + "\n")
    (root / "nested.yaml").write_text("optim: " + "[" * 40 + "]" * 40 + "\n")
    (root / "recursive.yaml").write_text("optim: &a [1, *a]\n")
    (root / "huge.yaml").write_text("# padding\n" * 120_000)
    (root / "a_folder.yaml").mkdir()
    (root / "results.json").mkdir()
    (root / "plugin.yaml").write_text("method:\n  name: somewhere/toy.py:Toy\n")
    (root / "syntax.py").write_text("def broken(:\n")
    (root / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    (root / "exits.py").write_text("import sys\nsys.exit(3)\n")
    (root / "no_class.py").write_text("x = 1\n")
    fixtures = {
        "{two_classes}": _folder(root / "two", {"a": 4, "b": 4}),
        "{one_class}": _folder(root / "one", {"only": 8}),
        "{duplicates}": _folder(root / "dups", {"a": 6, "b": 6}, data=_png()),
        "{bomb}": root / "bomb.yaml",
        "{deep}": root / "deep.yaml",
        "{nested}": root / "nested.yaml",
        "{recursive}": root / "recursive.yaml",
        "{huge_yaml}": root / "huge.yaml",
        "{yaml_folder}": root / "a_folder.yaml",
        "{plugin_yaml}": root / "plugin.yaml",
        "{syntax_method}": f"{root / 'syntax.py'}:Toy",
        "{raising_method}": f"{root / 'raises.py'}:Toy",
        "{exiting_method}": f"{root / 'exits.py'}:Toy",
        "{classless_method}": f"{root / 'no_class.py'}:Toy",
        "{latin1_list}": _file_list(lists / "latin1.txt", "{png:caf\xe9.png},0\n{png:b.png},1\n", "latin-1"),
        "{three_fields}": _file_list(lists / "three.csv", "{png:c.png},0,extra\n"),
        "{mixed_labels}": _file_list(lists / "mixed.csv", "{png:d.png},0\n{png:e.png}\n"),
        "{negative_label}": _file_list(lists / "negative.csv", "{png:f.png},-3\n{png:g.png},1\n"),
        "{comments_only}": _file_list(lists / "comments.txt", "# nothing here\n\n"),
        "{idx_labels_only}": root / "idx",
        "{missing_json_folder}": root / "no" / "such" / "knn.json",
        "{idx_2d}": root / "idx_2d",
        "{idx_2d_labels}": root / "idx_2d_labels",
        "{idx_overflow}": root / "idx_overflow",
        "{empty_val}": root / "empty_val",
        "{json_folder}": root / "results.json",
        "{save_under_missing}": root / "no" / "such" / "ft",
    }
    (root / "idx").mkdir()
    (root / "idx" / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x00")
    for name, images, labels in [
        ("idx_2d", np.zeros((4, 9), np.uint8), np.zeros(4, np.uint8)),
        ("idx_2d_labels", np.zeros((4, 3, 3), np.uint8), np.zeros((4, 2), np.uint8)),
    ]:
        (root / name).mkdir()
        _idx(root / name / "train-images-idx3-ubyte", images)
        _idx(root / name / "train-labels-idx1-ubyte", labels)
    (root / "idx_overflow").mkdir()
    (root / "idx_overflow" / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"\xff\xff\xff\xff" * 3)
    _idx(root / "idx_overflow" / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    _folder(root / "empty_val" / "train", {"a": 3, "b": 3})
    (root / "empty_val" / "val" / "a").mkdir(parents=True)
    fixtures.update(_noted_fixtures(root))
    fixtures.update(_shard_fixtures(root))
    twins = _folder(root / "twins", {"a": 0, "b": 0})
    for c in ("a", "b"):
        for i in range(4):
            image = _png()
            (twins / c / f"{i}.png").write_bytes(image)
            (twins / c / f"{i}_copy.png").write_bytes(image)
    fixtures["{twins}"] = twins
    lists = root / "lists"
    fixtures["{two_spellings}"] = _file_list(
        lists / "spellings.csv", "".join(f"{{png:sp{i}.png}},{['7', '007', '3'][i % 3]}\n" for i in range(9))
    )
    return fixtures


def _shard_fixtures(root: Path) -> dict[str, Path]:
    """Shard folders (``dilemma shard`` of 12 PNGs, 4 a shard), each damaged in one way."""
    import shutil

    from dilemma.data.sharding import make_shards
    from dilemma.data.shards import MANIFEST, index_path

    good = root / "shards" / "good"
    make_shards(str(_folder(root / "shards" / "pngs", {"a": 6, "b": 6})), good, samples_per_shard=4,
                val_fraction=0.25, workers=1, show_progress=False)  # fmt: skip
    damaged = {}
    for name in ("missing", "truncated", "no_index", "wrong_index", "old_format"):
        damaged[name] = root / "shards" / name
        shutil.copytree(good, damaged[name])
    (damaged["missing"] / "val-000000.tar").unlink()
    with open(damaged["truncated"] / "train-000000.tar", "r+b") as f:
        f.truncate(f.seek(0, os.SEEK_END) - 100)
    index_path(damaged["no_index"] / "train-000001.tar").unlink()
    for tar in damaged["wrong_index"].glob("train-*.tar"):  # every offset moved onto the .cls member's data
        index = np.load(index_path(tar))
        index["offset"] += (index["size"] + 511) // 512 * 512 + 512
        np.save(index_path(tar), index)
    manifest = json.loads((good / MANIFEST).read_text())
    (damaged["old_format"] / MANIFEST).write_text(json.dumps({**manifest, "format": "dilemma-shards-v0"}))
    foreign = root / "shards" / "foreign"
    foreign.mkdir()
    shutil.copy(good / "train-000000.tar", foreign / "data-000000.tar")
    return {f"{{shards_{name}}}": path for name, path in {"good": good, **damaged, "foreign": foreign}.items()}


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _noted_fixtures(root: Path) -> dict[str, Path]:
    """Data that must be read, and said how: odd file names, lists as other tools write them, IDX."""
    latin1 = _folder(root / "latin1_name", {"a": 4, "b": 4})
    with open(os.path.join(os.fsencode(latin1 / "a"), b"caf\xe9.png"), "wb") as f:  # not valid UTF-8
        f.write(_png())
    lists = root / "lists"
    rows = [(f"{{png:n{i}.png}}", i % 2) for i in range(8)]
    (lists / "dir with space").mkdir()
    idx = root / "idx_set"
    idx.mkdir()
    rng = np.random.default_rng(0)
    _idx(idx / "train-images-idx3-ubyte", rng.integers(0, 256, (12, 8, 8)))
    _idx(idx / "train-labels-idx1-ubyte", np.arange(12) % 3)
    return {
        "{latin1_name}": latin1,
        "{huge_labels}": _file_list(
            lists / "huge.csv", "".join(f"{{png:h{i}.png}},{[0, 10**20][i % 2]}\n" for i in range(8))
        ),
        "{spaces}": _file_list(
            lists / "spaces.txt", "".join(f"{{png:dir with space/s {i}.png}} {i % 2}\n" for i in range(8))
        ),
        "{excel}": _file_list(lists / "excel.csv", "\ufeffpath,label\r\n" + "".join(f"{n},{y}\r\n" for n, y in rows)),
        "{utf16}": _file_list(lists / "utf16.csv", "".join(f"{{png:u{i}.png}},{i % 2}\n" for i in range(8)), "utf-16"),
        "{quoted}": _file_list(lists / "quoted.csv", "".join(f'"{{png:q, {i}.png}}",{i % 2}\n' for i in range(8))),
        "{idx}": idx,
        "{commented}": _file_list(
            lists / "commented.csv",
            "# made by hand\npath,label\n" + "".join(f"{{png:m{i}.png}},{i % 2}\n" for i in range(8)),
        ),
    }


# (name, argv, expected fragment of the message). "pretrain" cases get the tiny recipe first.
CASES = [
    ("missing data folder", ["pretrain", "--data", "/nonexistent/folder"], "is neither an embedded dataset"),
    ("data source is a file", ["pretrain", "--data", "{file}"], "is a file; point it at a folder or a file list"),
    ("file list of missing files", ["pretrain", "--data", "{list}"], "names 1 missing files"),
    ("empty folder", ["pretrain", "--data", "{empty}"], "no images found"),
    ("corrupt image", ["pretrain", "--data", "{corrupt}", *SMALL_IMAGES], "broken.png: unreadable"),
    ("truncated image", ["pretrain", "--data", "{truncated}", *SMALL_IMAGES], "cut.png: unreadable"),
    ("zero-byte file", ["pretrain", "--data", "{zero}", *SMALL_IMAGES], "zero.png: empty (0-byte) file"),
    ("tiny image", ["pretrain", "--data", "{tiny}", *SMALL_IMAGES], "dot.png: 2x2 px, smaller than 4 px"),
    ("unlabelled folder for kNN", ["eval", "knn", "--checkpoint", "{ckpt}", "--data", "{unlabelled}"], "needs labels"),
    (
        "image size not divisible by patch size",
        ["pretrain", "--set", "model.img_size=30"],
        "not divisible by model.patch_size",
    ),
    ("drop rate out of range", ["pretrain", "--set", "dilemma.drop_rate=1.2"], "drop_rate must be in [0, 1)"),
    (
        "misplace probability out of range",
        ["pretrain", "--set", "dilemma.misplace_prob=-0.5"],
        "misplace_prob must be in [0, 1]",
    ),
    ("K = 0 tokens kept", ["pretrain", "--set", "dilemma.drop_rate=0.99"], "keeps K = 0"),
    ("an unknown position task", ["pretrain", "--set", "dilemma.task=guess"], "dilemma.task must be one of detect"),
    (
        "a share of unplaced tokens over 1",
        ["pretrain", "--set", "dilemma.task=predict", "--set", "dilemma.position_drop_prob=1.5"],
        "position_drop_prob must be in [0, 1]",
    ),
    ("DropPos without its task", ["pretrain", "--set", "method.name=droppos"], "DropPos predicts positions"),
    ("unknown config key", ["pretrain", "--set", "optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
    ("mistyped config key", ["pretrain", "--set", "dilema.drop_rate=0.5"], "did you mean 'dilemma.drop_rate'"),
    ("wrong value type", ["pretrain", "--set", "optim.lr=fast"], "needs a value of type float"),
    ("--set without =", ["pretrain", "--set", "optim.lr"], "--set needs key=value"),
    ("bad YAML", ["pretrain", "--config", "{yaml_bad}"], "is not valid YAML"),
    ("YAML that is not a mapping", ["pretrain", "--config", "{yaml_list}"], "must hold a mapping of sections"),
    ("missing config file", ["pretrain", "--config", "{missing}"], "does not exist"),
    ("unknown method", ["pretrain", "--method", "swav"], "unknown method 'swav'"),
    ("unknown timm model", ["pretrain", "--set", "model.name=vit_tinny_patch16_224"], "unknown timm model"),
    (
        "batch larger than the data",
        [
            "pretrain",
            "--data",
            "{unlabelled}",
            "--set",
            "model.img_size=8",
            "--set",
            "model.patch_size=2",
            "--set",
            "data.batch_size=64",
        ],
        "fewer than one batch of 64",
    ),
    ("CUDA asked for, none present", ["pretrain", "--device", "cuda"], "no CUDA device is available"),
    ("output folder not writable", ["pretrain", "--out", "{blocked}"], "cannot write to output folder"),
    ("--resume with no checkpoint", ["pretrain", "--out", "{out}", "--resume"], "no checkpoint"),
    ("checkpoint that does not exist", ["eval", "knn", "--checkpoint", "/nonexistent/ckpt.pt"], "does not exist"),
    ("file that is not a checkpoint", ["eval", "knn", "--checkpoint", "{not_ckpt}"], "is not a readable checkpoint"),
    ("pickle that would run code", ["eval", "knn", "--checkpoint", "{evil}"], "refusing to load"),
    (
        "checkpoint whose weights do not fit its config",
        ["eval", "knn", "--checkpoint", "{tampered}"],
        "does not match its own model config",
    ),
    ("detection picture from a model without DILEMMA", ["inspect", "{baseline_ckpt}"], "has no detection head"),
    # numbers that would reach torch as a traceback or train / report something meaningless
    ("negative gradient clip", ["pretrain", "--set", "optim.grad_clip=-1"], "optim.grad_clip must be > 0 or null"),
    ("negative weight decay", ["pretrain", "--set", "optim.weight_decay=-0.1"], "weight_decay must be >= 0"),
    ("min lr above lr", ["pretrain", "--set", "optim.min_lr=1"], "optim.min_lr must be in [0, optim.lr"),
    ("lr nan", ["pretrain", "--set", "optim.lr=nan"], "needs a finite number"),
    ("lr infinite", ["pretrain", "--set", "optim.lr=.inf"], "needs a finite number"),
    ("zero depth", ["pretrain", "--set", "model.depth=0"], "model.depth must be in [1, 64]"),
    ("drop-path of 1.5", ["pretrain", "--set", "model.drop_path_rate=1.5"], "drop_path_rate must be in [0, 1)"),
    ("seed past 2^31", ["pretrain", "--seed", "99999999999999999999"], "--seed must be in [0, 2147483648)"),
    ("eval batch size 0", ["pretrain", "--set", "eval.batch_size=0"], "eval.batch_size must be >= 1"),
    ("kNN with k = 0", ["eval", "knn", "--checkpoint", "{ckpt}", "--k", "0"], "--k must be >= 1"),
    ("linear probe lr nan", ["eval", "linear", "--checkpoint", "{ckpt}", "--lr", "nan"], "--lr must be a finite"),
    (
        "fine-tune 0 epochs",
        ["eval", "finetune", "--checkpoint", "{ckpt}", "--epochs", "0"],
        "--epochs must be in [1, 100000]",
    ),
    ("occlusion fraction 0", ["eval", "occlusion", "--checkpoint", "{ckpt}", "--fractions", "0"], "must be in (0, 1]"),
    ("negative workers", ["eval", "knn", "--checkpoint", "{ckpt}", "--workers", "-1"], "--workers must be >= 0"),
    ("compare with a seed twice", ["compare", "--variant", "a=", "--seeds", "0", "0", "--out", "{out}"], "seed twice"),
    (
        "a hybrid CNN-ViT, which has no token per patch",
        ["pretrain", "--set", "model.name=vit_small_r26_s32_224"],
        "hybrid and convolutional backbones have none",
    ),
    (
        "compare with a read-out it does not know",
        ["compare", "--variant", "a=", "--readouts", "knn,shape", "--out", "{out}"],
        "--readouts: unknown 'shape'; choose among knn, linear, occlusion",
    ),
    ("compare variant named like a path", ["compare", "--variant", "../x=", "--out", "{out}"], "must be a plain name"),
    (
        "fine-tune batch larger than the data",
        ["eval", "finetune", "--checkpoint", "{ckpt}", "--data", "{two_classes}", "--batch-size", "64"],
        "fewer than one batch of 64",
    ),
    ("plot to a name that is not .png", ["plot", "{ckpt}", "--out", "curves.pngg"], "give a name ending in .png"),
    ("plot into a path under a file", ["plot", "{ckpt}", "--out", "{png_under_file}"], "is not an existing folder"),
    ("export under a file", ["export", "{ckpt}", "--out", "{under_file}"], "cannot write"),
    ("export over an existing folder", ["export", "{ckpt}", "--out", "{empty}"], "already exists"),
    ("YAML file in Latin-1", ["pretrain", "--config", "{latin1}"], "is not UTF-8"),
    ("resume on other data", ["pretrain", "--out", "{ckpt}", "--resume", "--data", "{unlabelled}"], "data.source"),
    ("device that does not exist", ["pretrain", "--device", "mps:7"], "train.device"),
    ("batch size 0", ["pretrain", "--set", "data.batch_size=0"], "data.batch_size must be >= 2"),
    ("negative loader workers", ["pretrain", "--set", "data.num_workers=-1"], "data.num_workers must be >= 0"),
    ("val fraction above 1", ["pretrain", "--set", "data.val_fraction=1.5"], "data.val_fraction must be in (0, 1)"),
    ("crop scale 0", ["pretrain", "--set", "data.crop_min_scale=0"], "data.crop_min_scale must be in (0, 1]"),
    ("hue above 0.5", ["pretrain", "--set", "data.hue=0.7"], "data.hue must be in [0, 0.5]"),
    ("blur probability 2", ["pretrain", "--set", "data.blur_prob=2"], "data.blur_prob must be a probability"),
    ("two input channels", ["pretrain", "--set", "model.in_chans=2"], "model.in_chans must be 1 or 3"),
    ("three means for one channel", ["pretrain", "--set", "model.mean=[0.1,0.2,0.3]"], "model.mean needs 1 or"),
    ("zero std", ["pretrain", "--set", "model.std=[0]"], "model.std values must be > 0"),
    ("crop fraction 0", ["pretrain", "--set", "model.crop_pct=0"], "model.crop_pct must be in [0.5, 1]"),
    ("unknown positional embedding", ["pretrain", "--set", "model.pos_embed=rope"], "model.pos_embed must be one of"),
    ("pretrained weights that do not exist", ["pretrain", "--set", "model.pretrained=/no/such.pt"], "does not exist"),
    ("zero steps", ["pretrain", "--set", "train.max_steps=0"], "train.max_steps must be >= 1"),
    ("negative epochs", ["pretrain", "--set", "train.epochs=-1"], "train.epochs must be in (0, 1e5]"),
    ("zero time budget", ["pretrain", "--set", "train.time_budget=0"], "train.time_budget must be > 0"),
    ("log every 0 steps", ["pretrain", "--set", "train.log_every=0"], "must be >= 1"),
    ("keep no checkpoint", ["pretrain", "--set", "train.keep_checkpoints=0"], "train.keep_checkpoints must be >= 1"),
    ("snapshot every whole run", ["pretrain", "--set", "train.snapshot_every=1"], "train.snapshot_every must be"),
    ("unknown non-finite policy", ["pretrain", "--set", "train.on_nonfinite=maybe"], "must be stop or skip"),
    ("unknown precision", ["pretrain", "--set", "train.precision=fp8"], "train.precision must be"),
    ("accumulation not dividing the batch", ["pretrain", "--set", "train.accum_steps=3"], "train.accum_steps"),
    ("warm-up over the whole run", ["pretrain", "--set", "optim.warmup=1"], "optim.warmup must be a fraction"),
    ("zero lr", ["pretrain", "--set", "optim.lr=0"], "optim.lr must be > 0"),
    ("kNN k 0 in the config", ["pretrain", "--set", "eval.knn_k=0"], "eval.knn_k must be >= 1"),
    ("kNN temperature 0", ["pretrain", "--set", "eval.knn_temperature=0"], "eval.knn_temperature must be > 0"),
    ("kNN temperature 0 on the CLI", ["eval", "knn", "--checkpoint", "{ckpt}", "--temperature", "0"], "must be > 0"),
    ("eval batch size 0 on the CLI", ["eval", "knn", "--checkpoint", "{ckpt}", "--batch-size", "0"], "must be >= 1"),
    ("inspect no image", ["inspect", "{ckpt}", "--num-images", "0"], "--num-images must be in [1, 256]"),
    (
        "compare read out at no point",
        ["compare", "--variant", "a=", "--curve-points", "0", "--out", "{out}"],
        "in [1, 99]",
    ),
    ("check-data on a missing folder", ["check-data", "/nonexistent/images"], "does not exist"),
    ("export a missing checkpoint", ["export", "/nonexistent/run", "--out", "{out}"], "does not exist"),
    ("plot a folder that is not a run", ["plot", "{empty}"], "is not a run folder"),
    (
        "compare with no time",
        ["compare", "--variant", "a=", "--time-budget", "0", "--out", "{out}"],
        "must be in (0, 10000000]",
    ),
    # ---- round three: configs that could exhaust memory or run code ----
    ("YAML billion laughs", ["pretrain", "--config", "{bomb}"], "is too large once its aliases are expanded"),
    ("YAML nested 40 deep", ["pretrain", "--config", "{nested}"], "levels of nesting"),
    ("YAML nested 3000 deep", ["pretrain", "--config", "{deep}"], "is nested too deeply"),
    ("YAML alias inside itself", ["pretrain", "--config", "{recursive}"], "recursive YAML alias"),
    ("config file over 1 MB", ["pretrain", "--config", "{huge_yaml}"], "is over 1 MB"),
    ("config path that is a folder", ["pretrain", "--config", "{yaml_folder}"], "is a folder; give a YAML file"),
    ("YAML naming a method file", ["pretrain", "--config", "{plugin_yaml}"], "pass --method with that name"),
    ("method file with a syntax error", ["pretrain", "--method", "{syntax_method}"], "SyntaxError"),
    ("method file raising on import", ["pretrain", "--method", "{raising_method}"], "RuntimeError: boom at import"),
    ("method file calling sys.exit", ["pretrain", "--method", "{exiting_method}"], "SystemExit: 3"),
    ("method file without the class", ["pretrain", "--method", "{classless_method}"], "has no Method subclass"),
    ("checkpoint naming a method file: knn", ["eval", "knn", "--checkpoint", "{plugin_run}"], "pass --method"),
    ("checkpoint naming a method file: linear", ["eval", "linear", "--checkpoint", "{plugin_run}"], "pass --method"),
    ("checkpoint naming a method file: export", ["export", "{plugin_run}", "--out", "{out}"], "pass --method"),
    ("checkpoint naming a method file: inspect", ["inspect", "{plugin_run}"], "pass --method"),
    ("checkpoint naming a method file: resume", ["pretrain", "--out", "{plugin_run}", "--resume"], "pass --method"),
    (
        "checkpoint naming a method file: pretrained",
        ["pretrain", "--set", "model.pretrained={plugin_run}"],
        "export its backbone first",
    ),
    (
        "checkpoint of another method than --method",
        ["eval", "knn", "--checkpoint", "{ckpt}", "--method", "dino"],
        "the checkpoint names the method 'mocov3', not 'dino'",
    ),
    # ---- resource knobs ----
    ("a hundred thousand loader workers", ["pretrain", "--set", "data.num_workers=100000"], "is more than"),
    ("eval with 100000 workers", ["eval", "knn", "--checkpoint", "{ckpt}", "--workers", "100000"], "is more than"),
    ("check-data with 100000 workers", ["check-data", "{two_classes}", "--workers", "100000"], "is more than"),
    ("image of a million pixels a side", ["pretrain", "--set", "model.img_size=1000000"], "must be <= 4096"),
    ("a thousand blocks", ["pretrain", "--set", "model.depth=1000"], "model.depth must be in [1, 64]"),
    (
        "zero-sized local crops",
        ["pretrain", "--method", "dino", "--set", "method.dino.local_crop_size=0"],
        "local_crop_size must be in [1, 4096]",
    ),
    (
        "local crops off the patch grid",
        ["pretrain", "--method", "dino", "--set", "method.dino.local_crop_size=6"],
        "must be a multiple of model.patch_size",
    ),
    (
        "a thousand local crops",
        ["pretrain", "--method", "dino", "--set", "method.dino.local_crops=1000"],
        "local_crops must be in [0, 64]",
    ),
    (
        "a billion prototypes",
        ["pretrain", "--method", "dino", "--set", "method.dino.out_dim=1000000000"],
        "head sizes must be in [1, 2^18]",
    ),
    ("a billion-wide projector", ["pretrain", "--set", "method.mocov3.proj_dim=1000000000"], "in [1, 2^18]"),
    (
        "a thousand decoder blocks",
        ["pretrain", "--method", "mae", "--set", "method.mae.decoder_depth=1000"],
        "method.mae decoder sizes",
    ),
    (
        "a BYOL target momentum above 1",
        ["pretrain", "--method", "byol", "--set", "method.byol.momentum=1.5"],
        "method.byol.momentum must be in [0, 1]",
    ),
    (
        "a billion-wide BYOL predictor",
        ["pretrain", "--method", "byol", "--set", "method.byol.proj_hidden_dim=1000000000"],
        "method.byol head sizes",
    ),
    (
        "a negative VICReg weight",
        ["pretrain", "--method", "vicreg", "--set", "method.vicreg.variance_weight=-25"],
        "method.vicreg weights must be finite",
    ),
    (
        "VICReg with every weight zero",
        [
            "pretrain",
            "--method",
            "vicreg",
            "--set",
            "method.vicreg.invariance_weight=0",
            "--set",
            "method.vicreg.variance_weight=0",
            "--set",
            "method.vicreg.covariance_weight=0",
        ],
        "not all 0",
    ),
    (
        "an iBOT mask covering every patch",
        ["pretrain", "--method", "ibot", "--set", "method.ibot.mask_max_ratio=1.0"],
        "need 0 <= mask_min_ratio <= mask_max_ratio < 1",
    ),
    (
        "an iBOT mask range upside down",
        ["pretrain", "--method", "ibot", "--set", "method.ibot.mask_min_ratio=0.6"],
        "need 0 <= mask_min_ratio <= mask_max_ratio < 1",
    ),
    (
        "iBOT with both loss weights zero",
        ["pretrain", "--method", "ibot", "--set", "method.ibot.cls_weight=0", "--set", "method.ibot.patch_weight=0"],
        "not both 0",
    ),
    (
        "an iBOT local crop that is not a multiple of the patch",
        ["pretrain", "--method", "ibot", "--set", "method.ibot.local_crop_size=6"],
        "method.ibot.local_crop_size 6 must be a multiple of model.patch_size",
    ),
    (
        "I-JEPA target blocks larger than the image",
        ["pretrain", "--method", "ijepa", "--set", "method.ijepa.target_max_scale=1.5"],
        "need 0 < target_min_scale / target_max_scale in order and <= 1",
    ),
    (
        "an I-JEPA predictor width its heads do not divide",
        ["pretrain", "--method", "ijepa", "--set", "method.ijepa.predictor_dim=100"],
        "method.ijepa.predictor_dim 100 is not divisible by predictor_heads 3",
    ),
    (
        "a model without class token read out by it",
        ["pretrain", "--set", "model.class_token=false"],
        "model.class_token=false leaves no class token to read out: set model.global_pool",
    ),
    (
        "an unknown pooling",
        ["pretrain", "--set", "model.global_pool=mean"],
        "model.global_pool must be null or one of token, avg, max, avgmax",
    ),
    (
        "a VICReg expander too wide for memory",
        ["pretrain", "--method", "vicreg", "--set", "method.vicreg.expander_dim=100000"],
        "method.vicreg.expander_dim must be in [1, 2^14]",
    ),
    # ---- the run length, resume, output paths ----
    (
        "a run with no end",
        ["pretrain", "--set", "train.max_steps=null", "--set", "train.time_budget=null"],
        "the run has no end",
    ),
    ("resume from another run's checkpoint", ["pretrain", "--out", "{foreign}", "--resume"], "belongs to another run"),
    (
        "JSON into a missing folder",
        ["eval", "knn", "--checkpoint", "{ckpt}", "--json", "{missing_json_folder}"],
        "is not an existing folder",
    ),
    ("JSON onto a folder", ["eval", "knn", "--checkpoint", "{ckpt}", "--json", "{json_folder}"], "is a folder; give"),
    ("JSON named like a picture", ["eval", "knn", "--checkpoint", "{ckpt}", "--json", "out.png"], "ending in .json"),
    ("export named like a checkpoint", ["export", "{ckpt}", "--out", "backbone.pt"], "not a .pt file"),
    ("export under a missing folder", ["export", "{ckpt}", "--out", "{save_under_missing}"], "not an existing folder"),
    ("fine-tune saved over a folder", ["eval", "finetune", "--checkpoint", "{ckpt}", "--save", "{empty}"], "exists"),
    (
        "fine-tune saved under a missing folder",
        ["eval", "finetune", "--checkpoint", "{ckpt}", "--save", "{save_under_missing}"],
        "is not an existing folder",
    ),
    # ---- data: lists, duplicates, classes ----
    ("file list in Latin-1", ["pretrain", "--data", "{latin1_list}"], "is not UTF-8"),
    ("file list with three fields", ["pretrain", "--data", "{three_fields}"], "expected 'path' or 'path,label'"),
    ("file list with some labels", ["pretrain", "--data", "{mixed_labels}"], "give a label on every line or on none"),
    ("file list with a negative label", ["pretrain", "--data", "{negative_label}"], "labels must be >= 0"),
    ("file list of comments only", ["pretrain", "--data", "{comments_only}"], "names no images"),
    (
        "folder of duplicates only",
        ["pretrain", "--data", "{duplicates}"],
        "holds 12 images, 12 of them with an exact copy",
    ),
    ("IDX folder without images", ["pretrain", "--data", "{idx_labels_only}"], "no *-images-idx3-ubyte"),
    ("kNN on one class", ["eval", "knn", "--checkpoint", "{ckpt}", "--data", "{one_class}"], "at least 2 classes"),
    ("linear probe on one class", ["eval", "linear", "--checkpoint", "{ckpt}", "--data", "{one_class}"], "2 classes"),
    ("occlusion on one class", ["eval", "occlusion", "--checkpoint", "{ckpt}", "--data", "{one_class}"], "2 classes"),
    # ---- every option range-checked ----
    ("eval seed -5", ["eval", "knn", "--checkpoint", "{ckpt}", "--seed", "-5"], "--seed must be in [0, 2147483648)"),
    ("compare seed -1", ["compare", "--variant", "a=", "--seeds", "-1", "--out", "{out}"], "--seeds must be in"),
    ("compare variant with a newline", ["compare", "--variant", "a\nb=", "--out", "{out}"], "short printable name"),
    ("compare variant with a bar", ["compare", "--variant", "a|b=", "--out", "{out}"], "without '|'"),
    ("compare variant of 100 letters", ["compare", "--variant", "v" * 100 + "=", "--out", "{out}"], "short printable"),
    ("inspect with p = 2", ["inspect", "{ckpt}", "--misplace-prob", "2"], "--misplace-prob must be in [0, 1]"),
    ("inspect with r = 1", ["inspect", "{ckpt}", "--drop-rate", "1"], "--drop-rate must be in [0, 1)"),
    ("inspect 100000 images", ["inspect", "{ckpt}", "--num-images", "100000"], "--num-images must be in [1, 256]"),
    ("fine-tune layer decay 0", ["eval", "finetune", "--checkpoint", "{ckpt}", "--layer-decay", "0"], "(0, 1]"),
    ("fine-tune weight decay -1", ["eval", "finetune", "--checkpoint", "{ckpt}", "--weight-decay", "-1"], ">= 0"),
    ("fine-tune drop-path 1", ["eval", "finetune", "--checkpoint", "{ckpt}", "--drop-path", "1"], "[0, 1)"),
    ("fine-tune smoothing 1", ["eval", "finetune", "--checkpoint", "{ckpt}", "--label-smoothing", "1"], "[0, 1)"),
    ("fine-tune warm-up -1", ["eval", "finetune", "--checkpoint", "{ckpt}", "--warmup-epochs", "-1"], "in [0, 100000]"),
    (
        "fine-tune mixup -1",
        ["eval", "finetune", "--checkpoint", "{ckpt}", "--mixup", "-1"],
        "--mixup must be in [0, 100]",
    ),
    (
        "fine-tune cutmix -1",
        ["eval", "finetune", "--checkpoint", "{ckpt}", "--cutmix", "-1"],
        "--cutmix must be in [0, 100]",
    ),
    ("fine-tune erasing 2", ["eval", "finetune", "--checkpoint", "{ckpt}", "--reprob", "2"], "--reprob must be in"),
    ("fine-tune lr infinite", ["eval", "finetune", "--checkpoint", "{ckpt}", "--lr", "inf"], "a finite number"),
    ("check-data val fraction 0", ["check-data", "{two_classes}", "--val-fraction", "0"], "(0, 1)"),
    ("occlusion fraction nan", ["eval", "occlusion", "--checkpoint", "{ckpt}", "--fractions", "nan"], "finite"),
    (
        "robustness without labels",
        ["eval", "robustness", "--checkpoint", "{ckpt}", "--data", "{unlabelled}"],
        "needs labels",
    ),
    ("robustness grid 5 at 28 px", ["eval", "robustness", "--checkpoint", "{ckpt}", "--grids", "5"], "do not divide"),
    (
        "robustness q above 1",
        ["eval", "robustness", "--checkpoint", "{ckpt}", "--position-fractions", "1.5"],
        "eval.position_fractions must be in [0, 1]",
    ),
    (
        "robustness q = -0.1 by --set",
        ["eval", "robustness", "--checkpoint", "{ckpt}", "--set", "eval.position_fractions=[-0.1]"],
        "must be in [0, 1]",
    ),  # fmt: skip
    ("shape bias on other data", ["eval", "shape-bias", "--checkpoint", "{ckpt}", "--data", "{two_classes}"], "--data"),
    (
        "linear probe 0 epochs",
        ["eval", "linear", "--checkpoint", "{ckpt}", "--epochs", "0"],
        "--epochs must be in [1, 100000]",
    ),
    ("compare probe 0 epochs", ["compare", "--variant", "a=", "--probe-epochs", "0", "--out", "{out}"], ">= 1"),
    ("compare 0 steps", ["compare", "--variant", "a=", "--max-steps", "0", "--out", "{out}"], "--max-steps must be"),
    ("pretrain time budget -1", ["pretrain", "--time-budget", "-1"], "--time-budget must be in (0, 10000000]"),
    ("pretrain 0 steps on the CLI", ["pretrain", "--max-steps", "0"], "--max-steps must be >= 1"),
    # ---- round three, second pass (an adversarial review) ----
    ("a snapshot every 1e-7 of the run", ["pretrain", "--set", "train.snapshot_every=1e-7"], "at most 99 snapshots"),
    ("compare read out 1000 times", ["compare", "--variant", "a=", "--curve-points", "1000", "--out", "{out}"], "99]"),
    ("crop fraction 1e-4", ["pretrain", "--set", "model.crop_pct=0.0001"], "model.crop_pct must be in [0.5, 1]"),
    ("a data name YAML would read as a number", ["pretrain", "--data", "010"], "data source '010' is neither"),
    ("a data name with a hash", ["pretrain", "--data", "data #1"], "data source 'data #1' is neither"),
    ("IDX images of two dimensions", ["pretrain", "--data", "{idx_2d}"], "images must be (N, H, W)"),
    ("IDX labels of two dimensions", ["pretrain", "--data", "{idx_2d_labels}"], "labels must be one number per image"),
    ("IDX header of 2^96 values", ["pretrain", "--data", "{idx_overflow}"], "is truncated: header says"),
    (
        "a projector of 2^36 weights",
        ["pretrain", "--set", "method.mocov3.proj_hidden_dim=262144", "--set", "method.mocov3.proj_dim=262144"],
        "product <= 2^28",
    ),
    (
        "a million tokens per image",
        ["pretrain", "--set", "model.img_size=4096", "--set", "model.patch_size=1"],
        "patch tokens per image",
    ),
    (
        "local crops larger than the image",
        ["pretrain", "--method", "dino", "--set", "method.dino.local_crop_size=4096"],
        "up to model.img_size 28",
    ),
    ("micro-batches of one image", ["pretrain", "--set", "train.accum_steps=32"], "micro-batches of at least 2"),
    ("epochs 1e308", ["pretrain", "--set", "train.epochs=1e308"], "train.epochs must be in (0, 1e5]"),
    ("checkpoint of a 100000 px model", ["eval", "knn", "--checkpoint", "{huge_model}"], "model.img_size must be <="),
    ("checkpoint without a config", ["eval", "knn", "--checkpoint", "{no_config}"], "not a whole dilemma checkpoint"),
    ("fine-tune lr 1e39", ["eval", "finetune", "--checkpoint", "{ckpt}", "--lr", "1e39"], "--lr must be in (0, 100]"),
    ("fine-tune warm-up 1e308", ["eval", "finetune", "--checkpoint", "{ckpt}", "--warmup-epochs", "1e308"], "in [0,"),
    ("fine-tune cutmix 1e-320", ["eval", "finetune", "--checkpoint", "{ckpt}", "--cutmix", "1e-320"], "at least 0.001"),
    (
        "RandAugment spec of garbage",
        ["eval", "finetune", "--checkpoint", "{ckpt}", "--auto-augment", "garbage"],
        "timm",
    ),
    (
        "RandAugment of 10^8 ops",
        ["eval", "finetune", "--checkpoint", "{ckpt}", "--auto-augment", "rand-m9-n100000000"],
        "n <= 20",
    ),
    ("compare into a file", ["compare", "--variant", "a=", "--out", "{file}"], "is a file; give a folder"),
    (
        "compare variant named results.json",
        ["compare", "--variant", "results.json=", "--out", "{out}"],
        "compare writes",
    ),
    (
        "start a built-in from a plug-in run",
        ["pretrain", "--set", "model.pretrained={plugin_run}", "--method", "mocov3"],
        "export its backbone first",
    ),
    ("val folder with no images", ["pretrain", "--data", "{empty_val}"], "holds no images: add the held-out"),
    # shards (issue 31): each names the shard, and what to do
    ("a shard missing", ["pretrain", "--data", "{shards_missing}", *SMALL_IMAGES], "shard 'val-000000.tar' is missing"),
    ("a truncated shard", ["pretrain", "--data", "{shards_truncated}", *SMALL_IMAGES], "its manifest says"),
    (
        "a tar without its index",
        ["pretrain", "--data", "{shards_no_index}", *SMALL_IMAGES],
        "shard 'train-000001.tar' in",
    ),
    (
        "a tar without its index: the command",
        ["pretrain", "--data", "{shards_no_index}", *SMALL_IMAGES],
        "Rebuild its index with: dilemma shard --index",
    ),
    (
        "an index that does not match its tar",
        ["pretrain", "--data", "{shards_wrong_index}", *SMALL_IMAGES],
        "dilemma shard --index",
    ),
    (
        "a manifest of another format version",
        ["pretrain", "--data", "{shards_old_format}", *SMALL_IMAGES],
        "of format 'dilemma-shards-v0'; this dilemma reads 'dilemma-shards-v1'",
    ),
    ("tars without a manifest", ["pretrain", "--data", "{shards_foreign}"], "holds .tar files but no manifest.json"),
    ("shard without --out", ["shard", "{two_classes}"], "needs --out DIR"),
    ("shard into a folder holding other files", ["shard", "{two_classes}", "--out", "{two_classes}"], "is not empty"),
    ("shard into a file", ["shard", "{two_classes}", "--out", "{file}"], "cannot make --out folder"),
    (
        "shard a missing source",
        ["shard", "/nonexistent/images", "--out", "{out}/missing_shards"],
        "is neither an embedded dataset",
    ),
    (
        "shard a corrupt image",
        ["shard", "{corrupt}", "--out", "{out}/corrupt_shards", "--no-progress"],
        "broken.png: not an image PIL can read",
    ),
    (
        "shard 0 samples a shard",
        ["shard", "{two_classes}", "--out", "{out}", "--samples-per-shard", "0"],
        "--samples-per-shard must be in [1, 10000000]",
    ),
    ("index a folder of no tars", ["shard", "--index", "{empty}"], "holds no manifest and no .tar files"),
    ("check-data --verify on a folder", ["check-data", "{two_classes}", "--verify"], "is not one"),
    ("--resume auto without --out", ["pretrain", "--resume", "auto"], "--resume auto needs --out DIR"),
    # round four (issue 33): retired keys name themselves
    ("a retired key", ["pretrain", "--set", "train.progress=false"], "train.progress was renamed train.show_progress"),
    # round four, part two (issue 37)
    (
        "folder whose images all have a twin",
        ["pretrain", "--data", "{twins}"],
        "16 images, 16 of them with an exact copy",
    ),
    (
        "a checkpoint's other method section 2^20 wide",
        ["eval", "knn", "--checkpoint", "{huge_predictor}"],
        "the checkpoint's config is not one this dilemma accepts: method.ijepa predictor sizes",
    ),
    (
        "compare with an arm that cannot run",
        ["compare", "--variant", "a=", "--variant", "b=eval.shuffle_grids=[3]", "--seeds", "0", "--out", "{out}/cmp"],
        "variant 'b' cannot run (nothing was trained): eval.shuffle_grids [3] do not divide",
    ),
    (
        "I-JEPA predictor width the sin-cos PE cannot take",
        [
            "pretrain",
            "--method",
            "ijepa",
            "--set",
            "method.ijepa.predictor_dim=50",
            "--set",
            "method.ijepa.predictor_heads=5",
        ],
        "method.ijepa.predictor_dim must be divisible by 4",
    ),
    ("a data path with a newline", ["pretrain", "--data", "/no/such\nfolder"], "'/no/such\\nfolder' is neither"),
    (
        "a password in an error",
        ["pretrain", "--data", "http://alice:pw123@host/?token=t0k"],
        "'http://host/?token=***' is neither an embedded dataset",
    ),
]

# Inputs that are not errors but were once handled silently or wrongly: each run must succeed and
# say what it did (the fragment appears in its output).
NOTED = [
    ("a file name that is not UTF-8", ["pretrain", "--data", "{latin1_name}", *SMALL_IMAGES], "class folders"),
    ("file list with huge labels", ["pretrain", "--data", "{huge_labels}", *SMALL_IMAGES], "renumbered 0..1"),
    ("file list with spaces in names", ["pretrain", "--data", "{spaces}", *SMALL_IMAGES], "file list"),
    ("file list from Excel (BOM, CRLF)", ["pretrain", "--data", "{excel}", *SMALL_IMAGES], "file list"),
    ("file list in UTF-16", ["pretrain", "--data", "{utf16}", *SMALL_IMAGES], "file list"),
    ("file list with a quoted comma", ["pretrain", "--data", "{quoted}", *SMALL_IMAGES], "file list"),
    ("an exported folder as the start", ["pretrain", "--set", "model.pretrained={exported}"], "exported folder"),
    ("check-data on an IDX folder", ["check-data", "{idx}"], "nothing to decode file by file"),
    ("a file list spelling one label two ways", ["pretrain", "--data", "{two_spellings}", *SMALL_IMAGES],
     "labels read as integers: '007' and '7' are class 7"),
    ("training on shards", ["pretrain", "--data", "{shards_good}", *SMALL_IMAGES], "WebDataset shards made from"),
    ("check-data on shards", ["check-data", "{shards_good}", "--workers", "1"], "0 problems in 3 shards of 12 samples"),
    ("linear probe of an average-pooled ViT", ["eval", "linear", "--checkpoint", "{avg_pool_ckpt}", "--epochs", "1"],
     "frozen dense backbone, avg-pooled patch tokens"),
    ("fine-tuning's layer decay", ["eval", "finetune", "--checkpoint", "{ckpt}", "--epochs", "1", "--batch-size",
     "2", "--data", "{two_classes}"], "embeddings 0, block i i+1, final norm and head depth+1"),
    ("export to a .SAFETENSORS file", ["export", "{ckpt}", "--out", "b.SAFETENSORS"],
     "safetensors.torch.load_file"),
    ("shard an IDX set (PNG-encoded)", ["shard", "{idx}", "--out", "{out}/idx_shards", "--workers", "1"],
     "train on them with --data"),
    ("file list with a comment above its header", ["pretrain", "--data", "{commented}", *SMALL_IMAGES], "file list"),
    ("kNN with k above the bank", ["eval", "knn", "--checkpoint", "{ckpt}", "--data", "{two_classes}", "--k", "50"],
     "k=50 asked"),
    ("a plug-in checkpoint with its --method", ["eval", "knn", "--checkpoint", "{plugin_run}", "--method", "{toy}"],
     "kNN top-1"),
]  # fmt: skip


def _filled(arg: str, fixtures: dict[str, str]) -> str:
    for placeholder, value in fixtures.items():
        arg = arg.replace(placeholder, value)
    return arg


def argv_for(case_argv: list[str], fixtures: dict[str, str]) -> list[str]:
    argv = [_filled(a, fixtures) for a in case_argv]
    if argv[0] == "pretrain":  # the tiny recipe first, so that the case's own settings win
        argv = ["pretrain", *TINY_SETS, *argv[1:]]
    return argv


if __name__ == "__main__":
    import collections
    import contextlib
    import tempfile

    from dilemma.cli import main
    from tests.test_reliability import checkpoint_fixtures

    outcomes = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        fixtures = make_fixtures(Path(tmp))
        fixtures.update(checkpoint_fixtures(Path(tmp)))
        for number, (name, case, _) in enumerate(CASES + NOTED):
            out, err = io.StringIO(), io.StringIO()
            (Path(tmp) / f"case_{number}").mkdir()  # a fresh working folder per case, as the tests give
            os.chdir(Path(tmp) / f"case_{number}")
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                code = main(argv_for(case, fixtures))
            lines = (err.getvalue() or out.getvalue()).strip().splitlines() or [""]
            outcomes[code] += 1
            print(f"- {name} (exit {code}): `{lines[-1].replace(tmp, '<tmp>')[:300]}`")
    print(f"exit statuses: {dict(outcomes)}")
