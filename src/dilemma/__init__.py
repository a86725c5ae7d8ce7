"""dilemma: self-supervised ViT pretraining with DILEMMA (arXiv 2204.04788)."""

from __future__ import annotations

import importlib

from dilemma.errors import DilemmaError

__version__ = "0.1.0"
# The public names, imported on first use: ``import dilemma`` (and the command line's --help) must
# not pay for torch and timm before a sub-command needs them.
_LAZY = {
    "DetectionHead": "dilemma.pretext",
    "TokenSample": "dilemma.pretext",
    "ViTEncoder": "dilemma.models",
    "create_encoder": "dilemma.models",
    "detection_loss": "dilemma.pretext",
    "sample_tokens": "dilemma.pretext",
}
__all__ = ["DilemmaError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dilemma' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
