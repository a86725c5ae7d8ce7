"""iBOT (Zhou et al. 2022) with the DILEMMA pretext on the student's global crops.

iBOT is DINO (``methods/dino.py``: EMA teacher, multi-crop, centred and sharpened teacher outputs,
class-token self-distillation across crops) plus masked image modelling as self-distillation: the
student sees each global crop with block-wise masked patches replaced by a learnable mask token
(``masks.block_masks``; half the images unmasked, the others 10-50 % masked, App. C), and at each
masked token predicts the teacher's output for the clean patch of the same crop (``losses.
masked_patch_loss``, same crop only, Sec. 3.2), through the class token's head (``shared_head``,
the paper's default) or a patch head of its own. Patch outputs have their own centre and teacher
temperature schedule. Loss = ``cls_weight`` x L_[CLS] + ``patch_weight`` x L_MIM.

How the three token operations co-exist on a student global crop (``docs/method.md``): sparsity
drops patches first (a dropped patch is neither seen nor predicted); the block mask, drawn on the
full grid, turns the kept patches under it into mask tokens at their true positions (the prediction
there belongs to that place); misplacement acts on the visible kept tokens only, and the detection
loss counts only them (a mask token has no content whose place could be wrong). The teacher sees
the global crops dense, clean and unmasked; its patch outputs at the student's masked kept
positions are the targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from dilemma.errors import require
from dilemma.heads import DINOHead
from dilemma.losses import masked_patch_loss
from dilemma.masks import batch_draws, block_masks
from dilemma.methods.base import Detection, MethodOutput
from dilemma.methods.dino import DINO, DINOConfig, StepMean, teacher_entropy, teacher_temperature_at
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma, TokenDraws, hide_under_mask


@dataclass
class IBOTConfig(DINOConfig):
    """The ``method.ibot`` config section: DINO's fields (iBOT's ViT-S/16 recipe: 8192 prototypes,
    2048 hidden, 256 bottleneck, 10 local crops, EMA 0.996) and the masked-patch ones."""

    section: ClassVar[str] = "method.ibot"

    shared_head: bool = True  # patch tokens through the class token's head (the paper's choice)
    patch_out_dim: int = 1024  # the patch head's prototypes when not shared (8192 in the paper)
    teacher_patch_temp: float = 0.07  # the patch outputs' teacher temperature after the warm-up
    warmup_teacher_patch_temp: float = 0.04
    mask_prob: float = 0.5  # share of global crops that are masked at all (pred_ratio 0 or 0.3)
    mask_min_ratio: float = 0.1  # a masked crop masks a share uniform in [min, max] of its patches
    mask_max_ratio: float = 0.5  # (pred_ratio 0.3 +- pred_ratio_var 0.2)
    mask_aspect: float = 0.3  # blocks' aspect ratio log-uniform in [a, 1 / a] (BEiT)
    cls_weight: float = 1.0  # lambda on L_[CLS]
    patch_weight: float = 1.0  # lambda on L_MIM

    def check(self) -> None:
        super().check()
        s = self.section
        require(
            min(self.teacher_patch_temp, self.warmup_teacher_patch_temp) > 0,
            f"{s} patch temperatures must be > 0, got {(self.teacher_patch_temp, self.warmup_teacher_patch_temp)}",
        )
        require(0.0 <= self.mask_prob <= 1.0, f"{s}.mask_prob must be in [0, 1], got {self.mask_prob}")
        require(
            0.0 <= self.mask_min_ratio <= self.mask_max_ratio < 1.0,
            f"{s}: need 0 <= mask_min_ratio <= mask_max_ratio < 1, got {self.mask_min_ratio}, {self.mask_max_ratio}",
        )
        require(0.0 < self.mask_aspect <= 1.0, f"{s}.mask_aspect must be in (0, 1], got {self.mask_aspect}")
        weights = (self.cls_weight, self.patch_weight)
        require(
            all(0 <= w < float("inf") for w in weights) and sum(weights) > 0,
            f"{s} cls_weight and patch_weight must be finite, >= 0 and not both 0, got {weights}",
        )
        require(
            1 <= self.patch_out_dim <= 2**18 and self.bottleneck_dim * self.patch_out_dim <= 2**28,
            f"{s}.patch_out_dim must be in [1, 2^18] with <= 2^28 weights, got {self.patch_out_dim}",
        )


class MaskedStudent(NamedTuple):
    """The student's pass over the global crops."""

    cls: torch.Tensor  # (2n, D) class tokens
    cls_out: torch.Tensor  # (2n, out_dim) through the head
    patch_out: torch.Tensor  # (2n, K, d) the kept tokens through the patch head
    keep: torch.Tensor | None  # (2n, K) the kept patches (None: dense)
    masked: torch.Tensor  # (2n, K) the kept tokens shown as the mask token
    detection: Detection | None


