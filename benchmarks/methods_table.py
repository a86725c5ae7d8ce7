"""Every method x {plain, +DILEMMA} at the same wall-clock budget on the embedded Animal-MNIST.

    python benchmarks/methods_table.py --time-budget 3 --out /tmp/methods_table

For each method in the registry, ``dilemma compare`` trains its recipe (``configs/<method>_dilemma.yaml``)
plain (``Method.plain``) and with DILEMMA, one run at a time (run nothing else on the machine
meanwhile), and reads both out (kNN, linear probe, occlusion). This script only gathers the rows into
``benchmarks/results/methods_table.md`` (and ``.json``): steps, epochs, the final detection BCE
against H(p), kNN and linear top-1 on the val split. A finished run is reused, so an interrupted
table continues where it stopped.
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
        variants = ["plain=" + ",".join(METHODS[name].plain), "dilemma="]
        results = compare(
            variants,
            seeds=args.seeds,
            out=args.out / name,
            time_budget=args.time_budget,
            config=str(ROOT / "configs" / f"{name}_dilemma.yaml"),
        )
        rows += [{"method": name, **r} for r in results]

    fmt = lambda x, spec: "—" if x is None else format(x, spec)  # noqa: E731
    lines = [
        "# Every method x {plain, +DILEMMA} at equal wall-clock (embedded Animal-MNIST)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads; "
        f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}.",
        f"Budget: {args.time_budget} min of training per run, seeds {args.seeds}, one run at a time. "
        f"Read-outs: {rows[0]['protocol']}.",
        "Plain = `Method.plain` (p = 0, r = 0; MAE: p = 0, mask ratio 0.75). +DILEMMA = the recipe in "
        "configs/<method>_dilemma.yaml (p = 0.2, r = 0.75, lambda = 1). Detection BCE is the last logged "
        "training value, against H(p).",
        "",
        "| method | variant | seed | steps | epochs | det BCE (H(p)) | det AUROC | kNN top-1 % | linear top-1 % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        det = "—" if r["det_bce"] is None else f"{r['det_bce']:.3f} ({r['det_entropy']:.3f})"
        lines.append(
            f"| {r['method']} | {r['variant']} | {r['seed']} | {r['steps']} | {r['epochs']:.2f} | {det} | "
            f"{fmt(r['det_auroc'], '.3f')} | {r['knn_top1']:.2f} | {r['linear_top1']:.2f} |"
        )
    lines += ["", "Produced by: python benchmarks/methods_table.py " + " ".join(sys.argv[1:])]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    args.results.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
