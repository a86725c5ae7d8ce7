"""SSL methods, each a ``Method`` in a file of its own, built by name from a ``Config``."""

from __future__ import annotations

from dilemma.config import Config
from dilemma.errors import DilemmaError
from dilemma.methods.base import Method, Views
from dilemma.methods.dino import DINO
from dilemma.methods.mae import MAE
from dilemma.methods.mocov3 import MoCoV3
from dilemma.methods.simclr import SimCLR
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma

METHODS: dict[str, type[Method]] = {"mocov3": MoCoV3, "dino": DINO, "simclr": SimCLR, "mae": MAE}


def method_class(cfg: Config) -> type[Method]:
    if cfg.method.name not in METHODS:
        raise DilemmaError(f"unknown method {cfg.method.name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[cfg.method.name]


def build_method(cfg: Config, encoder: ViTEncoder) -> Method:
    d = cfg.dilemma
    dilemma = Dilemma(encoder.embed_dim, encoder.num_patches, misplace_prob=d.misplace_prob, drop_rate=d.drop_rate, weight=d.weight)
    return method_class(cfg).from_config(cfg, encoder, dilemma)


def build_views(cfg: Config) -> Views:
    """The method's augmentation: uint8 batch -> tuple of view batches."""
    return method_class(cfg).views(cfg)


__all__ = ["DINO", "MAE", "METHODS", "Method", "MoCoV3", "SimCLR", "build_method", "build_views"]
