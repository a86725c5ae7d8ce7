"""SSL methods, each a ``Method`` in a file of its own, built by name from a ``Config``."""

from __future__ import annotations

from dilemma.config import Config
from dilemma.errors import DilemmaError
from dilemma.methods.base import Method
from dilemma.methods.mocov3 import MoCoV3
from dilemma.models import ViTEncoder
from dilemma.pretext import Dilemma


def _mocov3(cfg: Config, encoder: ViTEncoder, dilemma: Dilemma) -> Method:
    m = cfg.method
    return MoCoV3(encoder, dilemma, proj_hidden_dim=m.proj_hidden_dim, proj_dim=m.proj_dim,
                  temperature=m.temperature, momentum=m.momentum)


METHODS = {"mocov3": _mocov3}


def build_method(cfg: Config, encoder: ViTEncoder) -> Method:
    if cfg.method.name not in METHODS:
        raise DilemmaError(f"unknown method {cfg.method.name!r}; choose one of {', '.join(METHODS)}")
    d = cfg.dilemma
    dilemma = Dilemma(encoder.embed_dim, encoder.num_patches, misplace_prob=d.misplace_prob, drop_rate=d.drop_rate, weight=d.weight)
    return METHODS[cfg.method.name](cfg, encoder, dilemma)


__all__ = ["METHODS", "Method", "MoCoV3", "build_method"]
