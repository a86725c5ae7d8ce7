"""MAE (He et al. 2022) with the DILEMMA pretext on the visible tokens.

The encoder sees only the visible tokens (the mask ratio is DILEMMA's drop rate r); with DILEMMA a
fraction p of them carry the positional embedding of a masked location, and the detection head
reads the encoder's outputs. The decoder puts every encoded token back at its TRUE position,
fills the rest with a shared mask token, adds its own fixed sin-cos PE, and predicts the pixels of
every patch; the loss is the MSE on the masked patches, against per-patch normalised pixels
(``norm_pix_loss``). Total = reconstruction + lambda * detection (``docs/method.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from timm.models.vision_transformer import Block
from torch import nn
from torchvision.utils import save_image

from dilemma.data.augment import Views, ViewSettings
from dilemma.errors import require
from dilemma.methods.base import Detection, Method, MethodOutput
from dilemma.models import ViTEncoder, sincos_pos_embed_2d
from dilemma.pretext import Dilemma, TokenDraws, TokenSample


@dataclass
class MAEConfig:
    """The ``method.mae`` config section (the mask ratio is ``dilemma.drop_rate``)."""

    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # reconstruct per-patch normalised pixels

    def check(self) -> None:
        sizes = (self.decoder_dim, self.decoder_depth, self.decoder_heads)
        require(
            min(sizes) >= 1 and self.decoder_dim <= 2**14 and self.decoder_depth <= 64,
            f"method.mae decoder sizes must be >= 1 (dim <= 2^14, depth <= 64), got {sizes}",
        )


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, L, patch_size**2 * C)`` in the encoder's row-major patch order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch_size, patch_size, w // patch_size, patch_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch_size) * (w // patch_size), patch_size**2 * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    b = patches.shape[0]
    x = patches.reshape(b, grid[0], grid[1], patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, grid[0] * patch_size, grid[1] * patch_size)


class MAE(Method):
    name = "mae"
    Config = MAEConfig
    plain = ("dilemma.misplace_prob=0",)  # the mask ratio (drop rate) is MAE itself
    recipe = ("data.crop_min_scale=0.2",)  # configs/mae_dilemma.yaml: MAE's crops

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: MAEConfig | None = None):
        cfg = cfg or MAEConfig()
        super().__init__(encoder, dilemma, cfg)
        require(
            dilemma.drop_rate > 0,
            "MAE reconstructs dropped patches: set dilemma.drop_rate > 0 (the mask ratio; MAE uses 0.75)",
        )
        require(
            cfg.decoder_dim % cfg.decoder_heads == 0,
            f"method.mae.decoder_dim {cfg.decoder_dim} is not divisible by "
            f"method.mae.decoder_heads {cfg.decoder_heads}",
        )
        dim = cfg.decoder_dim
        self.patch_size = encoder.vit.patch_embed.patch_size[0]
        self.decoder_embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(encoder.grid_size, dim), persistent=False)
        self.decoder_blocks = nn.Sequential(
            *[Block(dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, self.patch_size**2 * encoder.in_chans)

    @classmethod
    def views(cls, cfg: MAEConfig, settings: ViewSettings):
        """One view: random resized crop and flip only, as MAE."""
        return Views(settings.crop_and_flip())

    def decoder_tokens(self, cls: torch.Tensor, patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + L, Dd)``: each encoded token at its TRUE position ``keep`` (whatever PE the encoder
        gave it), mask tokens elsewhere, plus the decoder's PE; the class token first."""
        x = self.decoder_embed(patches)  # (B, K, Dd)
        batch, _, dim = x.shape
        full = self.mask_token.to(x.dtype).expand(batch, self.encoder.num_patches, dim)  # (B, L, Dd)
        # row keep[b, i] of image b receives encoded token i: its true location, not the PE it was given
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, dim), x) + self.decoder_pos_embed
        return torch.cat([self.decoder_embed(cls).unsqueeze(1), full], dim=1)

    def decode(self, cls: torch.Tensor, patches: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, ``(B, L, patch_size**2 * C)``."""
        x = self.decoder_norm(self.decoder_blocks(self.decoder_tokens(cls, patches, keep)))
        return self.decoder_pred(x[:, 1:])

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        target = patchify(images, self.patch_size)
        if self.cfg.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return target

    def reconstruction_loss(self, pred: torch.Tensor, images: torch.Tensor, sample: TokenSample) -> torch.Tensor:
        """MSE per patch, averaged over the masked (dropped) patches only."""
        per_patch = (pred.float() - self.targets(images)).pow(2).mean(dim=-1)  # (B, L)
        masked = torch.ones_like(per_patch).scatter(1, sample.keep, 0.0)  # (B, L): 1 where the patch was dropped
        return (per_patch * masked).sum() / masked.sum()

    def forward(
        self, views, progress: float = 0.0, draws: TokenDraws = None, with_metrics: bool = False
    ) -> MethodOutput:
        images = views[0]
        sample = self.dilemma.sample(images.shape[0], generator=draws, device=images.device)
        cls, patches = self.encoder(
            images, sample.keep, sample.positions, no_position=self.dilemma.no_position_embedding
        )
        bce, det_logs = self.dilemma.loss(patches, sample, with_metrics=with_metrics)
        pred = self.decode(cls, patches, sample.keep)
        loss = self.reconstruction_loss(pred, images, sample)
        detection = None if bce is None else Detection(bce, det_logs)
        return self.output(loss, [detection], features=cls, ssl_name="recon_loss")

    @torch.no_grad()
    def pictures(self, images: torch.Tensor, out_dir: Path) -> list[Path]:
        """``mae_reconstruction.png``: rows of originals, visible patches, and reconstructions (visible
        patches pasted back; predicted patches un-normalised with the true patch statistics, as MAE's demo)."""
        was_training = self.training
        self.eval()
        images = images[:8]
        sample = self.dilemma.sample(
            images.shape[0], generator=torch.Generator(images.device).manual_seed(0), device=images.device
        )
        encoded = self.encoder(images, sample.keep, sample.positions, no_position=self.dilemma.no_position_embedding)
        pred = self.decode(*encoded, sample.keep)
        target = patchify(images, self.patch_size)
        if self.cfg.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        visible = torch.zeros_like(target[..., :1]).scatter(1, sample.keep.unsqueeze(-1), 1.0)
        channels, grid = images.shape[1], self.encoder.grid_size
        masked_input = unpatchify(target * visible, self.patch_size, channels, grid)  # masked patches grey
        pasted = unpatchify(target * visible + pred * (1 - visible), self.patch_size, channels, grid)
        rows = self.encoder.denormalize(torch.cat([images, masked_input, pasted]))
        rows = nn.functional.interpolate(rows, scale_factor=4, mode="nearest")
        path = Path(out_dir) / "mae_reconstruction.png"
        save_image(rows, path, nrow=images.shape[0], padding=2, pad_value=1.0)
        self.train(was_training)
        return [path]
