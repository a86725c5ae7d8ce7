"""Detect minus predict, paired by seed, in each block of the detect-or-predict study
(benchmarks/position_study.sh; compare's own tables pair each arm with `sparse` only): mean ± half
the 95 % interval (Student's t over seeds) and the per-seed differences, in points.

    python benchmarks/position_study_pairs.py [runs/positions]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student's t, two-sided 95 %, by degrees of freedom


def readouts(run: dict) -> dict[str, float]:
    """The compared numbers of one run (linear probe top-1 where a protocol has several points)."""
    out = {"kNN": run["knn_top1"], "linear": run["linear_top1"]}
    for point in run.get("occlusion") or []:
        if point["keep_fraction"] in (0.5, 0.1):
            out[f"linear @{point['keep_fraction']:.0%}"] = point["linear_top1"]
    for point in run.get("patch_shuffle") or []:
        if point["grid"] == 7:
            out["linear, 7x7 shuffled"] = point["linear_top1"]
    for point in run.get("position_shuffle") or []:
        if point["fraction"] in (0.2, 1.0):
            out[f"linear, q={point['fraction']:g} positions"] = point["linear_top1"]
    if run.get("shape_bias"):
        out["shape bias %"] = run["shape_bias"].get("shape_bias")
    return {k: v for k, v in out.items() if v is not None}


def main(root: Path, first: str = "detect", second: str = "predict") -> None:
    print(f"| block | read-out | seeds | {first} − {second} | per seed |")
    print("|---|---|---:|---:|---|")
    for results in sorted(root.glob("*/results.json")):
        runs = json.loads(results.read_text())
        by = {(r["variant"], r["seed"]): readouts(r) for r in runs}
        seeds = sorted(s for v, s in by if v == first and (second, s) in by)
        if not seeds:
            continue
        for key in by[(first, seeds[0])]:
            diffs = [by[(first, s)][key] - by[(second, s)][key] for s in seeds if key in by[(second, s)]]
            if len(diffs) < 2:
                continue
            half = T975.get(len(diffs) - 1, 2.0) * statistics.stdev(diffs) / len(diffs) ** 0.5
            each = ", ".join(f"{d:+.2f}" for d in diffs)
            mean = statistics.fmean(diffs)
            print(f"| {results.parent.name} | {key} | {len(diffs)} | {mean:+.2f} ± {half:.2f} | {each} |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/positions"))
