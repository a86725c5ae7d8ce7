"""I-JEPA (Assran et al. 2023) with the DILEMMA pretext on the context encoder's tokens.

One view per image. ``masks.multi_block_masks`` draws M = 4 target blocks (15-20 % of the image
each, aspect ratio 0.75-1.5, one size per batch) and a context block (85-100 %, square) without
the target patches. The context encoder (the student ``encoder``) sees only the context tokens,
so it is sparse by construction; the target encoder (EMA of it) sees the whole image, and its
layer-normalised patch outputs at the target blocks are the targets. A narrow predictor (a small
ViT) takes the context encoder's outputs at their true positions plus one mask token per target
patch carrying only that patch's position, and regresses the targets: L2 (mean squared error),
Sec. 3. The predictor is never given a target token.

DILEMMA (``docs/method.md``): a share p of the context tokens get the PE of a non-context position
(drawn from the positions the context encoder does not see, as every method's dropped ones) and the
detection head reads the context encoder's outputs; the predictor places each context token at its
TRUE position (as MAE's decoder), whatever PE the encoder gave it. ``dilemma.drop_rate`` r > 0 keeps
only a share 1 - r of each context (the recipes keep r = 0: the context block is I-JEPA's sparsity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from dilemma.data.augment import Views, ViewSettings
from dilemma.errors import require
from dilemma.masks import batch_draws, cut_contexts, largest_block, multi_block_masks
from dilemma.methods.base import Detection, EMATeacherMethod, MethodOutput
from dilemma.models import ViTEncoder, sincos_pos_embed_2d
from dilemma.pretext import Dilemma, PositionDraws, TokenDraws, misplace_tokens


@dataclass
class IJEPAConfig:
    """The ``method.ijepa`` config section (masking as the paper's App. C; the paper's predictor is
    384 wide and 6-12 blocks deep)."""

    predictor_dim: int = 96
    predictor_depth: int = 2
    predictor_heads: int = 3
    momentum: float = 0.99  # target EMA at the start; cosine to 1 (the paper: 0.996 -> 1, linear)
    targets: int = 4  # M target blocks
    target_min_scale: float = 0.15
    target_max_scale: float = 0.2
    target_min_aspect: float = 0.75
    target_max_aspect: float = 1.5
    context_min_scale: float = 0.85
    context_max_scale: float = 1.0
    min_context: int = 10  # patches a context keeps at least, where a place allows it (I-JEPA's min_keep)

    def check(self) -> None:
        s = "method.ijepa"
        sizes = (self.predictor_dim, self.predictor_depth, self.predictor_heads)
        require(
            min(sizes) >= 1 and self.predictor_dim <= 2**14 and self.predictor_depth <= 64,
            f"{s} predictor sizes must be >= 1 (dim <= 2^14, depth <= 64), got {sizes}",
        )
        require(
            self.predictor_dim % 4 == 0,
            f"{s}.predictor_dim must be divisible by 4 (the predictor's fixed 2D sin-cos positional embedding), "
            f"got {self.predictor_dim}",
        )
        require(
            self.predictor_dim % self.predictor_heads == 0,
            f"{s}.predictor_dim {self.predictor_dim} is not divisible by predictor_heads {self.predictor_heads}",
        )
        require(0.0 <= self.momentum <= 1.0, f"{s}.momentum must be in [0, 1], got {self.momentum}")
        require(1 <= self.targets <= 16, f"{s}.targets must be in [1, 16], got {self.targets}")
        for name, low, high, top in (
            ("target_min_scale / target_max_scale", self.target_min_scale, self.target_max_scale, 1.0),
            ("context_min_scale / context_max_scale", self.context_min_scale, self.context_max_scale, 1.0),
            ("target_min_aspect / target_max_aspect", self.target_min_aspect, self.target_max_aspect, 10.0),
        ):
            require(0.0 < low <= high <= top, f"{s}: need 0 < {name} in order and <= {top:g}, got {low}, {high}")
        require(self.min_context >= 1, f"{s}.min_context must be >= 1, got {self.min_context}")
        require(
            self.targets * self.target_max_scale <= 0.9,
            f"{s}: {self.targets} target blocks of up to {self.target_max_scale:g} of the image leave no room "
            "for a context: need targets x target_max_scale <= 0.9",
        )


class Predictor(nn.Module):
    """I-JEPA's narrow predictor: context tokens embedded to ``dim`` plus the fixed sin-cos PE of
    their true positions, then one learned mask token per target patch plus the PE of that patch's
    position; ViT blocks over both; the outputs at the mask tokens, normalised and projected back
    to the encoder's width. One sequence per target block (the context repeated), as I-JEPA."""

    def __init__(self, embed_dim: int, dim: int, depth: int, heads: int, grid: tuple[int, int]):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(grid, dim), persistent=False)  # (L, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, embed_dim)

    def forward(
        self, context: torch.Tensor, context_positions: torch.Tensor, target_positions: torch.Tensor
    ) -> torch.Tensor:
        """``context`` (B, Kc, D) at ``context_positions`` (B, Kc); ``target_positions`` (B, M, T)
        -> predictions (B, M, T, D). Only the targets' positions enter, never their tokens."""
        batch, blocks, per_block = target_positions.shape
        x = self.embed(context) + self.pos_embed[context_positions]  # (B, Kc, dim)
        x = x.repeat_interleave(blocks, dim=0)  # (B * M, Kc, dim): one sequence per target block
        queries = self.mask_token + self.pos_embed[target_positions.flatten(0, 1)]  # (B * M, T, dim)
        out = self.blocks(torch.cat([x, queries.to(x.dtype)], dim=1))[:, -per_block:]  # the mask tokens' outputs
        return self.proj(self.norm(out)).view(batch, blocks, per_block, -1)


