"""``dilemma compare``: several configurations, the same wall-clock budget, several seeds.

Each variant x seed is pretrained (one at a time, on this machine) into ``OUT/<variant>/seed_<n>``
and read out with the robustness panels (``eval/robustness.py``: token drop, whose 100 % point is
the plain kNN and linear probe, patch shuffle, position shuffle, the detector's val AUROC), the
shape bias for a run on Animal-Texture (``eval/shape_bias.py``), and kNN and linear at checkpoints
kept at fixed fractions of the budget (the read-out over wall-clock). ``OUT/summary.md`` gets a
mean +- std table with wall-clock, steps and epochs seen (so "same time" and "same epochs" can both
be read), the layout and shape read-outs, the paired differences to the first variant with 95 %
confidence intervals, and the read-outs over time; ``OUT/results.json`` every number;
``OUT/occlusion.png``, ``over_time.png``, ``patch_shuffle.png``, ``position_shuffle.png`` (and
``shape_bias.png``, ``detection.png``) the curves with bands over seeds and the chance level. A
finished run is not trained again, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import timm
import torch

from dilemma.build import build_method, load_splits
from dilemma.config import config_from_dict, keys_set_in, load_config, safe_yaml
from dilemma.data.sources import TEXTURED
from dilemma.distributed import resolve_device
from dilemma.errors import DilemmaError
from dilemma.eval.occlusion import occlusion_curve
from dilemma.eval.robustness import SHUFFLES, Robustness, grids_for, robustness
from dilemma.eval.shape_bias import shape_bias_eval
from dilemma.files import atomic_write_text
from dilemma.rundir import CheckpointDir, RunDir, load_checkpoint
from dilemma.train.later_readouts import log_to_run
from dilemma.train.loop import pretrain
from dilemma.train.metrics import read_records
from dilemma.train.signals import Interrupted
from dilemma.weights import encoder_from_checkpoint, method_from_checkpoint

OUTPUTS = (  # what compare writes in --out
    "results.json", "summary.md", "occlusion.png", "over_time.png", "detection.png", "patch_shuffle.png",
    "position_shuffle.png", "shape_bias.png",
)  # fmt: skip


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``'name=key=value,key=value'`` -> ``('name', ['key=value', ...])``; ``'name='`` has no overrides."""
    name, _, overrides = text.partition("=")
    if not name:
        raise DilemmaError(f"--variant needs NAME=key=value,...; got {text!r}")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise DilemmaError(f"--variant name {name!r} must be a plain name (it becomes a folder)")
    if name in OUTPUTS:
        raise DilemmaError(f"--variant name {name!r} is the name of a file compare writes in --out; choose another")
    if not name.isprintable() or name.strip() != name or "|" in name or len(name) > 64:
        raise DilemmaError(
            f"--variant name {name!r} must be a short printable name without '|' or surrounding spaces "
            "(it heads a column of summary.md)"
        )
    return name, [kv for kv in overrides.split(",") if kv]


READOUTS = ("knn", "linear", "occlusion", "patch-shuffle", "position-shuffle", "detection", "shape-bias")
DEFAULT_READOUTS = ("knn", "linear", "occlusion")


def parse_readouts(text: str) -> tuple[str, ...]:
    """``--readouts``: names of ``READOUTS``, comma-separated, or ``all``. kNN and linear are always
    read out: they are the intact point every other read-out is measured against."""
    names = READOUTS if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if unknown := [n for n in names if n not in READOUTS]:
        raise DilemmaError(
            f"--readouts: unknown {', '.join(map(repr, unknown))}; choose among {', '.join(READOUTS)}, or all"
        )
    return tuple(n for n in READOUTS if n in {"knn", "linear", *names})


def _trusted(cfg) -> str | None:
    """The method to name when loading this comparison's own checkpoints (one from a file: its name)."""
    return cfg.method.name if ":" in cfg.method.name else None


