"""SimCLR (Chen et al. 2020) with the DILEMMA pretext on both views.

One encoder + projector (2-layer MLP with BN); NT-Xent over the 2N views of the global batch:
each view's positive is the other view of its image, every other view in the global batch is a
negative. Views of other processes are gathered with a gather whose backward is correct, so the
gradient equals the single-process one. There is no teacher: both views are sparse + corrupted
and both carry the detection loss, unless ``clean_view`` keeps the second one dense and clean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dilemma.methods.base import Method
from dilemma.methods.parts import mlp
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma
from dilemma.train.distributed import gather_with_grad, rank


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: cross-entropy of each of this process's 2n views against all 2N views but itself,
    the positive being the other view of the same image. Mean over this process's views."""
    n = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]), dim=1).float()  # (2n, d): rows i and n + i are one image
    everything = gather_with_grad(local)  # (2N, d), process r's block at [2n r, 2n (r + 1))
    offset = 2 * n * rank()
    logits = local @ everything.T / temperature
    rows = torch.arange(2 * n, device=local.device)
    logits[rows, offset + rows] = float("-inf")  # a view is not its own negative
    positives = offset + (rows + n) % (2 * n)
    return F.cross_entropy(logits, positives)


class SimCLR(Method):
    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, *, proj_hidden_dim: int = 1024, proj_dim: int = 128,
                 temperature: float = 0.2, clean_view: bool = False):
        super().__init__()
        self.encoder, self.dilemma = encoder, dilemma
        self.projector = mlp(encoder.embed_dim, proj_hidden_dim, proj_dim, 2, last_bn=False)
        self.temperature, self.clean_view = temperature, clean_view

    @classmethod
    def from_config(cls, cfg, encoder, dilemma):
        s = cfg.method.simclr
        return cls(encoder, dilemma, proj_hidden_dim=s.proj_hidden_dim, proj_dim=s.proj_dim,
                   temperature=s.temperature, clean_view=s.clean_view)

    def forward(self, views, progress: float = 0.0, generator: torch.Generator | None = None, with_metrics: bool = False):
        x1, x2 = views
        cls1, _, bce1, logs1 = self.student(x1, generator, with_metrics)
        cls2, _, bce2, logs2 = self.student(x2, generator, with_metrics, corrupt=not self.clean_view)
        ssl = nt_xent_loss(self.projector(cls1), self.projector(cls2), self.temperature)
        return self.combine(ssl, [(bce1, logs1), (bce2, logs2)], features=cls1)
