"""DINO (Caron et al. 2021) with the DILEMMA pretext on the student's global crops.

Student and EMA teacher share the architecture: ViT + DINO head (3-layer MLP with GELU, L2
normalised bottleneck, weight-normalised last layer with its norm fixed to 1). The teacher's
outputs are centred (EMA of the batch mean, averaged over processes, a buffer saved in
checkpoints) and sharpened with a temperature that warms up linearly. Multi-crop: 2 global crops
at the model's size + N local crops at a smaller size; the student sees all crops, the teacher the
global ones; cross-entropy between the teacher's distribution for one global crop and the
student's for every other crop. DILEMMA and sparsity act on the student's global crops (local
crops dense unless ``local_dilemma``); the teacher sees global crops dense and clean (METHOD.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dilemma.data.augment import multi_crop
from dilemma.errors import DilemmaError
from dilemma.methods.base import Method
from dilemma.methods.parts import ema_update, frozen_copy, momentum_at
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma
from dilemma.train.distributed import all_reduce_mean


class NormalizedLinear(nn.Module):
    """Linear layer whose weight rows are L2-normalised: ``weight_norm`` with g fixed to 1 (DINO's
    ``norm_last_layer=True``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def teacher_temperature_at(progress: float, warmup_temp: float, temp: float, warmup: float) -> float:
    """Linear warm-up from ``warmup_temp`` to ``temp`` over the first ``warmup`` fraction of training."""
    if warmup <= 0 or progress >= warmup:
        return temp
    return warmup_temp + (temp - warmup_temp) * progress / warmup


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Mean over (teacher crop i, student crop v != i) of H(softmax((t_i - c) / T_t), softmax(s_v / T_s));
    the first ``len(teacher)`` student crops are the same global crops as the teacher's."""
    targets = [F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    terms = [-(q * lp).sum(dim=-1).mean() for i, q in enumerate(targets) for v, lp in enumerate(log_probs) if v != i]
    return torch.stack(terms).mean()


class DINO(Method):
    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, *, out_dim: int = 1024, hidden_dim: int = 1024,
                 bottleneck_dim: int = 128, student_temp: float = 0.1, teacher_temp: float = 0.07,
                 warmup_teacher_temp: float = 0.04, teacher_temp_warmup: float = 0.3, center_momentum: float = 0.9,
                 momentum: float = 0.99, local_dilemma: bool = False):
        super().__init__()
        self.encoder, self.dilemma = encoder, dilemma
        self.head = DINOHead(encoder.embed_dim, out_dim, hidden_dim, bottleneck_dim)
        self.teacher_encoder, self.teacher_head = frozen_copy(encoder), frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._teacher_sum, self._teacher_count = None, 0  # this step's teacher outputs, for the centre
        self.student_temp, self.teacher_temp, self.warmup_teacher_temp = student_temp, teacher_temp, warmup_teacher_temp
        self.teacher_temp_warmup, self.center_momentum = teacher_temp_warmup, center_momentum
        self.base_momentum, self.momentum, self.local_dilemma = momentum, momentum, local_dilemma

    @classmethod
    def from_config(cls, cfg, encoder, dilemma):
        d = cfg.method.dino
        if d.local_crop_size % cfg.model.patch_size:
            raise DilemmaError(f"method.dino.local_crop_size {d.local_crop_size} is not divisible by model.patch_size "
                               f"{cfg.model.patch_size}")
        return cls(encoder, dilemma, out_dim=d.out_dim, hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim,
                   student_temp=d.student_temp, teacher_temp=d.teacher_temp, warmup_teacher_temp=d.warmup_teacher_temp,
                   teacher_temp_warmup=d.teacher_temp_warmup, center_momentum=d.center_momentum, momentum=d.momentum,
                   local_dilemma=d.local_dilemma)

    @staticmethod
    def views(cfg):
        d, dino = cfg.data, cfg.method.dino
        return multi_crop(cfg.model.img_size, dino.local_crop_size, dino.local_crops, crop_min_scale=d.crop_min_scale,
                          local_max_scale=dino.local_crop_scale, hflip=d.hflip, color_jitter=d.color_jitter,
                          blur_prob=d.blur_prob)

    def update_teacher(self, momentum: float) -> None:
        ema_update([(self.encoder, self.teacher_encoder), (self.head, self.teacher_head)], momentum)

    def before_step(self, progress: float) -> None:
        self.momentum = momentum_at(progress, self.base_momentum)
        self.update_teacher(self.momentum)
        self._teacher_sum, self._teacher_count = None, 0  # what a skipped step observed is dropped

    def after_step(self) -> None:
        """The centre moves once per optimiser step, by the mean teacher output over the step's
        global batch (all micro-batches and processes)."""
        if self._teacher_count:
            self.update_center(self._teacher_sum / self._teacher_count)
        self._teacher_sum, self._teacher_count = None, 0

    @torch.no_grad()
    def update_center(self, batch_mean: torch.Tensor) -> None:
        batch_center = all_reduce_mean(batch_mean.clone())
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def forward(self, views, progress: float = 0.0, generator: torch.Generator | None = None, with_metrics: bool = False):
        global_crops, local_crops = views[:2], views[2:]
        n = global_crops[0].shape[0]
        # Global crops in one pass, local crops in another (as DINO's multi-resolution forward); each
        # image draws its own token sample, so batching the crops changes nothing about the pretext.
        cls, _, bce, det_logs = self.student(torch.cat(global_crops), generator, with_metrics)
        student_out = list(self.head(cls).chunk(2))
        detections = [(bce, det_logs)]
        if local_crops:
            cls_local, _, bce_local, logs_local = self.student(torch.cat(local_crops), generator, with_metrics,
                                                               corrupt=self.local_dilemma)
            student_out += list(self.head(cls_local).split(n))
            detections.append((bce_local, logs_local))

        temp = teacher_temperature_at(progress, self.warmup_teacher_temp, self.teacher_temp, self.teacher_temp_warmup)
        with torch.no_grad():
            teacher_out = self.teacher_head(self.teacher_encoder(torch.cat(global_crops))[0])
        ssl = dino_loss(student_out, list(teacher_out.chunk(2)), self.center, self.student_temp, temp)
        total = teacher_out.detach().float().sum(dim=0, keepdim=True)
        self._teacher_sum = total if self._teacher_sum is None else self._teacher_sum + total
        self._teacher_count += teacher_out.shape[0]
        loss, logs = self.combine(ssl, detections, features=cls[:n])
        logs.update(momentum=self.momentum, teacher_temp=temp)
        return loss, logs