def _intact_point(path: Path, ckpt: dict, cfg, splits) -> dict:
    """kNN and linear top-1 (``cfg.eval``) of the checkpoint ``ckpt`` read from ``path``: the occlusion
    curve's 100 % point."""
    device = resolve_device(cfg.train.device)
    encoder, _ = encoder_from_checkpoint(path, ckpt=ckpt, method=_trusted(cfg))
    settings = dataclasses.replace(cfg.eval, occlusion_fractions=[1.0])
    return _accuracies(occlusion_curve(encoder.to(device), splits, settings, device=device).points[0])


def _final_readouts(path: Path, cfg, splits, readouts: tuple[str, ...]) -> tuple[Robustness, dict | None]:
    """The final backbone's ``readouts`` (``READOUTS``): the robustness panels asked for (token drop =
    the occlusion curve; without it only its 100 % point, the intact kNN and linear) and, for a run
    on Animal-Texture, its shape bias on the cue-conflict set."""
    device = resolve_device(cfg.train.device)
    method, _ = method_from_checkpoint(path, method=_trusted(cfg))
    head = method.dilemma.head
    detector = None if head is None or "detection" not in readouts else (method.encoder, head, cfg.dilemma.drop_rate)
    encoder = method.evaluated_encoder().to(device)
    settings = cfg.eval if "occlusion" in readouts else dataclasses.replace(cfg.eval, occlusion_fractions=[1.0])
    shuffles = [panel for panel in SHUFFLES if panel.replace("_", "-") in readouts]
    report = robustness(encoder, splits, settings, detector=detector, shuffles=shuffles, device=device)
    if "detection" not in readouts:
        report.protocols.pop("detection")
    textured = cfg.data.source == TEXTURED and "shape-bias" in readouts
    return report, shape_bias_eval(encoder, cfg.data, cfg.eval, device=device) if textured else None


_elsewhere = "use another --out, or remove that folder to run it again"


def config_sha1(cfg) -> str:
    """A run's identity: its resolved config, less what cannot change training (eval, progress bars,
    where it is tracked)."""
    data = cfg.to_dict()
    data.pop("eval", None)
    data["train"] = {k: v for k, v in data["train"].items() if k not in ("show_progress", "loggers", "tracking")}
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def readout_settings(cfg, readouts: tuple[str, ...]) -> dict:
    """Everything a run's read-outs depend on besides its weights (the ``eval`` section and the
    read-outs asked for): a result read out otherwise is read out again (its training is reused)."""
    return {**cfg.to_dict()["eval"], "readouts": list(readouts)}


def _final_record(run: RunDir) -> dict:
    finals = [r for r in read_records(run.metrics) if "stopped_by" in r]
    if not finals:
        raise DilemmaError(f"{run.path} has a result but no final record in metrics.jsonl: {_elsewhere}")
    return finals[-1]


def _finished_result(done: Path, run_dir: Path, identity: str, overrides: list[str]) -> dict:
    """The result a finished run left in ``done``, checked to be of this configuration."""
    try:
        result = json.loads(done.read_text())
    except (OSError, ValueError):
        result = None
    if not isinstance(result, dict):
        raise DilemmaError(f"{done} is damaged (not a JSON object): remove it, and the run is read out again")
    if result.get("config_sha1", identity) != identity or result.get("overrides") != overrides:
        raise DilemmaError(f"{run_dir} holds a finished run of another configuration: {_elsewhere}")
    return result


def _train(cfg, run: RunDir, run_dir: Path, identity: str) -> dict:
    """Pretrain ``cfg`` into ``run_dir``, continuing an interrupted run of the same configuration;
    the final metrics record."""
    if run.config.exists():
        saved = safe_yaml(run.config.read_text(), str(run.config))
        method = cfg.method.name if ":" in cfg.method.name else None
        if config_sha1(config_from_dict(saved, method)) != identity:
            raise DilemmaError(f"{run_dir} holds an interrupted run of another configuration: {_elsewhere}")
    try:
        return pretrain(cfg, run_dir, resume=run.holds_run(), log=lambda _: None)  # resumes an interrupted run
    except Interrupted as stop:
        message = "Rerun the same dilemma compare command to continue."
        raise Interrupted(stop.message, stop.signum, message) from None


