"""GPU readiness in one command: the CUDA tests, then every method's step at ViT-S/16 224 px.

    pip install --no-deps -e . && python benchmarks/gpu_check.py          # at most ~8 minutes
    python benchmarks/gpu_check.py --device cpu --smoke                   # the script itself, on a CPU

1. ``pytest -m cuda``: autocast bf16 / fp16 with the gradient scaler, the fused optimiser, pinned-
   memory loaders, SyncBatchNorm in a one-process NCCL group, ``torch.compile``, a run and its resume.
2. Each method (the ``configs/paper_*`` recipes at ViT-S/16, 224 px; MAE's decoder as its recipe),
   plain and + DILEMMA, bf16, eager and compiled: img/s of the full training step (the device stage
   of the views, i.e. photometric ops + normalisation, and the model's step, on crops made
   beforehand), the device stage's share of it, model FLOP utilisation (FLOPs of one step by
   ``torch.utils.flop_counter`` / time / the GPU's dense bf16 peak), peak memory, and the loader's
   img/s (the worker stage) with all CPU cores as workers on a folder of generated photo-like JPEGs:
   the step is loader-bound when the loader is slower than the model.

Work that would not finish inside ``--budget-s`` is skipped and listed as skipped. Writes
``benchmarks/results/gpu-<gpu name>.md`` (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import matmul_peak, pinned, timed, training_step  # noqa: E402

from dilemma.allocator import keep_freed_memory  # noqa: E402
from dilemma.config import load_config  # noqa: E402
from dilemma.data import pretrain_loader  # noqa: E402
from dilemma.methods import METHODS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "mocov3": ["--config", "configs/paper_mocov3_vits16.yaml"],
    "dino": ["--config", "configs/paper_dino_vits16.yaml"],
    "simclr": ["--config", "configs/paper_simclr_vits16.yaml"],
    "mae": ["--config", "configs/paper_mae_vitb16.yaml", "model.name=vit_small_patch16_224"],
    "byol": ["--config", "configs/paper_byol_vits16.yaml"],
    "vicreg": ["--config", "configs/paper_vicreg_vits16.yaml"],
    "ibot": ["--config", "configs/paper_ibot_vits16.yaml"],
    "ijepa": ["--config", "configs/paper_ijepa_vits16.yaml"],
    "droppos": ["--config", "configs/paper_droppos_vits16.yaml"],
}
# Dense bf16 tensor-core peaks from the vendors' data sheets (FLOP/s, no sparsity), by name fragment.
BF16_PEAKS = [
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
]
SMOKE = ["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8", "model.depth=2"]
SMOKE += ["method.dino.local_crop_size=16", "method.ibot.local_crop_size=16", "method.ijepa.targets=2"]
SMOKE += ["method.mocov3.proj_hidden_dim=64", "method.simclr.proj_hidden_dim=64", "method.dino.out_dim=128"]
SMOKE += ["method.dino.hidden_dim=64", "method.mae.decoder_dim=64", "method.mae.decoder_depth=1"]
SMOKE += ["method.byol.proj_hidden_dim=64", "method.vicreg.expander_dim=64"]
SMOKE += ["method.ibot.out_dim=128", "method.ibot.hidden_dim=64"]
SMOKE += ["method.ijepa.predictor_dim=96", "method.ijepa.predictor_depth=1"]


def jpeg_folder(root: Path, count: int, sizes: tuple[int, int]) -> Path:
    """``count`` photo-like JPEGs (``tests.imagefolder.photo_like_image``) in 10 class folders."""
    sys.path.insert(0, str(ROOT))
    from tests.imagefolder import make_image_folder, photo_like_image

    make_image_folder(root / "train", classes=10, per_class=count // 10, sizes=sizes, image=photo_like_image)
    return root


def bf16_peak(device: torch.device, smoke: bool) -> tuple[float, str]:
    """The GPU's dense bf16 peak (data sheet), or the measured matmul peak where the name is unknown."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peak in BF16_PEAKS:
            if fragment in name:
                return peak, f"data sheet, {fragment}"
    size = 512 if smoke else 8192
    return matmul_peak(device, torch.bfloat16, size), f"measured {size}^3 bf16 matmul"