class ImageDraws(NamedTuple):
    """What ``IJEPA.draw`` draws per image of the global batch, before the cut to a micro-batch's
    smallest context: a tuple, so ``masks.batch_draws`` cuts every field to the micro-batch's rows."""

    context: torch.Tensor  # (rows, L) bool: the context block less the targets
    targets: torch.Tensor  # (rows, M, T) the target blocks' patch indices
    subset: torch.Tensor  # (rows, L) uniform: which context tokens the cut keeps
    order: torch.Tensor  # (rows, L) the misplacement's variates (``pretext.PositionDraws``)
    flag: torch.Tensor  # (rows, L)
    other: torch.Tensor  # (rows, L)


class IJEPA(EMATeacherMethod):
    name = "ijepa"
    Config = IJEPAConfig
    eval_backbone = "target_encoder"  # I-JEPA evaluates its target encoder (average-pooled, Sec. 5)
    plain = ("dilemma.misplace_prob=0", "dilemma.drop_rate=0")  # I-JEPA as published
    recipe = (  # configs/ijepa_dilemma.yaml: an average-pooled ViT without a class token (Sec. 5), one
        "model.global_pool=avg", "model.class_token=false",  # crop without flip or colour, and the
        "data.crop_min_scale=0.3", "data.hflip=false", "data.color_jitter=0", "data.blur_prob=0",  # context
        "dilemma.drop_rate=0", "optim.weight_decay=0.04",  # block as the only sparsity (r > 0 would thin it)
    )  # fmt: skip

    def __init__(self, encoder: ViTEncoder, dilemma: Dilemma, cfg: IJEPAConfig | None = None):
        cfg = cfg or IJEPAConfig()
        super().__init__(encoder, dilemma, cfg)
        # targets that can cover the whole image leave nothing to predict them from
        grid = encoder.grid_size
        covered = cfg.targets * largest_block(
            (cfg.target_min_scale, cfg.target_max_scale), (cfg.target_min_aspect, cfg.target_max_aspect), grid
        )
        require(
            covered < grid[0] * grid[1],
            f"on the {grid[0]}x{grid[1]} patch grid, {cfg.targets} target blocks can cover all {grid[0] * grid[1]} "
            "patches: lower method.ijepa.targets or target_max_scale, or use more patches per image "
            "(model.img_size / model.patch_size)",
        )
        self.target_encoder = self.teacher_of(encoder)
        self.predictor = Predictor(
            encoder.embed_dim, cfg.predictor_dim, cfg.predictor_depth, cfg.predictor_heads, encoder.grid_size
        )

    @classmethod
    def views(cls, cfg: IJEPAConfig, settings: ViewSettings):
        """One view: random resized crop (and flip as ``data.hflip``), as I-JEPA."""
        return Views(settings.crop_and_flip())

    def draw(self, rows: int, generator, device) -> ImageDraws:
        """Per-image draws for ``rows`` images, before any cut."""
        c, grid = self.cfg, self.encoder.grid_size
        masks = multi_block_masks(
            rows,
            grid,
            targets=c.targets,
            target_scale=(c.target_min_scale, c.target_max_scale),
            target_aspect=(c.target_min_aspect, c.target_max_aspect),
            context_scale=(c.context_min_scale, c.context_max_scale),
            min_context=c.min_context,
            generator=generator,
            device=device,
        )
        subset = torch.rand(masks.context.shape, generator=generator, device=device)
        position = PositionDraws.draw(rows, grid[0] * grid[1], generator=generator, device=device)
        return ImageDraws(masks.context, masks.targets, subset, position.order, position.flag, position.other)

    def sample(self, n: int, draws: TokenDraws, device):
        """This micro-batch's context ``TokenSample`` (keep = the cut context, sorted) and targets
        ``(n, M, T)``. Every draw is made per image of the global batch (the same however the batch is
        split); only the cut to the smallest context depends on the micro-batch, as in I-JEPA."""
        drawn = batch_draws(draws, n, lambda rows, generator: self.draw(rows, generator, device))
        keep = cut_contexts(drawn.context, drawn.subset, keep_fraction=1.0 - self.dilemma.drop_rate)  # (n, Kc)
        position = PositionDraws(drawn.order, drawn.flag, drawn.other)
        return misplace_tokens(keep, position, self.dilemma.misplace_prob, self.dilemma.unplace_prob), drawn.targets

    def forward(
        self, views, progress: float = 0.0, draws: TokenDraws = None, with_metrics: bool = False
    ) -> MethodOutput:
        images = views[0]
        n = images.shape[0]
        require(
            tuple(images.shape[-2:]) == self.encoder.img_size,
            f"I-JEPA's masks are drawn on the model's grid: images must be {self.encoder.img_size}, "
            f"got {tuple(images.shape[-2:])}",
        )
        sample, targets = self.sample(n, draws, images.device)
        context = sample.keep  # (n, Kc) true positions of the context tokens
        embedding, tokens = self.encoder(  # (n, D), (n, Kc, D)
            images, keep=context, positions=sample.positions, no_position=self.dilemma.no_position_embedding
        )
        # the detection head reads the encoder's outputs, as in every method (and in the read-outs)
        bce, det_logs = self.dilemma.loss(tokens, sample, with_metrics=with_metrics)
        # I-JEPA's encoder ends in a norm over every token; timm's average-pooling ViTs apply theirs after
        # pooling (fc_norm; the identity for class-token ViTs, whose `norm` already acted): applied here
        context_out = self.encoder.vit.fc_norm(tokens)
        prediction = self.predictor(context_out, context, targets)  # (n, M, T, D): context at its TRUE places
        with torch.no_grad():  # the target encoder: the whole image, dense and clean
            full = self.target_encoder.vit.fc_norm(self.target_encoder(images)[1])  # (n, L, D)
            full = F.layer_norm(full, full.shape[-1:])  # and I-JEPA standardises the targets (Sec. 3)
            dim = full.shape[-1]
            target = full.gather(1, targets.flatten(1).unsqueeze(-1).expand(-1, -1, dim)).view(prediction.shape)
        loss = F.mse_loss(prediction.float(), target.float())
        detection = None if bce is None else Detection(bce, det_logs)
        out = self.output(loss, [detection], features=embedding)
        out.logs.update(momentum=self.momentum, context_tokens=float(context.shape[1]))
        return out
