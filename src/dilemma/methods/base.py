"""What every self-supervised method provides to the training loop, and the EMA-teacher base.

A method is an ``nn.Module`` around a student ``encoder`` with the DILEMMA pretext attached. A new
method is one file: a subclass of ``Method`` (or ``EMATeacherMethod``) that declares

- ``name``: the value of ``method.name`` and the key of its config section ``method.<name>``;
- ``Config``: that section, a dataclass whose defaults are the method's defaults (the only place
  they are written) and whose ``check()`` raises ``DilemmaError`` for values out of range;
- ``__init__(encoder, dilemma, cfg)``: builds heads / teachers from ``cfg`` (an instance of ``Config``);
- ``forward(views, progress, draws, with_metrics) -> MethodOutput``: ``progress`` in [0, 1] drives
  the method's own schedules, ``draws`` the student's token samples (pass it to ``student``);
- optionally ``views(cfg, settings)`` (its augmentation; default: two views of one transform),
  ``before_step`` / ``after_step``, ``pictures`` and ``plain`` (what "without DILEMMA" means).

``encoder`` is the backbone that is evaluated and exported; teacher / momentum parameters have
``requires_grad=False``. The DILEMMA switches (p, r, lambda) mean the same for every method: they act
on the student's views only (``docs/method.md``), through ``student``, and ``output`` adds the
detection loss. ``dilemma pretrain --method path/to/file.py:ClassName`` trains a method kept in a
file of your own; a built-in one is also listed in ``dilemma.methods.BUILTIN``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from timm.layers import DropPath
from torch import nn

from dilemma.data.augment import Views, ViewSettings, two_views
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma, TokenDraws
from dilemma.schedules import momentum_at


@dataclass
class Detection:
    """The detection loss of some student views (``Dilemma.loss``): its mean over their tokens, the
    metrics, and how many views it covers (its weight in the mean over views)."""

    bce: torch.Tensor
    logs: dict[str, Any]
    views: int = 1


@dataclass
class StudentOutput:
    """``Method.student``'s encoding of (stacked) student views."""

    embedding: torch.Tensor  # (B, D): the image embedding (the class token for timm's ViTs)
    patches: torch.Tensor | None  # (B, K, D) kept patch tokens; None when not asked for and not needed
    detection: Detection | None  # None where nothing is detected (a clean view, p = 0)


@dataclass
class MethodOutput:
    """What one forward gives the training loop."""

    loss: torch.Tensor  # the total to minimise: SSL loss + lambda * detection BCE
    logs: dict[str, Any]  # numbers (or 0-d tensors) for metrics.jsonl
    features: torch.Tensor  # (n, D) detached class embeddings of the first student view: the online probe's input


