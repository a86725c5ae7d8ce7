"""SimCLR (Chen et al. 2020) with the DILEMMA pretext on both views.

One encoder + projector (2-layer MLP with BN); NT-Xent over the 2N views of the global batch:
each view's positive is the other view of its image, every other view in the global batch is a
negative (``losses.nt_xent_loss``, whose gather passes gradients back to their owner). There is no
teacher: both views are sparse + corrupted and both carry the detection loss, unless
``clean_view`` keeps the second one dense and clean.
"""

from __future__ import annotations

from dataclasses import dataclass

from dilemma.errors import require
from dilemma.heads import mlp
from dilemma.losses import NTXentLoss
from dilemma.methods.base import Method, MethodOutput
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma, TokenDraws


@dataclass
class SimCLRConfig:
    """The ``method.simclr`` config section."""

    temperature: float = 0.2
    proj_hidden_dim: int = 1024
    proj_dim: int = 128
    clean_view: bool = False  # keep the second view dense and clean (DILEMMA on the first only)

    def check(self) -> None:
        require(self.temperature > 0, f"method.simclr.temperature must be > 0, got {self.temperature}")
        sizes = (self.proj_hidden_dim, self.proj_dim)
        require(
            1 <= min(sizes) and max(sizes) <= 2**18 and sizes[0] * sizes[1] <= 2**28,
            f"method.simclr head sizes must be in [1, 2^18] with a product <= 2^28 (weights), got {sizes}",
        )


class SimCLR(Method):
    name = "simclr"
    Config = SimCLRConfig

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: SimCLRConfig | None = None):
        cfg = cfg or SimCLRConfig()
        super().__init__(encoder, dilemma, cfg)
        self.projector = mlp(encoder.embed_dim, cfg.proj_hidden_dim, cfg.proj_dim, 2, last_bn=False)
        self.criterion = NTXentLoss(cfg.temperature)

    def forward(
        self, views, progress: float = 0.0, draws: TokenDraws = None, with_metrics: bool = False
    ) -> MethodOutput:
        cls1, cls2, detections = self.two_student_views(views, draws, with_metrics, self.cfg.clean_view)
        # the projector has batch norm: each view is its own batch
        ssl = self.criterion(self.projector(cls1), self.projector(cls2))
        return self.output(ssl, detections, features=cls1)
