"""Streaming image folders at 224 px: start-up, memory, loader throughput per worker, model speed.

    python benchmarks/data_loading.py                     # 20,000 JPEGs, 100 classes, 200-500 px
    python benchmarks/data_loading.py --files 2000        # a quick look

Generates a synthetic ImageNet-like folder (real JPEG encoding; kept in ``--folder``, outside the
repo, and reused when it is already there), then measures, each in a fresh process:
- start-up: listing + train/val split, and the first batch of each recipe's views, for 25 / 50 /
  100 % of the classes (start-up should grow linearly with the number of files);
- peak RSS of a process that lists the folder and decodes 20 batches, and the same for 12 JPEGs
  with 300 MB appended to each (sparse files): memory must not follow file sizes;
- decoded + augmented images per second in ONE process (what one DataLoader worker gives), for
  the views of each paper recipe (configs/paper_*.yaml) at 224 px;
- the model's training images per second for ViT-S/16 at 224 px (MoCo v3 + DILEMMA, the recipe's
  step at a small batch) on this machine's device, so that the workers needed per accelerator can
  be read off: workers = model img/s / loader img/s per worker.
Writes ``benchmarks/results/data_loading.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPES = ["paper_mocov3_vits16", "paper_dino_vits16", "paper_simclr_vits16", "paper_mae_vitb16"]


def generate(folder: Path, files: int, classes: int, seed: int = 0) -> None:
    from tests.imagefolder import make_image_folder

    done = folder / ".complete"
    if done.exists() and done.read_text() == f"{files} {classes}":
        return
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    make_image_folder(folder, classes=classes, per_class=files // classes, sizes=(200, 500), seed=seed)
    done.write_text(f"{files} {classes}")
    print(f"generated {files} JPEGs in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def in_subprocess(code: str) -> dict:
    """Run ``code`` (which prints one JSON line) in a fresh interpreter; add its peak RSS."""
    rss = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
    wrapper = f"import json, resource\n{code}\nprint(json.dumps({{**RESULT, 'peak_rss_mb': {rss}}}))"
    out = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def startup(folder: Path, recipe: str) -> dict:
    return in_subprocess(f"""
import time
t0 = time.perf_counter()
from dilemma.build import build_views, load_splits
from dilemma.config import load_config
from dilemma.data import PretrainBatches
t1 = time.perf_counter()
cfg = load_config({str(ROOT / "configs" / (recipe + ".yaml"))!r}, ["data.source={folder}", "data.batch_size=64"])
splits = load_splits(cfg)
t2 = time.perf_counter()
batches = PretrainBatches(splits.train, 64, build_views(cfg), seed=0)
batches[0]
t3 = time.perf_counter()
RESULT = dict(files=len(splits.train) + len(splits.val), import_s=t1 - t0, list_split_s=t2 - t1, first_batch_s=t3 - t2)
""")


def decode_rss(folder: Path, batches: int = 20, batch: int = 32) -> dict:
    return in_subprocess(f"""
from dilemma.build import build_views, load_splits
from dilemma.config import load_config
from dilemma.data import PretrainBatches
recipe = {str(ROOT / "configs" / "paper_mocov3_vits16.yaml")!r}
cfg = load_config(recipe, ["data.source={folder}", "data.batch_size={batch}", "data.val_fraction=0.2"])
splits = load_splits(cfg)
b = PretrainBatches(splits.train, {batch}, build_views(cfg), seed=0)
for step in range({batches}):
    b[step]
RESULT = dict(files=len(splits.train) + len(splits.val), batches={batches}, batch={batch})
""")


def big_files(folder: Path, source: Path) -> Path:
    """12 JPEGs of ``source`` with 300 MB appended to each (sparse: no disk used)."""
    big = folder.parent / "big_files"
    shutil.rmtree(big, ignore_errors=True)
    jpegs = sorted(source.rglob("*.jpg"))
    for i in range(12):
        target = big / f"class_{i % 2}" / f"img_{i}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(jpegs[i], target)
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) + 300 * 2**20)
    return big


def loader_rate(folder: Path, recipe: str, steps: int) -> dict:
    return in_subprocess(f"""
import time, torch
torch.set_num_threads(1)
from dilemma.build import build_views, load_splits
from dilemma.config import load_config
from dilemma.data import PretrainBatches
cfg = load_config({str(ROOT / "configs" / (recipe + ".yaml"))!r}, ["data.source={folder}", "data.batch_size=32"])
splits = load_splits(cfg)
b = PretrainBatches(splits.train, 32, build_views(cfg), seed=0)
b[0]
t = time.perf_counter()
for step in range(1, {steps} + 1):
    b[step]