def _training(final: dict, records: list[dict]) -> dict:
    """How far a run trained, and its last detector numbers (``None`` for a method without one)."""
    det = [r for r in records if r.get("det_bce") is not None]
    return {
        "steps": final["step"],
        "epochs": final["epoch"],
        "train_seconds": final["elapsed_s"],
        "stopped_by": final["stopped_by"],
        "det_bce": det[-1]["det_bce"] if det else None,
        "det_entropy": det[-1]["det_entropy"] if det else None,
        "det_auroc": det[-1].get("det_auroc") if det else None,
        "det_auroc_curve": [[r["elapsed_s"], r["det_auroc"]] for r in det if r.get("det_auroc") is not None],
    }


def _over_time(cfg, run_dir: Path, splits, final: dict, end: dict, say: Callable[[str], None]) -> list[dict]:
    """kNN / linear of every snapshot, then of the final backbone (its 100 % point ``end``); each
    snapshot's numbers also go to the run's trackers at its step."""
    over_time, snapshots = [], CheckpointDir(run_dir, cfg.train.keep_checkpoints).snapshots()
    for i, path in enumerate(snapshots, 1):
        say(f"reading out snapshot {i}/{len(snapshots)}")
        ckpt = load_checkpoint(path)  # once: its weights, step and training time
        point = _intact_point(path, ckpt, cfg, splits)
        over_time.append({"step": ckpt["step"], "elapsed_s": ckpt["elapsed"], **point})
        log_to_run(path, point, step=ckpt["step"])  # a snapshot's step is in the file, not its name
    over_time.append({"step": final["step"], "elapsed_s": final["elapsed_s"], **_accuracies(end)})
    return over_time


def run_one(
    name: str,
    cfg,
    run_dir: Path,
    overrides: list[str],
    readouts: tuple[str, ...] = DEFAULT_READOUTS,
    say: Callable[[str], None] = lambda phase: None,
) -> dict:
    """Pretrain ``cfg`` into ``run_dir`` (or continue it, or reuse it) and read it out: ``readouts``
    of the final backbone and kNN / linear of every snapshot (the curve over time), all of it also
    sent to the run's trackers. A finished run is read out again when a read-out setting changed,
    never trained again. ``say``: told each phase as it starts."""
    done, run, identity = run_dir / "result.json", RunDir(run_dir), config_sha1(cfg)
    readout = readout_settings(cfg, readouts)
    if done.exists():
        result = _finished_result(done, run_dir, identity, overrides)
        if result.get("readout") == readout:
            return result
        final = _final_record(run)
    else:
        say(f"training ({_budget(cfg)})")
        final = _train(cfg, run, run_dir, identity)
    start = time.perf_counter()
    training = _training(final, read_records(run.metrics))
    splits = load_splits(cfg)
    say(f"reading out the final backbone ({', '.join(readouts)})")
    report, bias = _final_readouts(run.last, cfg, splits, readouts)
    log_to_run(run.last, {**report.numbers(), **_shape_bias_numbers(bias)})
    over_time = _over_time(cfg, run_dir, splits, final, report.intact, say)
    result = {  # the key order is the order of results.json
        "config_sha1": identity, "readout": readout, "variant": name, "seed": cfg.train.seed, "overrides": overrides,
        **training, "readout_seconds": time.perf_counter() - start, **_numbers(report, bias, over_time),
        "data": splits.name, "num_classes": len(splits.classes),
    }  # fmt: skip
    atomic_write_text(done, json.dumps(result, indent=1))
    return result


def _numbers(report: Robustness, bias: dict | None, over_time: list[dict]) -> dict:
    """A run's read-outs as ``results.json`` keeps them."""
    return {
        "knn_top1": report.intact["knn_top1"],
        "linear_top1": report.intact["linear_top1"],
        "occlusion": report.token_drop,
        "patch_shuffle": report.patch_shuffle,
        "position_shuffle": report.position_shuffle,
        "det_auroc_val": report.detection_auroc,
        "shape_bias": bias,
        "over_time": over_time,
        "protocol": report.protocols["token_drop"],
        "protocols": report.protocols,
    }


