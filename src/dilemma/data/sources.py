"""Where images come from: the embedded Animal-MNIST, MNIST-IDX folders (held in memory at the
model's size), and image folders or file lists (streamed from disk, ``folders.py``).

Every source becomes a ``Splits`` of two ``ImageSet``s (train, val) with integer labels (-1 when
the source is unlabelled).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dilemma.data.folders import (
    IMAGE_SUFFIXES,
    LIST_SUFFIXES,
    VAL_FOLDERS,
    FileImageSet,
    Listing,
    PathTable,
    fingerprint,
    list_classes,
    read_file_list,
)
from dilemma.data.sets import Splits, TensorImageSet
from dilemma.data.shards import is_shard_folder, load_shards
from dilemma.data.texture import cue_conflict_images, fill_with_texture
from dilemma.errors import DilemmaError

EMBEDDED = {
    "animal-mnist": {
        "images": "animal-images-idx3-ubyte.gz",
        "labels": "animal-labels-idx1-ubyte.gz",
        "classes": ["Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra"],
    },
}


MAX_IDX_BYTES = 2**30  # an IDX set is read whole into memory: larger ones belong in an image folder


def _idx_bytes(path) -> bytes:
    """The bytes of an IDX file (gzip-compressed or not), at most ``MAX_IDX_BYTES`` once decompressed;
    a special file (FIFO, device) is refused unread."""
    if isinstance(path, Path) and not path.is_file():
        raise DilemmaError(f"{str(path)!r} is not a regular file (a FIFO, device or broken link?)")
    with path.open("rb") as f:
        head = f.read(2)
        f.seek(0)
        stream = gzip.GzipFile(fileobj=f) if head == b"\x1f\x8b" else f
        raw = stream.read(MAX_IDX_BYTES + 1)
    if len(raw) > MAX_IDX_BYTES:
        raise DilemmaError(
            f"IDX file {str(path)!r} holds over {MAX_IDX_BYTES >> 30} GB: sets that large are not read into memory; "
            "convert it to an image folder"
        )
    return raw


def read_idx(path) -> np.ndarray:
    """Read an MNIST IDX file (optionally gzip-compressed): uint8 images (N, H, W) or labels (N,)."""
    try:
        raw = _idx_bytes(path)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DilemmaError(f"cannot read IDX file {str(path)!r}: {err}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 4:
        raise DilemmaError(f"{str(path)!r} is not an MNIST IDX file of uint8 data (1 to 4 dimensions)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=min(len(raw), 4 + 4 * ndim))
    if data.size != math.prod(dims):  # Python integers: a header's product cannot overflow
        raise DilemmaError(f"IDX file {str(path)!r} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _check_idx_pair(prefix: str, images: np.ndarray, labels: np.ndarray, folder: Path) -> None:
    where = f"IDX pair {prefix!r} in {str(folder)!r}"
    if labels.ndim != 1:
        raise DilemmaError(f"{where}: labels must be one number per image, got shape {list(labels.shape)}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DilemmaError(f"{where}: images must be (N, H, W) or (N, H, W, 1 or 3), got shape {list(images.shape)}")
    if len(images) != len(labels):
        raise DilemmaError(f"{where} has {len(images)} images but {len(labels)} labels")
    if not len(images) or min(images.shape[1:3]) < 1:
        raise DilemmaError(f"{where} holds no images")


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


def split_train_val(keys: Sequence[bytes], labels: np.ndarray, val_fraction: float, seed: int):
    """Seeded, stratified split. ``keys`` are equal for exact duplicates (content or a fingerprint
    of it), which never go to val: each image that has a twin stays in train, so no val image has a
    copy in train. Returns (train_idx, val_idx)."""
    digests = [hashlib.sha1(key).digest() for key in keys]
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
    train_idx, val_idx = split_train_val([image.tobytes() for image in images], labels, val_fraction, seed)
    return _tensor_splits_from(
        name, images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], classes, img_size, in_chans
    )


def _tensor_splits_from(name, train_x, train_y, val_x, val_y, classes, img_size, in_chans) -> Splits:
    def make(x, y):
        return TensorImageSet(to_model_size(x, img_size, in_chans), torch.from_numpy(y.astype(np.int64)))

    return Splits(name, make(train_x, train_y), make(val_x, val_y), classes)


def _embedded_arrays(name: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    spec = EMBEDDED[name]
    root = importlib.resources.files("dilemma.data").joinpath(name.replace("-", "_"))
    return read_idx(root.joinpath(spec["images"])), read_idx(root.joinpath(spec["labels"])), spec["classes"]


def load_embedded(name: str, img_size: int, in_chans: int, val_fraction: float, seed: int) -> Splits:
    return _tensor_splits(name, *_embedded_arrays(name), img_size, in_chans, val_fraction, seed)


TEXTURED = "animal-texture"  # Animal-MNIST's silhouettes filled with a texture per class (``texture.py``)


def _silhouette_split(val_fraction: float, seed: int):
    """Animal-MNIST's ``(train_x, train_y, val_x, val_y, classes)``, split exactly as ``load_embedded``
    splits it: a textured image's silhouette is in val exactly when it is in Animal-MNIST's val."""
    images, labels, classes = _embedded_arrays("animal-mnist")
    train_idx, val_idx = split_train_val([image.tobytes() for image in images], labels, val_fraction, seed)
    return images[train_idx], labels[train_idx], images[val_idx], labels[val_idx], classes


def load_textured(img_size: int, in_chans: int, val_fraction: float, seed: int) -> Splits:
    """Animal-Texture: shape and texture agree (each silhouette wears its own class's texture); the
    texture phases are drawn from ``seed`` (train) and ``seed + 1`` (val)."""
    train_x, train_y, val_x, val_y, classes, _ = memory_arrays(TEXTURED, val_fraction, seed)
    splits = _tensor_splits_from(TEXTURED, train_x, train_y, val_x, val_y, classes, img_size, in_chans)
    splits.notes.append("Animal-MNIST silhouettes filled with a texture per class")
    return splits


def load_cue_conflict(
    img_size: int, in_chans: int, val_fraction: float, seed: int
) -> tuple[TensorImageSet, torch.Tensor]:
    """The cue-conflict set on Animal-MNIST's val silhouettes: ``(images labelled by shape, texture
    labels)``, each silhouette of class a filled with the texture of a class b != a (``seed + 2``)."""
    _, _, val_x, val_y, classes = _silhouette_split(val_fraction, seed)
    images, textures = cue_conflict_images(val_x, val_y, len(classes), seed + 2)
    images = TensorImageSet(to_model_size(images, img_size, in_chans), torch.from_numpy(val_y.astype(np.int64)))
    return images, torch.from_numpy(textures.astype(np.int64))


def _find_idx(folder: Path) -> dict[str, Path]:
    """IDX files in ``folder`` (or torchvision's ``*/raw`` layout), keyed by file stem."""
    for candidate in [folder, folder / "raw", *sorted(folder.glob("*/raw"))]:
        found = {p.name.removesuffix(".gz"): p for p in sorted(candidate.glob("*-idx[13]-ubyte*"))}
        if found:
            return found
    return {}


def idx_folder_arrays(folder: Path, val_fraction: float, seed: int):
    """An MNIST-IDX folder's ``(train_x, train_y, val_x, val_y, classes, notes)`` at its own size: a
    ``train`` + ``t10k`` pair as train / val, a single set split like Animal-MNIST."""
    files = _find_idx(folder)
    image_files = sorted(k for k in files if "-images-idx3-ubyte" in k)
    pairs = {}
    for key in image_files:
        prefix = key.split("-images-idx3-ubyte")[0]
        label_key = f"{prefix}-labels-idx1-ubyte"
        if label_key not in files:
            raise DilemmaError(f"{str(files[key])!r} has no matching labels file {label_key}[.gz] beside it")
        pairs[prefix] = (read_idx(files[key]), read_idx(files[label_key]))
    if not pairs:
        raise DilemmaError(f"{str(folder)!r} holds IDX files but no *-images-idx3-ubyte[.gz] file")
    for prefix, (x, y) in pairs.items():
        _check_idx_pair(prefix, x, y, folder)
    distinct = np.unique(np.concatenate([y for _, y in pairs.values()]))
    classes, notes = [str(c) for c in distinct], ["MNIST-IDX folder"]
    if not np.array_equal(distinct, np.arange(len(distinct))):  # gaps: renumber, and say so
        pairs = {k: (x, np.searchsorted(distinct, y)) for k, (x, y) in pairs.items()}
        notes.append(f"labels {', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''} renumbered")
    elif len(classes) == 10 and "fashion" in str(folder).lower():
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
        return train_x, train_y, val_x, val_y, classes, notes
    if len(pairs) != 1:
        raise DilemmaError(f"{str(folder)!r} holds IDX sets {sorted(pairs)}: expected one set, or train + t10k")
    ((x, y),) = pairs.values()
    train_idx, val_idx = split_train_val([image.tobytes() for image in x], y, val_fraction, seed)
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx], classes, notes


