"""Frozen-backbone features: the final-norm class token of a clean forward, dense or occluded."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dilemma.data import ImageSet, eval_batches
from dilemma.errors import DilemmaError
from dilemma.models import ViTEncoder


def occlusion_keep(
    batch_size: int, num_patches: int, keep_fraction: float, generator: torch.Generator
) -> torch.Tensor | None:
    """Random visible tokens per image, ``(B, max(1, round(f * L)))`` sorted (true positions); None at f = 1."""
    if not 0.0 < keep_fraction <= 1.0:
        raise DilemmaError(f"keep fraction must be in (0, 1], got {keep_fraction}")
    kept = max(1, math.floor(num_patches * keep_fraction + 0.5))
    if kept >= num_patches:
        return None
    return torch.rand(batch_size, num_patches, generator=generator).argsort(dim=1)[:, :kept].sort(dim=1).values


@torch.no_grad()
def extract_features(
    encoder: ViTEncoder,
    images: ImageSet,
    *,
    batch_size: int = 256,
    device="cpu",
    l2_normalize: bool = True,
    keep_fraction: float = 1.0,
    seed: int = 0,
    num_workers: int = 0,
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D), labels (N,))`` on the CPU; L2-normalised when ``l2_normalize``.

    ``keep_fraction < 1`` occludes each image: only a random ``round(f * L)`` of its tokens enter
    the encoder, each with its own (true) position; the draw is fixed by ``seed``. ``num_workers``
    processes decode the images; ``desc`` names a progress bar.
    """
    was_training = encoder.training
    encoder.eval()
    generator = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for x, y in eval_batches(images, batch_size, num_workers=num_workers, desc=desc):
        keep = occlusion_keep(x.shape[0], encoder.num_patches, keep_fraction, generator)
        x = encoder.normalize(x.to(device, non_blocking=True))
        cls = encoder.embed(x, keep=None if keep is None else keep.to(device))
        feats.append(cls.float().cpu())
        labels.append(y)
    encoder.train(was_training)
    feats = torch.cat(feats)
    return (F.normalize(feats, dim=1) if l2_normalize else feats), torch.cat(labels)
