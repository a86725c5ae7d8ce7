"""Occlusion robustness: accuracy when only a fraction of each test image's tokens is visible.

The paper (Sec. 4) claims that training on sparse inputs makes a ViT robust to occlusion. Here the
memory bank (kNN) and the linear probe are built from dense train features; each val image then
keeps a random ``round(f * L)`` of its patch tokens, at their true positions (a fixed draw per
seed), for each f of ``eval.occlusion_fractions``. At 100 % this is exactly the plain kNN / linear eval.
"""

from __future__ import annotations

from dataclasses import dataclass

from dilemma.config import EvalConfig
from dilemma.data import Splits
from dilemma.eval.corruptions import token_drop
from dilemma.eval.knn import require_labels
from dilemma.eval.readout import FrozenReadout
from dilemma.models import ViTEncoder


@dataclass
class OcclusionCurve:
    points: list[dict]  # {"keep_fraction", "tokens", "knn_top1", "linear_top1"}
    protocol: str


def occlusion_points(readout: FrozenReadout, splits: Splits, *, show_progress: bool = False) -> list[dict]:
    """kNN and linear top-1 at each of ``eval.occlusion_fractions`` of the tokens."""
    points = []
    for fraction in readout.settings.occlusion_fractions:
        desc = f"val features, {fraction:.0%} of tokens" if show_progress else None
        tokens = max(1, int(readout.encoder.num_patches * fraction + 0.5))
        top1 = readout.top1(splits.val, token_drop(fraction), desc)
        points.append({"keep_fraction": fraction, "tokens": tokens, **top1})
    return points


def tracker_numbers(points: list[dict]) -> dict[str, float]:
    """An occlusion curve as flat names for a tracker: ``occlusion/keep_0.25/linear_top1``, ..."""
    return {f"occlusion/keep_{p['keep_fraction']:g}/{k}": p[k] for p in points for k in ("knn_top1", "linear_top1")}


def occlusion_protocol(readout: FrozenReadout, splits: Splits) -> str:
    s, k = readout.settings, readout.settings.knn_k
    neighbours = str(k) if k <= len(splits.train) else f"{len(splits.train)} of {k} asked"  # the bank is smaller
    return (
        f"occlusion: each val image keeps a random round(f x {readout.encoder.num_patches}) patch tokens at their "
        f"true positions (seed {s.seed}); kNN (k={neighbours}, T={s.knn_temperature}) against dense train features "
        f"and a linear probe ({s.linear_epochs} epochs, SGD, cosine) trained on dense train features; {splits.name} "
        f"val ({len(splits.val)})"
    )


def occlusion_curve(
    encoder: ViTEncoder,
    splits: Splits,
    settings: EvalConfig,
    *,
    device="cpu",
    num_workers: int = 0,
    show_progress: bool = False,
) -> OcclusionCurve:
    """kNN and linear top-1 at each of ``settings.occlusion_fractions`` of the tokens."""
    require_labels(splits, "occlusion")
    readout = FrozenReadout.fit(
        encoder, splits.train, len(splits.classes), settings, show_progress=show_progress, device=device,
        num_workers=num_workers,
    )  # fmt: skip
    return OcclusionCurve(
        occlusion_points(readout, splits, show_progress=show_progress), occlusion_protocol(readout, splits)
    )