def load_idx_folder(folder: Path, img_size: int, in_chans: int, val_fraction: float, seed: int) -> Splits:
    train_x, train_y, val_x, val_y, classes, notes = idx_folder_arrays(folder, val_fraction, seed)
    splits = _tensor_splits_from(folder.name, train_x, train_y, val_x, val_y, classes, img_size, in_chans)
    splits.notes += notes
    return splits


def memory_arrays(source: str, val_fraction: float, seed: int):
    """``(train_x, train_y, val_x, val_y, classes, notes)`` of a source held in memory (embedded,
    Animal-Texture, an MNIST-IDX folder) at its own size, split as training splits it; None for a
    source of files."""
    if source in EMBEDDED:
        return (*_silhouette_split(val_fraction, seed), [f"embedded {source}"])
    if source == TEXTURED:
        train_x, train_y, val_x, val_y, classes = _silhouette_split(val_fraction, seed)
        train_x, val_x = fill_with_texture(train_x, train_y, seed), fill_with_texture(val_x, val_y, seed + 1)
        return train_x, train_y, val_x, val_y, classes, [TEXTURED]
    path = Path(source).expanduser()
    if path.is_dir() and _find_idx(path):
        return idx_folder_arrays(path, val_fraction, seed)
    return None


def _fingerprints(listing: Listing, skip_bad: bool) -> tuple[Listing, list[bytes]]:
    """Each file's fingerprint (8 KiB read). A file that cannot be opened stops the listing with its
    name, or with ``skip_bad`` is left out and counted."""
    keep, keys = [], []
    for i, path in enumerate(listing.paths):
        try:
            keys.append(fingerprint(path))
            keep.append(i)
        except OSError as err:
            if not skip_bad:
                raise DilemmaError(
                    f"cannot read image {path}: {err.strerror or err}. Fix its permissions, or set "
                    "data.skip_bad_images=true to leave it out"
                ) from None
            listing.skipped["unreadable files"] += 1
            listing.unreadable.append(f"{path}: {err.strerror or err}")
    if len(keep) < len(listing.paths):
        listing = Listing(
            [listing.paths[i] for i in keep],
            [listing.labels[i] for i in keep],
            listing.classes,
            listing.ignored,
            listing.skipped,
            listing.notes,
            listing.unreadable,
        )
    return listing, keys


