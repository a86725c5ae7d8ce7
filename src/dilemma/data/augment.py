"""Views (torchvision transforms v2).

A view is cropped from the image as stored (full resolution for files, model size for in-memory
sets), then resized to the model's size: random resized crop, flip, colour jitter, grayscale,
blur, solarisation. The settings are the ``data`` config section; the defaults suit the 28 px
grayscale silhouettes (no colour-only operations), ``configs/paper_*.yaml`` set the published
RGB recipes. With ``asymmetric`` the two views differ as in BYOL / MoCo v3 / DINO: view 1 is
always blurred and never solarised, view 2 blurred with p = 0.1 and solarised with
``solarize_prob``. Views stay uint8 (a quarter of the bytes between loader workers and the
device); the encoder normalises them where they train (``ViTEncoder.normalize``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2


class GaussianBlur:
    """Blur with sigma drawn from ``sigma`` (torch's RNG): PIL's own filter for PIL images (as
    MoCo v3 and DINO; 30-60x faster at 224 px than a 2D convolution), torchvision's kernel of
    ``kernel_size`` for tensors (the in-memory sets)."""

    def __init__(self, kernel_size: int, sigma: tuple[float, float] = (0.1, 2.0)):
        self.kernel_size, self.sigma = kernel_size, sigma

    def __call__(self, img):
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        if isinstance(img, Image.Image):
            return img.filter(ImageFilter.GaussianBlur(radius=sigma))
        return v2.functional.gaussian_blur(img, [self.kernel_size] * 2, [sigma, sigma])

    def __repr__(self) -> str:
        return f"GaussianBlur(kernel_size={self.kernel_size}, sigma={self.sigma})"


def view_transform(
    img_size: int,
    *,
    in_chans: int = 1,
    crop_min_scale: float = 0.35,
    crop_max_scale: float = 1.0,
    hflip: bool = True,
    color_jitter: float = 0.4,
    saturation: float = 0.0,
    hue: float = 0.0,
    grayscale_prob: float = 0.0,
    blur_prob: float = 0.2,
    solarize_prob: float = 0.0,
) -> v2.Compose:
    """One random view of a uint8 tensor or PIL image -> uint8 ``(C, img_size, img_size)``.

    Colour jitter (brightness and contrast ``color_jitter``, ``saturation``, ``hue``) is applied
    with p = 0.8 as in SimCLR / MoCo v3 / DINO; saturation, hue and grayscale only to RGB images.
    """
    steps = [v2.RandomResizedCrop(img_size, scale=(crop_min_scale, crop_max_scale), antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    rgb = in_chans == 3
    jitter = {"brightness": color_jitter, "contrast": color_jitter}
    if rgb:
        jitter.update(saturation=saturation, hue=hue)
    if any(jitter.values()):
        steps.append(v2.RandomApply([v2.ColorJitter(**jitter)], p=0.8))
    if rgb and grayscale_prob > 0:
        steps.append(v2.RandomGrayscale(p=grayscale_prob))
    if blur_prob > 0:
        kernel = max(3, (img_size // 10) | 1)  # ~10 % of the side, odd (SimCLR)
        steps.append(v2.RandomApply([GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob))
    if solarize_prob > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_prob))
    steps.append(v2.PILToTensor())  # PIL images (files) -> uint8 tensor; tensors pass unchanged
    return v2.Compose(steps)


@dataclass(frozen=True)
class ViewSettings:
    """The augmentation settings a method's views start from (``model.*`` and ``data.*``)."""

    img_size: int
    in_chans: int = 1
    crop_min_scale: float = 0.35
    hflip: bool = True
    color_jitter: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_prob: float = 0.0
    blur_prob: float = 0.2
    solarize_prob: float = 0.0
    asymmetric: bool = False

    def transform(self, **changes) -> v2.Compose:
        """``view_transform`` with these settings; ``changes`` replace some (e.g. ``color_jitter=0.0``)."""
        settings = {**dataclasses.asdict(self), **changes}
        settings.pop("asymmetric")
        return view_transform(**settings)

    def crop_and_flip(self) -> v2.Compose:
        """The geometric part alone (MAE's views, fine-tuning's base)."""
        return self.transform(
            color_jitter=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0
        )

    def pair(self, **changes) -> tuple[v2.Compose, v2.Compose]:
        """The two views of a two-view method: alike, or BYOL's asymmetric blur / solarisation."""
        if not self.asymmetric:
            same = self.transform(**changes)
            return same, same
        return (
            self.transform(**{**changes, "blur_prob": 1.0, "solarize_prob": 0.0}),
            self.transform(**{**changes, "blur_prob": 0.1, "solarize_prob": self.solarize_prob}),
        )


class MultiViews:
    """Maps a batch of images (uint8 tensors or PIL images of any size) to one uint8 batch
    ``(n, C, S', S')`` per transform, each image augmented independently (per-sample randomness)."""

    def __init__(self, *transforms: v2.Compose):
        self.transforms = transforms

    def __call__(self, images) -> tuple[torch.Tensor, ...]:
        return tuple(torch.stack([transform(img) for img in images]) for transform in self.transforms)


def two_views(settings: ViewSettings) -> MultiViews:
    """SimCLR / MoCo v3: two views of each image."""
    return MultiViews(*settings.pair())


def multi_crop(
    settings: ViewSettings, local_size: int, num_local: int, *, local_max_scale: float, local_min_scale: float = 0.05
) -> MultiViews:
    """DINO's multi-crop: 2 global crops at ``img_size`` covering ``[crop_min_scale, 1]`` of the image and
    ``num_local`` local crops at ``local_size`` covering ``[local_min_scale, local_max_scale]`` (blurred
    with p = 0.5 and never solarised when ``asymmetric``, as DINO's)."""
    local_blur = {"blur_prob": 0.5, "solarize_prob": 0.0} if settings.asymmetric else {}
    local_crop = settings.transform(
        img_size=local_size, crop_min_scale=local_min_scale, crop_max_scale=local_max_scale, **local_blur
    )
    return MultiViews(*settings.pair(), *[local_crop] * num_local)
