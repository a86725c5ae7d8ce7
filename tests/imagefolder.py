"""Generated image folders with real JPEG / PNG files (tests and the data benchmark)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def synthetic_image(rng: np.random.Generator, label: int, width: int, height: int) -> Image.Image:
    """A noisy background with a shape whose kind depends on ``label`` (so classes are learnable)."""
    base = rng.integers(0, 256, size=3)
    noise = rng.normal(0, 25, size=(height, width, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    s = min(width, height)
    x0, y0 = rng.integers(0, max(1, width - s // 2)), rng.integers(0, max(1, height - s // 2))
    box = [int(x0), int(y0), int(x0 + s // 2), int(y0 + s // 2)]
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    [
        draw.ellipse,
        draw.rectangle,
        lambda b, fill: draw.polygon([(b[0], b[3]), (b[2], b[3]), ((b[0] + b[2]) // 2, b[1])], fill=fill),
    ][label % 3](box, fill=colour)
    return img


def photo_like_image(rng: np.random.Generator, label: int, width: int, height: int) -> Image.Image:
    """Natural-image statistics for a decoder: a 1/f amplitude spectrum (as photographs have), the
    three channels correlated, plus the class's shape. At quality 90 it compresses to ~0.6 bytes
    per pixel, as ImageNet's JPEGs do (~110 KB at ~400 x 350)."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    falloff = np.hypot(fx, fy)
    falloff[0, 0] = 1.0

    def field():
        return (rng.normal(size=falloff.shape) + 1j * rng.normal(size=falloff.shape)) / falloff

    shared = field()
    channels = np.stack([np.fft.irfft2(shared + 0.5 * field(), s=(height, width)) for _ in range(3)], axis=-1)
    channels = (channels - channels.mean()) / (channels.std() + 1e-9) * 50 + rng.uniform(80, 170, size=3)
    img = Image.fromarray(np.clip(channels, 0, 255).astype(np.uint8), "RGB")
    s = min(width, height)
    x0, y0 = rng.integers(0, max(1, width - s // 2)), rng.integers(0, max(1, height - s // 2))
    box = [int(x0), int(y0), int(x0 + s // 2), int(y0 + s // 2)]
    (ImageDraw.Draw(img).ellipse if label % 2 else ImageDraw.Draw(img).rectangle)(box, outline=(255, 255, 255), width=3)
    return img


def make_image_folder(
    root: Path,
    *,
    classes: int = 3,
    per_class: int = 10,
    sizes: tuple[int, int] = (40, 90),
    split: tuple[str, ...] = (),
    seed: int = 0,
    suffix: str = ".jpg",
    image=synthetic_image,
) -> Path:
    """``root/<class>/img_k.jpg`` (or ``root/<split>/<class>/...`` for each name in ``split``);
    ``image(rng, label, width, height)`` draws each one (``synthetic_image``, ``photo_like_image``)."""
    rng = np.random.default_rng(seed)
    for part in split or ("",):
        for label in range(classes):
            folder = Path(root) / part / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
                image(rng, label, w, h).save(folder / f"img_{k:05d}{suffix}", quality=90)
    return Path(root)