def _split(listing: Listing, keys: list[bytes], val_fraction: float, seed: int) -> tuple[Listing, Listing]:
    train_idx, val_idx = split_train_val(keys, np.array(listing.labels), val_fraction, seed)

    def part(idx):
        return Listing([listing.paths[i] for i in idx], [listing.labels[i] for i in idx], listing.classes)

    return part(train_idx), part(val_idx)


def _with_classes(listing: Listing, classes: list[str], where: str) -> Listing:
    """``listing`` (a val folder) relabelled by the train split's class names."""
    unknown = sorted(set(listing.classes) - set(classes))
    if unknown:
        raise DilemmaError(f"{where} has class folders that train/ lacks: {unknown[:5]}")
    index = {c: classes.index(c) for c in listing.classes}
    return Listing(listing.paths, [index[listing.classes[y]] for y in listing.labels], classes)


def _list_val(val_dir: Path, train: Listing, skip_bad: bool) -> Listing:
    """The held-out ``val_dir`` beside ``train/``, relabelled by train's classes and fingerprinted; what
    it passes over is counted in ``train``'s ``skipped`` and ``unreadable``, reported once for both."""
    val = list_classes(val_dir, skip_bad)
    if train.classes and not val.classes and val.paths:
        raise DilemmaError(
            f"{str(val_dir)!r} holds images but no class folders: sort them into class folders "
            "like train/'s (for ImageNet, its valprep.sh does this)"
        )
    if train.classes:
        val = _with_classes(val, train.classes, str(val_dir))
    val, _ = _fingerprints(val, skip_bad)
    train.skipped.update(val.skipped)
    train.unreadable += val.unreadable
    if not val.paths:
        raise DilemmaError(f"{str(val_dir)!r} holds no images: add the held-out images, or remove the folder")
    return val


def _list_layout(source: Path, skip_bad: bool) -> tuple[Listing, Listing | None, str]:
    """``(listing, val, note)``: what ``source`` holds, its own val split (None: split ``listing`` by
    data.val_fraction) and a note naming the layout found."""
    if not (source.is_file() or source.is_dir()):
        raise DilemmaError(f"data source {str(source)!r} is not a folder or a regular file (a FIFO, socket or device?)")
    if source.is_file():
        if source.suffix.lower() not in LIST_SUFFIXES:
            kinds = ", ".join(sorted(LIST_SUFFIXES))
            raise DilemmaError(f"data source {str(source)!r} is a file; point it at a folder or a file list ({kinds})")
        return read_file_list(source), None, "file list"
    if (source / "train").is_dir():
        listing = list_classes(source / "train", skip_bad)
        val_dir = next((source / v for v in VAL_FOLDERS if (source / v).is_dir()), None)
        if val_dir is None:
            return listing, None, "train/ split by data.val_fraction"
        return listing, _list_val(val_dir, listing, skip_bad), f"train/ + {val_dir.name}/"
    listing = list_classes(source, skip_bad)
    return listing, None, "class folders" if listing.classes else "flat folder, unlabelled"


