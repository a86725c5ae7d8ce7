"""Speed benchmarks: sparsity, training steps per method, FLOP/s against the matmul peak, loader.

    python benchmarks/speed.py                      # CPU, fp32 (+ bf16 FLOP/s)
    python benchmarks/speed.py --baseline e3bcd03   # + the same steps of another commit, in the same run
    python benchmarks/speed.py --device cuda --precision bf16
    python benchmarks/speed.py --baseline 2dbd42a --methods mocov3,dino --out results.md   # some methods, elsewhere

Writes ``benchmarks/results/speed-<device>-<precision>.md`` (or ``--out``; and .json) with the machine,
library versions and this command. Run it on an otherwise idle machine; each number is the median of timed repeats
after warm-up. ``--baseline REF`` times every method's step (and the student step alone) with the
code of git commit REF and with this checkout, in child processes that take turns (A B A B ...)
so that drifts of the machine hit both alike; each side's number is its fastest round (a busy or
throttled machine only ever slows a round down, so the fastest is the least disturbed).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from dilemma import build
from dilemma.build import build_method, build_views, load_splits
from dilemma.config import load_config
from dilemma.data import PretrainBatches
from dilemma.methods import METHODS
from dilemma.models import build_encoder, normalize
from dilemma.pretext import DetectionHead, sample_tokens
from dilemma.train.step import Stepper

try:
    from dilemma.train.step import DTYPES as PRECISIONS  # precision name -> autocast dtype
except ImportError:  # a baseline commit from before the name
    from dilemma.train.step import PRECISIONS

try:
    from dilemma.allocator import keep_freed_memory  # what the dilemma command sets at start
except ImportError:  # a baseline commit from before it
    keep_freed_memory = None

ROOT = Path(__file__).resolve().parents[1]
# glibc's environment switches for what keep_freed_memory sets: a baseline commit measured with them
# shows what the allocator setting alone buys
KEEP_FREED_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**60)}


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


def feature_step(cfg, device, batch: int, precision: str):
    """What the kNN / linear read-outs run per batch: the image embedding of a dense forward, no gradient."""
    encoder = build_encoder(cfg.model).to(device).eval()
    images = torch.randn(batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, device=device)
    embed = getattr(encoder, "embed", None) or (lambda x: encoder(x)[0])  # a baseline commit from before embed
    dtype = PRECISIONS[precision]

    @torch.no_grad()
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            embed(images)

    return step


def pinned(batch, device):
    """The batch as the loader hands it over: its crops in pinned memory when they go to a GPU."""
    if device.type != "cuda":
        return batch
    return batch._replace(views=tuple(v.pin_memory() for v in batch.views))


def device_stage(batches, device, encoder):
    """Batch -> the encoder's input, as the training loop makes it: the photometric ops and the
    normalisation on ``device`` (a baseline commit from before the two stages: normalisation alone,
    its workers having done the rest)."""
    if hasattr(batches, "views") and hasattr(batches.views, "finish"):
        return lambda b: batches.views.finish(b.views, b.draws, device, encoder.mean, encoder.std)
    return lambda b: tuple(normalize(v.to(device)) for v in b.views)


def training_step(cfg, device, precision: str, batch: int, compile: bool = False, with_loader: bool = False):
    """One full training step as the loop runs it: the device stage of a batch's views and the
    ``Stepper`` step (the model compiled as ``train.compile`` does), on one batch made beforehand;
    ``with_loader``: each step also makes its batch in this process (the worker stage, as
    ``data.num_workers=0`` does: the quickstart). Returns the step and the batches."""
    model = build_method(cfg).to(device)
    if compile:
        model.compile()
    maker = build if hasattr(build, "adamw") else importlib.import_module("dilemma.train.loop")  # a baseline commit's
    groups = maker.param_groups(model, cfg.optim.weight_decay)
    if hasattr(maker, "adamw"):  # the optimiser the training run makes
        optimizer = maker.adamw(groups, 1e-4, use_scaler=precision == "fp16")
    else:  # a baseline commit from before it
        optimizer = torch.optim.AdamW(groups, lr=1e-4)
    # a baseline commit's Stepper took the module twice (model, method)
    twice = "method" in inspect.signature(Stepper).parameters
    stepper = Stepper(*([model] * (2 if twice else 1)), optimizer, device=device, precision=precision, grad_clip=3.0)
    batches = PretrainBatches(load_splits(cfg).train, batch, build_views(cfg), seed=0)
    finish, first = device_stage(batches, device, model.encoder), pinned(batches[0], device)
    counter = iter(range(1, 10**9))

    def step():
        number = next(counter)
        stepper.step(finish(pinned(batches[number], device) if with_loader else first), 0.5, number, False)

    return step, batches


def step_rates(
    set_args: list[str], device, precision: str, batch: int, repeats: int, methods: list[str]
) -> dict[str, float]:
    """img/s of the student step alone (all tokens kept minus DILEMMA's drop: the default r and p)
    and of the evaluation features' forward, and of every method's full step, plain and + DILEMMA, with
    whatever ``dilemma`` is imported."""
    base = load_config(None, set_args)
    rates = {}
    keep = 1.0 - base.dilemma.drop_rate
    rates["student step alone"] = batch / timed(student_step(base, device, keep, batch, precision), device, repeats)
    rates["evaluation features"] = batch / timed(feature_step(base, device, batch, precision), device, repeats)
    quickstart, _ = training_step(base, device, precision, batch, with_loader=True)
    rates["default run: batch made + step (0 workers)"] = batch / timed(quickstart, device, repeats)
    for name in methods:
        for variant, switches in (("plain", METHODS[name].plain), ("dilemma", ())):
            cfg = load_config(None, [*set_args, f"method.name={name}", *switches])
            step, _ = training_step(cfg, device, precision, batch)
            rates[f"{name} {variant}"] = batch / timed(step, device, repeats)
    return rates


def before_after(ref: str, args, rounds: int) -> dict:
    """The step rates of commit ``ref`` (as it was, and with glibc's allocator set as the dilemma
    command now sets it) and of this checkout, from child processes taking turns."""
    child = [sys.executable, __file__, "--rates-only", "--device", args.device, "--precision", args.precision]
    child += ["--batch", str(args.batch), "--repeats", str(args.repeats)] + [f"--set={s}" for s in args.set]
    child += ["--methods", ",".join(args.methods)]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        sides = {"before": (Path(tmp) / "src", {})}
        if not (Path(tmp) / "src" / "dilemma" / "allocator.py").exists():  # what the allocator setting alone buys
            sides["before + allocator"] = (Path(tmp) / "src", KEEP_FREED_ENV)
        sides["after"] = (ROOT / "src", {})
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for _ in range(rounds):
            for side, (src, extra_env) in sides.items():
                env = {**os.environ, **extra_env, "PYTHONPATH": str(src)}
                done = subprocess.run(child, env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"error: the {side!r} child failed:\n{done.stderr}")
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if not Path(result["dilemma"]).resolve().is_relative_to(src.resolve()):
                    sys.exit(f"error: the {side!r} child imported dilemma from {result['dilemma']}, not {src}")
                runs[side].append(result["rates"])
    best = {side: {k: max(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()}
    return {"ref": ref, "rounds": rounds, "best": best, "runs": runs}


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
    parser.add_argument("--baseline", metavar="REF", help="also time the steps of git commit REF, taking turns")
    parser.add_argument("--rounds", type=int, default=3, help="turns per side with --baseline")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, e.g. mocov3,dino")
    parser.add_argument("--out", type=Path, default=None, help="results .md (default: see above)")
    parser.add_argument("--rates-only", action="store_true", help=argparse.SUPPRESS)  # a --baseline child
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    if unknown := set(args.methods) - set(METHODS):
        sys.exit(f"error: unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    device = torch.device(args.device)
    if keep_freed_memory is not None:
        keep_freed_memory()
    if args.rates_only:
        rates = step_rates(args.set, device, args.precision, args.batch, args.repeats, args.methods)
        print(json.dumps({"dilemma": str(Path(sys.modules["dilemma"].__file__).parent), "rates": rates}))
        return
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
    for name in args.methods:
        for variant, switches in (("plain", METHODS[name].plain), ("dilemma", ())):
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
    if args.baseline:
        rows["before_after"] = before_after(args.baseline, args, args.rounds)

    out = args.out or ROOT / "benchmarks" / "results" / f"speed-{device.type}-{args.precision}.md"
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
        "## Full training step (crops made; device stage, EMA, teacher, heads, optimiser included)",
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
        "Loader: one process decoding and cropping a batch (`PretrainBatches[step]`, the worker stage of the "
        "method's views); "
        "FLOPs counted by `torch.utils.flop_counter` (matmuls and convolutions).",
    ]
    if args.baseline:
        ba = rows["before_after"]
        lines += [
            "",
            f"## Before / after: commit {ba['ref']} vs this checkout",
            "",
            f"Child processes taking turns, {ba['rounds']} rounds per side; each side's img/s is its "
            "fastest round (each round's number the median of its timed repeats): the machine's slow spells "
            "only ever lower a round, so the fastest is the least disturbed. 'before + allocator': the "
            "baseline's code with glibc's malloc set by its environment as `dilemma` now sets it "
            "(`allocator.keep_freed_memory`); the rest of the speed-up is the code's. Student step alone: "
            "encoder + detection head at the default drop rate. Evaluation features: the dense, gradient-free "
            "forward that kNN and the linear probe run. Default run: what `dilemma pretrain` does per step with "
            "no loader workers (the quickstart): the batch made in the training process, the device stage, the "
            "step. Method rows: the step on a batch made beforehand, with the device stage where the code has "
            "one (a commit from before the two stages ran the photometric ops in its workers).",
            "",
            "Speed-up: fastest after / fastest before; per round: after / before of the same round "
            "(neighbours in time), whose range shows how much the machine's slow spells moved single rounds.",
            "",
            "| step | before img/s | before + allocator | after img/s | speed-up | per round (min-max) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        before, after = ba["best"]["before"], ba["best"]["after"]
        alloc = ba["best"].get("before + allocator")
        for k in after:
            paired = [a[k] / b[k] for a, b in zip(ba["runs"]["after"], ba["runs"]["before"], strict=True)]
            with_alloc = f"{alloc[k]:.0f} ({alloc[k] / before[k]:.2f}x)" if alloc else "(has it)"
            lines.append(
                f"| {k} | {before[k]:.0f} | {with_alloc} | {after[k]:.0f} | "
                f"{after[k] / before[k]:.2f}x | {min(paired):.2f}-{max(paired):.2f}x |"
            )
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
