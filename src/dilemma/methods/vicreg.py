"""VICReg (Bardes et al. 2022) on a ViT, with the DILEMMA pretext on both views.

One encoder + expander (3-layer MLP, BN, ReLU; Sec. 4.2); loss = 25 x invariance (the pairs'
mean squared difference) + 25 x variance (a hinge keeping each dimension's std over the batch at
1) + 1 x covariance (squared off-diagonal covariances), the variance and covariance terms over the
global batch, gathered across processes with gradient (``losses.vicreg_loss``). There is no
teacher: both views are sparse + corrupted and both carry the detection loss, unless
``clean_view`` keeps the second one dense and clean (as SimCLR's switch).
"""

from __future__ import annotations

from dataclasses import dataclass

from dilemma.errors import require
from dilemma.heads import mlp
from dilemma.losses import VICRegLoss
from dilemma.methods.base import Method, MethodOutput
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma, TokenDraws


@dataclass
class VICRegConfig:
    """The ``method.vicreg`` config section (loss weights as the paper's; expander 8192 wide there)."""

    expander_dim: int = 1024  # every layer of the 3-layer expander (8192 in the paper)
    invariance_weight: float = 25.0  # lambda
    variance_weight: float = 25.0  # mu
    covariance_weight: float = 1.0  # nu
    clean_view: bool = False  # keep the second view dense and clean (DILEMMA on the first only)

    def check(self) -> None:
        weights = (self.invariance_weight, self.variance_weight, self.covariance_weight)
        require(
            all(0 <= w < float("inf") for w in weights) and sum(weights) > 0,
            f"method.vicreg weights must be finite, >= 0 and not all 0, got {weights}",
        )
        require(
            1 <= self.expander_dim <= 2**14,
            f"method.vicreg.expander_dim must be in [1, 2^14], got {self.expander_dim}",
        )


class VICReg(Method):
    name = "vicreg"
    Config = VICRegConfig

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: VICRegConfig | None = None):
        cfg = cfg or VICRegConfig()
        super().__init__(encoder, dilemma, cfg)
        self.expander = mlp(encoder.embed_dim, cfg.expander_dim, cfg.expander_dim, 3, last_bn=False)
        self.criterion = VICRegLoss(cfg.invariance_weight, cfg.variance_weight, cfg.covariance_weight)

    def forward(
        self, views, progress: float = 0.0, draws: TokenDraws = None, with_metrics: bool = False
    ) -> MethodOutput:
        cls1, cls2, detections = self.two_student_views(views, draws, with_metrics, self.cfg.clean_view)
        # the expander has batch norm: each view is its own batch, as VICReg's per-view forwards
        ssl, terms = self.criterion(self.expander(cls1), self.expander(cls2))
        out = self.output(ssl, detections, features=cls1)
        out.logs.update(terms)
        return out
