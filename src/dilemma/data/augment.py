"""Views in two stages: crops in the loader workers, photometric ops on the training device.

A view is cropped from the image as stored (full resolution for files, model size for in-memory
sets) and resized to its output size (random resized crop + flip), then colour-jittered, turned
grey, blurred and solarised. Only the first stage needs the file, so only it runs per image on the
CPU (``Views.crops``, in the DataLoader workers, uint8 out: a quarter of the bytes of floats); the
second runs batched on the training device right before the encoder (``Views.finish``,
``photometric.Photometric``), followed by the encoder's normalisation.

The settings are the ``data`` config section; the defaults suit the 28 px grayscale silhouettes (no
colour-only operations), ``configs/paper_*.yaml`` set the published RGB recipes. With
``asymmetric_views`` the two views differ as in BYOL / MoCo v3 / DINO: view 1 is always blurred and
never solarised, view 2 blurred with p = 0.1 and solarised with ``solarize_prob``.

Every random number of an image's views comes from one generator seeded for that image
(``loader.image_seed``): the crops and flips drawn as torchvision's ``RandomResizedCrop`` /
``RandomHorizontalFlip`` draw them (the same calls in the same order), then ``Photometric.DRAWS``
uniforms per view for the device stage.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from dilemma.data.photometric import Photometric
from dilemma.models import standardize

RATIO = (3 / 4, 4 / 3)  # aspect ratios of a random resized crop (torchvision's default)


@dataclass(frozen=True)
class Crop:
    """The loader workers' part of a view: a random resized crop covering ``scale`` of the image's
    area, resized to ``size`` (bilinear, antialiased), and a horizontal flip with p = 0.5."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True

    def box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """``(top, left, h, w)``: torchvision's ``RandomResizedCrop.get_params`` drawing from
        ``generator`` (the same draws in the same order: the same box for the same RNG state)."""
        area = height * width
        log_ratio = torch.log(torch.tensor(RATIO))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(*self.scale, generator=generator).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
                left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
                return top, left, h, w
        # ten misses: the centre crop of the image, its aspect ratio clamped to RATIO
        in_ratio = width / height
        if in_ratio < min(RATIO):
            w, h = width, int(round(width / min(RATIO)))
        elif in_ratio > max(RATIO):
            h, w = height, int(round(height * max(RATIO)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 ``(C, H, W)`` -> uint8 ``(C, size, size)``."""
        top, left, h, w = self.box(image.shape[-2], image.shape[-1], generator)
        flip = self.hflip and torch.rand(1, generator=generator).item() < 0.5  # RandomHorizontalFlip(p=0.5)
        region = image[None, :, top : top + h, left : left + w]
        # torch's uint8 antialiased bilinear kernel: PIL's filter to +-1 level, 3-4x faster than PIL
        out = F.interpolate(region, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return out[0].flip(-1) if flip else out[0]


@dataclass(frozen=True)
class View:
    """One view of an image: its crop (per image, loader workers) and photometric ops (batched, device)."""

    crop: Crop
    photometric: Photometric = Photometric()


class Views:
    """A method's views of each image, in two stages: ``crops`` where the images are decoded,
    ``finish`` on the training device."""

    def __init__(self, *views: View):
        self.views = views
        # views alike (DINO's local crops, SimCLR's pair) share one device-stage call: fewer, larger kernels
        alike: dict[View, list[int]] = {}
        for index, view in enumerate(views):
            alike.setdefault(view, []).append(index)
        self.alike = list(alike.values())

    def __len__(self) -> int:
        return len(self.views)

    def crops(self, images: Sequence[torch.Tensor], seeds: Sequence[int]) -> tuple[tuple[torch.Tensor, ...], ...]:
        """uint8 images ``(C, H, W)`` of any size, one seed each -> ``(crops, draws)``: per view the
        uint8 batch ``(n, C, S, S)`` and its device stage's uniforms ``(n, Photometric.DRAWS)``."""
        n, channels = len(images), images[0].shape[0]
        crops = [torch.empty((n, channels, v.crop.size, v.crop.size), dtype=torch.uint8) for v in self.views]
        draws = [torch.empty((n, Photometric.DRAWS)) for _ in self.views]
        generator = torch.Generator()
        for k, (image, seed) in enumerate(zip(images, seeds, strict=True)):
            generator.manual_seed(seed)
            for view, crop, draw in zip(self.views, crops, draws, strict=True):
                crop[k] = view.crop(image, generator)
                draw[k] = torch.rand(Photometric.DRAWS, generator=generator)
        return tuple(crops), tuple(draws)

    def finish(
        self,
        crops: Sequence[torch.Tensor],
        draws: Sequence[torch.Tensor],
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> tuple[torch.Tensor, ...]:
        """The device stage: uint8 crops (moved to ``device`` as uint8) -> photometric ops ->
        ``(x - mean) / std``, the encoder's input. ``draws`` stay on the host."""
        out: list[torch.Tensor] = [torch.empty(0)] * len(self.views)
        for group in self.alike:
            moved = [crops[i].to(device, non_blocking=True) for i in group]
            pixels = (torch.cat(moved) if len(moved) > 1 else moved[0]).to(torch.float32, copy=True).div_(255)
            finished = self.views[group[0]].photometric(pixels, torch.cat([draws[i] for i in group]))
            for i, part in zip(group, standardize(finished, mean, std).chunk(len(group)), strict=True):
                out[i] = part
        return tuple(out)

    def __call__(
        self,
        images: Sequence[torch.Tensor],
        seeds: Sequence[int],
        device: torch.device | str = "cpu",
        mean: Sequence[float] = (0.5,),
        std: Sequence[float] = (0.5,),
    ) -> tuple[torch.Tensor, ...]:
        """Both stages in one place (tests, pictures, benchmarks): images -> the encoder's input."""
        return self.finish(*self.crops(images, seeds), torch.device(device), mean, std)


@dataclass(frozen=True)
class ViewSettings:
    """The augmentation settings a method's views start from: the model's size and channels, and
    the ``data`` config section's view keys (``from_data``: by field name; their defaults and
    meanings are written there, in ``config.DataConfig``)."""

    img_size: int
    in_chans: int
    crop_min_scale: float
    hflip: bool
    color_jitter: float  # brightness and contrast strength, applied with p = 0.8
    saturation: float
    hue: float
    grayscale_prob: float
    blur_prob: float
    solarize_prob: float
    asymmetric_views: bool

    @classmethod
    def from_data(cls, data, img_size: int, in_chans: int) -> ViewSettings:
        """The settings of ``data`` (a ``DataConfig``, or anything with its view keys)."""
        keys = [f.name for f in dataclasses.fields(cls) if f.name not in ("img_size", "in_chans")]
        return cls(img_size=img_size, in_chans=in_chans, **{key: getattr(data, key) for key in keys})

    def view(self, *, size: int | None = None, scale: tuple[float, float] | None = None, **changes) -> View:
        """A view with these settings; ``size`` / ``scale`` set its crop, ``changes`` replace
        photometric settings (e.g. ``blur_prob=1.0``). Colour-only ops act on RGB only."""
        s = dataclasses.replace(self, **changes)
        size = size or s.img_size
        rgb = s.in_chans == 3
        photometric = Photometric(
            brightness=s.color_jitter,
            contrast=s.color_jitter,
            saturation=s.saturation if rgb else 0.0,
            hue=s.hue if rgb else 0.0,
            grayscale_prob=s.grayscale_prob if rgb else 0.0,
            blur_prob=s.blur_prob,
            blur_kernel=max(3, (size // 10) | 1),  # ~10 % of the side, odd (SimCLR)
            solarize_prob=s.solarize_prob,
        )
        return View(Crop(size, scale or (s.crop_min_scale, 1.0), s.hflip), photometric)

    def crop_and_flip(self) -> View:
        """The geometric part alone (MAE's views)."""
        return View(self.view().crop)

    def pair(self, **changes) -> tuple[View, View]:
        """The two views of a two-view method: alike, or BYOL's asymmetric blur / solarisation."""
        if not self.asymmetric_views:
            same = self.view(**changes)
            return same, same
        return (
            self.view(**{**changes, "blur_prob": 1.0, "solarize_prob": 0.0}),
            self.view(**{**changes, "blur_prob": 0.1, "solarize_prob": self.solarize_prob}),
        )


def two_views(settings: ViewSettings) -> Views:
    """SimCLR / MoCo v3: two views of each image."""
    return Views(*settings.pair())


def multi_crop(
    settings: ViewSettings, local_size: int, num_local: int, *, local_max_scale: float, local_min_scale: float = 0.05
) -> Views:
    """DINO's multi-crop: 2 global crops at ``img_size`` covering ``[crop_min_scale, 1]`` of the image and
    ``num_local`` local crops at ``local_size`` covering ``[local_min_scale, local_max_scale]`` (blurred
    with p = 0.5 and never solarised when ``asymmetric_views``, as DINO's)."""
    local_blur = {"blur_prob": 0.5, "solarize_prob": 0.0} if settings.asymmetric_views else {}
    local = settings.view(size=local_size, scale=(local_min_scale, local_max_scale), **local_blur)
    return Views(*settings.pair(), *[local] * num_local)
