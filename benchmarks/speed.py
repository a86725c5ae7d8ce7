"""Speed benchmarks: sparsity, training steps per method, FLOP/s against the matmul peak, loader.

    python benchmarks/speed.py                      # CPU, fp32 (+ bf16 FLOP/s)
    python benchmarks/speed.py --device cuda --precision bf16

Writes ``benchmarks/results/speed-<device>-<precision>.md`` (and .json) with the machine, library versions and
this command. Run it on an otherwise idle machine; each number is the median of timed repeats
after warm-up.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from dilemma.build import build_method, build_views, load_splits
from dilemma.config import load_config
from dilemma.data import PretrainBatches
from dilemma.methods import METHODS
from dilemma.models import build_encoder, normalize
from dilemma.pretext import DetectionHead, sample_tokens
from dilemma.train.step import PRECISIONS, Stepper

ROOT = Path(__file__).resolve().parents[1]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(device, dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, device, repeats=5)


def student_step(cfg, device, keep_fraction: float, batch: int, precision: str):
    """Encoder + detection head forward and backward on ``keep_fraction`` of the tokens (DILEMMA's student)."""
    encoder = build_encoder(cfg.model).to(device)
    head = DetectionHead(encoder.embed_dim).to(device)
    images = torch.randn(batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, device=device)
    drop = 1.0 - keep_fraction
    dtype = PRECISIONS[precision]

    def step():
        s = sample_tokens(batch, encoder.num_patches, drop, 0.2, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, patches = encoder(images, keep=s.keep, positions=s.positions)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(head(patches).float(), s.misplaced.float())
        loss.backward()

    return step


def training_step(cfg, device, precision: str, batch: int):
    """One full ``Stepper`` step (views already made) and the views it consumes."""
    model = build_method(cfg).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    stepper = Stepper(model, model, optimizer, device=device, precision=precision, grad_clip=3.0)
    batches = PretrainBatches(load_splits(cfg).train, batch, build_views(cfg), seed=0)
    views = batches[0].views
    views = tuple(normalize(v.to(device)) for v in views)
    counter = iter(range(10**9))
    return (lambda: stepper.step(views, 0.5, next(counter), False)), batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument(
        "--set", action="append", default=[], help="config overrides for the model (e.g. model.depth=12)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    base = load_config(None, args.set)
    rows: dict = {
        "command": "python benchmarks/speed.py " + " ".join(sys.argv[1:]),
        "device": str(device),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__},
        "model": f"{base.model.name} depth {base.model.depth}, {base.model.img_size} px, patch {base.model.patch_size}",
        "precision": args.precision,
        "batch": args.batch,
    }

    # 1. the student step at several keep fractions
    student = {}
    for keep in (1.0, 0.5, 0.25, 0.1):
        seconds = timed(student_step(base, device, keep, args.batch, args.precision), device, args.repeats)
        student[keep] = args.batch / seconds
    rows["student_img_per_s"] = {f"{k:.2f}": v for k, v in student.items()}

    # 2. full training steps per method, plain and with DILEMMA; 3. their FLOP/s; 4. the loader
    peaks = {
        p: matmul_peak(device, torch.float32 if p == "fp32" else torch.bfloat16, args.matmul_size)
        for p in ("fp32", "bf16")
    }
    rows["matmul_peak_flops"] = peaks
    steps = []
    for name, method in METHODS.items():
        for variant, switches in (("plain", method.plain), ("dilemma", ())):
            cfg = load_config(None, [*args.set, f"method.name={name}", *switches])
            step, batches = training_step(cfg, device, args.precision, args.batch)
            seconds = timed(step, device, args.repeats)
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
            loader_seconds = timed(lambda batches=batches: batches[7], torch.device("cpu"), 3, warmup=1)
            steps.append(
                {
                    "method": name,
                    "variant": variant,
                    "img_per_s": args.batch / seconds,
                    "step_s": seconds,
                    "flops_per_step": flops,
                    "achieved_flops": flops / seconds,
                    "fraction_of_peak": flops / seconds / peaks["bf16" if args.precision != "fp32" else "fp32"],
                    "loader_img_per_s": args.batch / loader_seconds,
                }
            )
    rows["training_steps"] = steps

    out = ROOT / "benchmarks" / "results" / f"speed-{device.type}-{args.precision}.md"
    lines = [
        f"# Speed on {rows['cuda'] or rows['machine']} ({rows['threads']} threads)",
        "",
        f"Command: `{rows['command']}`; python {rows['versions']['python']}, torch {rows['versions']['torch']}, "
        f"timm {rows['versions']['timm']}. Model: {rows['model']}; batch {args.batch}; {args.precision}. "
        "Median of timed repeats after warm-up.",
        "",
        "## Student step (encoder + detection head, forward + backward)",
        "",
        "| tokens kept | img/s | x dense |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {float(k) * 100:.0f} % | {v:.0f} | {v / student[1.0]:.2f} |" for k, v in student.items()]
    lines += [
        "",
        f"Matmul peak ({args.matmul_size}^3): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s.",
        "",
        "## Full training step (views made; EMA, teacher, heads, optimiser included)",
        "",
        "| method | variant | img/s | GFLOP/step | achieved GFLOP/s | of matmul peak | loader img/s | loader / model |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['method']} | {r['variant']} | {r['img_per_s']:.0f} | {r['flops_per_step'] / 1e9:.2f} | "
        f"{r['achieved_flops'] / 1e9:.1f} | {r['fraction_of_peak'] * 100:.0f} % | {r['loader_img_per_s']:.0f} | "
        f"{r['loader_img_per_s'] / r['img_per_s']:.1f}x |"
        for r in steps
    ]
    lines += [
        "",
        "Loader: one process decoding and augmenting a batch (`PretrainBatches[step]`, the method's views); "
        "FLOPs counted by `torch.utils.flop_counter` (matmuls and convolutions).",
    ]
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
