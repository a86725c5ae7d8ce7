"""Position prediction, the pretext DILEMMA is compared with: a share of the student's kept tokens
enter the encoder without a position, and a head classifies each such token's true position among
the grid's N.

- MP3 (Zhai et al., ICML 2022): no token has a position (share 1).
- DropPos (Wang et al., NeurIPS 2023; github Haochen-Wang409/DropPos, ``models_DropPos_mae.py``): 75 %
  of the patches masked, 75 % of the visible tokens without their PE; a dropped PE is replaced by one
  learned "mask position" token (``mask_token_type='param'``, normal(0.02) init), as here
  (``NoPosition``); soft labels by distance (position smoothing) whose width decays linearly to 0.

The labels' Gaussian follows DropPos's ``exp(-d^2 / sigma^2)`` (d in patches), normalised per token
(DropPos divides by the column sums and builds the map on a 16-wide grid for 224 px / 14 px tokens:
both fixed here). sigma = 0 (below 1e-3) is the one-hot target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NoPosition(nn.Module):
    """The one learned embedding a token without a position gets in place of its PE (DropPos's
    ``mask_pos_token``); for rotary models such a token is not rotated."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(embed_dim))
        nn.init.normal_(self.embedding, std=0.02)


class PositionHead(nn.Module):
    """One ``Linear(D, N)`` shared by all patch tokens: logits over the grid's N positions."""

    def __init__(self, embed_dim: int, num_patches: int):
        super().__init__()
        self.proj = nn.Linear(embed_dim, num_patches)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(patch_tokens)  # (B, K, D) -> (B, K, N)


def grid_coordinates(grid: tuple[int, int], device=None) -> torch.Tensor:
    """``(N, 2)`` float (row, column) of each position in raster order."""
    rows, cols = grid
    index = torch.arange(rows * cols, device=device)
    return torch.stack([index // cols, index % cols], dim=1).float()


def position_targets(labels: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Soft targets ``(..., N)`` for true positions ``labels`` ``(...)``: ``exp(-d^2 / sigma^2)`` over
    the grid, d the distance in patches to the true position, normalised to sum to 1 (one-hot at
    sigma = 0)."""
    num = grid[0] * grid[1]
    if sigma < 1e-3:  # one-hot to float precision (exp(-1 / sigma^2) underflows), and no 0 / 0
        return F.one_hot(labels, num).float()
    coords = grid_coordinates(grid, labels.device)  # (N, 2)
    squared = (coords[labels].unsqueeze(-2) - coords).pow(2).sum(-1)  # (..., N): d^2 to every position
    weights = torch.exp(-squared / sigma**2)
    return weights / weights.sum(-1, keepdim=True)


def position_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    asked: torch.Tensor,
    grid: tuple[int, int],
    sigma: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``logits`` ``(B, K, N)`` against the (smoothed) true positions ``labels``
    ``(B, K)`` at the tokens ``asked`` ``(B, K)`` bool: per image the mean over its asked tokens (0 when
    none; ``weights`` ``(B, K)`` makes it a weighted mean: DropPos's attentive reconstruction), then the
    mean over images, so the loss is the same however the batch is split."""
    log_probs = F.log_softmax(logits.float(), dim=-1)
    per_token = -(position_targets(labels, grid, sigma) * log_probs).sum(-1)  # (B, K)
    w = asked.float() if weights is None else asked.float() * weights.float()
    return ((per_token * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-12)).mean()


@torch.no_grad()
def position_metrics(logits: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int]) -> dict[str, float]:
    """On the asked tokens' ``logits`` ``(T, N)`` and true ``labels`` ``(T,)``: top-1 and top-5
    accuracy (%), and the mean distance in patches from the predicted (top-1) position to the true one."""
    if labels.numel() == 0:
        return {"pos_top1": float("nan"), "pos_top5": float("nan"), "pos_dist": float("nan")}
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (T, 5)
    coords = grid_coordinates(grid, labels.device)
    return {
        "pos_top1": 100.0 * (top[:, 0] == labels).float().mean().item(),
        "pos_top5": 100.0 * (top == labels.unsqueeze(-1)).any(-1).float().mean().item(),
        "pos_dist": (coords[top[:, 0]] - coords[labels]).norm(dim=-1).mean().item(),
    }
