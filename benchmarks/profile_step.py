"""Where one training step spends its time: torch.profiler over full ``Stepper`` steps.

    python benchmarks/profile_step.py                           # MoCo v3 + DILEMMA, the default config
    python benchmarks/profile_step.py --set method.name=dino --steps 5
    PYTHONPATH=/path/to/old/src python benchmarks/profile_step.py   # another commit's step
    python benchmarks/profile_step.py --default-malloc | --compile | --per-view   # what each change buys

Prints the operators by self time (CPU) with their call counts per step, and the share of the
step they take; ``--out FILE.md`` writes the same table. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import keep_freed_memory, training_step  # noqa: E402  (the step the speed benchmark times)

from dilemma.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--set", action="append", default=[], help="config overrides (e.g. method.name=dino)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc's malloc as it is")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (as train.compile)")
    parser.add_argument(
        "--per-view", action="store_true", help="one encoder call per view (the tests' reference), not one for all"
    )
    args = parser.parse_args()
    if keep_freed_memory is not None and not args.default_malloc:
        keep_freed_memory()  # as the dilemma command does
    device = torch.device(args.device)
    cfg = load_config(None, args.set)
    if args.per_view:  # split every stacked call: the student's (tests' reference) and the dense 2-view ones
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from dilemma.methods import Method
        from dilemma.models import ViTEncoder
        from tests.test_fast_paths import _per_view_student

        Method.student = _per_view_student
        encode = ViTEncoder.forward

        def per_view(self, images, keep=None, positions=None):
            if keep is not None or images.shape[0] != 2 * args.batch:
                return encode(self, images, keep, positions)
            return tuple(torch.cat(parts) for parts in zip(*(encode(self, v) for v in images.chunk(2)), strict=True))

        ViTEncoder.forward = per_view
    step, _ = training_step(cfg, device, args.precision, args.batch, compile=args.compile)
    for _ in range(2):  # warm-up (and the compile)
        step()
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(args.steps):  # unprofiled: wall time and page faults per step
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) * 1e3 / args.steps
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]
    lines = [
        f"Profile of `python benchmarks/profile_step.py {' '.join(sys.argv[1:])}` "
        f"({torch.get_num_threads()} threads, torch {torch.__version__}): {args.steps} steps, "
        f"{total / 1e3 / args.steps:.0f} ms of operator self time per step. Unprofiled: {step_ms:.0f} ms "
        f"per step ({args.batch * 1e3 / step_ms:.0f} img/s), {faults:.0f} minor page faults per step.",
        "",
        "| operator | self ms / step | share | calls / step |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / args.steps:.1f} | {100 * e.self_cpu_time_total / total:.1f} % "
        f"| {e.count / args.steps:.0f} |"
        for e in rows
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
