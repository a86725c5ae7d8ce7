"""Pictures (matplotlib, an optional extra): training curves and which tokens the model flags.

``plot_runs``: losses, detection BCE against H(p) and its AUROC, learning rate, online probe and
final kNN, from each run's ``metrics.jsonl``. ``inspect_detection``: for a few val images, the
tokens that were misplaced (truth) next to the detection head's P(misplaced) per token.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import yaml

from dilemma.errors import DilemmaError
from dilemma.files import written_whole
from dilemma.report import labels
from dilemma.train.metrics import read_records


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DilemmaError(
            "pictures need matplotlib: pip install 'dilemma[plots]' (or pip install matplotlib)"
        ) from None
    return plt


def _save(fig, path, **kwargs) -> None:
    """A PNG written whole (``files.written_whole``) or a clear error (read-only folder, full disk, no extension)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DilemmaError(f"{str(path)!r}: pictures are PNG files; give a name ending in .png")
    try:
        with written_whole(path) as f:
            fig.savefig(f, format="png", dpi=110, **kwargs)
    except OSError as err:
        raise DilemmaError(f"cannot write {str(path)!r}: {err.strerror or err}") from None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DilemmaError(f"{str(run_dir)!r} is not a run folder: {path} does not exist")
    records = read_records(path)
    if not records:
        raise DilemmaError(f"{path} is empty: the run logged no step yet")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "stopped_by" not in r]
    return [p[0] for p in points], [p[1] for p in points]


def _run_labels(run_dirs: list[str | Path]) -> list[str]:
    """Each run's method and arm (``report.labels``), from its ``config.yaml`` (its folder without one)."""
    configs = []
    for run_dir in run_dirs:
        try:
            configs.append(yaml.safe_load((Path(run_dir) / "config.yaml").read_text()))
        except (OSError, yaml.YAMLError):
            configs.append(None)
    return labels(configs, [Path(run_dir).name for run_dir in run_dirs])


def _plot_losses(ax, records: list[dict], label: str) -> str:
    """The total loss (its colour, returned, is the run's in every panel), its parts dashed."""
    line = ax.plot(*_series(records, "loss"), "o-", ms=2, label=f"{label}: total")[0]
    colour = line.get_color()
    for key in ("ssl_loss", "recon_loss"):
        if _series(records, key)[0]:
            ax.plot(*_series(records, key), "--", color=colour, label=f"{label}: {key}")
    return colour


def _plot_detection(ax, records: list[dict], label: str, colour: str) -> None:
    """Detection BCE, the entropy H(p) a constant guess scores, and the AUROC (when the run detects);
    position prediction's top-1 as a fraction (when the run predicts)."""
    steps, top1 = _series(records, "pos_top1")
    if steps:
        ax.plot(steps, [v / 100 for v in top1], "o-", ms=2, color=colour, label=f"{label}: position top-1")
    steps, bce = _series(records, "det_bce")
    if steps:
        ax.plot(steps, bce, "o-", ms=2, color=colour, label=f"{label}: BCE")
        entropy = _series(records, "det_entropy")[1][-1]
        ax.axhline(entropy, color=colour, ls=":", label=f"{label}: H(p) = {entropy:.3f}, a constant guess")
        ax.plot(*_series(records, "det_auroc"), "-.", color=colour, alpha=0.7, label=f"{label}: AUROC")


def _plot_run(axes, records: list[dict], label: str, index: int) -> None:
    """One run's lines in every panel; ``index`` places its final kNN bar."""
    (ax_loss, ax_det, ax_lr), (ax_health, ax_rank, ax_teacher), (ax_probe, ax_knn, ax_speed) = axes
    colour = _plot_losses(ax_loss, records, label)
    ax_health.plot(*_series(records, "emb_std"), color=colour, label=label)
    ax_rank.plot(*_series(records, "rankme"), color=colour, label=label)
    for key, style in (("teacher_agreement", "-"), ("teacher_entropy", "--")):  # MoCo v3 / BYOL; DINO / iBOT
        if _series(records, key)[0]:
            ax_teacher.plot(*_series(records, key), style, color=colour, label=f"{label}: {key.split('_')[1]}")
    _plot_detection(ax_det, records, label, colour)
    if _series(records, "probe_acc")[0]:
        ax_probe.plot(*_series(records, "probe_acc"), "o-", ms=2, color=colour, label=label)
    final = records[-1]
    if final.get("knn_top1") is not None:
        ax_knn.bar(index, final["knn_top1"], color=colour, label=f"{label}: {final['knn_top1']:.1f} %")
    ax_lr.plot(*_series(records, "lr"), color=colour, label=label)
    ax_speed.plot(*_series(records, "img_per_s"), color=colour, label=label)


