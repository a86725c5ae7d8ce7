"""What every self-supervised method provides to the training loop.

A method is an ``nn.Module`` around a student ``encoder`` with the DILEMMA pretext attached:

- ``from_config(cfg, encoder, dilemma)`` builds it from its own config section;
- ``views(cfg)`` is the augmentation: a uint8 batch ``(n, C, S, S)`` -> a tuple of float view batches;
- ``forward(views, progress, generator, with_metrics)`` -> ``(loss, logs)``; ``progress`` in [0, 1]
  drives the method's own schedules (EMA momentum, teacher temperature), ``generator`` draws the
  student's token samples;
- ``pictures(images, out_dir)`` may draw sanity pictures at the end of a run.

``encoder`` is the backbone that is evaluated and exported; teacher / momentum parameters have
``requires_grad=False``. The DILEMMA switches (p, r, lambda) mean the same for every method: they
act on the student's views only (METHOD.md), through ``student``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dilemma.data.augment import TwoViews, view_transform
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma

Views = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


class Method(nn.Module):
    encoder: ViTEncoder
    dilemma: Dilemma
    probe_features: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg, encoder: ViTEncoder, dilemma: Dilemma) -> "Method":
        raise NotImplementedError

    @staticmethod
    def views(cfg) -> Views:
        """Two independently augmented views (SimCLR / MoCo v3 style)."""
        d = cfg.data
        return TwoViews(view_transform(cfg.model.img_size, crop_min_scale=d.crop_min_scale, hflip=d.hflip,
                                       color_jitter=d.color_jitter, blur_prob=d.blur_prob))

    def student(self, images: torch.Tensor, generator: torch.Generator | None, with_metrics: bool, corrupt: bool = True):
        """Encode one student view, sparse and corrupted as configured (dense and clean when
        ``corrupt`` is False): ``(cls, patches, det_bce | None, logs)``."""
        sample = None
        if corrupt:
            grid = self.encoder.grid_of(tuple(images.shape[-2:]))
            sample = self.dilemma.sample(images.shape[0], num_patches=grid[0] * grid[1], generator=generator, device=images.device)
        if sample is None:
            cls, patches = self.encoder(images)
        else:
            cls, patches = self.encoder(images, keep=sample.keep, positions=sample.positions)
        bce, logs = self.dilemma.loss(patches, sample, with_metrics=with_metrics)
        return cls, patches, bce, logs

    def combine(self, ssl_loss: torch.Tensor, detections: list, features: torch.Tensor,
                ssl_name: str = "ssl_loss") -> tuple[torch.Tensor, dict]:
        """Total = SSL loss + lambda * mean detection BCE over the corrupted views (METHOD.md, step 7).

        ``features`` (the class embeddings of the first student view) are kept, detached, as
        ``probe_features`` for the online linear probe."""
        self.probe_features = features.detach()
        logs: dict = {ssl_name: ssl_loss.detach()}
        detections = [(bce, view_logs) for bce, view_logs in detections if bce is not None]
        loss = ssl_loss
        if detections:
            det = torch.stack([bce for bce, _ in detections]).mean()
            loss = loss + self.dilemma.weight * det
            logs["det_bce"] = det.detach()
            logs["det_entropy"] = self.dilemma.entropy
            for key in detections[0][1]:
                logs[key] = sum(view_logs[key] for _, view_logs in detections) / len(detections)
        logs["loss"] = loss.detach()
        return loss, logs

    def before_step(self, progress: float) -> None:
        """Once per optimiser step, before its forwards: EMA teachers move here (not in ``forward``,
        which gradient accumulation calls several times per step)."""

    def after_step(self) -> None:
        """Once per optimiser step, after the update (not after a skipped step): state that the
        forwards only observe, such as DINO's centre, moves here."""

    def pictures(self, images: torch.Tensor, out_dir: Path) -> list[Path]:
        """Sanity pictures written at the end of a run (none by default)."""
        return []
