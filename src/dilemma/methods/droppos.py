"""DropPos (Wang et al., NeurIPS 2023, "Pre-Training Vision Transformers by Reconstructing Dropped
Positions"; github Haochen-Wang409/DropPos, ``models_DropPos_mae.py``): position prediction as the
whole method, no second branch and no pixel loss.

The encoder sees 25 % of the patches (the mask ratio is ``dilemma.drop_rate``, 0.75); of those, a
share ``dilemma.position_drop_prob`` (0.75) gets the learned "no position" embedding in place of its
PE (``pretext.Dilemma``, task predict). A small transformer decoder without positions (512 wide, 2
blocks, 16 heads; its class token and the visible tokens) classifies each visible token's position
among the N; the loss is the cross-entropy at the tokens without a position, against labels
smoothed by distance (``dilemma.position_smoothing`` = 1 patch, decaying linearly to 0), each token
weighted by attentive reconstruction: the softmax over patches (temperature 0.1) of the cosine
between the class token and each patch token of the same encoder on the whole image, without
gradient (the tokens the image's content rests on count most).

Differences from the released code, each a fix or a choice of this library: the smoothing map is on
the model's own grid, normalised per token (the code's is on a 16-wide grid for 14 x 14 patches and
normalised per column); a dropped position is each kept token's independent draw with probability
0.75 (the code drops exactly 37 of 49); the weighted loss is a mean per image, then over images (the
code's over the whole batch), so it is the same however the batch is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from dilemma.data.augment import Views, ViewSettings
from dilemma.errors import require
from dilemma.methods.base import Method, MethodOutput
from dilemma.models import ViTEncoder
from dilemma.position_task import position_loss, position_metrics
from dilemma.pretext import Dilemma, TokenDraws


@dataclass
class DropPosConfig:
    """The ``method.droppos`` config section (mask ratio, drop ratio and smoothing are in ``dilemma``)."""

    decoder_dim: int = 512
    decoder_depth: int = 2
    decoder_heads: int = 16
    attentive: bool = True  # attentive reconstruction (the released scripts' --attn_guide)
    attentive_temperature: float = 0.1

    def check(self) -> None:
        sizes = (self.decoder_dim, self.decoder_depth, self.decoder_heads)
        require(
            min(sizes) >= 1 and self.decoder_dim <= 2**14 and self.decoder_depth <= 64,
            f"method.droppos decoder sizes must be >= 1 (dim <= 2^14, depth <= 64), got {sizes}",
        )
        require(self.attentive_temperature > 0, "method.droppos.attentive_temperature must be > 0")


class DropPosDecoder(nn.Module):
    """Linear to the decoder width, transformer blocks without any positional embedding, norm, and a
    linear classifier over the N positions: ``(B, D), (B, K, D) -> (B, K, N)``."""

    def __init__(self, embed_dim: int, num_patches: int, cfg: DropPosConfig):
        super().__init__()
        self.embed = nn.Linear(embed_dim, cfg.decoder_dim)
        self.blocks = nn.Sequential(
            *[Block(cfg.decoder_dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.decoder_depth)]
        )
        self.norm = nn.LayerNorm(cfg.decoder_dim)
        self.pred = nn.Linear(cfg.decoder_dim, num_patches)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        x = self.embed(torch.cat([cls.unsqueeze(1), patches], dim=1))  # (B, 1 + K, Dd)
        return self.pred(self.norm(self.blocks(x))[:, 1:])  # (B, K, N)


class DropPos(Method):
    name = "droppos"
    Config = DropPosConfig
    plain = ()  # DropPos as published: it has no arm without its task
    # DropPos's masking, drop ratio and smoothing (scripts/pretrain_base.sh), its crops (MAE's)
    recipe = ("dilemma.task=predict", "dilemma.drop_rate=0.75", "dilemma.position_drop_prob=0.75",
              "dilemma.position_smoothing=1.0", "data.crop_min_scale=0.2")  # fmt: skip

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: DropPosConfig | None = None):
        cfg = cfg or DropPosConfig()
        super().__init__(encoder, dilemma, cfg)
        require(
            dilemma.task == "predict" and dilemma.unplace_prob > 0,
            "DropPos predicts positions: set dilemma.task=predict and dilemma.position_drop_prob > 0 (0.75)",
        )
        require(
            cfg.decoder_dim % cfg.decoder_heads == 0,
            f"method.droppos.decoder_dim {cfg.decoder_dim} is not divisible by method.droppos.decoder_heads "
            f"{cfg.decoder_heads}",
        )
        dilemma.position_head = None  # DropPos's decoder classifies the positions instead of a linear head
        self.decoder = DropPosDecoder(encoder.embed_dim, encoder.num_patches, cfg)

    @classmethod
    def views(cls, cfg: DropPosConfig, settings: ViewSettings):
        """One view: random resized crop and flip only (DropPos's, MAE's)."""
        return Views(settings.crop_and_flip())

    def position_logits(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        return self.decoder(cls, patches)

    @torch.no_grad()
    def attention_weights(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(B, K)``: softmax over all patches of cos(image embedding, patch token) / temperature from
        the encoder on the whole image (dense, true positions; in training mode, as DropPos), at the kept
        patches, renormalised to sum to 1. The embedding is the class token for timm's ViTs (DropPos's)."""
        cls, patches = self.encoder(images)  # (B, D), (B, L, D)
        similarity = F.cosine_similarity(cls.unsqueeze(1).float(), patches.float(), dim=-1)  # (B, L)
        weights = (similarity / self.cfg.attentive_temperature).softmax(dim=-1).gather(1, keep)  # (B, K)
        return weights / weights.sum(dim=1, keepdim=True)

    def forward(
        self, views, progress: float = 0.0, draws: TokenDraws = None, with_metrics: bool = False
    ) -> MethodOutput:
        images = views[0]
        sample = self.dilemma.sample(images.shape[0], generator=draws, device=images.device)
        no_position = self.dilemma.no_position_embedding
        cls, patches = self.encoder(images, sample.keep, sample.positions, no_position=no_position)
        logits = self.position_logits(cls, patches)  # (B, K, N)
        weights = self.attention_weights(images, sample.keep) if self.cfg.attentive else None
        grid = self.dilemma.grid
        loss = position_loss(logits, sample.keep, sample.unplaced, grid, self.dilemma.smoothing, weights)
        out = self.output(loss, [], features=cls, ssl_name="pos_ce")
        out.logs["pos_sigma"] = self.dilemma.smoothing
        if with_metrics:
            asked = sample.unplaced
            out.logs.update(position_metrics(logits[asked], sample.keep[asked], grid))
        return out