def _budget(cfg) -> str:
    minutes, steps = cfg.train.time_budget, cfg.train.max_steps
    return " or ".join([*([f"{minutes:g} min"] if minutes else []), *([f"{steps} steps"] if steps else [])])


def _shape_bias_numbers(bias: dict | None) -> dict:
    """``shape_bias/linear``, ``shape_bias/knn`` for a tracker (none without a shape-bias read-out)."""
    return {f"shape_bias/{name}": bias[name]["shape_bias"] for name in ("linear", "knn")} if bias else {}


def _accuracies(point: dict) -> dict:
    return {"knn_top1": point["knn_top1"], "linear_top1": point["linear_top1"]}


# Two-sided 95 % quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96).
# fmt: off
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
# fmt: on


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (t, n - 1 degrees of freedom)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    t = T95[len(values) - 2] if len(values) - 1 <= len(T95) else 1.96
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def _point(r: dict, panel: str, key: str, at: float, name: str = "linear_top1") -> float | None:
    """A result's ``name`` at the point of ``panel`` whose ``key`` is ``at`` (None where it has none)."""
    return next((p[name] for p in r.get(panel) or [] if p[key] == at), None)


def _retained(r: dict, panel: str, key: str, at: float) -> float | None:
    """Linear top-1 under a corruption as a share (%) of the intact linear top-1."""
    value = _point(r, panel, key, at)
    return None if value is None or not r["linear_top1"] else 100 * value / r["linear_top1"]


def _shape_bias(r: dict, name: str) -> float | None:
    found = r.get("shape_bias")
    return (
        None if not found or found[name]["shape_bias"] != found[name]["shape_bias"] else found[name]["shape_bias"] * 100
    )


def _metrics(first: dict) -> list[tuple[str, Callable[[dict], float | None]]]:
    """Every number compared between variants, found in each result by its point's value (``first``:
    a result, for the points to compare): intact kNN / linear, linear under token drop, patch shuffle
    and position shuffle, the share of accuracy retained at the strongest shuffles, the detector's val
    AUROC and the shape bias (%)."""
    metrics = [("kNN", lambda r: r["knn_top1"]), ("linear", lambda r: r["linear_top1"])]
    occlusion = [p["keep_fraction"] for p in first["occlusion"] if p["keep_fraction"] < 1]
    metrics += [
        (f"linear @{f * 100:.0f}%", lambda r, f=f: _point(r, "occlusion", "keep_fraction", f)) for f in occlusion
    ]
    grids = [p["grid"] for p in first.get("patch_shuffle") or [] if p["grid"] > 1]
    metrics += [(f"linear, {g}x{g} shuffled", lambda r, g=g: _point(r, "patch_shuffle", "grid", g)) for g in grids]
    qs = [p["fraction"] for p in first.get("position_shuffle") or [] if p["fraction"] > 0]
    metrics += [(f"linear, q={q:g} positions", lambda r, q=q: _point(r, "position_shuffle", "fraction", q)) for q in qs]
    if grids:
        metrics.append(
            (f"retained % at {grids[-1]}x{grids[-1]}", lambda r: _retained(r, "patch_shuffle", "grid", grids[-1]))
        )
    if qs:
        metrics.append((f"retained % at q={qs[-1]:g}", lambda r: _retained(r, "position_shuffle", "fraction", qs[-1])))
    metrics.append(("det AUROC (val)", lambda r: r.get("det_auroc_val")))
    metrics += [(f"shape bias % ({name})", lambda r, n=name: _shape_bias(r, n)) for name in ("linear", "knn")]
    return metrics