class IBOT(DINO):
    name = "ibot"
    Config = IBOTConfig
    eval_backbone = "teacher_encoder"  # iBOT, as DINO, reports its teacher

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: IBOTConfig | None = None):
        cfg = cfg or IBOTConfig()
        super().__init__(encoder, dilemma, cfg)  # DINO: head, teacher encoder and head, class centre
        self.mask_token = torch.nn.Parameter(torch.zeros(encoder.embed_dim))
        torch.nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.own_patch_head = self.teacher_own_patch_head = None  # with shared_head, the class token's
        if not cfg.shared_head:
            self.own_patch_head = DINOHead(encoder.embed_dim, cfg.patch_out_dim, cfg.hidden_dim, cfg.bottleneck_dim)
            self.teacher_own_patch_head = self.teacher_of(self.own_patch_head)
        patch_dim = cfg.out_dim if cfg.shared_head else cfg.patch_out_dim
        self.register_buffer("patch_center", torch.zeros(1, patch_dim))
        self.teacher_patch_means = StepMean()  # this step's per-image mean teacher patch outputs, for the centre

    @property
    def patch_head(self) -> DINOHead:
        return self.head if self.own_patch_head is None else self.own_patch_head

    @property
    def teacher_patch_head(self) -> DINOHead:
        return self.teacher_head if self.teacher_own_patch_head is None else self.teacher_own_patch_head

    def before_step(self, progress: float) -> None:
        super().before_step(progress)
        self.teacher_patch_means.take()  # what a skipped step observed is dropped

    def after_step(self) -> None:
        super().after_step()
        mean = self.teacher_patch_means.take()  # one row per teacher image, as the class outputs
        if mean is not None:  # the patch centre moves as the class one: the step's global mean, EMA
            self.update_center(mean, self.patch_center)

    def draw_masks(self, n: int, grid: tuple[int, int], draws: TokenDraws, device) -> torch.Tensor:
        """Block masks ``(2n, L)`` for the two global crops, view by view as they are stacked; the
        same for an image however the global batch is split (``masks.batch_draws``)."""
        c = self.cfg

        def draw(rows: int, generator):
            masked_at_all = torch.rand(rows, generator=generator, device=device) < c.mask_prob
            share = c.mask_min_ratio + (c.mask_max_ratio - c.mask_min_ratio) * torch.rand(
                rows, generator=generator, device=device
            )
            ratios = torch.where(masked_at_all, share, torch.zeros_like(share))
            return block_masks(ratios, grid, aspect=c.mask_aspect, generator=generator)

        return torch.cat([batch_draws(draws, n, draw) for _ in range(2)])

    def masked_student(self, global_views: torch.Tensor, draws: TokenDraws, with_metrics: bool) -> MaskedStudent:
        """The student on the global crops ``(2n, C, H, W)``: sparse, block-masked and corrupted."""
        n = global_views.shape[0] // 2
        grid = self.encoder.grid_of(tuple(global_views.shape[-2:]))
        mask = self.draw_masks(n, grid, draws, global_views.device)  # (2n, L) on the full grid
        sample = self.dilemma.sample(
            2 * n, num_patches=grid[0] * grid[1], generator=draws, device=global_views.device, views=2
        )
        sample, masked = hide_under_mask(sample, mask)  # masked: (2n, K) kept tokens shown as the mask token
        keep = None if sample is None else sample.keep
        positions = None if sample is None else sample.positions
        cls, patches = self.encoder(
            global_views, keep, positions, masked, self.mask_token, self.dilemma.no_position_embedding
        )
        bce, logs = self.dilemma.loss(patches, sample, with_metrics, views=2, counted=~masked)
        # Patch outputs for all kept tokens; only the masked ones enter the loss (the head is per
        # token, so computing it for all K is what iBOT does and needs no data-dependent shapes).
        return MaskedStudent(
            cls, self.head(cls), self.patch_head(patches), keep, masked,
            None if bce is None else Detection(bce, logs, views=2),
        )  # fmt: skip

    @torch.no_grad()
    def teacher_targets(self, global_views: torch.Tensor, keep: torch.Tensor | None):
        """The teacher's class outputs ``(2n, out_dim)`` on the dense, clean, unmasked global crops,
        and its patch outputs ``(2n, K, d)`` at the student's kept positions (its own patches,
        whatever positional embedding they were shown with); the step's patch mean is noted."""
        teacher_cls, teacher_patches = self.teacher_encoder(global_views)  # (2n, D), (2n, L, D)
        teacher_patch = self.teacher_patch_head(teacher_patches)  # (2n, L, d)
        self.teacher_patch_means.add(teacher_patch.float().mean(dim=1))  # a row per image
        if keep is not None:
            teacher_patch = teacher_patch.gather(1, keep.unsqueeze(-1).expand(-1, -1, teacher_patch.shape[-1]))
        return self.teacher_head(teacher_cls), teacher_patch

    def forward(
        self, views, progress: float = 0.0, draws: TokenDraws = None, with_metrics: bool = False
    ) -> MethodOutput:
        global_crops, local_crops = views[:2], views[2:]
        global_views = torch.cat(global_crops)  # (2n, C, H, W)
        student = self.masked_student(global_views, draws, with_metrics)
        local_out, local_detection = self.local_student(local_crops, draws, with_metrics)
        c, temp = self.cfg, self.teacher_temperature(progress)
        patch_temp = teacher_temperature_at(
            progress, c.warmup_teacher_patch_temp, c.teacher_patch_temp, c.teacher_temp_warmup
        )
        teacher_cls, at_kept = self.teacher_targets(global_views, student.keep)
        cls_loss = self.criterion(
            [*student.cls_out.chunk(2), *local_out], list(teacher_cls.chunk(2)), self.center, temp
        )
        patch_loss = masked_patch_loss(
            student.patch_out, at_kept, student.masked, self.patch_center, c.student_temp, patch_temp
        )
        entropy = teacher_entropy(teacher_cls, self.center, temp)
        self.observe_teacher(teacher_cls)
        out = self.output(
            c.cls_weight * cls_loss + c.patch_weight * patch_loss,
            [student.detection, local_detection],
            features=student.cls[: global_crops[0].shape[0]],
        )
        out.logs.update(
            cls_loss=cls_loss.detach(), patch_loss=patch_loss.detach(),
            masked_share=student.masked.float().mean().detach(), momentum=self.momentum, teacher_temp=temp,
            teacher_entropy=entropy,
        )  # fmt: skip
        return out
