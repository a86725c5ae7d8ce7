"""Animal-Texture: the embedded silhouettes filled with one procedural texture per class, and the
cue-conflict set that asks whether a backbone decides by shape or by texture (Geirhos et al. 2019).

Animal-MNIST classes differ by outline alone. Here each class also gets its own binary texture
(stripes, checks, dots, a grid, a hatch, noise, or none) that fills the silhouette; the
background stays plain black. In the *agreeing* images shape and texture name
the same class, so either cue solves the task; in a *cue-conflict* image the silhouette of class
a is filled with the texture of a class b != a, and a classifier's decision says which cue it
used. Everything is a pure function of the silhouettes and a seed (no files, no downloads).
"""

from __future__ import annotations

import numpy as np

TEXTURE_NAMES = (  # by class index: Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra
    "horizontal stripes",
    "vertical stripes",
    "checks",
    "diamonds (checks turned 45 degrees)",
    "dots",
    "holes (dots inverted)",
    "grid lines",
    "cross-hatch (both diagonals)",
    "noise (a fixed random 8 px tile)",
    "solid (no texture)",
)
# One scale per family and families a horizontal flip maps onto themselves, so that the training
# augmentations (flip, a random resized crop's zoom of up to ~1.7x) never turn one class's texture
# into another's (mirrored diagonal stripes, or period-4 stripes zoomed to period 8, would: those
# pairs are left out).
PHASES = 8  # each image's texture is shifted by a random (dy, dx) in [0, 8)^2: a multiple of every period
DARK, BRIGHT = 96, 255  # the texture's two levels inside the silhouette: its outline stays visible on black
_NOISE_TILE = np.random.default_rng(12345).random((PHASES, PHASES)) < 0.5  # fixed: part of the set's definition


def texture_pattern(texture: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """The binary texture ``texture`` (0-9, ``TEXTURE_NAMES``) at integer coordinates ``ys``, ``xs``."""
    patterns = (
        lambda: ys % 4 < 2,
        lambda: xs % 4 < 2,
        lambda: (ys // 2 + xs // 2) % 2 == 0,
        lambda: ((ys + xs) // 2 + (ys - xs) // 2) % 2 == 0,
        lambda: (ys % 4 < 2) & (xs % 4 < 2),
        lambda: ~((ys % 4 < 2) & (xs % 4 < 2)),
        lambda: (ys % 4 == 0) | (xs % 4 == 0),
        lambda: ((ys + xs) % 4 == 0) | ((ys - xs) % 4 == 0),
        lambda: _NOISE_TILE[ys % PHASES, xs % PHASES],
        lambda: np.ones_like(ys, dtype=bool),
    )
    return patterns[texture]()


def fill_with_texture(silhouettes: np.ndarray, textures: np.ndarray, seed: int) -> np.ndarray:
    """uint8 ``(N, H, W)`` silhouettes (white on black) filled with texture ``textures[i]`` each, at a
    random phase per image drawn from ``seed``; the silhouette's grey edge scales the texture, so
    anti-aliased outlines stay anti-aliased."""
    n, height, width = silhouettes.shape
    phases = np.random.default_rng(seed).integers(0, PHASES, size=(n, 2))
    ys, xs = np.mgrid[0:height, 0:width]
    out = np.empty_like(silhouettes)
    for i in range(n):
        on = texture_pattern(int(textures[i]), ys + phases[i, 0], xs + phases[i, 1])
        level = np.where(on, BRIGHT, DARK)  # (H, W)
        out[i] = np.round(silhouettes[i].astype(np.float32) / 255.0 * level).astype(np.uint8)
    return out


def conflicting_textures(shapes: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """For each shape label a, a texture label b != a, uniform over the other classes (seeded)."""
    shift = np.random.default_rng(seed).integers(1, num_classes, size=len(shapes))  # 1 .. C - 1
    return (shapes + shift) % num_classes


def cue_conflict_images(
    silhouettes: np.ndarray, shapes: np.ndarray, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(images, texture labels)``: the silhouette of class a filled with the texture of a class b != a."""
    textures = conflicting_textures(shapes, num_classes, seed)
    return fill_with_texture(silhouettes, textures, seed + 1), textures


def shape_bias(predictions, shapes, textures) -> dict:
    """Geirhos et al. 2019: of the decisions that name the shape's or the texture's class, the share
    that names the shape; with the counts and the share of decisions that name neither."""
    predictions, shapes, textures = (np.asarray(a) for a in (predictions, shapes, textures))
    shape = int((predictions == shapes).sum())
    texture = int((predictions == textures).sum())
    total = len(predictions)
    return {
        "shape_bias": shape / (shape + texture) if shape + texture else float("nan"),
        "shape_decisions": shape,
        "texture_decisions": texture,
        "neither_share": (total - shape - texture) / total if total else float("nan"),
        "images": total,
    }
