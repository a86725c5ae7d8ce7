"""Patch masks of the masked-prediction methods, drawn on the device for a whole batch at once.

``block_masks``: BEiT's block-wise masking (Bao et al. 2022, Alg. 1) as iBOT uses it (Zhou et al.
2022, Sec. 3 and App. C): rectangles of at least ``(min(H, W) // 3) ** 2`` patches with a
log-uniform aspect ratio in [0.3, 1 / 0.3] are added until the image's budget of masked patches is
reached; a rectangle is taken only when it adds at least one new patch and no more than the budget
has left. Vectorised over the batch: every image tries the same number of candidate rectangles in
turn (BEiT stops after 10 failed tries in a row, here after ``candidates`` tries in all), so no
Python loop runs per image.

``multi_block_masks``: I-JEPA's multi-block masking (Assran et al. 2023, Sec. 3 and App. C): M
target blocks of one size per batch (scale and aspect ratio drawn once), and a context block (scale
0.85-1, square) at its own place per image from which every target patch is removed.
``cut_contexts`` then cuts each context to the micro-batch's smallest one (a random subset, kept in
raster order) so that the context encoder runs on a rectangular batch, as I-JEPA's collator cuts
to the smallest of each GPU's batch.

``batch_draws`` draws for a micro-batch so that an image gets the same
mask however the global batch is split across processes and micro-batches (as ``Dilemma.sample``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dilemma.errors import DilemmaError
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


@dataclass(frozen=True)
class MultiBlockMasks:
    """I-JEPA's masks for a batch: ``context`` ``(B, L)`` bool, the patches of each image's context
    block that are in no target; ``targets`` ``(B, M, T)`` the patch indices of each of the M target
    blocks (row-major)."""

    context: torch.Tensor
    targets: torch.Tensor


def block_side(scale: float, ratio: float, grid: tuple[int, int]) -> tuple[int, int]:
    """The block ``(h, w)`` of area ``scale`` x L and aspect ratio h / w = ``ratio``: each side at
    least 1 and below the grid's (as I-JEPA's collator)."""
    area = scale * grid[0] * grid[1]
    h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    return min(max(h, 1), max(grid[0] - 1, 1)), min(max(w, 1), max(grid[1] - 1, 1))


def _block_size(scale: tuple[float, float], aspect: tuple[float, float], grid, generator, device) -> tuple[int, int]:
    """One block size for the batch, scale and aspect ratio uniform in their ranges."""
    s_draw, a_draw = torch.rand(2, generator=generator, device=device).tolist()
    return block_side(scale[0] + (scale[1] - scale[0]) * s_draw, aspect[0] + (aspect[1] - aspect[0]) * a_draw, grid)


def largest_block(scale: tuple[float, float], aspect: tuple[float, float], grid: tuple[int, int]) -> int:
    """The most patches a block drawn from these ranges can cover (the ranges scanned finely)."""
    steps = [i / 64 for i in range(65)]
    return max(
        math.prod(block_side(scale[0] + (scale[1] - scale[0]) * s, aspect[0] + (aspect[1] - aspect[0]) * a, grid))
        for s in steps
        for a in steps
    )


def _place(size: tuple[int, int], count: tuple[int, ...], grid, generator, device) -> torch.Tensor:
    """``count`` blocks of ``size`` at uniform places: their patch indices ``(*count, h * w)``."""
    (h, w), (h_grid, w_grid) = size, grid
    top = torch.randint(0, h_grid - h + 1, count, generator=generator, device=device)
    left = torch.randint(0, w_grid - w + 1, count, generator=generator, device=device)
    rows = top.unsqueeze(-1) + torch.arange(h, device=device).repeat_interleave(w)  # (*count, h * w)
    cols = left.unsqueeze(-1) + torch.arange(w, device=device).repeat(h)
    return rows * w_grid + cols


def multi_block_masks(
    batch: int,
    grid: tuple[int, int],
    *,
    targets: int = 4,
    target_scale: tuple[float, float] = (0.15, 0.2),
    target_aspect: tuple[float, float] = (0.75, 1.5),
    context_scale: tuple[float, float] = (0.85, 1.0),
    min_context: int = 10,
    candidates: int = 8,
    generator: torch.Generator | None = None,
    device=None,
) -> MultiBlockMasks:
    """I-JEPA's masks (module doc). The context block tries ``candidates`` places per image and takes
    the first that keeps at least ``min_context`` patches once the targets are removed (else the one
    that keeps most), as I-JEPA re-draws a context that is too small; if the targets cover every try,
    that image's context keeps the target patches of its block (never empty)."""
    if device is None and generator is not None:
        device = generator.device
    num_patches = grid[0] * grid[1]
    target_size = _block_size(target_scale, target_aspect, grid, generator, device)
    context_size = _block_size(context_scale, (1.0, 1.0), grid, generator, device)
    target_idx = _place(target_size, (batch, targets), grid, generator, device)  # (B, M, T)
    in_target = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    in_target.scatter_(1, target_idx.flatten(1), True)  # (B, L): the union of the targets
    tries = _place(context_size, (batch, candidates), grid, generator, device)  # (B, C, Tc)
    in_block = torch.zeros(batch, candidates, num_patches, dtype=torch.bool, device=device)
    in_block.scatter_(2, tries, True)
    in_context = in_block & ~in_target.unsqueeze(1)  # (B, C, L): a context never sees a target patch
    sizes = in_context.sum(dim=2)  # (B, C)
    large_enough = sizes >= min(min_context, num_patches)
    # the first large-enough try (argmax of the first True), or the largest where none is
    choice = torch.where(large_enough.any(dim=1), large_enough.float().argmax(dim=1), sizes.argmax(dim=1))
    rows = torch.arange(batch, device=device)
    context = in_context[rows, choice]  # (B, L)
    # where the targets covered every try, the block keeps its target patches (I-JEPA's allow_overlap)
    # rather than leave the image without context (possible only where targets can cover a block)
    context = torch.where(context.any(dim=1, keepdim=True), context, in_block[rows, choice])
    return MultiBlockMasks(context=context, targets=target_idx)