def _listing_notes(listing: Listing) -> list[str]:
    """The listing's own notes, then what it ignored and skipped (read once fingerprinting has counted
    the unreadable files)."""
    notes = list(listing.notes)
    if listing.ignored:
        notes.append(f"{listing.ignored} image files beside the class folders ignored")
    return notes + [f"{count} skipped ({reason})" for reason, count in sorted(listing.skipped.items())]


def _no_val_error(source: Path, keys: list[bytes], split: bool, val_fraction: float) -> DilemmaError:
    """Why no image could be held out: too few images without a twin (an image with an exact copy
    stays in train), or too few images."""
    copies = Counter(keys)
    without_twin = sum(1 for key in keys if copies[key] == 1)
    if split and without_twin < len(keys) and without_twin * val_fraction < 0.5:
        return DilemmaError(
            f"{str(source)!r} holds {len(keys)} images, {len(keys) - without_twin} of them with an exact copy: an "
            "image with a copy never goes to val (a val image must have no copy in train), and the "
            f"{without_twin} without one are too few to hold out any; add distinct images, or give the held-out "
            "images as a val/ folder"
        )
    return DilemmaError(f"{str(source)!r} is too small to hold out a val split: add images or raise data.val_fraction")


def list_image_source(
    source: Path, val_fraction: float, seed: int, skip_bad: bool = False
) -> tuple[Listing, Listing, list[str]]:
    """``(train, val, notes)`` of an image folder or a file list (layouts: ``folders.py``)."""
    listing, val, layout = _list_layout(source, skip_bad)
    if not listing.paths:
        raise DilemmaError(
            f"no images found in {str(source)!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
            "point data.source at a folder of images, of class folders, or of train/ and val/"
        )
    listing, keys = _fingerprints(listing, skip_bad)
    notes = [layout, *_listing_notes(listing)]
    split = val is None  # no val folder: hold out data.val_fraction of the listing
    train, val = _split(listing, keys, val_fraction, seed) if val is None else (listing, val)
    train.skipped, train.unreadable = listing.skipped, listing.unreadable
    if not val.paths:
        raise _no_val_error(source, keys, split, val_fraction)
    return train, val, notes


def load_image_source(
    source: Path, img_size: int, in_chans: int, crop_pct: float, val_fraction: float, seed: int, skip_bad: bool
) -> Splits:
    """Files listed now, decoded when read (``FileImageSet``)."""
    train, val, notes = list_image_source(source, val_fraction, seed, skip_bad)

    def make(listing: Listing) -> FileImageSet:
        labels = torch.tensor(listing.labels, dtype=torch.long)
        return FileImageSet(PathTable(listing.paths), labels, img_size, in_chans, crop_pct, skip_bad)

    name = source.stem if source.is_file() else source.name
    return Splits(name, make(train), make(val), train.classes, notes)


def load_source(
    source: str,
    *,
    img_size: int,
    in_chans: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_bad: bool = False,
    crop_pct: float = 1.0,
) -> Splits:
    """Resolve ``data.source``: an embedded name, a shard folder (``dilemma shard``), an MNIST-IDX
    folder, an image folder or a file list."""
    if source in EMBEDDED:
        return load_embedded(source, img_size, in_chans, val_fraction, seed)
    if source == TEXTURED:
        return load_textured(img_size, in_chans, val_fraction, seed)
    path = Path(source).expanduser()
    if not path.exists():
        raise DilemmaError(
            f"data source {source!r} is neither an embedded dataset ({', '.join([*EMBEDDED, TEXTURED])}) "
            "nor an existing folder or file list"
        )
    if is_shard_folder(path):
        return load_shards(path, img_size, in_chans, crop_pct, skip_bad)
    if path.is_dir() and next(path.glob("*.tar"), None) is not None:
        raise DilemmaError(
            f"{str(path)!r} holds .tar files but no manifest.json: index them (and write one) with "
            f"dilemma shard --index {path}"
        )
    if path.is_dir() and _find_idx(path):
        return load_idx_folder(path, img_size, in_chans, val_fraction, seed)
    return load_image_source(path, img_size, in_chans, crop_pct, val_fraction, seed, skip_bad)
