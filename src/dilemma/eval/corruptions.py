"""What a read-out can do to a val image before the frozen backbone sees it.

A corruption takes a batch of uint8 images ``(B, C, H, W)``, the number of patch tokens ``L`` and a
generator, and returns ``(images, keep, positions)``: the (possibly changed) pixels, which patch
tokens enter the encoder (``(B, K)`` or None for all) and which positional embedding each gets
(``(B, K)`` or None for its own), as ``ViTEncoder.tokens`` takes them. Draws come from the
generator only, so a read-out is fixed by its seed.

- **token drop** (occlusion): a random ``round(f * L)`` of the tokens, at their true positions;
- **patch shuffle**: the image cut into ``g x g`` cells and the cells permuted (pixels move, every
  token keeps the embedding of where it now lies): what is left is local texture without layout;
- **position shuffle**: pixels intact, each token with probability ``q`` given the positional
  embedding of another position (the DILEMMA pretext's own corruption, ``pretext.sample_tokens``
  with nothing dropped): the layout is there, but the backbone is told wrong positions.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from dilemma.errors import DilemmaError
from dilemma.pretext import sample_tokens

Corruption = Callable[
    [torch.Tensor, int, torch.Generator], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
]


def token_drop(keep_fraction: float) -> Corruption:
    """Keep a random ``max(1, round(f * L))`` tokens per image, sorted, at their true positions."""
    if not 0.0 < keep_fraction <= 1.0:
        raise DilemmaError(f"keep fraction must be in (0, 1], got {keep_fraction}")

    def corrupt(images, num_patches, generator):
        kept = max(1, math.floor(num_patches * keep_fraction + 0.5))
        if kept >= num_patches:
            return images, None, None
        order = torch.rand(images.shape[0], num_patches, generator=generator).argsort(dim=1)  # (B, L)
        return images, order[:, :kept].sort(dim=1).values, None  # keep: (B, K)

    return corrupt


def shuffle_cells(images: torch.Tensor, grid: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, C, H, W)`` with its ``grid x grid`` cells permuted per image (a fresh permutation each)."""
    batch, channels, height, width = images.shape
    if height % grid or width % grid:
        raise DilemmaError(
            f"a {grid} x {grid} patch shuffle needs the image side to be a multiple of {grid}, but the images "
            f"are {height} x {width}: choose eval.shuffle_grids that divide {height}"
        )
    if grid == 1:
        return images
    ch, cw = height // grid, width // grid
    # (B, C, g, ch, g, cw) -> (B, g*g, C, ch, cw): one entry per cell, in row-major cell order
    cells = images.reshape(batch, channels, grid, ch, grid, cw).permute(0, 2, 4, 1, 3, 5)
    cells = cells.reshape(batch, grid * grid, channels, ch, cw)
    order = torch.rand(batch, grid * grid, generator=generator).argsort(dim=1)  # (B, g*g): cell i shows order[i]
    cells = cells[torch.arange(batch)[:, None], order]
    # back: (B, g, g, C, ch, cw) -> (B, C, g, ch, g, cw) -> (B, C, H, W)
    cells = cells.reshape(batch, grid, grid, channels, ch, cw).permute(0, 3, 1, 4, 2, 5)
    return cells.reshape(batch, channels, height, width)


def patch_shuffle(grid: int) -> Corruption:
    """Permute the image's ``grid x grid`` cells; tokens see the moved pixels at their own positions."""
    if grid < 1:
        raise DilemmaError(f"a patch-shuffle grid must be >= 1, got {grid}")

    def corrupt(images, num_patches, generator):
        return shuffle_cells(images, grid, generator), None, None

    return corrupt


def position_shuffle(fraction: float) -> Corruption:
    """Every token enters; each with probability ``q`` gets another position's embedding (never its own)."""
    if not 0.0 <= fraction <= 1.0:
        raise DilemmaError(f"a position-shuffle fraction q must be in [0, 1], got {fraction}")

    def corrupt(images, num_patches, generator):
        if fraction == 0.0:
            return images, None, None
        sample = sample_tokens(images.shape[0], num_patches, 0.0, fraction, generator=generator)
        return images, sample.keep, sample.positions  # keep: every token, in order; positions: (B, L)

    return corrupt


def default_grids(img_size: int, patch_size: int) -> list[int]:
    """1, 2, 4, ... (powers of two that divide the image and give cells larger than a patch), then the
    token grid: 1, 2, 4, 7 at 28 px / 4 px patches; 1, 2, 4, 8, 14 at 224 / 16."""
    tokens = img_size // patch_size
    grids = [g for g in (2**i for i in range(13)) if g < tokens and img_size % g == 0]
    return grids + [tokens] if tokens > 1 else grids or [1]
