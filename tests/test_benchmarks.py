"""The GPU readiness script runs end to end (on a CPU, with a tiny model) and writes its table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run_writes_every_method(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--smoke"]
    command += ["--batch", "16", "--workers", "1", "--out", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    (report,) = tmp_path.glob("gpu-*-smoke.json")
    rows = json.loads(report.read_text())["steps"]
    assert [(r["method"], r["variant"]) for r in rows] == [
        (m, v)
        for m in ("mocov3", "dino", "simclr", "mae", "byol", "vicreg", "ibot", "ijepa")
        for v in ("plain", "dilemma")
    ] + [("droppos", "plain")]  # DropPos as published: no DILEMMA arm
    for row in rows:
        assert "error" not in row, row
        assert row["img_per_s"] > 0 and row["flops_per_step"] > 0 and row["loader_img_per_s"] > 0
        assert row["bound"] in ("loader", "model")
    assert "| mocov3 | dilemma | no |" in report.with_suffix(".md").read_text()
