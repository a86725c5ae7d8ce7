"""BYOL (Grill et al. 2020) on a ViT, with the DILEMMA pretext on the online network's views.

Online network: encoder + projector (2-layer MLP, BN) + predictor (2-layer MLP, BN); target
network: an EMA copy of encoder + projector, momentum on a cosine from ``momentum`` to 1 (Sec. 3.1).
The online prediction of each view regresses the target projection of the other view, normalised
MSE ``2 - 2 cos``, symmetrised (Eq. 2). No negatives, so nothing is gathered across processes. The
online views are sparse + corrupted; the target sees them dense and clean (``docs/method.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dilemma.errors import require
from dilemma.heads import mlp
from dilemma.losses import BYOLLoss, agreement
from dilemma.methods.base import EMATeacherMethod, MethodOutput
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma, TokenDraws


@dataclass
class BYOLConfig:
    """The ``method.byol`` config section (the paper's sizes: 4096 hidden, 256 out, momentum 0.996)."""

    proj_hidden_dim: int = 1024  # projector and predictor hidden width (4096 in the paper)
    proj_dim: int = 256
    momentum: float = 0.99  # target EMA momentum at the start; cosine to 1 (0.996 in the paper's 1000 epochs)

    def check(self) -> None:
        require(0.0 <= self.momentum <= 1.0, f"method.byol.momentum must be in [0, 1], got {self.momentum}")
        sizes = (self.proj_hidden_dim, self.proj_dim)
        require(
            1 <= min(sizes) and max(sizes) <= 2**18 and sizes[0] * sizes[1] <= 2**28,
            f"method.byol head sizes must be in [1, 2^18] with a product <= 2^28 (weights), got {sizes}",
        )


class BYOL(EMATeacherMethod):
    name = "byol"
    Config = BYOLConfig

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: BYOLConfig | None = None):
        cfg = cfg or BYOLConfig()
        super().__init__(encoder, dilemma, cfg)
        self.projector = mlp(encoder.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, last_bn=False)
        self.predictor = mlp(cfg.proj_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, last_bn=False)
        self.target_encoder = self.teacher_of(encoder)
        self.target_projector = self.teacher_of(self.projector)
        self.criterion = BYOLLoss()

    def forward(
        self, views, progress: float = 0.0, draws: TokenDraws = None, with_metrics: bool = False
    ) -> MethodOutput:
        n = views[0].shape[0]
        both = torch.cat(views)  # (2n, C, H, W): each network encodes the two views in one call
        online = self.student(both, draws, with_metrics, views=2, patches=False)
        cls = online.embedding  # (2n, D)
        # the heads have batch norm: each view is its own batch, as BYOL's per-view forwards
        p1, p2 = (self.predictor(self.projector(view_cls)) for view_cls in cls.split(n))

        with torch.no_grad():  # targets: the target network on the same views, dense and clean
            z1, z2 = (self.target_projector(view_cls) for view_cls in self.target_encoder.embed(both).split(n))

        ssl = self.criterion(p1, z2) + self.criterion(p2, z1)
        out = self.output(ssl, [online.detection], features=cls[:n])
        out.logs["momentum"] = self.momentum
        out.logs["teacher_agreement"] = agreement((p1, z2), (p2, z1))  # cos(prediction, teacher target)
        return out