elapsed = time.perf_counter() - t
RESULT = dict(recipe={recipe!r}, img_per_s={steps} * 32 / elapsed, views=len(b[0].views))
""")


def model_rate(device: str, batch: int, steps: int) -> dict:
    return in_subprocess(f"""
import time, torch
from dilemma.build import build_method
from dilemma.config import load_config
from dilemma.train.step import Stepper
precision = "bf16" if {device!r} == "cuda" else "fp32"
cfg = load_config({str(ROOT / "configs" / "paper_mocov3_vits16.yaml")!r}, [f"train.precision={{precision}}"])
dev = torch.device({device!r})
method = build_method(cfg).to(dev)
opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
stepper = Stepper(method, method, opt, device=dev, precision=precision, accum_steps=1, grad_clip=None, seed=0)
views = tuple(torch.randn({batch}, 3, 224, 224, device=dev) for _ in range(2))
for i in range(2):
    stepper.step(views, 0.5, i, False)
if dev.type == "cuda":
    torch.cuda.synchronize()
t = time.perf_counter()
for i in range({steps}):
    stepper.step(views, 0.5, i, False)
if dev.type == "cuda":
    torch.cuda.synchronize()
rate = {steps} * {batch} / (time.perf_counter() - t)
RESULT = dict(device=str(dev), precision=precision, batch={batch}, img_per_s=rate, threads=torch.get_num_threads())
""")


def subset(folder: Path, fraction: float) -> Path:
    """A folder of symlinks to the first ``fraction`` of the class folders."""
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    part = folder.parent / f"subset_{round(fraction * 100)}"
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    for c in classes[: max(1, round(len(classes) * fraction))]:
        (part / c.name).symlink_to(c, target_is_directory=True)
    return part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--folder", default="/tmp/dilemma-synthetic-imagenet/train")
    parser.add_argument("--loader-steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-batch", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_loading"))
    args = parser.parse_args()
    folder = Path(args.folder)
    generate(folder, args.files, args.classes)

    results = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    results["startup"] = [
        startup(folder if f == 1 else subset(folder, f), "paper_mocov3_vits16") for f in (0.25, 0.5, 1.0)
    ]
    results["rss"] = {
        "folder": decode_rss(folder),
        "big_files": decode_rss(big_files(folder, folder), batches=2, batch=4),
    }
    results["loader"] = [loader_rate(folder, r, args.loader_steps) for r in RECIPES]
    results["model"] = model_rate(args.device, args.model_batch, steps=3 if args.device == "cpu" else 20)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(report(results))
    print(report(results))


def report(r: dict) -> str:
    lines = [
        "# Streaming image folders: start-up, memory, loader and model throughput (224 px)",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}",
        "",
        "## Start-up (fresh process; MoCo v3 ViT-S/16 recipe, batch 64)",
        "",
        "| files | import s | list + split s | first batch s | peak RSS MB |",
        "|---:|---:|---:|---:|---:|",
    ]
    for s in r["startup"]:
        lines.append(
            f"| {s['files']} | {s['import_s']:.1f} | {s['list_split_s']:.2f} | {s['first_batch_s']:.2f} "
            f"| {s['peak_rss_mb']:.0f} |"
        )
    folder, big = r["rss"]["folder"], r["rss"]["big_files"]
    lines += [
        "",
        "## Peak memory",
        "",
        f"- {folder['files']} files, list + split + {folder['batches']} batches of {folder['batch']}: "
        f"{folder['peak_rss_mb']:.0f} MB",
        f"- 12 JPEGs with 300 MB appended to each, list + split + {big['batches']} batches of {big['batch']}: "
        f"{big['peak_rss_mb']:.0f} MB",
        "",
        "## Loader: decoded + augmented images per second in one process (= one DataLoader worker)",
        "",
        "| recipe | views per image | img/s per worker |",
        "|---|---:|---:|",
    ]
    for s in r["loader"]:
        lines.append(f"| {s['recipe']} | {s['views']} | {s['img_per_s']:.1f} |")
    m = r["model"]
    lines += [
        "",
        "## Model",
        "",
        f"MoCo v3 + DILEMMA, ViT-S/16 at 224 px, {m['precision']} on {m['device']} ({m['threads']} threads), batch "
        f"{m['batch']}: {m['img_per_s']:.1f} training img/s.",
        "",
        "Workers needed to feed a device: its training img/s / the recipe's img/s per worker.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
