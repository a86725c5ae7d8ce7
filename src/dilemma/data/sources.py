"""Where images come from: the embedded Animal-MNIST, MNIST-IDX folders, and image folders.

Every source becomes a ``Splits`` of two ``ImageSet``s (train, val) that return uint8 image
tensors ``(n, C, S, S)`` at the model's size and channel count, plus integer labels (-1 when
the source is unlabelled).
"""

from __future__ import annotations

import abc
import gzip
import hashlib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from dilemma.errors import DilemmaError

EMBEDDED = {
    "animal-mnist": {
        "images": "animal-images-idx3-ubyte.gz",
        "labels": "animal-labels-idx1-ubyte.gz",
        "classes": ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"],
    },
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MIN_IMAGE_SIDE = 4  # pixels; anything smaller is not an image worth resizing


class ImageSet(abc.ABC):
    """Indexable images with labels; ``load(indices)`` gives a uint8 batch ``(n, C, S, S)``."""

    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def load(self, indices) -> torch.Tensor:
        """uint8 images ``(len(indices), C, S, S)``."""


class TensorImageSet(ImageSet):
    """Images already decoded in memory (IDX sources)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def load(self, indices) -> torch.Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)]


class FileImageSet(ImageSet):
    """Image files decoded on demand, centre-cropped to square and resized."""

    def __init__(self, paths: list[Path], labels: torch.Tensor, img_size: int, in_chans: int):
        self.paths, self.labels = paths, labels
        self.img_size, self.mode = img_size, "L" if in_chans == 1 else "RGB"

    def read(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                img = ImageOps.fit(img.convert(self.mode), (self.img_size, self.img_size), Image.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            raise DilemmaError(f"cannot read image {str(path)!r}: {err}. Remove or replace the file.") from None
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return torch.from_numpy(array.copy())

    def load(self, indices) -> torch.Tensor:
        return torch.stack([self.read(int(i)) for i in indices])


@dataclass
class Splits:
    name: str
    train: ImageSet
    val: ImageSet
    classes: list[str]

    @property
    def labelled(self) -> bool:
        return bool(self.classes)


def read_idx(path) -> np.ndarray:
    """Read an MNIST IDX file (optionally gzip-compressed): uint8 images (N, H, W) or labels (N,)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DilemmaError(f"cannot read IDX file {str(path)!r}: {err}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DilemmaError(f"{str(path)!r} is not an MNIST IDX file of uint8 data")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DilemmaError(f"IDX file {str(path)!r} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def to_model_size(images: np.ndarray, img_size: int, in_chans: int) -> torch.Tensor:
    """uint8 ``(N, H, W[, C])`` -> uint8 ``(N, in_chans, img_size, img_size)`` (bilinear, antialiased)."""
    x = torch.from_numpy(np.array(images))  # a writable copy
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[1] != in_chans:
        x = x.float().mean(1, keepdim=True).round().to(torch.uint8) if in_chans == 1 else x.expand(-1, in_chans, -1, -1)
    if tuple(x.shape[-2:]) != (img_size, img_size):
        x = F.interpolate(x.float(), size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def split_train_val(images: np.ndarray | list[bytes], labels: np.ndarray, val_fraction: float, seed: int):
    """Seeded, stratified split. Exact duplicates never go to val: each image that has a twin
    stays in train, so no val image has a copy in train. Returns (train_idx, val_idx)."""
    digests = [hashlib.sha1(bytes(item) if isinstance(item, bytes) else item.tobytes()).digest() for item in images]
    counts: dict[bytes, int] = {}
    for d in digests:
        counts[d] = counts.get(d, 0) + 1
    unique = np.array([counts[d] == 1 for d in digests])
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        candidates = rng.permutation(members[unique[members]])
        val.extend(candidates[: int(round(val_fraction * len(members)))].tolist())
    val_mask = np.zeros(len(labels), dtype=bool)
    val_mask[val] = True
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


def _tensor_splits(name, images, labels, classes, img_size, in_chans, val_fraction, seed) -> Splits:
    train_idx, val_idx = split_train_val(images, labels, val_fraction, seed)
    return _tensor_splits_from(
        name, images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], classes, img_size, in_chans
    )


def _tensor_splits_from(name, train_x, train_y, val_x, val_y, classes, img_size, in_chans) -> Splits:
    def make(x, y):
        return TensorImageSet(to_model_size(x, img_size, in_chans), torch.from_numpy(y.astype(np.int64)))

    return Splits(name, make(train_x, train_y), make(val_x, val_y), classes)


def load_embedded(name: str, img_size: int, in_chans: int, val_fraction: float, seed: int) -> Splits:
    spec = EMBEDDED[name]
    root = importlib.resources.files("dilemma.data").joinpath(name.replace("-", "_"))
    images = read_idx(root.joinpath(spec["images"]))
    labels = read_idx(root.joinpath(spec["labels"]))
    return _tensor_splits(name, images, labels, spec["classes"], img_size, in_chans, val_fraction, seed)


def _find_idx(folder: Path) -> dict[str, Path]:
    """IDX files in ``folder`` (or torchvision's ``*/raw`` layout), keyed by file stem."""
    for candidate in [folder, folder / "raw", *sorted(folder.glob("*/raw"))]:
        found = {p.name.removesuffix(".gz"): p for p in sorted(candidate.glob("*-idx[13]-ubyte*"))}
        if found:
            return found
    return {}


def load_idx_folder(folder: Path, img_size: int, in_chans: int, val_fraction: float, seed: int) -> Splits:
    files = _find_idx(folder)
    image_files = sorted(k for k in files if "-images-idx3-ubyte" in k)
    pairs = {}
    for key in image_files:
        prefix = key.split("-images-idx3-ubyte")[0]
        label_key = f"{prefix}-labels-idx1-ubyte"
        if label_key not in files:
            raise DilemmaError(f"{str(files[key])!r} has no matching labels file {label_key}[.gz] beside it")
        pairs[prefix] = (read_idx(files[key]), read_idx(files[label_key]))
    for prefix, (x, y) in pairs.items():
        if len(x) != len(y):
            raise DilemmaError(f"IDX pair {prefix!r} in {str(folder)!r} has {len(x)} images but {len(y)} labels")
    classes = [str(c) for c in range(int(max(y.max() for _, y in pairs.values())) + 1)]
    if "fashion" in str(folder).lower():
        classes = [
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ]
    if "train" in pairs and ("t10k" in pairs or "test" in pairs):
        (train_x, train_y), (val_x, val_y) = pairs["train"], pairs.get("t10k", pairs.get("test"))
        return _tensor_splits_from(folder.name, train_x, train_y, val_x, val_y, classes, img_size, in_chans)
    if len(pairs) != 1:
        raise DilemmaError(f"{str(folder)!r} holds IDX sets {sorted(pairs)}: expected one set, or train + t10k")
    ((x, y),) = pairs.values()
    return _tensor_splits(folder.name, x, y, classes, img_size, in_chans, val_fraction, seed)


def image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as a training image (None if it decodes fine)."""
    try:
        if path.stat().st_size == 0:
            return "empty (0-byte) file"
        with Image.open(path) as img:
            if min(img.size) < MIN_IMAGE_SIDE:
                return f"{img.size[0]}x{img.size[1]} px, smaller than {MIN_IMAGE_SIDE} px"
            img.load()
    except Image.DecompressionBombError:
        return f"too large (over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels)"
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
        return f"unreadable ({err})"
    return None


def check_images(files: list[Path], skip_bad: bool) -> list[Path]:
    """Decode every file once; fail listing the bad ones, or drop them with ``skip_bad`` (and say how many)."""
    bad = [(f, problem) for f in files if (problem := image_problem(f)) is not None]
    if bad and not skip_bad:
        shown = "; ".join(f"{f}: {problem}" for f, problem in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise DilemmaError(
            f"{len(bad)} of {len(files)} images cannot be used: {shown}{more}. "
            "Remove them, or set data.skip_bad_images=true to skip them"
        )
    if bad:
        import sys

        print(
            f"skipping {len(bad)} of {len(files)} images that cannot be used (data.skip_bad_images=true)",
            file=sys.stderr,
        )
        bad_set = {f for f, _ in bad}
        files = [f for f in files if f not in bad_set]
        if not files:
            raise DilemmaError("every image was skipped as unusable: nothing left to train on")
    return files


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _labelled_files(folder: Path, skip_bad: bool) -> tuple[list[Path], list[int], list[str]]:
    """``class/xxx.png`` layout (every image one folder down) or a flat, unlabelled folder."""
    files = _list_images(folder)
    if not files:
        raise DilemmaError(
            f"no images found in {str(folder)!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
            "point data.source at a folder of images or of class sub-folders"
        )
    files = check_images(files, skip_bad)
    if all(len(f.relative_to(folder).parts) == 2 for f in files):
        classes = sorted({f.parent.name for f in files})
        return files, [classes.index(f.parent.name) for f in files], classes
    return files, [-1] * len(files), []


def load_image_folder(
    folder: Path, img_size: int, in_chans: int, val_fraction: float, seed: int, skip_bad: bool = False
) -> Splits:
    """Every file is decoded once up front, so a bad image stops the run before it starts."""
    if (folder / "train").is_dir() and (folder / "val").is_dir():
        train_files, train_y, classes = _labelled_files(folder / "train", skip_bad)
        val_files, val_y, val_classes = _labelled_files(folder / "val", skip_bad)
        if val_classes != classes:
            raise DilemmaError(f"{str(folder)!r}: train/ and val/ have different class folders")
    else:
        files, labels, classes = _labelled_files(folder, skip_bad)
        y = np.array(labels)
        train_idx, val_idx = split_train_val([f.read_bytes() for f in files], y, val_fraction, seed)
        train_files, train_y = [files[i] for i in train_idx], y[train_idx].tolist()
        val_files, val_y = [files[i] for i in val_idx], y[val_idx].tolist()
    if not val_files:
        raise DilemmaError(
            f"{str(folder)!r} is too small to hold out a val split: add images or raise data.val_fraction"
        )

    def make(files, ys):
        return FileImageSet(files, torch.tensor(ys, dtype=torch.long), img_size, in_chans)

    return Splits(folder.name, make(train_files, train_y), make(val_files, val_y), classes)


def load_source(
    source: str, *, img_size: int, in_chans: int, val_fraction: float = 0.2, seed: int = 0, skip_bad: bool = False
) -> Splits:
    """Resolve ``data.source``: an embedded name, an MNIST-IDX folder, or an image folder."""
    if source in EMBEDDED:
        return load_embedded(source, img_size, in_chans, val_fraction, seed)
    folder = Path(source).expanduser()
    if not folder.exists():
        raise DilemmaError(
            f"data source {source!r} is neither an embedded dataset ({', '.join(EMBEDDED)}) nor an existing folder"
        )
    if not folder.is_dir():
        raise DilemmaError(f"data source {source!r} is a file; point it at a folder")
    if _find_idx(folder):
        return load_idx_folder(folder, img_size, in_chans, val_fraction, seed)
    return load_image_folder(folder, img_size, in_chans, val_fraction, seed, skip_bad)
