"""What every self-supervised method provides to the training loop."""

from __future__ import annotations

import torch
from torch import nn

from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma


class Method(nn.Module):
    """An SSL objective around a student ``encoder`` with the DILEMMA pretext attached.

    ``forward(views, progress, generator, with_metrics)`` returns ``(loss, logs)``, where
    ``progress`` in [0, 1] drives the method's own schedules (e.g. EMA momentum) and
    ``generator`` draws the student's token samples. ``encoder`` is the backbone that is
    evaluated and exported; parameters that must not be optimised have ``requires_grad=False``.
    """

    encoder: ViTEncoder
    dilemma: Dilemma

    def student(self, images: torch.Tensor, generator: torch.Generator | None, with_metrics: bool):
        """Encode one student view, sparse and corrupted as configured: ``(cls, det_bce | None, logs)``."""
        sample = self.dilemma.sample(images.shape[0], generator=generator, device=images.device)
        if sample is None:
            cls, patches = self.encoder(images)
        else:
            cls, patches = self.encoder(images, keep=sample.keep, positions=sample.positions)
        bce, logs = self.dilemma.loss(patches, sample, with_metrics=with_metrics)
        return cls, bce, logs

    def combine(self, ssl_loss: torch.Tensor, detections: list) -> tuple[torch.Tensor, dict[str, float]]:
        """Total = SSL loss + lambda * mean detection BCE over student views (METHOD.md, step 7)."""
        logs: dict[str, float] = {"ssl_loss": ssl_loss.detach()}
        bces = [bce for bce, _ in detections if bce is not None]
        loss = ssl_loss
        if bces:
            det = torch.stack(bces).mean()
            loss = loss + self.dilemma.weight * det
            logs["det_bce"] = det.detach()
            logs["det_entropy"] = self.dilemma.entropy
            for key in detections[0][1]:
                logs[key] = sum(view_logs[key] for _, view_logs in detections) / len(detections)
        logs["loss"] = loss.detach()
        return loss, logs
