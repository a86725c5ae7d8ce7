"""MoCo v3 (Chen, Xie, He 2021) with the DILEMMA pretext on the query encoder.

Query encoder + projector (3-layer MLP, BN) + predictor (2-layer MLP); momentum encoder +
projector updated by EMA with momentum on a cosine from ``momentum`` to 1. Symmetric InfoNCE on
the class token, temperature T, each term scaled by 2T, keys gathered across processes. The
student's views are sparse + corrupted; the momentum branch sees them dense and clean (METHOD.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dilemma.methods.base import Method
from dilemma.methods.parts import ema_update, frozen_copy, mlp, momentum_at
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma
from dilemma.train.distributed import gather_no_grad, rank


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries against all keys (gathered over processes), scaled by 2T as in MoCo v3."""
    q, k = F.normalize(q, dim=1), gather_no_grad(F.normalize(k, dim=1))
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits.float(), labels) * (2 * temperature)


class MoCoV3(Method):
    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, *, proj_hidden_dim: int = 1024, proj_dim: int = 256,
                 temperature: float = 0.2, momentum: float = 0.99):
        super().__init__()
        self.encoder, self.dilemma = encoder, dilemma
        self.temperature, self.base_momentum, self.momentum = temperature, momentum, momentum
        self.projector = mlp(encoder.embed_dim, proj_hidden_dim, proj_dim, 3)
        self.predictor = mlp(proj_dim, proj_hidden_dim, proj_dim, 2)
        self.momentum_encoder = frozen_copy(encoder)
        self.momentum_projector = frozen_copy(self.projector)

    @classmethod
    def from_config(cls, cfg, encoder, dilemma):
        m = cfg.method.mocov3
        return cls(encoder, dilemma, proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim,
                   temperature=m.temperature, momentum=m.momentum)

    def update_momentum(self, momentum: float) -> None:
        ema_update([(self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)], momentum)

    def before_step(self, progress: float) -> None:
        self.momentum = momentum_at(progress, self.base_momentum)
        self.update_momentum(self.momentum)

    def forward(self, views, progress: float = 0.0, generator: torch.Generator | None = None, with_metrics: bool = False):
        x1, x2 = views
        cls1, _, bce1, logs1 = self.student(x1, generator, with_metrics)
        cls2, _, bce2, logs2 = self.student(x2, generator, with_metrics)
        q1, q2 = self.predictor(self.projector(cls1)), self.predictor(self.projector(cls2))

        with torch.no_grad():
            k1 = self.momentum_projector(self.momentum_encoder(x1)[0])
            k2 = self.momentum_projector(self.momentum_encoder(x2)[0])

        ssl = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
        loss, logs = self.combine(ssl, [(bce1, logs1), (bce2, logs2)], features=cls1)
        logs["momentum"] = self.momentum
        return loss, logs
