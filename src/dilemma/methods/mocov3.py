"""MoCo v3 (Chen, Xie, He 2021) with the DILEMMA pretext on the query encoder.

Query encoder + projector (3-layer MLP, BN) + predictor (2-layer MLP); momentum encoder +
projector updated by EMA with momentum on a cosine from ``momentum`` to 1. Symmetric InfoNCE on
the class token, temperature T, each term scaled by 2T, keys gathered across processes. The
student's views are sparse + corrupted; the momentum branch sees them dense and clean
(``docs/method.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dilemma.errors import require
from dilemma.heads import mlp
from dilemma.losses import InfoNCELoss, agreement
from dilemma.methods.base import EMATeacherMethod, MethodOutput
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma, TokenDraws


@dataclass
class MoCoV3Config:
    """The ``method.mocov3`` config section."""

    temperature: float = 0.2
    proj_hidden_dim: int = 1024
    proj_dim: int = 256
    momentum: float = 0.99  # EMA momentum at the start; cosine to 1

    def check(self) -> None:
        require(self.temperature > 0, f"method.mocov3.temperature must be > 0, got {self.temperature}")
        require(0.0 <= self.momentum <= 1.0, f"method.mocov3.momentum must be in [0, 1], got {self.momentum}")
        sizes = (self.proj_hidden_dim, self.proj_dim)
        require(
            1 <= min(sizes) and max(sizes) <= 2**18 and sizes[0] * sizes[1] <= 2**28,
            f"method.mocov3 head sizes must be in [1, 2^18] with a product <= 2^28 (weights), got {sizes}",
        )


class MoCoV3(EMATeacherMethod):
    name = "mocov3"
    Config = MoCoV3Config

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: MoCoV3Config | None = None):
        cfg = cfg or MoCoV3Config()
        super().__init__(encoder, dilemma, cfg)
        self.projector = mlp(encoder.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 3)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2)
        self.momentum_encoder = self.teacher_of(encoder)
        self.momentum_projector = self.teacher_of(self.projector)
        self.criterion = InfoNCELoss(cfg.temperature)

    def forward(
        self, views, progress: float = 0.0, draws: TokenDraws = None, with_metrics: bool = False
    ) -> MethodOutput:
        n = views[0].shape[0]
        both = torch.cat(views)  # (2n, C, H, W): each branch encodes the two views in one call
        student = self.student(both, draws, with_metrics, views=2, patches=False)
        cls = student.embedding  # (2n, D)
        # the heads have batch norm: each view is its own batch, as in MoCo v3's per-view forwards
        q1, q2 = (self.predictor(self.projector(view_cls)) for view_cls in cls.split(n))

        with torch.no_grad():  # keys: the momentum branch on the same views, dense and clean
            k1, k2 = (self.momentum_projector(view_cls) for view_cls in self.momentum_encoder.embed(both).split(n))

        ssl = self.criterion(q1, k2) + self.criterion(q2, k1)
        out = self.output(ssl, [student.detection], features=cls[:n])
        out.logs["momentum"] = self.momentum
        out.logs["teacher_agreement"] = agreement((q1, k2), (q2, k1))  # cos(prediction, teacher target)
        return out
