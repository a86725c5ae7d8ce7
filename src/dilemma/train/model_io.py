"""Rebuild trained parts from a checkpoint (for evaluation, inspection and export)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from dilemma.config import Config, config_from_dict
from dilemma.errors import DilemmaError
from dilemma.models import ViTEncoder, build_encoder
from dilemma.pretext import DetectionHead
from dilemma.train.checkpoint import load_checkpoint

ENCODER_PREFIX = "encoder."
HEAD_PREFIX = "dilemma.head."


def _load_part(module, state: dict, prefix: str, path, what: str) -> None:
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise DilemmaError(f"checkpoint {str(path)!r} does not match its own {what} "
                           f"(missing {len(missing)} keys, unexpected {len(unexpected)})")


def encoder_from_checkpoint(path: str | Path, *, drop_path_rate: float | None = None) -> tuple[ViTEncoder, Config]:
    """The student backbone of a checkpoint (no projector, no detection head) and its config;
    ``drop_path_rate`` rebuilds it with stochastic depth for fine-tuning."""
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    model_cfg = cfg.model if drop_path_rate is None else dataclasses.replace(cfg.model, drop_path_rate=drop_path_rate)
    encoder = build_encoder(model_cfg)
    _load_part(encoder, ckpt["model"], ENCODER_PREFIX, path, "model config")
    encoder.eval()
    return encoder, cfg


def detection_head_from_checkpoint(path: str | Path, embed_dim: int) -> DetectionHead:
    ckpt = load_checkpoint(path)
    if not any(k.startswith(HEAD_PREFIX) for k in ckpt["model"]):
        raise DilemmaError(f"checkpoint {str(path)!r} has no detection head: it was trained without DILEMMA "
                           "(dilemma.misplace_prob = 0 or dilemma.weight = 0)")
    head = DetectionHead(embed_dim)
    _load_part(head, ckpt["model"], HEAD_PREFIX, path, "detection head")
    return head.eval()
