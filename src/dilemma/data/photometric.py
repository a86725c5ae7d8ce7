"""Photometric augmentation: the second stage of a view, batched on the training device.

Colour jitter (brightness, contrast, saturation and hue in a random order, applied with p = 0.8),
grayscale, Gaussian blur and solarisation are random per image but need no file, so they run on
the whole batch right before the encoder (a few kernels per batch on a GPU, batched tensor ops on
a CPU) instead of image by image in the loader workers (``docs/method.md``, "Views").

Each op takes floats in [0, 1], ``(n, C, H, W)``, and one parameter per image ``(n,)``, and gives
every image what torchvision's functional op (``torchvision.transforms.v2.functional``) gives it
for that parameter (tested per op on float and uint8 images). ``Photometric`` turns ``DRAWS``
uniform numbers per image into those parameters, distributed as torchvision's ``ColorJitter``,
``RandomGrayscale``, ``GaussianBlur`` and ``RandomSolarize`` draw them; the loader workers draw the
numbers with the image's crop, so a view stays a function of (seed, step, image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from dilemma.errors import require

LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601-2 luma)
SOLARIZE_THRESHOLD = 128 / 255  # torchvision's RandomSolarize(threshold=128) on uint8 images


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)  # (n,) -> (n, 1, 1, 1): broadcasts over (C, H, W)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """RGB ``(n, 3, H, W)`` -> luma ``(n, 1, H, W)``."""
    r, g, b = x.unbind(1)
    return (r * LUMA[0] + g * LUMA[1] + b * LUMA[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other`` per image, clamped to [0, 1] (torchvision's ``_blend``),
    as one ``lerp`` from ``other`` towards ``x`` (one pass over the batch instead of three)."""
    return torch.lerp(other.expand_as(x), x, _per_image(factor).to(x.dtype)).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_image(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma (its mean value for one channel)."""
    luma = grayscale(x) if x.shape[1] == 3 else x
    return _blend(x, luma.mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's own luma (RGB only; one channel is returned as it is, as torchvision)."""
    return _blend(x, grayscale(x), factor) if x.shape[1] == 3 else x


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (in [-0.5, 0.5]) in HSV space, keeping value (the largest
    channel) and chroma (largest - smallest), as torchvision's HSV round trip (RGB only)."""
    if x.shape[1] != 3:
        return x
    r, g, b = x.unbind(1)  # each (n, H, W)
    top, bottom = x.amax(dim=1), x.amin(dim=1)
    chroma = top - bottom
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))  # grey pixels: any hue, chroma 0
    # hue in sixths of a turn from the largest channel's sector (r wins ties, then g, as torchvision)
    sixths = torch.where(top == r, (g - b) / safe, torch.where(top == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    sixths = (sixths + 6 * _per_image(shift)[:, 0]).remainder_(6)
    # HSV -> RGB in closed form: channel n (r: 5, g: 3, b: 1) = value - chroma * clamp(min(k, 4 - k), 0, 1)
    # with k = (n + hue in sixths) mod 6; the same as torchvision's sector table (p, q, t)
    out = []
    for offset in (5.0, 3.0, 1.0):
        k = (sixths + offset).remainder_(6)
        out.append(top - chroma * torch.minimum(k, 4 - k).clamp_(0, 1))
    return torch.stack(out, dim=1).clamp_(0, 1)


def to_grayscale(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    """Luma in every channel (``RandomGrayscale``: RGB in, RGB out)."""
    return grayscale(x).expand_as(x).contiguous() if x.shape[1] == 3 else x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gaussian blur with one ``sigma`` per image: torchvision's kernel (``kernel_size`` taps of
    ``exp(-t^2 / 2 sigma^2)``, normalised) and reflect padding, as two 1D passes (its 2D kernel is
    their outer product). Each (image, channel) plane is a group of one depthwise convolution."""
    n, c, h, w = x.shape
    taps = torch.arange(kernel_size, dtype=x.dtype, device=x.device) - (kernel_size - 1) / 2
    kernel = torch.softmax(-((taps / sigma.to(x.dtype)[:, None]) ** 2) / 2, dim=1)  # (n, k)
    weight = kernel.repeat_interleave(c, dim=0)  # (n * c, k): one kernel per plane
    half = kernel_size // 2
    planes = x.reshape(1, n * c, h, w)
    planes = F.conv2d(F.pad(planes, (half, half, 0, 0), mode="reflect"), weight[:, None, None, :], groups=n * c)
    planes = F.conv2d(F.pad(planes, (0, 0, half, half), mode="reflect"), weight[:, None, :, None], groups=n * c)
    return planes.reshape(n, c, h, w)


def solarize(x: torch.Tensor, _: torch.Tensor | None = None) -> torch.Tensor:
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)


Op = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
JITTER: tuple[Op, ...] = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's fn_idx


@dataclass(frozen=True)
class Step:
    """One op on some images of the batch: ``rows`` (host indices) and their parameters."""

    op: Op
    rows: torch.Tensor  # (m,) int64
    params: torch.Tensor  # (m,) float


class Uniforms(NamedTuple):
    """An image's ``Photometric.DRAWS`` uniform numbers by use (the columns of ``(n, DRAWS)``, in order)."""

    jitter_gate: torch.Tensor  # (n,) jittered when below jitter_prob
    jitter_keys: torch.Tensor  # (n, 4) their order is the order of the four jitter ops
    jitter_factors: torch.Tensor  # (n, 4) brightness, contrast, saturation, hue within their ranges
    grayscale_gate: torch.Tensor  # (n,)
    blur_gate: torch.Tensor  # (n,)
    blur_sigma: torch.Tensor  # (n,) within blur_sigma
    solarize_gate: torch.Tensor  # (n,)

    @classmethod
    def of(cls, draws: torch.Tensor) -> Uniforms:
        columns = draws.double().split([1, 4, 4, 1, 1, 1, 1], dim=1)
        return cls(*(c.squeeze(1) if c.shape[1] == 1 else c for c in columns))


@dataclass(frozen=True)
class Photometric:
    """A view's photometric ops, as torchvision's per-image pipeline applies them:
    ``RandomApply([ColorJitter], p=jitter_prob)``, ``RandomGrayscale``,
    ``RandomApply([GaussianBlur], p=blur_prob)``, ``RandomSolarize``. Strength 0 or probability 0
    switches an op off. Saturation, hue and grayscale change only RGB images."""

    brightness: float = 0.0  # factor uniform in [max(0, 1 - brightness), 1 + brightness]
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # shift uniform in [-hue, hue] turns, hue <= 0.5
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_kernel: int = 3  # taps, odd
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # sigma uniform in this range
    solarize_prob: float = 0.0

    DRAWS: ClassVar[int] = 13  # uniform numbers per image (``Uniforms``)

    def __post_init__(self):
        strengths = (self.brightness, self.contrast, self.saturation)
        require(min(strengths) >= 0, f"colour jitter strengths must be >= 0, got {strengths}")
        require(0 <= self.hue <= 0.5, f"hue must be in [0, 0.5] (turns), got {self.hue}")
        probs = (self.jitter_prob, self.grayscale_prob, self.blur_prob, self.solarize_prob)
        require(all(0 <= p <= 1 for p in probs), f"probabilities must be in [0, 1], got {probs}")
        require(self.blur_kernel >= 1 and self.blur_kernel % 2 == 1, f"blur_kernel must be odd, got {self.blur_kernel}")
        low, high = self.blur_sigma
        require(0 < low <= high, f"blur_sigma must be a range of positive values, got {self.blur_sigma}")

    @property
    def jitter_ranges(self) -> list[tuple[float, float] | None]:
        """Brightness, contrast, saturation, hue: each op's parameter range, None where it is off."""
        strengths = (self.brightness, self.contrast, self.saturation)
        factors = [(max(0.0, 1 - s), 1 + s) if s > 0 else None for s in strengths]
        return [*factors, (-self.hue, self.hue) if self.hue > 0 else None]

    @property
    def identity(self) -> bool:
        jitter = self.jitter_prob > 0 and any(self.jitter_ranges)
        return not (jitter or self.grayscale_prob > 0 or self.blur_prob > 0 or self.solarize_prob > 0)

    def steps(self, draws: torch.Tensor) -> list[Step]:
        """The ops each image gets, in order, from its uniforms ``draws`` ``(n, DRAWS)`` (on the host)."""
        u = Uniforms.of(draws)
        steps = []
        jittered = u.jitter_gate < self.jitter_prob
        order = u.jitter_keys.argsort(dim=1)  # a uniformly random permutation per image, as torch.randperm(4)
        for position in range(4):
            for op_id, (op, span) in enumerate(zip(JITTER, self.jitter_ranges, strict=True)):
                if span is None:
                    continue
                chosen = _rows(jittered & (order[:, position] == op_id))
                params = span[0] + (span[1] - span[0]) * u.jitter_factors[chosen, op_id]
                steps.append(Step(op, chosen, params.float()))
        grey = _rows(u.grayscale_gate < self.grayscale_prob)
        steps.append(Step(to_grayscale, grey, torch.zeros(len(grey))))
        blurred = _rows(u.blur_gate < self.blur_prob)
        low, high = self.blur_sigma
        steps.append(Step(self._blur, blurred, (low + (high - low) * u.blur_sigma[blurred]).float()))
        solarized = _rows(u.solarize_gate < self.solarize_prob)
        steps.append(Step(solarize, solarized, torch.zeros(len(solarized))))
        return [step for step in steps if len(step.rows)]

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(x, sigma, self.blur_kernel)

    def __call__(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Floats in [0, 1] ``(n, C, H, W)`` on any device, and their uniforms ``(n, DRAWS)`` on the
        host (they decide which images each op touches without waiting for the device)."""
        if self.identity:
            return x
        steps = self.steps(draws)
        if not steps:
            return x
        # two transfers for all the steps, their rows and their parameters (pinned and asynchronous on a GPU)
        rows = _to_device(torch.cat([s.rows for s in steps]), x.device).split([len(s.rows) for s in steps])
        params = _to_device(torch.cat([s.params for s in steps]), x.device).split([len(s.rows) for s in steps])
        for step, index, param in zip(steps, rows, params, strict=True):
            if len(step.rows) == len(x):
                x = step.op(x, param)
            else:
                x[index] = step.op(x[index], param)
        return x


def _rows(mask: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(mask).flatten()


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> ``device`` without a synchronisation: a copy from pageable memory would wait for
    the queued work on a GPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
