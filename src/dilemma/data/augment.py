"""Two-view augmentations (torchvision transforms v2) and input normalisation.

Images are uint8 ``(C, S, S)``; views come out as float, normalised to mean 0.5 / std 0.5 per
channel (a fixed choice, so a checkpoint evaluates the same on any dataset).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchvision.transforms import v2

MEAN, STD = 0.5, 0.5


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., C, H, W)`` -> float in about [-1, 1]."""
    return (images.float() / 255.0 - MEAN) / STD


def view_transform(
    img_size: int,
    *,
    crop_min_scale: float = 0.35,
    hflip: bool = True,
    color_jitter: float = 0.4,
    blur_prob: float = 0.2,
    crop_max_scale: float = 1.0,
) -> v2.Compose:
    """One random view: resized crop, flip, brightness/contrast jitter, blur (SimCLR / MoCo v3 style,
    without the colour-only parts that mean nothing on grayscale silhouettes)."""
    steps = [v2.RandomResizedCrop(img_size, scale=(crop_min_scale, crop_max_scale), antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=color_jitter, contrast=color_jitter)], p=0.8))
    if blur_prob > 0:
        kernel = max(3, (img_size // 10) | 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob))
    return v2.Compose(steps)


@dataclass(frozen=True)
class ViewSettings:
    """The augmentation settings a method's views start from (``model.img_size`` and ``data.*``)."""

    img_size: int
    crop_min_scale: float = 0.35
    hflip: bool = True
    color_jitter: float = 0.4
    blur_prob: float = 0.2

    def transform(self, **changes) -> v2.Compose:
        """``view_transform`` with these settings; ``changes`` replace some (e.g. ``color_jitter=0.0``)."""
        return view_transform(**{**dataclasses.asdict(self), **changes})


class MultiViews:
    """Maps a uint8 batch ``(n, C, S, S)`` to one normalised float batch per transform, each image
    augmented independently (per-sample randomness)."""

    def __init__(self, *transforms: v2.Compose):
        self.transforms = transforms

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(normalize(torch.stack([transform(img) for img in images])) for transform in self.transforms)


class TwoViews(MultiViews):
    """Two views from the same transform (SimCLR, MoCo v3)."""

    def __init__(self, transform: v2.Compose):
        super().__init__(transform, transform)


def multi_crop(
    settings: ViewSettings, local_size: int, num_local: int, *, local_max_scale: float, local_min_scale: float = 0.05
) -> MultiViews:
    """DINO's multi-crop: 2 global crops at ``img_size`` covering ``[crop_min_scale, 1]`` of the image and
    ``num_local`` local crops at ``local_size`` covering ``[local_min_scale, local_max_scale]``."""
    global_crop = settings.transform()
    local_crop = settings.transform(img_size=local_size, crop_min_scale=local_min_scale, crop_max_scale=local_max_scale)
    return MultiViews(global_crop, global_crop, *[local_crop] * num_local)
