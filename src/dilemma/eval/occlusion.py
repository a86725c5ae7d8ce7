"""Occlusion robustness: accuracy when only a fraction of each test image's tokens is visible.

The paper (Sec. 4) claims that training on sparse inputs makes a ViT robust to occlusion. Here the
memory bank (kNN) and the linear probe are built from dense train features; each val image then
keeps a random ``round(f * L)`` of its patch tokens, at their true positions (a fixed draw per
seed), for each f of ``eval.occlusion_fractions``. At 100 % this is exactly the plain kNN / linear eval.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from dilemma.config import EvalConfig
from dilemma.data import Splits
from dilemma.eval.features import extract_features
from dilemma.eval.knn import knn_accuracy, require_labels
from dilemma.eval.linear import train_linear_probe
from dilemma.models import ViTEncoder


@dataclass
class OcclusionCurve:
    points: list[dict]  # {"keep_fraction", "tokens", "knn_top1", "linear_top1"}
    protocol: str


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
    num_classes, seed, k, temperature = len(splits.classes), settings.seed, settings.knn_k, settings.knn_temperature
    probe_epochs, probe_lr = settings.linear_epochs, settings.linear_lr
    loading = {"batch_size": settings.batch_size, "device": device, "num_workers": num_workers, "l2_normalize": False}
    train_f, train_y = extract_features(
        encoder, splits.train, **loading, desc="train features" if show_progress else None
    )
    probe = train_linear_probe(train_f, train_y, num_classes, epochs=probe_epochs, lr=probe_lr, seed=seed)
    bank = F.normalize(train_f, dim=1)
    points = []
    for fraction in settings.occlusion_fractions:
        desc = f"val features, {fraction:.0%} of tokens" if show_progress else None
        val_f, val_y = extract_features(encoder, splits.val, **loading, keep_fraction=fraction, seed=seed, desc=desc)
        knn_top1, _ = knn_accuracy(
            bank, train_y, F.normalize(val_f, dim=1), val_y, k=k, temperature=temperature, num_classes=num_classes
        )
        tokens = max(1, int(encoder.num_patches * fraction + 0.5))
        points.append(
            {"keep_fraction": fraction, "tokens": tokens, "knn_top1": knn_top1, "linear_top1": probe.top1(val_f, val_y)}
        )
    neighbours = str(k) if k <= len(splits.train) else f"{len(splits.train)} of {k} asked"  # the bank is smaller
    protocol = (
        f"occlusion: each val image keeps a random round(f x {encoder.num_patches}) patch tokens at their true "
        f"positions (seed {seed}); kNN (k={neighbours}, T={temperature}) against dense train features and a "
        f"linear probe ({probe_epochs} epochs, SGD, cosine) trained on dense train features; {splits.name} val "
        f"({len(splits.val)})"
    )
    return OcclusionCurve(points, protocol)
