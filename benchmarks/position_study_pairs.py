"""The paired differences compare's own tables do not show, in each block of the detect-or-predict
study (benchmarks/position_study.sh; compare pairs each arm with the first one only): detect minus
predict, and DropPos minus MAE + DILEMMA. Every read-out of compare's tables (shape bias included),
mean ± half the 95 % interval (Student's t over seeds) and the per-seed differences, in points.

    python benchmarks/position_study_pairs.py [runs/positions]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dilemma.compare import mean_ci95, paired_differences

PAIRS = (("detect", "predict"), ("droppos", "mae_dilemma"))  # (arm, the arm it is measured against)


def rows(block: str, runs: list[dict], arm: str, against: str) -> list[str]:
    """The table rows of ``arm`` − ``against`` in one block (none where the block lacks either)."""
    # paired_differences measures every arm against the first result's: put `against` first
    pair = [r for r in runs if r["variant"] == against] + [r for r in runs if r["variant"] == arm]
    if {r["variant"] for r in pair} != {arm, against}:
        return []
    lines = []
    for _, metric, diffs in paired_differences(pair):
        if len(diffs) >= 2:
            mean, half = mean_ci95(diffs)
            each = ", ".join(f"{d:+.2f}" for d in diffs)
            name = f"{arm} − {against}"
            lines.append(f"| {block} | {name} | {metric} | {len(diffs)} | {mean:+.2f} ± {half:.2f} | {each} |")
    return lines


def main(root: Path) -> None:
    print("| block | difference | read-out | seeds | mean ± 95 % | per seed |")
    print("|---|---|---|---:|---:|---|")
    for results in sorted(root.glob("*/results.json")):
        runs = json.loads(results.read_text())
        for arm, against in PAIRS:
            for line in rows(results.parent.name, runs, arm, against):
                print(line)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/positions"))
