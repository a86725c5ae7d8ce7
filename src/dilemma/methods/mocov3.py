"""MoCo v3 (Chen, Xie, He 2021) with the DILEMMA pretext on the query encoder.

Query encoder + projector (3-layer MLP, BN) + predictor (2-layer MLP); momentum encoder +
projector updated by EMA with momentum on a cosine from ``momentum`` to 1. Symmetric InfoNCE on
the class token, temperature T, each term scaled by 2T, keys gathered across processes. The
student's views are sparse + corrupted; the momentum branch sees them dense and clean (METHOD.md).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from dilemma.methods.base import Method
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma
from dilemma.train.distributed import gather_no_grad, rank


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: Linear-BN-ReLU blocks, a final Linear, and a final affine-free BN."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in = in_dim if i == 0 else hidden_dim
        dim_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries against all keys (gathered over processes), scaled by 2T as in MoCo v3."""
    q, k = F.normalize(q, dim=1), gather_no_grad(F.normalize(k, dim=1))
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits.float(), labels) * (2 * temperature)


def momentum_at(progress: float, base: float) -> float:
    """MoCo v3's momentum schedule: cosine from ``base`` at progress 0 to 1 at progress 1."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) * (1.0 - base)


class MoCoV3(Method):
    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, *, proj_hidden_dim: int = 1024, proj_dim: int = 256,
                 temperature: float = 0.2, momentum: float = 0.99):
        super().__init__()
        self.encoder, self.dilemma = encoder, dilemma
        self.temperature, self.base_momentum = temperature, momentum
        self.projector = mlp(encoder.embed_dim, proj_hidden_dim, proj_dim, 3)
        self.predictor = mlp(proj_dim, proj_hidden_dim, proj_dim, 2)
        self.momentum_encoder = copy.deepcopy(encoder)
        self.momentum_projector = copy.deepcopy(self.projector)
        for p in [*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()]:
            p.requires_grad_(False)

    @torch.no_grad()
    def update_momentum(self, momentum: float) -> None:
        pairs = [(self.encoder, self.momentum_encoder), (self.projector, self.momentum_projector)]
        for online, target in pairs:
            for p, p_m in zip(online.parameters(), target.parameters()):
                p_m.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)

    def forward(self, views, progress: float = 0.0, generator: torch.Generator | None = None, with_metrics: bool = False):
        x1, x2 = views
        cls1, bce1, logs1 = self.student(x1, generator, with_metrics)
        cls2, bce2, logs2 = self.student(x2, generator, with_metrics)
        q1, q2 = self.predictor(self.projector(cls1)), self.predictor(self.projector(cls2))

        momentum = momentum_at(progress, self.base_momentum)
        with torch.no_grad():
            self.update_momentum(momentum)
            k1 = self.momentum_projector(self.momentum_encoder(x1)[0])
            k2 = self.momentum_projector(self.momentum_encoder(x2)[0])

        ssl = contrastive_loss(q1, k2, self.temperature) + contrastive_loss(q2, k1, self.temperature)
        loss, logs = self.combine(ssl, [(bce1, logs1), (bce2, logs2)])
        logs["momentum"] = momentum
        return loss, logs
