"""``dilemma compare``: several configurations, the same wall-clock budget, several seeds.

Each variant x seed is pretrained (one at a time, on this machine) into ``OUT/<variant>/seed_<n>``
and read out with the occlusion curve, whose 100 % point is the plain kNN and linear probe
(``eval/occlusion.py``). ``OUT/summary.md`` gets a mean +- std table with wall-clock, steps and
epochs seen (so "same time" and "same epochs" can both be read), ``OUT/results.json`` every
number, ``OUT/occlusion.png`` the mean curves. A finished run is not trained again, so an
interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import timm
import torch

from dilemma.build import load_splits
from dilemma.config import load_config
from dilemma.distributed import resolve_device
from dilemma.errors import DilemmaError
from dilemma.eval.occlusion import occlusion_curve
from dilemma.rundir import RunDir, encoder_from_checkpoint
from dilemma.train.loop import pretrain


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``'name=key=value,key=value'`` -> ``('name', ['key=value', ...])``; ``'name='`` has no overrides."""
    name, _, overrides = text.partition("=")
    if not name:
        raise DilemmaError(f"--variant needs NAME=key=value,...; got {text!r}")
    return name, [kv for kv in overrides.split(",") if kv]


def run_one(name: str, cfg, run_dir: Path, overrides: list[str], probe_epochs: int) -> dict:
    """Pretrain ``cfg`` into ``run_dir`` (or continue it, or reuse its result) and read it out."""
    done = run_dir / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    resume = RunDir(run_dir).holds_run()  # a run that was interrupted: continue it
    final = pretrain(cfg, run_dir, resume=resume, log=lambda _: None)
    records = [json.loads(line) for line in RunDir(run_dir).metrics.read_text().splitlines()]
    det = [r for r in records if r.get("det_bce") is not None]
    encoder, _ = encoder_from_checkpoint(run_dir)
    device = resolve_device(cfg.train.device)
    splits = load_splits(cfg)
    curve = occlusion_curve(
        encoder.to(device),
        splits,
        k=cfg.eval.knn_k,
        temperature=cfg.eval.knn_temperature,
        probe_epochs=probe_epochs,
        seed=0,
        device=device,
    )
    result = {
        "variant": name,
        "seed": cfg.train.seed,
        "overrides": overrides,
        "steps": final["step"],
        "epochs": final["epoch"],
        "train_seconds": final["elapsed_s"],
        "stopped_by": final["stopped_by"],
        "det_bce": det[-1]["det_bce"] if det else None,
        "det_entropy": det[-1]["det_entropy"] if det else None,
        "det_auroc": det[-1].get("det_auroc") if det else None,
        "knn_top1": curve.points[0]["knn_top1"],
        "linear_top1": curve.points[0]["linear_top1"],
        "occlusion": curve.points,
        "protocol": curve.protocol,
        "data": splits.name,
    }
    done.write_text(json.dumps(result, indent=1))
    return result


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def summarise(results: list[dict], *, time_budget: float, max_steps: int, seeds: list[int]) -> str:
    variants = list(dict.fromkeys(r["variant"] for r in results))
    fractions = [p["keep_fraction"] for p in results[0]["occlusion"]]
    lines = [
        f"# Comparison on {results[0]['data']}: {', '.join(variants)}",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads; python {platform.python_version()}, "
        f"torch {torch.__version__}, timm {timm.__version__}. Budget {time_budget} min of training per run "
        f"(max {max_steps} steps), seeds {seeds}; runs one at a time.",
        "",
        f"Read-outs: {results[0]['protocol']}. kNN and linear = the 100 % point.",
        "",
        "| variant | seeds | steps | epochs | train s | det BCE / H(p) | kNN top-1 | linear top-1 | "
        + " | ".join(f"linear @{f * 100:.0f}%" for f in fractions[1:])
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(fractions) - 1),
    ]
    for name in variants:
        rows = [r for r in results if r["variant"] == name]
        det = [r["det_bce"] for r in rows if r["det_bce"] is not None]
        det_text = f"{_mean_std(det)} / {rows[0]['det_entropy']:.3f}" if det else "—"
        occl = [_mean_std([r["occlusion"][i]["linear_top1"] for r in rows]) for i in range(1, len(fractions))]
        stats = {
            key: _mean_std([r[key] for r in rows])
            for key in ("steps", "epochs", "train_seconds", "knn_top1", "linear_top1")
        }
        cells = [name, str(len(rows)), stats["steps"], stats["epochs"], stats["train_seconds"], det_text]
        lines.append("| " + " | ".join([*cells, stats["knn_top1"], stats["linear_top1"], *occl]) + " |")
    lines += ["", "Variants (on top of the base config and --set):", ""]
    lines += [
        f"- `{name}`: {', '.join(next(r for r in results if r['variant'] == name)['overrides']) or '(no overrides)'}"
        for name in variants
    ]
    return "\n".join(lines) + "\n"


def plot_mean_curves(results: list[dict], path: Path) -> Path | None:
    try:
        from dilemma.viz import plot_occlusion
    except ImportError:
        return None
    merged = []
    for name in dict.fromkeys(r["variant"] for r in results):
        rows = [r for r in results if r["variant"] == name]
        points = [
            {
                "keep_fraction": p["keep_fraction"],
                "knn_top1": statistics.fmean(r["occlusion"][i]["knn_top1"] for r in rows),
                "linear_top1": statistics.fmean(r["occlusion"][i]["linear_top1"] for r in rows),
            }
            for i, p in enumerate(rows[0]["occlusion"])
        ]
        merged.append({"checkpoint": f"{name} (mean of {len(rows)})", "points": points})
    try:
        return plot_occlusion(merged, path)
    except DilemmaError:  # matplotlib missing: the table is still written
        return None


def compare(
    variants: list[str],
    *,
    seeds: list[int],
    out: Path,
    time_budget: float,
    max_steps: int = 1_000_000,
    probe_epochs: int = 100,
    config: str | None = None,
    overrides: list[str] = (),
) -> list[dict]:
    """Each ``NAME=key=value,...`` variant x seed, trained for ``time_budget`` minutes and read out."""
    out.mkdir(parents=True, exist_ok=True)
    parsed = [parse_variant(v) for v in variants]
    if len({name for name, _ in parsed}) != len(parsed):
        raise DilemmaError("--variant names must be different")
    fixed = [
        f"train.time_budget={time_budget}",
        f"train.max_steps={max_steps}",
        "train.progress=false",
        "eval.knn_at_end=false",
    ]
    results = []
    for seed in seeds:
        for name, variant_overrides in parsed:
            start = time.perf_counter()
            cfg = load_config(config, [*overrides, *variant_overrides, f"train.seed={seed}", *fixed])
            results.append(run_one(name, cfg, out / name / f"seed_{seed}", variant_overrides, probe_epochs))
            r = results[-1]
            print(
                f"{name} seed {seed}: {r['steps']} steps, {r['epochs']:.2f} epochs, kNN {r['knn_top1']:.2f}%, "
                f"linear {r['linear_top1']:.2f}%  ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    summary = summarise(results, time_budget=time_budget, max_steps=max_steps, seeds=seeds)
    (out / "summary.md").write_text(summary)
    png = plot_mean_curves(results, out / "occlusion.png")
    print(summary + (f"\nwrote {png}" if png else ""))
    return results
