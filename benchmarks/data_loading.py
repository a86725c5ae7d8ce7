"""Streaming image folders at 224 px: is a step model- or loader-bound? Start-up, memory, the worker
stage per CPU core, the device stage, against a baseline commit and lightly's transforms.

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/data_loading.py --baseline acade67
    python benchmarks/data_loading.py --files 2000 --rounds 1     # a quick look
    python benchmarks/data_loading.py --lightly-python /tmp/lightly-venv/bin/python --baseline acade67

Generates an ImageNet-like folder of photo-like JPEGs (300-640 px sides, a 1/f spectrum, quality 90:
~0.6 bytes per pixel, as ImageNet's files; kept in ``--folder``, outside the repo, and reused), then
measures, each in a fresh process:
- the worker stage: decoded + cropped images per second in ONE process (= one DataLoader worker on
  one core) for the views of each paper recipe (configs/paper_*.yaml), with this checkout, with it
  decoding every file with PIL (no torchvision JPEG fast path), with the code of ``--baseline``
  (whose workers also ran the photometric ops), and with lightly's transforms where
  ``--lightly-python`` (or this Python) has lightly; the sides take turns, each side's number is its
  fastest of ``--rounds`` (a busy machine only ever slows a round down);
- the device stage (``Views.finish``: photometric ops + normalisation of a batch) in ms per image,
  on this CPU with one thread and on CUDA where there is a GPU;
- start-up (listing + train/val split, first batch) for 25 / 50 / 100 % of the classes, and peak
  RSS of a process that decodes 20 batches, and of one reading 12 JPEGs with 300 MB appended each;
- the model's training images per second for ViT-S/16 at 224 px (MoCo v3 + DILEMMA) on ``--device``.
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
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPES = ["paper_mocov3_vits16", "paper_dino_vits16", "paper_simclr_vits16", "paper_mae_vitb16"]
TARGETS = {"paper_mocov3_vits16": 350, "paper_dino_vits16": 150, "paper_simclr_vits16": 350, "paper_mae_vitb16": 600}
# lightly's transforms with each recipe's views (BYOL's asymmetric pair is MoCo v3's augmentation)
LIGHTLY = {
    "paper_mocov3_vits16": "BYOLTransform()",
    "paper_dino_vits16": "DINOTransform(n_local_views=8)",
    "paper_simclr_vits16": "SimCLRTransform()",
    "paper_mae_vitb16": "MAETransform()",
}
BATCH = 32


def generate(folder: Path, files: int, classes: int, seed: int = 0) -> dict:
    """The photo-like folder (made once); its size in bytes per pixel."""
    from PIL import Image

    from tests.imagefolder import make_image_folder, photo_like_image

    done = folder / ".complete"
    if not (done.exists() and done.read_text() == f"{files} {classes}"):
        shutil.rmtree(folder, ignore_errors=True)
        start = time.perf_counter()
        make_image_folder(
            folder, classes=classes, per_class=files // classes, sizes=(300, 640), seed=seed, image=photo_like_image
        )
        done.write_text(f"{files} {classes}")
        print(f"generated {files} JPEGs in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    sample = sorted(folder.rglob("*.jpg"))[:500]
    pixels = sum(Image.open(p).size[0] * Image.open(p).size[1] for p in sample)
    size = sum(p.stat().st_size for p in sample)
    return {"files": files, "bytes_per_pixel": size / pixels, "mean_kb": size / len(sample) / 1024}


def in_subprocess(code: str, python: str = sys.executable, src: Path = ROOT / "src") -> dict:
    """Run ``code`` (which sets RESULT) in a fresh interpreter importing dilemma from ``src``; add its peak RSS."""
    rss = "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024"
    wrapper = f"import json, resource\n{code}\nprint(json.dumps({{**RESULT, 'peak_rss_mb': {rss}}}))"
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
    out = subprocess.run([python, "-c", wrapper], capture_output=True, text=True, cwd=ROOT, env=env)
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


def worker_rate(folder: Path, recipe: str, steps: int, src: Path, pil_only: bool = False) -> dict:
    """Images per second of ``PretrainBatches[step]`` in one process: what one worker gives."""
    return in_subprocess(
        f"""
import time, torch
torch.set_num_threads(1)
import dilemma.data.folders
if {pil_only}:
    dilemma.data.folders.decode_jpeg = None  # every file through PIL