class Method(nn.Module):
    name: ClassVar[str]
    Config: ClassVar[type]
    # the attribute holding the backbone that is evaluated and exported (DINO: its teacher)
    eval_backbone: ClassVar[str] = "encoder"
    # the overrides that make the plain base method (no detection, dense inputs), for comparisons
    plain: ClassVar[tuple[str, ...]] = ("dilemma.misplace_prob=0", "dilemma.drop_rate=0")
    # settings outside the method's own section that the method is meant to run with (its model,
    # views, sparsity); ``--method NAME`` applies them unless the config file or --set gives the key
    recipe: ClassVar[tuple[str, ...]] = ()

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: Any):
        super().__init__()
        self.encoder, self.dilemma, self.cfg = encoder, dilemma, cfg

    @classmethod
    def views(cls, cfg: Any, settings: ViewSettings) -> Views:
        """Two independently augmented views (SimCLR / MoCo v3 style)."""
        return two_views(settings)

    def forward(
        self,
        views: tuple[torch.Tensor, ...],
        progress: float = 0.0,
        draws: TokenDraws = None,
        with_metrics: bool = False,
    ) -> MethodOutput:
        """The interface itself: every method defines its forward (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(views, progress, draws, with_metrics)")

    def student(
        self,
        images: torch.Tensor,
        draws: TokenDraws,
        with_metrics: bool,
        corrupt: bool = True,
        views: int = 1,
        patches: bool = True,
    ) -> StudentOutput:
        """Encode student views, sparse and corrupted as configured (dense and clean when ``corrupt``
        is False). ``patches=False``: the caller reads no patch tokens, so where nothing is detected
        either (a clean view, no misplacement) the encoder skips what only they need
        (``ViTEncoder.embed``) and ``patches`` is None.

        ``images`` may stack ``views`` same-size views of the same n images (``torch.cat``, view by
        view): one encoder call over all of them is faster than one per view and computes the same,
        since the ViT has no batch statistics; each view draws its own tokens as it would alone and
        the detection loss is the mean over the views (``Dilemma.sample`` / ``Dilemma.loss``), which
        counts as ``views`` views in ``output``. Heads with batch norm must still see each view on
        its own (split the outputs)."""
        sample = None
        if corrupt:
            grid = self.encoder.grid_of(tuple(images.shape[-2:]))
            sample = self.dilemma.sample(
                images.shape[0], num_patches=grid[0] * grid[1], generator=draws, device=images.device, views=views
            )
        keep, positions = (None, None) if sample is None else (sample.keep, sample.positions)
        if not patches and not self.dilemma.detects(sample):  # only the embedding is read
            return StudentOutput(self.encoder.embed(images, keep, positions), None, None)
        embedding, patch_tokens = self.encoder(images, keep, positions, no_position=self.dilemma.no_position_embedding)
        bce, logs = self.dilemma.loss(patch_tokens, sample, with_metrics=with_metrics, views=views)
        return StudentOutput(embedding, patch_tokens, None if bce is None else Detection(bce, logs, views))

    def two_student_views(
        self, views, draws: TokenDraws, with_metrics: bool, clean_view: bool
    ) -> tuple[torch.Tensor, torch.Tensor, list[Detection | None]]:
        """The class embeddings ``(n, D)`` of two views that are both student views (SimCLR, VICReg):
        both sparse + corrupted in one encoder call, or, with ``clean_view``, the second dense and
        clean (a second call); and the detections for ``output``."""
        if clean_view:
            first = self.student(views[0], draws, with_metrics, patches=False)
            second = self.student(views[1], draws, with_metrics, corrupt=False, patches=False)
            return first.embedding, second.embedding, [first.detection]
        both = self.student(torch.cat(views), draws, with_metrics, views=2, patches=False)
        cls1, cls2 = both.embedding.split(views[0].shape[0])
        return cls1, cls2, [both.detection]

    def output(
        self,
        ssl_loss: torch.Tensor,
        detections: list[Detection | None],
        features: torch.Tensor,
        ssl_name: str = "ssl_loss",
    ) -> MethodOutput:
        """Total = SSL loss + lambda * mean detection BCE (or position cross-entropy, task predict) over
        the corrupted views (``docs/method.md``, step 7): each ``Detection`` counts as its ``views``
        views; None (nothing detected) as none."""
        logs: dict[str, Any] = {ssl_name: ssl_loss.detach()}
        detections = [d for d in detections if d is not None]
        loss = ssl_loss
        if detections:
            views = sum(d.views for d in detections)
            det = sum(d.bce * d.views for d in detections) / views
            loss = loss + self.dilemma.weight * det
            if self.dilemma.position_head is not None:  # task predict: the position cross-entropy
                logs["pos_ce"], logs["pos_sigma"] = det.detach(), self.dilemma.smoothing
            else:
                logs["det_bce"], logs["det_entropy"] = det.detach(), self.dilemma.entropy
            for key in detections[0].logs:
                logs[key] = sum(d.logs[key] * d.views for d in detections) / views
        logs["loss"] = loss.detach()
        return MethodOutput(loss, logs, features.detach())

    def position_logits(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor | None:
        """Task predict: logits ``(B, K, N)`` over the grid's positions for the student's outputs
        (``dilemma inspect`` draws them); None where the run predicts no positions."""
        head = self.dilemma.position_head
        return None if head is None else head(patches)

    def evaluated_encoder(self) -> ViTEncoder:
        """The backbone that kNN, the linear probe, fine-tuning and export read."""
        return getattr(self, self.eval_backbone)

    def before_step(self, progress: float) -> None:
        """Once per optimiser step, before its forwards: EMA teachers move here (not in ``forward``,
        which gradient accumulation calls several times per step)."""

    def after_step(self) -> None:
        """Once per optimiser step, after the update (not after a skipped step): state that the
        forwards only observe, such as DINO's centre, moves here."""

    def pictures(self, images: torch.Tensor, out_dir: Path) -> list[Path]:
        """Sanity pictures written at the end of a run (none by default)."""
        return []


class EMATeacherMethod(Method):
    """A method with an exponential-moving-average teacher (MoCo v3's momentum encoder, DINO's
    teacher, BYOL's target): ``teacher_of(module)`` makes a frozen copy that follows ``module`` with
    a momentum on a cosine from ``cfg.momentum`` to 1 over training (``schedules.momentum_at``)."""

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: Any):
        super().__init__(encoder, dilemma, cfg)
        self.momentum = cfg.momentum
        self._ema_pairs: list[tuple[nn.Module, nn.Module]] = []  # (online, teacher), parameters in the same order

    def teacher_of(self, online: nn.Module) -> nn.Module:
        """A deep copy of ``online`` that takes no gradient, moves in ``update_teacher`` and has no
        stochastic depth or dropout: its targets must not be noisy (DINO builds its teacher without
        drop-path). BatchNorm keeps training-mode batch statistics, as in MoCo v3."""
        teacher = copy.deepcopy(online)
        teacher.requires_grad_(False)
        for module in teacher.modules():
            if isinstance(module, DropPath):
                module.drop_prob = 0.0
            elif isinstance(module, nn.Dropout):
                module.p = 0.0  # kept as a module: timm's fused attention reads attn_drop.p
        self._ema_pairs.append((online, teacher))
        return teacher

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * online`` for every pair: one fused
        ``lerp`` over all parameters (``teacher += (1 - momentum) * (online - teacher)``)."""
        online = [p.detach() for pair_online, _ in self._ema_pairs for p in pair_online.parameters()]
        teacher = [p for _, pair_teacher in self._ema_pairs for p in pair_teacher.parameters()]
        torch._foreach_lerp_(teacher, online, 1.0 - momentum)

    def before_step(self, progress: float) -> None:
        self.momentum = momentum_at(progress, self.cfg.momentum)
        self.update_teacher(self.momentum)