def paired_differences(results: list[dict]) -> list[tuple[str, str, list[float]]]:
    """``(variant, metric, per-seed differences to the first variant)`` on the seeds both have a value for."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    by = {(r["variant"], r["seed"]): r for r in results}
    rows = []
    for name in variants[1:]:
        seeds = [seed for (v, seed) in by if v == name and (variants[0], seed) in by]
        for metric, value in _metrics(results[0]):
            pairs = [(value(by[name, s]), value(by[variants[0], s])) for s in seeds]
            if any(a is not None and b is not None for a, b in pairs):
                rows.append((name, metric, [a - b for a, b in pairs if a is not None and b is not None]))
    return rows


def _layout_table(results: list[dict], variants: list[str]) -> list[str]:
    """Linear top-1 under patch and position shuffle, the detector on val images and the shape bias,
    mean ± std over seeds; none for results read out before these panels existed."""
    first = results[0]
    if not first.get("patch_shuffle"):
        return []
    metrics = [m for m in _metrics(first) if m[0].startswith(("linear, ", "retained", "det AUROC", "shape bias"))]
    metrics = [m for m in metrics if any(m[1](r) is not None for r in results)]
    grids = [p["grid"] for p in first["patch_shuffle"]]
    lines = [
        "",
        "Layout and shape (linear probe fitted on intact images; retained = corrupted / intact top-1; "
        f"patch shuffle: each val image cut into g x g cells, g in {grids}, the cells permuted; position shuffle: "
        "a share q of the tokens given another position's embedding; whole protocols in results.json).",
        "",
        "| variant | " + " | ".join(name for name, _ in metrics) + " |",
        "|---|" + "---:|" * len(metrics),
    ]
    for variant in variants:
        rows = [r for r in results if r["variant"] == variant]
        cells = [_mean_std([v for v in map(value, rows) if v is not None]) for _, value in metrics]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def _header(
    results: list[dict], variants: list[str], *, time_budget: float, max_steps: int | None, seeds: list[int]
) -> list[str]:
    """The title, the machine and budget, and the read-out protocol."""
    cap = f"max {max_steps} steps" if max_steps else "no step cap"
    return [
        f"# Comparison on {results[0]['data']}: {', '.join(variants)}",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads; python {platform.python_version()}, "
        f"torch {torch.__version__}, timm {timm.__version__}. Budget {time_budget} min of training per run "
        f"({cap}), seeds {seeds}; runs one at a time. Chance: {100 / results[0]['num_classes']:.1f} %.",
        "",
        f"Read-outs: {results[0]['protocol']}. kNN and linear = the 100 % point. Mean ± std over seeds.",
        "",
    ]


def _results_table(results: list[dict], variants: list[str]) -> list[str]:
    """One row a variant: mean ± std over seeds of training, detector and read-outs."""
    fractions = [p["keep_fraction"] for p in results[0]["occlusion"]]
    lines = [
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
    return lines


def _differences_table(results: list[dict], variants: list[str]) -> list[str]:
    """The paired differences to the first variant with their 95 % intervals; none with one variant."""
    differences = paired_differences(results)
    if not differences:
        return []
    lines = [
        "",
        f"Paired differences to `{variants[0]}` (same seed), in points (AUROC in AUROC units): mean ± half-width "
        "of the 95 % confidence interval (Student's t over seeds; a single seed has none).",
        "",
        "| variant | metric | seeds | difference | per seed |",
        "|---|---|---:|---:|---|",
    ]
    for name, metric, diffs in differences:
        mean, half = mean_ci95(diffs) if diffs else (float("nan"), float("nan"))
        ci = f"{mean:+.2f} ± {half:.2f}" if diffs and half == half else (f"{mean:+.2f}" if diffs else "—")
        lines.append(f"| {name} | {metric} | {len(diffs)} | {ci} | {', '.join(f'{d:+.2f}' for d in diffs)} |")
    return lines


def _over_time_table(results: list[dict], variants: list[str]) -> list[str]:
    """kNN / linear at each snapshot, mean over seeds; none when no run kept a snapshot."""
    if not any(len(r.get("over_time", [])) > 1 for r in results):
        return []
    lines = ["", "Read-outs over training (snapshots; mean over seeds):", "",
             "| variant | train s | step | kNN top-1 | linear top-1 |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name in variants:
        rows = [r["over_time"] for r in results if r["variant"] == name]
        for i in range(min(len(points) for points in rows)):  # the snapshots every seed has
            column = [points[i] for points in rows]
            elapsed = statistics.fmean(p["elapsed_s"] for p in column)
            step = statistics.fmean(p["step"] for p in column)
            knn, linear = (_mean_std([p[key] for p in column]) for key in ("knn_top1", "linear_top1"))
            lines.append(f"| {name} | {elapsed:.0f} | {step:.0f} | {knn} | {linear} |")
    return lines


def _variants_list(results: list[dict], variants: list[str]) -> list[str]:
    """What each variant overrides."""
    lines = ["", "Variants (on top of the base config and --set):", ""]
    lines += [
        f"- `{name}`: {', '.join(next(r for r in results if r['variant'] == name)['overrides']) or '(no overrides)'}"
        for name in variants
    ]
    return lines


def summarise(results: list[dict], *, time_budget: float, max_steps: int | None, seeds: list[int]) -> str:
    """``summary.md``: the results table, the paired differences, the read-outs over time, the variants."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    lines = [
        *_header(results, variants, time_budget=time_budget, max_steps=max_steps, seeds=seeds),
        *_results_table(results, variants),
        *_layout_table(results, variants),
        *_differences_table(results, variants),
        *_over_time_table(results, variants),
        *_variants_list(results, variants),
    ]
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> list[Path]:
    """``occlusion.png`` and ``over_time.png`` with bands over seeds; none without matplotlib."""
    try:
        from dilemma.viz import plot_comparison

        return plot_comparison(results, out)
    except DilemmaError:  # matplotlib missing: the tables are still written
        return []