from dilemma.build import build_views, load_splits
from dilemma.config import load_config
from dilemma.data import PretrainBatches
cfg = load_config({str(ROOT / "configs" / (recipe + ".yaml"))!r}, ["data.source={folder}", "data.batch_size={BATCH}"])
b = PretrainBatches(load_splits(cfg).train, {BATCH}, build_views(cfg), seed=0)
b[0]
t = time.perf_counter()
for step in range(1, {steps} + 1):
    b[step]
RESULT = dict(img_per_s={steps} * {BATCH} / (time.perf_counter() - t), views=len(b[0].views))
""",
        src=src,
    )


def lightly_rate(folder: Path, recipe: str, steps: int, python: str) -> dict:
    """lightly's transform of the recipe's views, image by image from the file, in one process."""
    return in_subprocess(
        f"""
import time, torch, lightly
torch.set_num_threads(1)
from pathlib import Path
from PIL import Image
from lightly.transforms import BYOLTransform, DINOTransform, MAETransform, SimCLRTransform
transform = {LIGHTLY[recipe]}
paths = sorted(Path({str(folder)!r}).rglob("*.jpg"))[: ({steps} + 1) * {BATCH}]
def one(path):
    with Image.open(path) as img:
        return transform(img.convert("RGB"))
for path in paths[:{BATCH}]:
    one(path)
t = time.perf_counter()
for path in paths[{BATCH}:]:
    one(path)
RESULT = dict(img_per_s=(len(paths) - {BATCH}) / (time.perf_counter() - t), version=lightly.__version__)
""",
        python=python,
    )


def device_stage(folder: Path, recipe: str, device: str, batch: int) -> dict:
    """ms per image of ``Views.finish`` (every view of the image) on ``device``."""
    return in_subprocess(f"""
import time, torch
torch.set_num_threads(1)
from dilemma.build import build_views, load_splits
from dilemma.config import load_config
from dilemma.data import PretrainBatches
cfg = load_config({str(ROOT / "configs" / (recipe + ".yaml"))!r}, ["data.source={folder}", "data.batch_size={batch}"])
b = PretrainBatches(load_splits(cfg).train, {batch}, build_views(cfg), seed=0)
dev = torch.device({device!r})
batch = b[0]
if dev.type == "cuda":  # pinned, as the loader hands crops to a GPU
    batch = batch._replace(views=tuple(v.pin_memory() for v in batch.views))
mean, std = cfg.model.mean, cfg.model.std
def run():
    b.views.finish(batch.views, batch.draws, dev, mean, std)
    if dev.type == "cuda":
        torch.cuda.synchronize()
for _ in range(3):
    run()
times = []
for _ in range(10):
    t = time.perf_counter()
    run()
    times.append(time.perf_counter() - t)
