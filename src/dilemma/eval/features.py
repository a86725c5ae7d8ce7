"""Frozen-backbone features: the final-norm class token of a dense, clean forward."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dilemma.data import ImageSet, eval_batches
from dilemma.models import ViTEncoder


@torch.no_grad()
def extract_features(encoder: ViTEncoder, images: ImageSet, *, batch_size: int = 256, device="cpu",
                     normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D), labels (N,))`` on the CPU; L2-normalised when ``normalize``."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for x, y in eval_batches(images, batch_size):
        cls, _ = encoder(x.to(device, non_blocking=True))
        feats.append(cls.float().cpu())
        labels.append(y)
    encoder.train(was_training)
    feats = torch.cat(feats)
    return (F.normalize(feats, dim=1) if normalize else feats), torch.cat(labels)
