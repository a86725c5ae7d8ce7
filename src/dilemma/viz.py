"""Pictures (matplotlib, an optional extra): training curves and which tokens the model flags.

``plot_runs``: losses, detection BCE against H(p) and its AUROC, learning rate, online probe and
final kNN, from each run's ``metrics.jsonl``. ``inspect_detection``: for a few val images, the
tokens that were misplaced (truth) next to the detection head's P(misplaced) per token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dilemma.errors import DilemmaError


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


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DilemmaError(f"{str(run_dir)!r} is not a run folder: {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise DilemmaError(f"{path}:{number} is not a JSON line") from None
    if not records:
        raise DilemmaError(f"{path} is empty: the run logged no step yet")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "stopped_by" not in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One PNG with four panels, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    (ax_loss, ax_det), (ax_probe, ax_lr) = axes
    for run_dir in run_dirs:
        records = read_metrics(run_dir)
        label = Path(run_dir).name
        line = ax_loss.plot(*_series(records, "loss"), label=f"{label}: total")[0]
        for key, style in (("ssl_loss", "--"), ("recon_loss", "--")):
            if _series(records, key)[0]:
                ax_loss.plot(*_series(records, key), style, color=line.get_color(), label=f"{label}: {key}")
        steps, bce = _series(records, "det_bce")
        if steps:
            ax_det.plot(steps, bce, color=line.get_color(), label=f"{label}: detection BCE")
            ax_det.axhline(
                _series(records, "det_entropy")[1][-1], color=line.get_color(), ls=":", label=f"{label}: H(p)"
            )
            auroc_steps, auroc = _series(records, "det_auroc")
            ax_det.plot(auroc_steps, auroc, "-.", color=line.get_color(), alpha=0.7, label=f"{label}: AUROC")
        if _series(records, "probe_acc")[0]:
            ax_probe.plot(
                *_series(records, "probe_acc"), color=line.get_color(), label=f"{label}: online probe (train batches)"
            )
        final = records[-1]
        if final.get("knn_top1") is not None:
            ax_probe.scatter(
                [final["step"]],
                [final["knn_top1"]],
                color=line.get_color(),
                marker="*",
                s=120,
                label=f"{label}: final kNN {final['knn_top1']:.1f}%",
            )
        ax_lr.plot(*_series(records, "lr"), color=line.get_color(), label=label)
    for ax, title in (
        (ax_loss, "loss"),
        (ax_det, "misplaced-token detection"),
        (ax_probe, "accuracy %"),
        (ax_lr, "learning rate"),
    ):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_occlusion(results: list[dict], out: str | Path) -> Path:
    """kNN and linear top-1 against the fraction of tokens kept, one line per checkpoint."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for result in results:
        kept = [p["keep_fraction"] * 100 for p in result["points"]]
        for ax, key in zip(axes, ("knn_top1", "linear_top1"), strict=True):
            ax.plot(kept, [p[key] for p in result["points"]], "o-", label=result["checkpoint"])
    for ax, title in zip(axes, ("kNN top-1 %", "linear top-1 %"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("tokens kept %")
        ax.invert_xaxis()
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


@torch.no_grad()
def inspect_detection(encoder, head, images: torch.Tensor, sample, out: str | Path, patch_size: int) -> Path:
    """Rows: the image with misplaced tokens outlined (dropped ones dimmed); P(misplaced) per kept token
    as a heatmap at the token's true location, with the truth outlined."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    encoder.eval()
    _, patches = encoder(images, keep=sample.keep, positions=sample.positions)
    probs = torch.sigmoid(head(patches))
    grid_h, grid_w = encoder.grid_size
    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4), squeeze=False)
    for i in range(n):
        image = (images[i].float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
        visible = torch.zeros(grid_h * grid_w)
        visible[sample.keep[i].cpu()] = 1.0
        dim = visible.reshape(grid_h, grid_w).repeat_interleave(patch_size, 0).repeat_interleave(patch_size, 1)
        heat = torch.full((grid_h * grid_w,), float("nan"))
        heat[sample.keep[i].cpu()] = probs[i].float().cpu()
        axes[0, i].imshow(image * (0.35 + 0.65 * dim[..., None].numpy()), cmap="gray", vmin=0, vmax=1)
        shown = axes[1, i].imshow(heat.reshape(grid_h, grid_w).numpy(), cmap="magma", vmin=0, vmax=1)
        for j in torch.nonzero(sample.misplaced[i]).flatten().tolist():
            r, c = divmod(int(sample.keep[i, j]), grid_w)
            axes[0, i].add_patch(
                Rectangle(
                    (c * patch_size - 0.5, r * patch_size - 0.5),
                    patch_size,
                    patch_size,
                    fill=False,
                    edgecolor="red",
                    lw=1.5,
                )
            )
            axes[1, i].add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=1.5))
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input (bright: kept,\nred: misplaced)", fontsize=8)
    axes[1, 0].set_ylabel("P(misplaced)\n(cyan: truth)", fontsize=8)
    fig.colorbar(shown, ax=axes[1, :].tolist(), fraction=0.02)
    out = Path(out)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
