"""The catalogue of bad inputs: each case is a command line that must end with one clear message.

Used by tests/test_reliability.py; ``python -m tests.bad_inputs`` prints every case with the
message a user sees (the list in the reliability issue's closing note comes from it).
"""

from __future__ import annotations

import io
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
    return {k: str(v) for k, v in fixtures.items()}


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
    ("unknown config key", ["pretrain", "--set", "optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
    ("mistyped config key", ["pretrain", "--set", "dilema.drop_rate=0.5"], "did you mean 'dilemma.drop_rate'"),
    ("wrong value type", ["pretrain", "--set", "optim.lr=fast"], "needs a value of type float"),
    ("--set without =", ["pretrain", "--set", "optim.lr"], "--set needs key=value"),
    ("bad YAML", ["pretrain", "--config", "{yaml_bad}"], "is not valid YAML"),
    ("YAML that is not a mapping", ["pretrain", "--config", "{yaml_list}"], "must hold a mapping of sections"),
    ("missing config file", ["pretrain", "--config", "{missing}"], "does not exist"),
    ("unknown method", ["pretrain", "--method", "byol"], "unknown method 'byol'"),
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
    ("zero depth", ["pretrain", "--set", "model.depth=0"], "model.depth must be >= 1"),
    ("drop-path of 1.5", ["pretrain", "--set", "model.drop_path_rate=1.5"], "drop_path_rate must be in [0, 1)"),
    ("seed past 2^31", ["pretrain", "--seed", "99999999999999999999"], "train.seed must be in [0, 2^31)"),
    ("eval batch size 0", ["pretrain", "--set", "eval.batch_size=0"], "eval.batch_size must be >= 1"),
    ("kNN with k = 0", ["eval", "knn", "--checkpoint", "{ckpt}", "--k", "0"], "--k must be >= 1"),
    ("linear probe lr nan", ["eval", "linear", "--checkpoint", "{ckpt}", "--lr", "nan"], "--lr must be a finite"),
    ("fine-tune 0 epochs", ["eval", "finetune", "--checkpoint", "{ckpt}", "--epochs", "0"], "--epochs must be >= 1"),
    ("occlusion fraction 0", ["eval", "occlusion", "--checkpoint", "{ckpt}", "--fractions", "0"], "must be in (0, 1]"),
    ("negative workers", ["eval", "knn", "--checkpoint", "{ckpt}", "--workers", "-1"], "--workers must be >= 0"),
    ("compare with a seed twice", ["compare", "--variant", "a=", "--seeds", "0", "0", "--out", "{out}"], "seed twice"),
    ("compare variant named like a path", ["compare", "--variant", "../x=", "--out", "{out}"], "must be a plain name"),
    (
        "fine-tune batch larger than the data",
        ["eval", "finetune", "--checkpoint", "{ckpt}", "--data", "{corrupt}", "--batch-size", "64"],
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
    ("crop fraction 0", ["pretrain", "--set", "model.crop_pct=0"], "model.crop_pct must be in (0, 1]"),
    ("unknown positional embedding", ["pretrain", "--set", "model.pos_embed=rope"], "model.pos_embed must be one of"),
    ("pretrained weights that do not exist", ["pretrain", "--set", "model.pretrained=/no/such.pt"], "does not exist"),
    ("zero steps", ["pretrain", "--set", "train.max_steps=0"], "train.max_steps must be >= 1"),
    ("negative epochs", ["pretrain", "--set", "train.epochs=-1"], "train.epochs must be > 0"),
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
    ("inspect no image", ["inspect", "{ckpt}", "--num-images", "0"], "--num-images must be >= 1"),
    ("compare read out at no point", ["compare", "--variant", "a=", "--curve-points", "0", "--out", "{out}"], ">= 1"),
    ("check-data on a missing folder", ["check-data", "/nonexistent/images"], "does not exist"),
    ("export a missing checkpoint", ["export", "/nonexistent/run", "--out", "{out}"], "does not exist"),
    ("plot a folder that is not a run", ["plot", "{empty}"], "is not a run folder"),
    ("compare with no time", ["compare", "--variant", "a=", "--time-budget", "0", "--out", "{out}"], "must be > 0"),
]


def argv_for(case_argv: list[str], fixtures: dict[str, str]) -> list[str]:
    argv = [fixtures.get(a, a) for a in case_argv]
    if argv[0] == "pretrain":  # the tiny recipe first, so that the case's own settings win
        argv = ["pretrain", *TINY_SETS, *argv[1:]]
    return argv


if __name__ == "__main__":
    import contextlib
    import tempfile

    from dilemma.cli import main
    from tests.test_reliability import checkpoint_fixtures

    with tempfile.TemporaryDirectory() as tmp:
        fixtures = make_fixtures(Path(tmp))
        fixtures.update(checkpoint_fixtures(Path(tmp)))
        for name, case, _ in CASES:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv_for(case, fixtures))
            message = err.getvalue().strip().splitlines()[-1].replace(tmp, "<tmp>")
            print(f"- {name} (exit {code}): `{message}`")
