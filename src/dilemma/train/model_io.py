"""Rebuild a trained backbone from a checkpoint (for evaluation and export)."""

from __future__ import annotations

from pathlib import Path

from dilemma.config import Config, config_from_dict
from dilemma.errors import DilemmaError
from dilemma.models import ViTEncoder, build_encoder
from dilemma.train.checkpoint import load_checkpoint

ENCODER_PREFIX = "encoder."


def encoder_from_checkpoint(path: str | Path) -> tuple[ViTEncoder, Config]:
    """The student backbone of a checkpoint (no projector, no detection head) and its config."""
    ckpt = load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    encoder = build_encoder(cfg.model)
    weights = {k[len(ENCODER_PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(ENCODER_PREFIX)}
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise DilemmaError(f"checkpoint {str(path)!r} does not match its own model config "
                           f"(missing {len(missing)} keys, unexpected {len(unexpected)})")
    encoder.eval()
    return encoder, cfg