def _label_run_panels(axes) -> None:
    """Titles and axis labels, a legend, or "not logged" on a panel no run drew in."""
    (ax_loss, ax_det, ax_lr), (ax_health, ax_rank, ax_teacher), (ax_probe, ax_knn, ax_speed) = axes
    for ax, title, ylabel in (
        (ax_health, "embedding spread (collapse -> 0)", "std of L2-normed embeddings x sqrt(D)"),
        (ax_rank, "effective rank of the batch's embeddings (RankMe)", "rank"),
        (ax_teacher, "teacher: agreement (cos) / target entropy", "cos(prediction, target) / nats"),
        (ax_loss, "training loss", "loss"),
        (ax_det, "position task (training batches)", "BCE (nats) / AUROC / top-1"),
        (ax_lr, "learning rate", "lr"),
        (ax_probe, "online linear probe (sparse training views)", "top-1 (%)"),
        (ax_knn, "final kNN (dense val images)", "top-1 (%)"),
        (ax_speed, "throughput", "images / s"),
    ):
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("run" if ax is ax_knn else "step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    ax_knn.set_xticks([])


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One PNG, one line (colour) per run: losses, detection BCE against H(p) and its AUROC, learning
    rate, the online probe on the (sparse) training views, the final kNN on dense val images,
    throughput, the embeddings' spread and effective rank (``train/health.py``) and the teacher's
    agreement or target entropy (teacher-student methods). A run that
    logged fewer than two steps is drawn as points, with a warning."""
    plt = _pyplot()
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    for index, (run_dir, label) in enumerate(zip(run_dirs, _run_labels(run_dirs), strict=True)):
        records = read_metrics(run_dir)
        logged = [r for r in records if "stopped_by" not in r]
        if len(logged) < 2:
            print(f"warning: {run_dir} logged {len(logged)} step(s); its curves are single points", file=sys.stderr)
        _plot_run(axes, records, label, index)
    _label_run_panels(axes)
    fig.tight_layout()
    out = Path(out)
    _save(fig, out)
    plt.close(fig)
    return out


def _legend(result: dict) -> str:
    """A read-out's legend entry: its run's method and arm (``report.labels``), else its checkpoint."""
    return result.get("label") or result["checkpoint"]


def plot_occlusion(results: list[dict], out: str | Path) -> Path:
    """kNN and linear top-1 against the fraction of tokens kept, one line per checkpoint."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for result in results:
        kept = [p["keep_fraction"] * 100 for p in result["points"]]
        for ax, key in zip(axes, ("knn_top1", "linear_top1"), strict=True):
            ax.plot(kept, [p[key] for p in result["points"]], "o-", label=_legend(result))
    for ax, title in zip(axes, ("kNN top-1 %", "linear top-1 %"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("tokens kept %")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    _save(fig, out)
    plt.close(fig)
    return out


ROBUSTNESS_PANELS = (  # (key in a robustness result, x key, x label, x from the point)
    ("patch_shuffle", "patch shuffle", "g x g cells permuted (g)", lambda p: p["grid"]),
    ("position_shuffle", "position shuffle", "share q of tokens given a wrong position", lambda p: p["fraction"]),
    ("token_drop", "token drop", "patch tokens kept (%)", lambda p: p["keep_fraction"] * 100),
)


def plot_robustness(results: list[dict], out: str | Path) -> Path:
    """``dilemma eval robustness``'s panels, one line per checkpoint (linear solid, kNN dashed), the
    chance level in each, and the detection AUROC against chance 0.5."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    for result in results:
        colour = None
        for ax, (key, _, _, x_of) in zip(axes[:3], ROBUSTNESS_PANELS, strict=True):
            xs = [x_of(p) for p in result[key]]
            line = ax.plot(xs, [p["linear_top1"] for p in result[key]], "o-", color=colour, label=_legend(result))
            colour = line[0].get_color()
            ax.plot(xs, [p["knn_top1"] for p in result[key]], "s--", color=colour, alpha=0.6)
        if result["detection_auroc"] is not None:  # a run without a detection head has no bar
            auroc = result["detection_auroc"]
            axes[3].bar(len(axes[3].patches), auroc, color=colour, label=f"{_legend(result)}: {auroc:.3f}")
    chance = results[0]["chance"]
    runs = axes[0].get_legend_handles_labels()  # one legend for the figure: the runs, under the panels
    for ax, (_, title, xlabel, _) in zip(axes[:3], ROBUSTNESS_PANELS, strict=True):
        chance_line = ax.axhline(chance, color="grey", ls=":", lw=1, label=f"chance {chance:.0f} %")
        ax.set(title=f"{title} (linear solid, kNN dashed)", xlabel=xlabel, ylabel="top-1 (%)")
        ax.legend(handles=[chance_line], fontsize=7)
    axes[2].invert_xaxis()
    axes[3].axhline(0.5, color="grey", ls=":", lw=1, label="chance 0.5")
    axes[3].set(title="detection AUROC on val images", ylabel="AUROC", ylim=(0, 1), xticks=[])
    axes[3].legend(fontsize=7)
    fig.legend(*runs, loc="lower center", ncol=min(len(results), 3), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(results) + 2) // 3), 1, 1))
    out = Path(out)
    _save(fig, out)
    plt.close(fig)
    return out


@torch.no_grad()
def inspect_detection(
    encoder, head, images: torch.Tensor, sample, out: str | Path, patch_size: int, title: str = ""
) -> Path:
    """Rows: the image with misplaced tokens outlined (dropped ones dimmed); P(misplaced) per kept token
    as a heatmap at the token's true location, with the truth outlined."""
    _pyplot()  # matplotlib present, or one error line
    from matplotlib.patches import Rectangle

    encoder.eval()
    _, patches = encoder(images, keep=sample.keep, positions=sample.positions)
    probs = torch.sigmoid(head(patches))
    grid_h, grid_w = encoder.grid_size
    fig, axes = _inspection_figure(encoder, images, sample.keep, patch_size)
    for i in range(images.shape[0]):
        heat = torch.full((grid_h * grid_w,), float("nan"))
        heat[sample.keep[i].cpu()] = probs[i].float().cpu()
        shown = axes[1, i].imshow(heat.reshape(grid_h, grid_w).numpy(), cmap="magma", vmin=0, vmax=1)
        for j in torch.nonzero(sample.misplaced[i]).flatten().tolist():
            r, c = divmod(int(sample.keep[i, j]), grid_w)
            axes[0, i].add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size,
                                           fill=False, edgecolor="red", lw=1.5))  # fmt: skip
            axes[1, i].add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=1.5))
    axes[0, 0].set_ylabel("input (bright: kept,\nred: misplaced)", fontsize=8)
    axes[1, 0].set_ylabel("P(misplaced)\n(cyan: truth)", fontsize=8)
    fig.colorbar(shown, ax=axes[1, :].tolist(), fraction=0.02)
    return _save_inspection(fig, out, title)


