"""Every method x {plain, +DILEMMA} at the same wall-clock budget on the embedded Animal-MNIST.

    python benchmarks/methods_table.py --methods byol vicreg --seeds 0 1 --time-budget 5 --out /tmp/methods_table

For each method named (default: every one in the registry), ``dilemma compare`` trains its recipe
(``configs/<method>_dilemma.yaml``) plain (``Method.plain``), sparse only (where plain is dense and
the recipe sparse) and with DILEMMA, one run at a time (run nothing else on the machine meanwhile), and reads them out.
This script gathers the rows into ``benchmarks/results/methods_table.md`` (and ``.json``): steps,
epochs, the final detection BCE against H(p), kNN and linear top-1 on the val split; the rows of
methods not named this time are kept. A finished run is reused, so an interrupted table continues
where it stopped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import timm
import torch

from dilemma.compare import compare
from dilemma.config import load_config
from dilemma.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-budget", type=float, default=3.0, help="minutes of training per run")
    parser.add_argument("--out", type=Path, default=Path("/tmp/methods_table"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "methods_table.md")
    args = parser.parse_args()
    rows = []
    for name in args.methods:
        plain, recipe = METHODS[name].plain, ROOT / "configs" / f"{name}_dilemma.yaml"
        variants = ["plain=" + ",".join(plain), "dilemma="]
        if "dilemma.drop_rate=0" in plain and load_config(recipe).dilemma.drop_rate > 0:
            variants.insert(1, "sparse=dilemma.misplace_prob=0")  # dense plain, sparse recipe: a third arm
        results = compare(
            variants, seeds=args.seeds, out=args.out / name, time_budget=args.time_budget, config=str(recipe)
        )
        command = f"python benchmarks/methods_table.py {' '.join(sys.argv[1:])}"
        rows += [{"method": name, "budget_min": args.time_budget, "command": command, **r} for r in results]

    # the rows of methods not run now stay, so the table grows a method at a time
    old = (
        json.loads(args.results.with_suffix(".json").read_text()) if args.results.with_suffix(".json").exists() else []
    )
    rows = [r for r in old if r["method"] not in args.methods] + rows
    fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    lines = [
        "# Every method x {plain, sparse, +DILEMMA} at equal wall-clock (embedded Animal-MNIST)",
        "",
        f"Machine: {platform.processor() or platform.machine()}; python {platform.python_version()}, "
        f"torch {torch.__version__}, timm {timm.__version__}. Each row: one run of `min` minutes of "
        "training (the BYOL, VICReg, iBOT and I-JEPA rows: one core and one thread per run, two runs "
        "side by side, one per core; commands in docs/results.md), read out by `dilemma compare` "
        "(kNN k = 20, T = 0.07; linear probe 100 epochs on dense train features; val split). Rows without "
        "a seed or a linear number are from the first version of this script (3 min, seed 0, kNN only).",
        "Plain = `Method.plain` (p = 0, r = 0; MAE: p = 0, mask ratio 0.75). Sparse = p = 0, r = 0.75 "
        "(methods with a dense plain arm and a sparse recipe). +DILEMMA = the recipe in "
        "configs/<method>_dilemma.yaml (p = 0.2, r = 0.75, lambda = 1; I-JEPA: r = 0, its context block "
        "is the sparsity, so its plain arm is already sparse). Detection BCE is the last logged training "
        "value, against H(p).",
        "",
        "| method | variant | seed | min | steps | epochs | det BCE (H(p)) | det AUROC | kNN % | linear % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        det = "—" if r["det_bce"] is None else f"{r['det_bce']:.3f} ({r['det_entropy']:.3f})"
        lines.append(
            f"| {r['method']} | {r['variant']} | {r.get('seed', '—')} | {r.get('budget_min', 3.0)} | {r['steps']} | "
            f"{r['epochs']:.2f} | {det} | {fmt(r['det_auroc'], '.3f')} | {r['knn_top1']:.2f} | "
            f"{fmt(r.get('linear_top1'), '.2f')} |"
        )
    lines += ["", "Produced by (from the repository root):", ""]
    lines += sorted({f"    {r['command']}" for r in rows})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    args.results.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
