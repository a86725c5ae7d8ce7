"""DINO (Caron et al. 2021) with the DILEMMA pretext on the student's global crops.

Student and EMA teacher share the architecture: ViT + DINO head (``heads.DINOHead``). The
teacher's outputs are centred (EMA of the batch mean, averaged over processes, a buffer saved in
checkpoints) and sharpened with a temperature that warms up linearly. Multi-crop: 2 global crops
at the model's size + N local crops at a smaller size; the student sees all crops, the teacher the
global ones; cross-entropy between the teacher's distribution for one global crop and the
student's for every other crop. DILEMMA and sparsity act on the student's global crops (local
crops dense unless ``local_dilemma``); the teacher sees global crops dense and clean
(``docs/method.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from dilemma.data.augment import ViewSettings, multi_crop
from dilemma.distributed import all_reduce_mean
from dilemma.errors import require
from dilemma.heads import DINOHead
from dilemma.losses import DINOLoss
from dilemma.methods.base import EMATeacherMethod, MethodOutput
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma, TokenDraws


@dataclass
class DINOConfig:
    """The ``method.dino`` config section."""

    section: ClassVar[str] = "method.dino"  # where these fields live, for error messages (iBOT extends them)
    out_dim: int = 1024  # prototypes (65536 in the paper's ImageNet runs)
    hidden_dim: int = 1024
    bottleneck_dim: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # reached after the warm-up
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.3  # fraction of training over which the teacher temperature rises
    center_momentum: float = 0.9
    momentum: float = 0.99  # teacher EMA momentum at the start; cosine to 1
    local_crops: int = 2  # N small crops besides the 2 global ones
    local_crop_size: int = 16  # pixels; must be divisible by the patch size
    local_crop_scale: float = 0.35  # local crops cover 5 % .. this fraction of the image; global crops start here
    local_dilemma: bool = False  # also make the local crops sparse + corrupted

    def check(self) -> None:
        temps = (self.student_temp, self.teacher_temp, self.warmup_teacher_temp)
        require(min(temps) > 0, f"{self.section} temperatures must be > 0, got {temps}")
        require(0.0 <= self.momentum <= 1.0, f"{self.section}.momentum must be in [0, 1], got {self.momentum}")
        require(
            0.0 <= self.teacher_temp_warmup <= 1.0,
            f"{self.section}.teacher_temp_warmup must be in [0, 1], got {self.teacher_temp_warmup}",
        )
        require(
            0.0 <= self.center_momentum < 1.0,
            f"{self.section}.center_momentum must be in [0, 1), got {self.center_momentum}",
        )
        require(0 <= self.local_crops <= 64, f"{self.section}.local_crops must be in [0, 64], got {self.local_crops}")
        require(
            1 <= self.local_crop_size <= 4096,
            f"{self.section}.local_crop_size must be in [1, 4096] px, got {self.local_crop_size}",
        )
        require(
            0.05 < self.local_crop_scale < 1.0,
            f"{self.section}.local_crop_scale must be in (0.05, 1), got {self.local_crop_scale}",
        )
        sizes = (self.out_dim, self.hidden_dim, self.bottleneck_dim)
        widest = max(self.hidden_dim * self.bottleneck_dim, self.bottleneck_dim * self.out_dim)
        require(
            1 <= min(sizes) and max(sizes) <= 2**18 and widest <= 2**28,
            f"{self.section} head sizes must be in [1, 2^18] with layers of <= 2^28 weights, got {sizes}",
        )


def teacher_temperature_at(progress: float, warmup_temp: float, temp: float, warmup: float) -> float:
    """Linear warm-up from ``warmup_temp`` to ``temp`` over the first ``warmup`` fraction of training."""
    if warmup <= 0 or progress >= warmup:
        return temp
    return warmup_temp + (temp - warmup_temp) * progress / warmup


@torch.no_grad()
def teacher_entropy(teacher_out: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    """The mean entropy (nats) of the teacher's targets, centred and sharpened as the loss makes
    them: log(out_dim) when they are uniform, 0 when one prototype takes all (DINO Sec. 5.3: the
    two collapses the centre and the sharpening balance)."""
    probs = torch.softmax((teacher_out.float() - center) / temp, dim=-1)
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1).mean()


class StepMean:
    """The mean of rows ``(B, d)`` added over one optimiser step (every micro-batch), taken once."""

    def __init__(self):
        self.total, self.count = None, 0

    def add(self, rows: torch.Tensor) -> None:
        total = rows.detach().float().sum(dim=0, keepdim=True)  # (1, d)
        self.total = total if self.total is None else self.total + total
        self.count += rows.shape[0]

    def take(self) -> torch.Tensor | None:
        """``(1, d)``: the mean since the last take (None if nothing was added); starts afresh."""
        mean = None if not self.count else self.total / self.count
        self.total, self.count = None, 0
        return mean


class DINO(EMATeacherMethod):
    name = "dino"
    Config = DINOConfig
    eval_backbone = "teacher_encoder"  # DINO's protocol evaluates the teacher

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: DINOConfig | None = None):
        cfg = cfg or DINOConfig()
        super().__init__(encoder, dilemma, cfg)
        patch = encoder.vit.patch_embed.patch_size[0]
        require(
            patch <= cfg.local_crop_size <= encoder.img_size[0] and cfg.local_crop_size % patch == 0,
            f"{cfg.section}.local_crop_size {cfg.local_crop_size} must be a multiple of model.patch_size {patch} "
            f"up to model.img_size {encoder.img_size[0]}",
        )
        self.head = DINOHead(encoder.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
        self.teacher_encoder, self.teacher_head = self.teacher_of(encoder), self.teacher_of(self.head)
        self.criterion = DINOLoss(cfg.student_temp)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.teacher_outputs = StepMean()  # this step's teacher outputs, for the centre

    @classmethod
    def views(cls, cfg: DINOConfig, settings: ViewSettings):
        return multi_crop(settings, cfg.local_crop_size, cfg.local_crops, local_max_scale=cfg.local_crop_scale)

    def before_step(self, progress: float) -> None:
        super().before_step(progress)  # the teacher moves
        self.teacher_outputs.take()  # what a skipped step observed is dropped

    def after_step(self) -> None:
        """The centre moves once per optimiser step, by the mean teacher output over the step's
        global batch (all micro-batches and processes)."""
        mean = self.teacher_outputs.take()
        if mean is not None:
            self.update_center(mean)

    @torch.no_grad()
    def update_center(self, batch_mean: torch.Tensor, center: torch.Tensor | None = None) -> None:
        """Move ``center`` (default: the class outputs' ``self.center``) by an EMA towards the
        step's ``batch_mean`` averaged over processes."""
        center = self.center if center is None else center
        batch_center = all_reduce_mean(batch_mean.clone())
        center.mul_(self.cfg.center_momentum).add_(batch_center, alpha=1.0 - self.cfg.center_momentum)

    def forward(
        self, views, progress: float = 0.0, draws: TokenDraws = None, with_metrics: bool = False
    ) -> MethodOutput:
        global_crops, local_crops = views[:2], views[2:]
        n = global_crops[0].shape[0]
        # Global crops in one pass, local crops in another (as DINO's multi-resolution forward); each
        # crop draws its own token sample as it would alone, so batching changes nothing about the pretext.
        global_views = torch.cat(global_crops)  # (2n, C, H, W)
        global_student = self.student(global_views, draws, with_metrics, views=2, patches=False)
        cls = global_student.embedding  # (2n, D)
        student_out = list(self.head(cls).chunk(2))
        detections = [global_student.detection]  # the mean over views: 2 global, then the local ones
        local_out, local_detection = self.local_student(local_crops, draws, with_metrics)
        student_out += local_out
        detections.append(local_detection)

        temp = self.teacher_temperature(progress)
        with torch.no_grad():  # the teacher: global crops only, dense and clean
            teacher_out = self.teacher_head(self.teacher_encoder.embed(global_views))  # (2n, out_dim)
        ssl = self.criterion(student_out, list(teacher_out.chunk(2)), self.center, temp)
        entropy = teacher_entropy(teacher_out, self.center, temp)
        self.observe_teacher(teacher_out)
        out = self.output(ssl, detections, features=cls[:n])
        out.logs.update(momentum=self.momentum, teacher_temp=temp, teacher_entropy=entropy)
        return out

    def local_student(self, local_crops, draws: TokenDraws, with_metrics: bool):
        """The head's outputs for each local crop ``[(n, out_dim)] * N`` (one encoder call for all),
        and their detection (None unless ``local_dilemma``)."""
        if not local_crops:
            return [], None
        local = self.student(
            torch.cat(local_crops),
            draws,
            with_metrics,
            corrupt=self.cfg.local_dilemma,
            views=len(local_crops),
            patches=False,
        )
        return list(self.head(local.embedding).split(local_crops[0].shape[0])), local.detection

    def teacher_temperature(self, progress: float) -> float:
        c = self.cfg
        return teacher_temperature_at(progress, c.warmup_teacher_temp, c.teacher_temp, c.teacher_temp_warmup)

    def observe_teacher(self, teacher_out: torch.Tensor) -> None:
        """Add this forward's teacher outputs ``(B, out_dim)`` to the step's mean for the centre."""
        self.teacher_outputs.add(teacher_out)
