"""How runs and read-outs are shown to people: a run's label (its method and arm, for plot legends
and table rows) and plain-text tables that put the read-outs of several runs side by side, each
protocol said once under the table instead of once per run."""

from __future__ import annotations

from collections.abc import Sequence

from dilemma.pretext import active_task

METHOD_TITLES = {  # how the papers write them; a method of one's own keeps its name
    "mocov3": "MoCo v3", "dino": "DINO", "simclr": "SimCLR", "mae": "MAE", "byol": "BYOL", "vicreg": "VICReg",
    "ibot": "iBOT", "ijepa": "I-JEPA", "droppos": "DropPos",
}  # fmt: skip


def arm(dilemma: dict) -> str:
    """The arm a run's ``dilemma`` section makes: with DILEMMA, with position prediction, sparse
    only, or plain (the rules of ``pretext.Dilemma``)."""
    p, r, q = dilemma.get("misplace_prob", 0), dilemma.get("drop_rate", 0), dilemma.get("position_drop_prob", 0)
    running = active_task(dilemma.get("task", "detect"), dilemma.get("weight", 1), p, q)
    if running == "detect":
        return f"+ DILEMMA (p={p:g}, r={r:g})"
    if running == "predict":
        sigma = dilemma.get("position_smoothing", 0)
        return f"+ predict (q={q:g}, r={r:g}{f', sigma={sigma:g}' if sigma else ''})"
    return f"sparse (r={r:g})" if r else "plain"


def run_label(config: dict | None) -> str | None:
    """``MoCo v3 + DILEMMA (p=0.2, r=0.75)`` from a run's saved config; the tracker run name when the
    run has one (``dilemma compare`` names each run by its variant and seed); None without a config."""
    try:
        named = (config["train"].get("tracking") or {}).get("run_name")
        method = config["method"]["name"]
        return named or f"{METHOD_TITLES.get(method, method)} {arm(config['dilemma'])}"
    except (KeyError, TypeError, AttributeError):
        return None


def labels(configs: Sequence[dict | None], names: Sequence[str]) -> list[str]:
    """One legend entry per run: its label (``run_label``), with its folder or file ``name`` where
    another run has the same label or there is no config."""
    found = [run_label(config) for config in configs]
    return [
        name if label is None else (f"{label}: {name}" if found.count(label) > 1 else label)
        for label, name in zip(found, names, strict=True)
    ]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned columns: the first left-aligned (names), the others right-aligned (numbers)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    align = lambda i, cell: str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i])  # noqa: E731
    return ["  ".join(align(i, cell) for i, cell in enumerate(row)).rstrip() for row in [header, *rows]]


def runs_key(checkpoints: Sequence[str], names: Sequence[str]) -> list[str]:
    """``[1] runs/a: MoCo v3 + DILEMMA (p=0.2, r=0.75)``: the numbers that head the columns."""
    return [f"  [{i}] {path}: {name}" for i, (path, name) in enumerate(zip(checkpoints, names, strict=True), 1)]


def protocols_said_once(protocols: Sequence[str]) -> list[str]:
    """Each distinct protocol once, in order of first use."""
    return [f"  [{text}]" for text in dict.fromkeys(protocols)]


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def knn_lines(results: Sequence[dict]) -> list[str]:
    """Several runs' kNN read-outs: one row a run."""
    rows = [[r["label"], _pct(r["knn_top1"]), _pct(r["knn_top5"])] for r in results]
    return [*table(["run", "kNN top-1 %", "top-5 %"], rows), *protocols_said_once([r["protocol"] for r in results])]


def linear_lines(results: Sequence[dict]) -> list[str]:
    """Several runs' linear probes: one row a run."""
    rows = [[r["label"], _pct(r["linear_top1"])] for r in results]
    return [*table(["run", "linear top-1 %"], rows), *protocols_said_once([r["protocol"] for r in results])]


def _side_by_side(results: Sequence[dict], rows: list[tuple[str, list[dict | None]]]) -> list[str]:
    """``rows``: a corruption's name and each run's point there (None: that run has none)."""
    header = ["", *(f"[{i}] linear / kNN" for i in range(1, len(results) + 1))]
    cells = [
        [name, *("—" if p is None else f"{p['linear_top1']:.2f} / {p['knn_top1']:.2f}" for p in points)]
        for name, points in rows
    ]
    return [*runs_key([r["checkpoint"] for r in results], [r["label"] for r in results]), *table(header, cells)]


def _points(results: Sequence[dict], panel: str, key: str) -> list[tuple[float, list[dict | None]]]:
    """Every value of ``key`` any run has in ``panel``, with each run's point at it."""
    values = list(dict.fromkeys(p[key] for r in results for p in r[panel]))
    return [(v, [next((p for p in r[panel] if p[key] == v), None) for r in results]) for v in values]


def occlusion_lines(results: Sequence[dict]) -> list[str]:
    """Several runs' occlusion curves side by side: a row per share of tokens kept, a column per run."""
    rows = [(f"tokens kept {v:.0%}", points) for v, points in _points(results, "points", "keep_fraction")]
    return [*_side_by_side(results, rows), *protocols_said_once([r["protocol"] for r in results])]


def robustness_lines(results: Sequence[dict]) -> list[str]:
    """Several runs' robustness panels side by side, and their detection AUROC."""
    rows = [(f"patch shuffle {g} x {g}", pts) for g, pts in _points(results, "patch_shuffle", "grid")]
    rows += [(f"position shuffle q = {q:g}", pts) for q, pts in _points(results, "position_shuffle", "fraction")]
    rows += [(f"tokens kept {f:.0%}", pts) for f, pts in _points(results, "token_drop", "keep_fraction")]
    aurocs = ["—" if r["detection_auroc"] is None else f"{r['detection_auroc']:.4f}" for r in results]
    lines = _side_by_side(results, rows)
    lines.append("detection AUROC (chance 0.5): " + ", ".join(f"[{i}] {a}" for i, a in enumerate(aurocs, 1)))
    return [*lines, *protocols_said_once([p for r in results for p in r["protocols"].values()])]
