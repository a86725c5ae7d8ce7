"""The position task itself in the detect-or-predict study (benchmarks/position_study.sh): per block
and arm, the last logged training-batch numbers of each seed — detection AUROC and BCE against H(p),
or position top-1 / top-5 (%, chance 100 / N) and distance (patches) — as mean ± std over seeds.

    python benchmarks/position_task_table.py [runs/positions]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

KEYS = ("det_auroc", "det_bce", "pos_top1", "pos_top5", "pos_dist", "step")


def last_logged(metrics: Path) -> dict:
    """The last record with a loss (the final line of a run is its stop record)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return next(r for r in reversed(records) if "loss" in r)


def spread(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def main(root: Path) -> None:
    print("| block | arm | seeds | steps | det AUROC | det BCE | pos top-1 % | pos top-5 % | pos dist |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for block in sorted(p for p in root.iterdir() if p.is_dir()):
        for arm in sorted(p for p in block.iterdir() if p.is_dir()):
            runs = [last_logged(m) for m in sorted(arm.glob("seed_*/metrics.jsonl"))]
            if not runs:
                continue
            cells = [spread([r[k] for r in runs if k in r], 0 if k == "step" else 2) for k in KEYS]
            print(f"| {block.name} | {arm.name} | {len(runs)} | {cells[5]} | " + " | ".join(cells[:5]) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/positions"))
