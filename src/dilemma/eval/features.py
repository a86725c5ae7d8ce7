"""Frozen-backbone features: the final-norm class token of a forward, intact or corrupted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dilemma.data import ImageSet, eval_batches
from dilemma.eval.corruptions import Corruption
from dilemma.models import ViTEncoder


@torch.no_grad()
def extract_features(
    encoder: ViTEncoder,
    images: ImageSet,
    *,
    batch_size: int = 256,
    device="cpu",
    l2_normalize: bool = True,
    corrupt: Corruption | None = None,
    seed: int = 0,
    num_workers: int = 0,
    desc: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features (N, D), labels (N,))`` on the CPU; L2-normalised when ``l2_normalize``.

    ``corrupt`` changes each batch first (``corruptions.py``: token drop, patch or position
    shuffle), its draws fixed by ``seed``. ``num_workers`` processes decode the images; ``desc``
    names a progress bar.
    """
    was_training = encoder.training
    encoder.eval()
    generator = torch.Generator().manual_seed(seed)
    feats, labels = [], []
    for x, y in eval_batches(images, batch_size, num_workers=num_workers, desc=desc):
        keep = positions = None
        if corrupt is not None:
            x, keep, positions = corrupt(x, encoder.num_patches, generator)
        x = encoder.normalize(x.to(device, non_blocking=True))
        cls = encoder.embed(x, *(None if t is None else t.to(device) for t in (keep, positions)))
        feats.append(cls.float().cpu())
        labels.append(y)
    encoder.train(was_training)
    feats = torch.cat(feats)
    return (F.normalize(feats, dim=1) if l2_normalize else feats), torch.cat(labels)