def _fixed_overrides(
    time_budget: float, max_steps: int | None, probe_epochs: int | None, curve_points: int
) -> list[str]:
    """The settings every run of a comparison shares (its budget, read-out, snapshots)."""
    fixed = [
        *([f"eval.linear_epochs={probe_epochs}"] if probe_epochs is not None else []),
        f"train.time_budget={time_budget}",
        *([f"train.max_steps={max_steps}"] if max_steps is not None else []),
        "train.show_progress=false",
        "eval.knn_at_end=false",
    ]
    if curve_points > 1:
        fixed.append(f"train.snapshot_every={1 / curve_points}")
    return fixed


def _run_name(variant: str, seed: int) -> str:
    """The tracker run's name (W&B / MLflow) unless the user sets one: the arm and the seed."""
    return f"train.tracking.run_name={json.dumps(f'{variant} seed {seed}')}"


def _plan(
    variants: list[str], seeds: list[int], config: str | None, overrides: list[str], fixed: list[str]
) -> list[tuple]:
    """``(seed, name, variant overrides, config)`` of every run, seed by seed; every configuration
    is checked (names, seeds, overrides) before the first run starts."""
    parsed = [parse_variant(v) for v in variants]
    if len({name for name, _ in parsed}) != len(parsed):
        raise DilemmaError("--variant names must be different")
    if len(set(seeds)) != len(seeds):
        raise DilemmaError(f"--seeds lists a seed twice: {seeds}")
    return [
        (
            seed,
            name,
            variant_overrides,
            load_config(config, [_run_name(name, seed), *overrides, *variant_overrides, f"train.seed={seed}", *fixed]),
        )
        for seed in seeds
        for name, variant_overrides in parsed
    ]


def _check_buildable(runs: list[tuple]) -> None:
    """Every variant built once (its data listed, its method and model made, its read-out grids
    checked) before the first run trains: an arm that cannot run is refused now, not after the
    others have trained for hours."""
    listed, built = set(), set()
    for _, name, _, cfg in runs:
        if name in built:
            continue
        try:
            data = json.dumps(cfg.to_dict()["data"], sort_keys=True)
            if data not in listed:
                load_splits(cfg)
                listed.add(data)
            grids_for(build_method(cfg).encoder, cfg.eval)
        except DilemmaError as err:
            raise DilemmaError(f"variant {name!r} cannot run (nothing was trained): {err}") from None
        built.add(name)


