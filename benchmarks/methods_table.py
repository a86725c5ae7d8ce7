"""Every method x {plain, +DILEMMA} at the same wall-clock budget on the embedded Animal-MNIST.

    python benchmarks/methods_table.py --time-budget 3 --out /tmp/methods_table

Runs ``dilemma pretrain`` once per cell (sequentially: run nothing else on the machine meanwhile)
and writes ``benchmarks/results/methods_table.md`` with steps, epochs, final detection BCE against
H(p), and kNN top-1 on the val split. "Plain" is p = 0, r = 0 (MAE: p = 0 and its mask ratio 0.75).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["mocov3", "dino", "simclr", "mae"]


def plain_switches(method: str) -> list[str]:
    return ["dilemma.misplace_prob=0"] + ([] if method == "mae" else ["dilemma.drop_rate=0"])


def run(method: str, variant: str, budget: float, out: Path, seed: int) -> dict:
    run_dir = out / f"{method}_{variant}"
    sets = plain_switches(method) if variant == "plain" else []
    cmd = ["dilemma", "pretrain", "--config", f"configs/{method}_dilemma.yaml", "--out", str(run_dir),
           "--time-budget", str(budget), "--max-steps", "100000", "--seed", str(seed), "--set", "train.progress=false"]
    for kv in sets:
        cmd += ["--set", kv]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    det = [r for r in records if r.get("det_bce") is not None]
    last_det = det[-1] if det else {}
    return {"method": method, "variant": variant, "command": " ".join(cmd), "wall_s": wall, "steps": final["step"],
            "epochs": final["epoch"], "det_bce": last_det.get("det_bce"), "det_entropy": last_det.get("det_entropy"),
            "det_auroc": last_det.get("det_auroc"), "knn_top1": final.get("knn_top1")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", type=float, default=3.0, help="minutes of training per run")
    parser.add_argument("--out", type=Path, default=Path("/tmp/methods_table"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "methods_table.md")
    args = parser.parse_args()
    rows = [run(m, v, args.time_budget, args.out, args.seed) for m in args.methods for v in ("plain", "dilemma")]

    fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    lines = [
        "# Every method x {plain, +DILEMMA} at equal wall-clock (embedded Animal-MNIST)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}.",
        f"Budget: {args.time_budget} min of training per run, seed {args.seed}, one run at a time. "
        "kNN: weighted, k = 20, T = 0.07, cosine on final-norm class tokens, bank = train (8000), queries = val (2000).",
        "Plain = p = 0, r = 0 (MAE: p = 0, mask ratio 0.75). +DILEMMA = the recipe in configs/<method>_dilemma.yaml "
        "(p = 0.2, r = 0.75, lambda = 1). Detection BCE is the last logged training value, against H(p) = 0.500.",
        "",
        "| method | variant | steps | epochs | det BCE (H(p)) | det AUROC | kNN top-1 % | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        det = "—" if r["det_bce"] is None else f"{r['det_bce']:.3f} ({r['det_entropy']:.3f})"
        lines.append(f"| {r['method']} | {r['variant']} | {r['steps']} | {r['epochs']:.2f} | {det} | "
                     f"{fmt(r['det_auroc'], '.3f')} | {fmt(r['knn_top1'], '.2f')} | {r['wall_s']:.0f} |")
    lines += ["", "Commands (run from the repository root):", ""] + [f"    {r['command']}" for r in rows] + [
        "", f"Produced by: python benchmarks/methods_table.py --time-budget {args.time_budget} --seed {args.seed}"]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    (args.results.with_suffix(".json")).write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
