"""Patch masks of the masked-prediction methods, drawn on the device for a whole batch at once.

``block_masks``: BEiT's block-wise masking (Bao et al. 2022, Alg. 1) as iBOT uses it (Zhou et al.
2022, Sec. 3 and App. C): rectangles of at least ``(min(H, W) // 3) ** 2`` patches with a
log-uniform aspect ratio in [0.3, 1 / 0.3] are added until the image's budget of masked patches is
reached; a rectangle is taken only when it adds at least one new patch and no more than the budget
has left. Vectorised over the batch: every image tries the same number of candidate rectangles in
turn (BEiT stops after 10 failed tries in a row, here after ``candidates`` tries in all), so no
Python loop runs per image.

``batch_draws`` draws for a micro-batch so that an image gets the same
mask however the global batch is split across processes and micro-batches (as ``Dilemma.sample``).
"""

from __future__ import annotations

import math

import torch

from dilemma.pretext import GlobalBatchRows, TokenDraws


def _uniform(shape, low, high, generator, device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def block_masks(
    ratios: torch.Tensor,
    grid: tuple[int, int],
    *,
    aspect: float = 0.3,
    candidates: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B, H * W)`` bool masks in row-major patch order, image b with about ``ratios[b] * H * W``
    masked patches (never more) in blocks; a ratio of 0 masks nothing."""
    (h_grid, w_grid), device, batch = grid, ratios.device, ratios.shape[0]
    budget = ratios.float() * h_grid * w_grid  # (B,) patches to mask, as BEiT's `high`
    min_area = float((min(h_grid, w_grid) // 3) ** 2)
    rows = torch.arange(h_grid, device=device).view(1, h_grid, 1)
    cols = torch.arange(w_grid, device=device).view(1, 1, w_grid)
    mask = torch.zeros(batch, h_grid, w_grid, dtype=torch.bool, device=device)
    count = torch.zeros(batch, device=device)
    log_aspect = math.log(aspect)
    for _ in range(candidates):
        left_over = budget - count  # (B,)
        # uniform between the smallest block and what is left (in either order, as random.uniform)
        area = min_area + (left_over - min_area) * torch.rand(batch, generator=generator, device=device)
        ratio = torch.exp(_uniform((batch,), log_aspect, -log_aspect, generator, device))
        h = torch.sqrt(area * ratio).round().long()  # (B,)
        w = torch.sqrt(area / ratio).round().long()
        fits = (h >= 1) & (w >= 1) & (h < h_grid) & (w < w_grid)
        top = (torch.rand(batch, generator=generator, device=device) * (h_grid - h + 1).clamp(min=1)).long()
        left = (torch.rand(batch, generator=generator, device=device) * (w_grid - w + 1).clamp(min=1)).long()
        block = (
            (rows >= top.view(-1, 1, 1))
            & (rows < (top + h).view(-1, 1, 1))
            & (cols >= left.view(-1, 1, 1))
            & (cols < (left + w).view(-1, 1, 1))
        )  # (B, H, W)
        new = (block & ~mask).flatten(1).sum(dim=1)  # (B,) patches the block would add
        take = fits & (new > 0) & (new <= left_over)
        mask |= block & take.view(-1, 1, 1)
        count = count + new * take
    return mask.flatten(1)


def batch_draws(draws: TokenDraws, n: int, draw):
    """``draw(rows, generator)`` for this micro-batch's ``n`` images: with ``GlobalBatchRows``, drawn
    for the whole global batch from the step's generator and cut to this micro-batch's rows (the
    same values however the batch is split); otherwise for the ``n`` images with ``draws``."""
    if isinstance(draws, GlobalBatchRows):
        full = draw(draws.total, draws.generator)
        return full[draws.rows.to(full.device)]
    return draw(n, draws)