def _make_out(out: Path) -> None:
    """Create ``--out``, or say why it cannot hold the comparison."""
    if out.exists() and not out.is_dir():
        raise DilemmaError(f"--out {str(out)!r} is a file; give a folder for the comparison")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DilemmaError(f"cannot write to --out {str(out)!r}: {err.strerror or err}") from None


def _time_left(runs: list[tuple], results: list[dict]) -> str:
    """What ``runs`` (those not started) will take: their training budgets, and as long a read-out
    each as those done so far took (an estimate; a step cap can end a run sooner)."""
    minutes = sum(cfg.train.time_budget or 0 for *_, cfg in runs)
    read = [r["readout_seconds"] for r in results if r.get("readout_seconds") is not None]
    if read:
        return f"about {minutes + len(runs) * statistics.fmean(read) / 60:.0f} min left"
    return f"{minutes:g} min of training left, and the read-outs" if minutes else "the read-outs left"


def _run_all(runs: list[tuple], out: Path, readouts: tuple[str, ...]) -> list[dict]:
    """Every run of the plan, one at a time: each phase said as it starts, each result as it ends."""
    results = []
    for i, (seed, name, variant_overrides, cfg) in enumerate(runs):
        head = f"[{i + 1}/{len(runs)}] {name} seed {seed}"
        print(f"{head}: {_time_left(runs[i:], results)}", flush=True)
        start = time.perf_counter()
        say = lambda phase, head=head: print(f"{head}: {phase}", flush=True)  # noqa: E731
        results.append(run_one(name, cfg, out / name / f"seed_{seed}", variant_overrides, readouts, say))
        r = results[-1]
        print(
            f"{head}: {r['steps']} steps, {r['epochs']:.2f} epochs, kNN {r['knn_top1']:.2f}%, "
            f"linear {r['linear_top1']:.2f}%  ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return results


def _write_outputs(
    results: list[dict], out: Path, *, time_budget: float, max_steps: int | None, seeds: list[int]
) -> None:
    """``results.json``, ``summary.md`` and the pictures in ``out``; the summary is printed too."""
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    summary = summarise(results, time_budget=time_budget, max_steps=max_steps, seeds=seeds)
    atomic_write_text(out / "summary.md", summary)
    pictures = plot(results, out)
    print(summary + "".join(f"\nwrote {path}" for path in pictures))


def compare(
    variants: list[str],
    *,
    seeds: list[int],
    out: Path,
    time_budget: float,
    max_steps: int | None = None,
    probe_epochs: int | None = None,
    curve_points: int = 4,
    readouts: tuple[str, ...] = DEFAULT_READOUTS,
    config: str | None = None,
    overrides: list[str] = (),
) -> list[dict]:
    """Each ``NAME=key=value,...`` variant x seed, trained for ``time_budget`` minutes and read out
    (``readouts``: of ``READOUTS``), also kNN / linear at ``curve_points - 1`` snapshots evenly
    spaced over training (the read-out over time).
    ``max_steps`` caps every run; without it a step cap given with ``--set`` (or a variant, or the
    config file) is kept, and otherwise only the budget ends a run."""
    fixed = _fixed_overrides(time_budget, max_steps, probe_epochs, curve_points)
    group = f"train.tracking.group={json.dumps(out.resolve().name)}"  # the arms side by side in a tracker
    only_the_budget = (
        [] if "train.max_steps" in keys_set_in(config) else ["train.max_steps=null"]
    )  # first: --set and variants win
    runs = _plan(variants, seeds, config, [*only_the_budget, group, *overrides], fixed)
    _check_buildable(runs)
    _make_out(out)
    results = _run_all(runs, out, readouts)
    caps = {cfg.train.max_steps for *_, cfg in runs}
    cap = caps.pop() if len(caps) == 1 else None
    _write_outputs(results, out, time_budget=time_budget, max_steps=cap, seeds=seeds)
    return results