def cut_contexts(context: torch.Tensor, score: torch.Tensor, keep_fraction: float = 1.0) -> torch.Tensor:
    """``(B, Kc)`` sorted patch indices: of each image's context ``(B, L)`` bool, the ``Kc`` patches
    with the highest ``score`` ``(B, L)`` (uniform variates: a random subset), ``Kc`` = the batch's
    smallest context x ``keep_fraction`` (at least 1; < 1 is DILEMMA's sparsity on top)."""
    smallest = int(context.sum(dim=1).min())  # a host sync, once a micro-batch
    if smallest == 0:
        raise DilemmaError(
            "an I-JEPA context block lost every patch to the target blocks: lower method.ijepa.targets "
            "or method.ijepa.target_max_scale, or use more patches per image"
        )
    kept = max(math.floor(smallest * keep_fraction + 1e-9), 1)
    masked_score = score.masked_fill(~context, -1.0)  # positions outside the context never win
    return masked_score.topk(kept, dim=1).indices.sort(dim=1).values


def batch_draws(draws: TokenDraws, n: int, draw):
    """``draw(rows, generator)`` (a tensor or a (named) tuple of tensors, one row per image) for this
    micro-batch's ``n`` images: with ``GlobalBatchRows``, drawn
    for the whole global batch from the step's generator and cut to this micro-batch's rows (the
    same values however the batch is split); otherwise for the ``n`` images with ``draws``."""
    if isinstance(draws, GlobalBatchRows):
        full = draw(draws.total, draws.generator)
        if isinstance(full, torch.Tensor):
            return full[draws.rows.to(full.device)]
        cut = (t[draws.rows.to(t.device)] for t in full)  # a tuple of tensors (named or not)
        return full._make(cut) if hasattr(full, "_make") else tuple(cut)
    return draw(n, draws)