def cuda_tests(timeout: int) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
        failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        seconds = time.perf_counter() - start
        return {"exit": done.returncode, "summary": summary, "failures": failures, "seconds": seconds}
    except subprocess.TimeoutExpired:
        return {"exit": None, "summary": f"timed out after {timeout} s", "failures": [], "seconds": timeout}


def measure(cfg, device, batch: int, compile: bool, repeats: int, workers: int, loader_s: float) -> dict:
    """One method's full step: img/s, FLOPs, peak memory, and the loader's img/s."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step, batches = training_step(cfg, device, "bf16", batch, compile=compile)
    start = time.perf_counter()
    step()  # the first step (compiles, when compiled)
    first_s = time.perf_counter() - start
    seconds = timed(step, device, repeats, warmup=2)
    batch_ = pinned(batches[0], device)
    finish = lambda: batches.views.finish(batch_.views, batch_.draws, device, cfg.model.mean, cfg.model.std)  # noqa: E731
    device_stage_s = timed(finish, device, repeats, warmup=2)
    flops = None
    if not compile:  # the counter sees eager operators only; a compiled step does the same FLOPs
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    loader = pretrain_loader(batches, 0, 10**6, num_workers=workers, pin_memory=device.type == "cuda")
    it, loaded = iter(loader), 0
    next(it)  # workers started
    load_start = time.perf_counter()
    while time.perf_counter() - load_start < loader_s or loaded < 2 * workers * batch:
        loaded += next(it).views[0].shape[0]
    loader_rate = loaded / (time.perf_counter() - load_start)
    del it, loader
    return {
        "img_per_s": batch / seconds,
        "step_s": seconds,
        "device_stage_s": device_stage_s,  # photometric ops + normalisation, part of step_s
        "first_step_s": first_s,
        "flops_per_step": flops,
        "peak_memory_gib": memory,
        "loader_img_per_s": loader_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=128, help="per GPU (the recipes' 1024 over 8 GPUs)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=450.0, help="skip what would not finish inside this")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--smoke", action="store_true", help="a tiny model, eager, 2 repeats: checks the script")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="folder for the results")
    args = parser.parse_args()
    begin = time.perf_counter()
    keep_freed_memory()  # as the dilemma command does
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; use --device cpu --smoke to check the script itself")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    report: dict = {
        "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
        "device": gpu,
        "cpu_workers": args.workers,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
        "batch": args.batch,
    }
    if device.type == "cuda":
        report["cuda_tests"] = cuda_tests(timeout=int(min(240, args.budget_s / 2)))
        print("cuda tests:", report["cuda_tests"]["summary"], flush=True)
    peak, peak_source = bf16_peak(device, args.smoke)
    report["bf16_peak_flops"], report["peak_source"] = peak, peak_source
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        report["jpeg_size"] = (40, 80) if args.smoke else (300, 640)
        folder = jpeg_folder(Path(tmp), 60 if args.smoke else 500, report["jpeg_size"])
        compiled_too = (False,) if args.smoke else (False, True)
        # DropPos has no DILEMMA arm (``plain`` empty): it runs once, as published
        plan = [
            (c, m, v)
            for c in compiled_too
            for m in METHODS
            for v in ("plain", "dilemma")[: 2 if METHODS[m].plain else 1]
        ]
        for compiled, name, variant in plan:
            # what the next item may cost: the longest one of its kind so far (compiling: at least a minute)
            alike = [r["wall_s"] for r in rows if r["compiled"] == compiled]
            expected = max(alike, default=0.0 if not compiled else 60.0)
            if time.perf_counter() - begin + expected > args.budget_s:
                skipped.append(f"{name} {variant} {'compiled' if compiled else 'eager'}")
                continue
            recipe = RECIPES[name]
            sets = [*recipe[2:], f"method.name={name}", f"data.source={folder}", "data.val_fraction=0.1"]
            sets += list(METHODS[name].plain) if variant == "plain" else []
            sets += SMOKE if args.smoke else []
            cfg = load_config(ROOT / recipe[1], sets)
            start = time.perf_counter()
            try:
                repeats, loader_s = (2, 0.2) if args.smoke else (args.repeats, 5.0)
                row = measure(cfg, device, args.batch, compiled, repeats, args.workers, loader_s)
            except Exception as err:  # noqa: BLE001 - a failure is a result to report, not a stop
                row = {"error": f"{type(err).__name__}: {err}"[:300]}
            row.update(method=name, variant=variant, compiled=compiled, wall_s=time.perf_counter() - start)
            if "img_per_s" in row:
                eager = [r for r in rows if (r["method"], r["variant"]) == (name, variant) and r.get("flops_per_step")]
                row["flops_per_step"] = row["flops_per_step"] or (eager[0]["flops_per_step"] if eager else 0)
                row["mfu"] = row["flops_per_step"] / row["step_s"] / peak
                row["bound"] = "loader" if row["loader_img_per_s"] < row["img_per_s"] else "model"
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "flops_per_step"}), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            # written after every item: a run stopped from outside keeps what it measured
            report.update(steps=rows, skipped=skipped, total_s=time.perf_counter() - begin)
            write(report, args.out, args.smoke)
    report.update(steps=rows, skipped=skipped, total_s=time.perf_counter() - begin)
    write(report, args.out, args.smoke)


def write(report: dict, folder: Path, smoke: bool) -> None:
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"].lower()).strip("-") + ("-smoke" if smoke else "")
    out = folder / f"gpu-{slug}.md"
    tests = report.get("cuda_tests")
    lines = [
        f"# GPU readiness on {report['device']}",
        "",
        f"Command: `{report['command']}`; python {report['versions']['python']}, torch {report['versions']['torch']}, "
        f"timm {report['versions']['timm']}; {report['total_s']:.0f} s in all. Batch {report['batch']} per GPU, bf16 "
        f"autocast; a step is the device stage (photometric ops + normalisation) and the training step on "
        f"crops made beforehand; the loader (the worker stage) uses {report['cpu_workers']} worker processes on "
        f"generated photo-like JPEGs with sides of {report['jpeg_size'][0]}-{report['jpeg_size'][1]} px. "
        f"MFU against {report['bf16_peak_flops'] / 1e12:.0f} TFLOP/s ({report['peak_source']}).",
        "",
        f"CUDA tests (`pytest -m cuda`): {tests['summary'] if tests else 'not run (no GPU)'}",
    ]
    lines += [f"- {failure}" for failure in (tests or {}).get("failures", [])]
    lines += [
        "",
        "| method | variant | compiled | img/s | MFU | peak GiB | first step s | device stage ms (of step) "
        "| loader img/s | bound |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["steps"]:
        head = f"| {r['method']} | {r['variant']} | {'yes' if r['compiled'] else 'no'} |"
        if "error" in r:
            lines.append(f"{head} error: {r['error']} | | | | | | |")
            continue
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(
            f"{head} {r['img_per_s']:.0f} | {100 * r['mfu']:.1f} % | {memory} | {r['first_step_s']:.1f} | "
            f"{1000 * r['device_stage_s']:.1f} ({100 * r['device_stage_s'] / r['step_s']:.0f} %) | "
            f"{r['loader_img_per_s']:.0f} | {r['bound']} |"
        )
    if report["skipped"]:
        lines += ["", f"Skipped to stay inside the time budget: {', '.join(report['skipped'])}."]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
