"""dilemma: self-supervised ViT pretraining with DILEMMA (arXiv 2204.04788)."""

from dilemma.errors import DilemmaError
from dilemma.models import ViTEncoder, create_encoder
from dilemma.pretext import DetectionHead, TokenSample, detection_loss, sample_tokens

__version__ = "0.1.0"
__all__ = [
    "DilemmaError",
    "DetectionHead",
    "TokenSample",
    "ViTEncoder",
    "create_encoder",
    "detection_loss",
    "sample_tokens",
]