def _inspection_figure(encoder, images: torch.Tensor, keep: torch.Tensor, patch_size: int):
    """Two rows of panels, one column per image, no ticks; the top row shows each image with its
    dropped patches dimmed (the bottom row is the caller's)."""
    plt = _pyplot()
    grid_h, grid_w = encoder.grid_size
    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4), squeeze=False)
    for i in range(n):
        image = encoder.denormalize(images[i].float()).permute(1, 2, 0).cpu().numpy()
        visible = torch.zeros(grid_h * grid_w)
        visible[keep[i].cpu()] = 1.0
        dim = visible.reshape(grid_h, grid_w).repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
        axes[0, i].imshow(image * (0.35 + 0.65 * dim[..., None].numpy()), cmap="gray", vmin=0, vmax=1)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig, axes


def _save_inspection(fig, out: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title, fontsize=9)
    out = Path(out)
    _save(fig, out, bbox_inches="tight")
    _pyplot().close(fig)
    return out


@torch.no_grad()
def inspect_positions(method, images: torch.Tensor, sample, out: str | Path, patch_size: int, title: str = "") -> Path:
    """Rows: the image with the tokens asked about outlined (dropped ones dimmed); on the patch grid,
    for each asked token an arrow from its true position to the predicted one (green dot: right)."""
    _pyplot()  # matplotlib present, or one error line
    from matplotlib.patches import Rectangle

    method.eval()
    encoder = method.encoder
    no_position = method.dilemma.no_position_embedding
    cls, patches = encoder(images, keep=sample.keep, positions=sample.positions, no_position=no_position)
    predicted = method.position_logits(cls, patches).argmax(-1)  # (B, K)
    grid_h, grid_w = encoder.grid_size
    fig, axes = _inspection_figure(encoder, images, sample.keep, patch_size)
    for i in range(images.shape[0]):
        axes[1, i].set(xlim=(-0.5, grid_w - 0.5), ylim=(grid_h - 0.5, -0.5), aspect="equal")
        for j in torch.nonzero(sample.unplaced[i]).flatten().tolist():
            (r, c), (pr, pc) = divmod(int(sample.keep[i, j]), grid_w), divmod(int(predicted[i, j]), grid_w)
            axes[0, i].add_patch(Rectangle((c * patch_size - 0.5, r * patch_size - 0.5), patch_size, patch_size,
                                           fill=False, edgecolor="orange", lw=1.2))  # fmt: skip
            if (r, c) == (pr, pc):
                axes[1, i].plot(c, r, "o", color="green", ms=3)
            else:
                axes[1, i].annotate("", (pc, pr), (c, r), arrowprops={"arrowstyle": "->", "color": "red", "lw": 0.8})
    axes[0, 0].set_ylabel("input (bright: kept,\norange: no position)", fontsize=8)
    axes[1, 0].set_ylabel("true -> predicted\n(green: right)", fontsize=8)
    return _save_inspection(fig, out, title)