times.sort()
RESULT = dict(recipe={recipe!r}, device={device!r}, batch={batch}, ms_per_image=1000 * times[len(times) // 2] / {batch})
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
stepper = Stepper(method, opt, device=dev, precision=precision, accum_steps=1, grad_clip=None, seed=0)
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


def baseline_src(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into / "src"


def worker_stage(folder: Path, args) -> list[dict]:
    """Every recipe's worker img/s per side, the sides taking turns; each side's fastest round."""
    sides = {"after": lambda r: worker_rate(folder, r, args.loader_steps, ROOT / "src")}
    sides["after, PIL decode only"] = lambda r: worker_rate(folder, r, args.loader_steps, ROOT / "src", pil_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            src = baseline_src(args.baseline, Path(tmp))
            sides["before"] = lambda r: worker_rate(folder, r, args.loader_steps, src)
        if args.lightly_python:
            sides["lightly"] = lambda r: lightly_rate(folder, r, args.loader_steps, args.lightly_python)
        rows = []
        for recipe in RECIPES:
            runs = {side: [] for side in sides}
            for _ in range(args.rounds):
                for side, run in sides.items():
                    runs[side].append(run(recipe))
            row = {"recipe": recipe, "views": runs["after"][0]["views"], "target": TARGETS[recipe]}
            row.update({side: max(r["img_per_s"] for r in results) for side, results in runs.items()})
            row["rounds"] = {side: [r["img_per_s"] for r in results] for side, results in runs.items()}
            if "lightly" in runs:
                row["lightly_version"] = runs["lightly"][0]["version"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def has_lightly(python: str) -> bool:
    return subprocess.run([python, "-c", "import lightly.transforms"], capture_output=True).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--folder", default="/tmp/dilemma-photo-like-imagenet/train")
    parser.add_argument("--loader-steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="turns per side of the worker-stage comparison")
    parser.add_argument("--baseline", metavar="REF", help="also time the workers of git commit REF")
    parser.add_argument("--lightly-python", help="a Python with lightly installed (default: this one, if it has it)")
    parser.add_argument("--device", default="cpu", help="for the model's rate (and the device stage, besides cpu)")
    parser.add_argument("--model-batch", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_loading"))
    args = parser.parse_args()
    if args.lightly_python is None and has_lightly(sys.executable):
        args.lightly_python = sys.executable
    folder = Path(args.folder)
    results = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "affinity": len(os.sched_getaffinity(0)),
        "files": generate(folder, args.files, args.classes),
    }
    results["worker"] = worker_stage(folder, args)
    devices = ["cpu"] + ([args.device] if args.device != "cpu" else [])
    results["device_stage"] = [device_stage(folder, r, d, 64 if d == "cpu" else 256) for r in RECIPES for d in devices]
    results["startup"] = [
        startup(folder if f == 1 else subset(folder, f), "paper_mocov3_vits16") for f in (0.25, 0.5, 1.0)
    ]
    results["rss"] = {
        "folder": decode_rss(folder),
        "big_files": decode_rss(big_files(folder, folder), batches=2, batch=4),
    }
    results["model"] = model_rate(args.device, args.model_batch, steps=3 if args.device == "cpu" else 20)
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    Path(args.out).with_suffix(".md").write_text(report(results))
    print(report(results))


def report(r: dict) -> str:
    f = r["files"]
    lines = [
        "# Streaming image folders at 224 px: worker stage, device stage, start-up, memory",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']} ({r['affinity']} usable). Files: {f['files']} photo-like JPEGs, 300-640 px sides, "
        f"quality 90, {f['bytes_per_pixel']:.2f} bytes per pixel ({f['mean_kb']:.0f} KB each on average).",
        "",
        "## Worker stage: images per second in one process on one core (= one DataLoader worker)",
        "",
        "Decode + every view's crop (+ flip) of each image, uint8 out; 'before' also ran the photometric ops "
        "per image in the worker, lightly runs its whole per-image pipeline. Fastest of the rounds.",
        "",
    ]
    sides = [s for s in ("before", "after", "after, PIL decode only", "lightly") if s in r["worker"][0]]
    lines += ["| recipe | views | " + " | ".join(sides) + " | after / before | target | met |"]
    lines += ["|---|---:|" + "---:|" * len(sides) + "---:|---:|---|"]
    for w in r["worker"]:
        ratio = f"{w['after'] / w['before']:.1f}x" if "before" in w else "-"
        values = " | ".join(f"{w[s]:.0f}" for s in sides)
        met = "yes" if w["after"] >= w["target"] else "no"
        lines.append(f"| {w['recipe']} | {w['views']} | {values} | {ratio} | >= {w['target']} | {met} |")
    if any("lightly_version" in w for w in r["worker"]):
        lines += ["", f"lightly {r['worker'][0]['lightly_version']}: {', '.join(LIGHTLY.values())}."]
    lines += [
        "",
        "## Device stage: photometric ops + normalisation of a batch (`Views.finish`)",
        "",
        "| recipe | device | batch | ms per image (all its views) |",
        "|---|---|---:|---:|",
    ]
    for d in r["device_stage"]:
        lines.append(f"| {d['recipe']} | {d['device']} | {d['batch']} | {d['ms_per_image']:.3f} |")
    lines += [
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
    m = r["model"]
    lines += [
        "",
        "## Peak memory",
        "",
        f"- {folder['files']} files, list + split + {folder['batches']} batches of {folder['batch']}: "
        f"{folder['peak_rss_mb']:.0f} MB",
        f"- 12 JPEGs with 300 MB appended to each, list + split + {big['batches']} batches of {big['batch']}: "
        f"{big['peak_rss_mb']:.0f} MB",
        "",
        "## Model",
        "",
        f"MoCo v3 + DILEMMA, ViT-S/16 at 224 px, {m['precision']} on {m['device']} ({m['threads']} threads), batch "
        f"{m['batch']}: {m['img_per_s']:.1f} training img/s.",
        "",
        "CPU cores one accelerator needs: its training img/s / the recipe's worker img/s per core.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
