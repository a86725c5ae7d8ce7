"""Linear probe on frozen features (the MoCo v3 / MAE protocol, on cached features).

The backbone is frozen and run once, without augmentation, to cache its image embeddings (the
final-norm class token, or the pooled patch tokens of an average-pooling ViT: ``ViTEncoder.pool``).
Features are standardised with the train split's mean and std (what MAE's affine-free BatchNorm
before the linear layer does at test time); one linear layer is trained with SGD + momentum and a
cosine learning rate, no weight decay; top-1 on the val split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LinearProbe:
    classifier: nn.Linear
    mean: torch.Tensor
    std: torch.Tensor

    @torch.no_grad()
    def predict(self, feats: torch.Tensor) -> torch.Tensor:
        return self.classifier((feats - self.mean) / self.std)

    def top1(self, feats: torch.Tensor, labels: torch.Tensor) -> float:
        return (self.predict(feats).argmax(1) == labels).float().mean().item() * 100


PROBE_BATCH = 256  # the probe's own mini-batches of cached features (its lr is per 256 images)


def train_linear_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = PROBE_BATCH,
) -> LinearProbe:
    """SGD (momentum 0.9, lr scaled by batch/256, cosine to 0, no weight decay) on standardised features."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    x = (feats - mean) / std
    classifier = nn.Linear(feats.shape[1], num_classes)
    with torch.no_grad():
        classifier.weight.normal_(0, 0.01, generator=generator)
        classifier.bias.zero_()
    steps_per_epoch = max(1, len(x) // batch_size)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr * batch_size / 256, momentum=0.9)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(classifier(x[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return LinearProbe(classifier.eval(), mean, std)


def linear_protocol(epochs: int, lr: float, features: str, batch_size: int = PROBE_BATCH) -> str:
    """The protocol; ``features``: what the encoder's embedding reads (``ViTEncoder.embedding_kind``)."""
    return (
        f"linear probe: frozen dense backbone, {features} (cached, no augmentation), standardised; "
        f"one linear layer, SGD momentum 0.9, lr {lr} x batch/256, batch {batch_size}, cosine, {epochs} epochs, "
        "no weight decay; top-1 on val"
    )