def _band(ax, x, series: list[list[float]], label: str, style: str = "o-"):
    """Mean over seeds as a line, mean ± std as a band (no band for one seed)."""
    import numpy as np

    values = np.array(series, dtype=float)  # (seeds, points)
    mean = values.mean(axis=0)
    line = ax.plot(x, mean, style, label=f"{label} (n={len(series)})")[0]
    if len(series) > 1:
        std = values.std(axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def _accuracy_panels(plt, draw, subtitle: str, xlabel: str, chance: float, title: str, path: Path, invert_x=False):
    """A kNN and a linear-probe panel side by side: ``draw(ax, key)`` adds the lines, then the chance
    level, titles, labels and legends; saved to ``path``."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, what in zip(axes, ("knn_top1", "linear_top1"), ("kNN", "linear probe"), strict=True):
        draw(ax, key)
        ax.axhline(chance, color="grey", ls="--", lw=1, label=f"chance {chance:.0f} %")
        ax.set(title=f"{what}, {subtitle}", xlabel=xlabel, ylabel="top-1 (%)")
        if invert_x:
            ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _occlusion_lines(ax, key: str, results: list[dict], variants: list[str]) -> None:
    """Accuracy against the share of tokens kept, one band per variant."""
    for name in variants:
        rows = [r["occlusion"] for r in results if r["variant"] == name]
        kept = [p["keep_fraction"] * 100 for p in rows[0]]
        _band(ax, kept, [[p[key] for p in points] for points in rows], name)


def _over_time_lines(ax, key: str, results: list[dict], variants: list[str]) -> None:
    """Accuracy against training seconds (averaged over seeds), one band per variant."""
    for name in variants:
        rows = [r["over_time"] for r in results if r["variant"] == name]
        length = min(len(points) for points in rows)
        seconds = [sum(points[i]["elapsed_s"] for points in rows) / len(rows) for i in range(length)]
        _band(ax, seconds, [[p[key] for p in points[:length]] for points in rows], name)


def _panel_lines(ax, key: str, results: list[dict], variants: list[str], panel: str, x_key: str) -> None:
    """Accuracy under a robustness panel's corruption against its strength, one band per variant."""
    for name in variants:
        rows = [r[panel] for r in results if r["variant"] == name]
        _band(ax, [p[x_key] for p in rows[0]], [[p[key] for p in points] for points in rows], name)


def plot_shape_bias(results: list[dict], out: str | Path) -> Path:
    """``dilemma eval shape-bias``'s picture: the shape bias (linear and kNN) of each checkpoint."""
    as_variants = [{"variant": _legend(r), "shape_bias": r} for r in results]
    variants = list(dict.fromkeys(r["variant"] for r in as_variants))
    return _shape_bias_panel(_pyplot(), as_variants, variants, "eval shape-bias", Path(out))


def _shape_bias_panel(plt, results: list[dict], variants: list[str], title: str, path: Path) -> Path:
    """Shape bias (linear and kNN) per variant: the mean over seeds, each seed a dot."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(variants), 4 + 0.05 * max(map(len, variants))))
    for offset, (name, marker) in enumerate((("linear", "o"), ("knn", "s"))):
        for i, variant in enumerate(variants):
            values = [r["shape_bias"][name]["shape_bias"] for r in results if r["variant"] == variant]
            values = [v for v in values if v == v] or [float("nan")]  # NaN: no shape or texture decision
            x = i + (offset - 0.5) * 0.3
            ax.bar(x, sum(values) / len(values), width=0.28, color=f"C{offset}", alpha=0.5,
                   label=f"{name} (mean; dots: seeds)" if i == 0 else None)  # fmt: skip
            ax.plot([x] * len(values), values, marker, color=f"C{offset}", ms=4)
    ax.axhline(0.5, color="grey", ls=":", lw=1, label="0.5: shape and texture alike")
    ax.set(title=f"{title}\nshape bias on the cue-conflict set", ylabel="shape / (shape + texture)", ylim=(0, 1))
    ax.set_xticks(range(len(variants)), variants, rotation=20 if max(map(len, variants)) > 12 else 0, ha="right")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def _detection_panel(plt, results: list[dict], detecting: list[str], title: str, path: Path) -> Path:
    """Detection AUROC against training seconds for the variants that detect, and chance (0.5)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in detecting:
        curves = [r["det_auroc_curve"] for r in results if r["variant"] == name and r.get("det_auroc_curve")]
        length = min(len(c) for c in curves)  # logged every train.log_every steps: align by log index
        seconds = [sum(c[i][0] for c in curves) / len(curves) for i in range(length)]
        _band(ax, seconds, [[point[1] for point in c[:length]] for c in curves], name, style="-")
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="chance 0.5")
    ax.set(title=f"{title}\ndetection AUROC on the training batches", xlabel="training seconds", ylabel="AUROC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_comparison(results: list[dict], out_dir: str | Path) -> list[Path]:
    """``dilemma compare``'s pictures, mean ± std over seeds per variant and the chance level:
    ``occlusion.png`` (accuracy vs tokens kept), with snapshots ``over_time.png`` (accuracy vs
    training seconds), and for variants that detect, ``detection.png`` (AUROC vs training seconds)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    variants = list(dict.fromkeys(r["variant"] for r in results))
    chance = 100.0 / results[0]["num_classes"]
    title = f"{results[0]['data']}: mean ± std over seeds"
    written = [
        _accuracy_panels(
            plt,
            partial(_occlusion_lines, results=results, variants=variants),
            "occluded val images",
            "patch tokens kept (%)",
            chance,
            title,
            out_dir / "occlusion.png",
            invert_x=True,
        )
    ]
    if any(len(r.get("over_time", [])) > 1 for r in results):
        over_time = partial(_over_time_lines, results=results, variants=variants)
        written.append(
            _accuracy_panels(
                plt, over_time, "during training", "training seconds", chance, title, out_dir / "over_time.png"
            )
        )
    detecting = [name for name in variants if any(r["variant"] == name and r.get("det_auroc_curve") for r in results)]
    if detecting:
        written.append(_detection_panel(plt, results, detecting, title, out_dir / "detection.png"))
    for panel, x_key, subtitle, xlabel in (
        ("patch_shuffle", "grid", "patch shuffle", "g x g cells permuted (g; 1 = intact)"),
        ("position_shuffle", "fraction", "position shuffle", "share q of tokens given a wrong position"),
    ):
        if all(r.get(panel) for r in results):
            draw = partial(_panel_lines, results=results, variants=variants, panel=panel, x_key=x_key)
            written.append(_accuracy_panels(plt, draw, subtitle, xlabel, chance, title, out_dir / f"{panel}.png"))
    if all(r.get("shape_bias") for r in results):
        written.append(_shape_bias_panel(plt, results, variants, title, out_dir / "shape_bias.png"))
    return written
