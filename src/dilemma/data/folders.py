"""Image files streamed from disk: folder layouts and file lists, decoded lazily.

A folder is listed once (paths and labels, O(files) memory, nothing written anywhere); images
are decoded only when a batch needs them, in the DataLoader workers. Training views crop the
full-resolution image (``raw``); evaluation resizes the short side to ``img_size / crop_pct`` and
takes the centre (``load_eval``), as timm's eval transform does.

Layouts (``sources.list_image_source`` notes which one was found, for the start line):
- ``ROOT/train/<class>/...`` with ``ROOT/val/<class>/...`` (or ``test/``, ``validation/``):
  ImageNet, ImageNet-100, Imagenette; ``ROOT/train`` alone is split by ``data.val_fraction``.
- ``ROOT/<class>/...``: class folders (images at any depth below them), split by ``val_fraction``;
  image files directly in ``ROOT`` beside class folders are ignored and counted.
- ``ROOT/*.jpg``: a flat, unlabelled folder.
- a text / CSV file list: one ``path[,label]`` per line (paths relative to the list's folder).
Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``) are never read; only regular
files are listed, each real folder is entered once (link loops are skipped), and every file or
folder passed over is counted for the start line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import shlex
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from dilemma.data.sets import ImageSet
from dilemma.errors import DilemmaError

try:  # torchvision's libjpeg-turbo binding; deprecated from 0.29 in favour of TorchCodec: without it PIL decodes all
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a torchvision without it
    decode_jpeg = None

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
LIST_SUFFIXES = {".txt", ".csv", ".tsv"}
VAL_FOLDERS = ("val", "validation", "test")
MIN_IMAGE_SIDE = 4  # pixels; anything smaller is not an image worth resizing
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# JPEGs are decoded at a reduced scale (PIL draft) only while the short side stays >= this x the model size
DECODE_MARGIN = 4
EXIF_ORIENTATION = 0x0112
JPEG_START = b"\xff\xd8\xff"  # start-of-image marker and the next marker's first byte
FAST_DECODE_MAX_BYTES = 32 * 2**20  # larger files stream through PIL: memory must not follow file sizes


class BadImage(Exception):
    """An image file that cannot be used (``reason`` says why)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class PathTable:
    """Many file paths in two numpy arrays (the file system's bytes and offsets), not a list of
    ``str``: a DataLoader worker reading a Python list touches every object's refcount, so each
    worker would end up with its own copy of a 1.28 M-path list. Names that are not valid UTF-8
    round-trip (``os.fsencode`` / ``os.fsdecode``)."""

    def __init__(self, paths: list[str]):
        encoded = [os.fsencode(p) for p in paths]
        self._bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return os.fsdecode(self._bytes[start : int(self._ends[i])].tobytes())


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):  # a broken EXIF block: keep the pixels as stored
        return img


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` as 8-bit ``L`` or ``RGB``: 16/32-bit greyscale scaled (not clipped) to 0-255,
    transparency (RGBA, LA, palette with a transparent colour) composited on ``BACKGROUND``,
    CMYK / YCbCr / palette converted by PIL."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("floating-point image (mode F): its value range is unknown")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == mode else img.convert(mode)


def decode(source: str | bytes | bytearray | memoryview, mode: str, min_side: int = 0, name: str = "") -> Image.Image:
    """The image at ``source`` (a path, or a file's bytes named ``name``) upright (EXIF orientation
    applied) in ``mode``; raises ``BadImage``. ``min_side``: a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale while its short side stays >= this."""
    in_memory = not isinstance(source, str)
    name = name or (str(source) if not in_memory else "<bytes>")
    try:
        if (len(source) if in_memory else os.path.getsize(source)) == 0:
            raise BadImage(name, "empty (0-byte) file")
        with Image.open(io.BytesIO(source) if in_memory else source) as img:
            if min(img.size) < MIN_IMAGE_SIDE:
                raise BadImage(name, f"{img.size[0]}x{img.size[1]} px, smaller than {MIN_IMAGE_SIDE} px")
            if min_side and img.format == "JPEG":
                img.draft(img.mode if img.mode in ("L", "RGB") else None, (min_side, min_side))
            img.load()
            return _to_mode(_exif_upright(img), mode)
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(name, "file not found") from None
    except Image.DecompressionBombError:
        raise BadImage(
            name, f"too large (over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError) as err:
        raise BadImage(name, f"unreadable ({err})") from None


def _decodes_like_pil(img: Image.Image, mode: str, min_side: int) -> bool:
    """Whether torchvision's JPEG decoder gives exactly ``decode``'s pixels for ``img`` (an opened,
    not yet decoded file): a JPEG already in ``mode``, stored upright, that draft mode would not
    reduce. Both decode with libjpeg-turbo (tested equal)."""
    return (
        img.format == "JPEG"
        and img.mode == mode
        and min(img.size) >= MIN_IMAGE_SIDE
        and (not min_side or min(img.size[0] // min_side, img.size[1] // min_side) < 2)
        and img.getexif().get(EXIF_ORIENTATION, 1) == 1
    )


def _jpeg_tensor(data: bytearray | memoryview, mode: str, min_side: int) -> torch.Tensor | None:
    """A JPEG file's bytes (writable) decoded by torchvision where the pixels are exactly ``decode``'s, else None."""
    if decode_jpeg is None or bytes(data[:3]) != JPEG_START or len(data) > FAST_DECODE_MAX_BYTES:
        return None
    with Image.open(io.BytesIO(data)) as img:
        if not _decodes_like_pil(img, mode, min_side):
            return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29+: "use TorchCodec"
        read_mode = ImageReadMode.GRAY if mode == "L" else ImageReadMode.RGB
        return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=read_mode)


def _fast_jpeg(path: str, mode: str, min_side: int) -> torch.Tensor | None:
    """The pixels from torchvision's JPEG decoder where they are exactly ``decode``'s, else None."""
    if decode_jpeg is None:
        return None
    with open(path, "rb") as f:
        head = f.read(3)
        if head != JPEG_START or os.fstat(f.fileno()).st_size > FAST_DECODE_MAX_BYTES:
            return None
        data = bytearray(head + f.read())  # the rest at once: PIL's many small header reads from a file cost more
    return _jpeg_tensor(data, mode, min_side)


def decode_pixels(source: str | bytearray | memoryview, mode: str, min_side: int = 0, name: str = "") -> torch.Tensor:
    """``decode`` as uint8 ``(C, H, W)``; ``source`` a path or a file's bytes (writable). The common
    JPEG goes straight into a tensor with torchvision's decoder (the same pixels, faster than PIL + a
    copy: benchmarks/results/data_loading.md); every other file, and any the fast path refuses,
    through ``decode``, which also names what is wrong with a bad one."""
    try:
        pixels = _fast_jpeg(source, mode, min_side) if isinstance(source, str) else _jpeg_tensor(source, mode, min_side)
    except Exception:  # whatever the fast path refuses, decode() reads or names
        pixels = None
    return pixels if pixels is not None else pil_to_uint8(decode(source, mode, min_side, name))


def centre_view(img: Image.Image, size: int, crop_pct: float) -> Image.Image:
    """Short side to ``round(size / crop_pct)`` (bicubic), then the centre ``size x size``."""
    scale = round(size / crop_pct) / min(img.size)
    w, h = max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale))
    img = img.resize((w, h), Image.BICUBIC, reducing_gap=None)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """PIL ``L`` / ``RGB`` -> uint8 ``(C, H, W)``, channels last in memory (as PIL stores it; torch's
    resampling kernels read that layout fastest)."""
    array = np.array(img, dtype=np.uint8)  # a writable copy
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


@dataclass
class Listing:
    """What a folder or list holds: absolute paths, labels (-1: unlabelled), class names, what was
    ignored or passed over, and notes for the start line."""

    paths: list[str]
    labels: list[int]
    classes: list[str]
    ignored: int = 0  # image files outside the layout (beside class folders)
    skipped: Counter = field(default_factory=Counter)  # what was passed over, by reason
    notes: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # "path: reason" of folders / files passed over


def list_images(root: Path, skip_bad: bool = False) -> tuple[list[str], Counter, list[str]]:
    """Image files below ``root`` (relative, sorted; hidden files and folders skipped) and what was
    passed over. Only regular files are listed: a FIFO, socket or device named like an image would
    block or mislead a reader, so it is skipped and counted, as is a broken link. Each real folder
    is entered once (links followed, a link loop or a second link to a folder seen already skipped
    and counted). A folder that cannot be read stops the listing with its name, or with
    ``skip_bad`` is left out and counted. Names the file system's encoding cannot decode are kept
    as Python's surrogate-escaped ``str`` (``PathTable`` stores their bytes)."""
    found, skipped, seen, unreadable = [], Counter(), set(), []
    pending = [("", str(root))]
    while pending:
        rel, folder = pending.pop()
        try:
            status = os.stat(folder)
            if (status.st_dev, status.st_ino) in seen:
                skipped["folders reached again through a link: a loop or a second link"] += 1
                continue
            seen.add((status.st_dev, status.st_ino))
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda e: e.name)
        except OSError as err:
            if not skip_bad:
                raise DilemmaError(
                    f"cannot read folder {folder!r}: {err.strerror or err}. Fix its permissions, or set "
                    "data.skip_bad_images=true to leave it out"
                ) from None
            skipped["unreadable folders"] += 1
            unreadable.append(f"{folder}: {err.strerror or err} (a folder; its images not counted)")
            continue
        for entry in entries:
            if _hidden(entry.name):
                continue
            try:
                if entry.is_dir():  # follows links; each real folder once (above)
                    pending.append((os.path.join(rel, entry.name), entry.path))
                    continue
                regular = entry.is_file()
            except OSError:  # vanished, or a link we may not follow
                regular = False
            if os.path.splitext(entry.name)[1].lower() not in IMAGE_SUFFIXES:
                continue
            if regular:
                found.append(os.path.join(rel, entry.name))
            else:
                skipped["special files (FIFOs, sockets, devices) or broken links named like images"] += 1
    return sorted(found), skipped, unreadable


def list_classes(root: Path, skip_bad: bool = False) -> Listing:
    """Class folders if ``root`` has sub-folders holding images (loose files beside them ignored),
    else a flat, unlabelled folder."""
    files, skipped, unreadable = list_images(root, skip_bad)
    nested = [f for f in files if os.sep in f]
    if nested:
        classes = sorted({f.split(os.sep, 1)[0] for f in nested})
        index = {c: i for i, c in enumerate(classes)}
        return Listing(
            [str(root / f) for f in nested],
            [index[f.split(os.sep, 1)[0]] for f in nested],
            classes,
            ignored=len(files) - len(nested),
            skipped=skipped,
            unreadable=unreadable,
        )
    return Listing([str(root / f) for f in files], [-1] * len(files), [], skipped=skipped, unreadable=unreadable)


def _read_text(path: Path) -> str:
    """A text file as spreadsheets and editors write it: UTF-8 (with or without a BOM) or UTF-16
    with a BOM; any line ends."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DilemmaError(f"cannot read file list {str(path)!r}: {err.strerror or err}") from None
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as err:
        raise DilemmaError(
            f"file list {str(path)!r} is not UTF-8 (byte {err.start}); save it as UTF-8 (or UTF-16 with a BOM)"
        ) from None


def _fields(line: str, folder: Path) -> list[str]:
    """A list line's fields: comma- or tab-separated (quotes as CSV writes them), else a path and an
    optional label separated by spaces; a line that names an existing file whole is a path alone
    (file names may hold spaces)."""
    if "," in line or "\t" in line:
        return [f.strip() for f in next(csv.reader([line], delimiter="," if "," in line else "\t"))]
    if '"' in line or "'" in line:
        try:
            return shlex.split(line)
        except ValueError:
            pass
    whole = Path(line).expanduser()
    if " " not in line or (whole if whole.is_absolute() else folder / whole).is_file():
        return [line]
    return [f.strip() for f in line.rsplit(None, 1)]


def _integer_labels(values: list[str], where: str) -> tuple[list[int], list[str], list[str]]:
    """Integer labels -> ``(labels 0..K-1, class names, notes)``: labels that are not 0..K-1 (gaps,
    huge values) are renumbered in order, and the note says so."""
    ints = [int(v) for v in values]
    if min(ints) < 0:
        raise DilemmaError(f"{where}: labels must be >= 0, got {min(ints)}")
    spellings: dict[int, set[str]] = {}
    for value, text in zip(ints, values, strict=True):
        spellings.setdefault(value, set()).add(text)
    merged = [sorted(texts) for texts in spellings.values() if len(texts) > 1]
    notes = [  # "007" and "7" are one class: say so, the user may have meant two
        "labels read as integers: " + "; ".join(" and ".join(map(repr, texts)) + f" are class {int(texts[0])}"
                                                for texts in merged[:3]) + ("; ..." if len(merged) > 3 else "")
    ] if merged else []  # fmt: skip
    distinct = sorted(set(ints))
    if distinct == list(range(len(distinct))):
        return ints, [str(c) for c in distinct], notes
    index = {value: i for i, value in enumerate(distinct)}
    shown = ", ".join(str(v) for v in distinct[:5]) + (", ..." if len(distinct) > 5 else "")
    note = f"labels {shown} renumbered 0..{len(distinct) - 1}"
    return [index[v] for v in ints], [str(v) for v in distinct], [*notes, note]


def read_file_list(path: Path) -> Listing:
    """``path[,label]`` lines (comma, tab or space separated; ``#`` comments; an optional header);
    labels are integers or class names; relative paths are relative to the list's folder."""
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = _fields(line, path.parent)
        if not rows and fields[0].lower() in ("path", "file", "filename", "image"):
            continue  # a header: the first line that is not a comment
        if len(fields) > 2 or not fields[0]:
            raise DilemmaError(f"{str(path)!r} line {number}: expected 'path' or 'path,label', got {line[:200]!r}")
        rows.append((fields[0], fields[1] if len(fields) == 2 and fields[1] else None))
    if not rows:
        raise DilemmaError(f"file list {str(path)!r} names no images")
    labelled = [label is not None for _, label in rows]
    if any(labelled) and not all(labelled):
        raise DilemmaError(f"file list {str(path)!r}: give a label on every line or on none")
    paths = [str(p if (p := Path(name).expanduser()).is_absolute() else path.parent / p) for name, _ in rows]
    missing = [p for p in paths if not os.path.isfile(p)]  # isfile: regular files only (no FIFO, device)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        kind = (
            "missing files" if not any(os.path.exists(p) for p in missing) else "files that are missing or not regular"
        )
        raise DilemmaError(f"file list {str(path)!r} names {len(missing)} {kind}: {missing[:3]}{more}")
    if not all(labelled):
        return Listing(paths, [-1] * len(paths), [])
    names = [label for _, label in rows]
    if all(re.fullmatch(r"-?[0-9]+", n) for n in names):  # ASCII digits ("²".isdigit() is True)
        labels, classes, notes = _integer_labels(names, f"file list {str(path)!r}")
        return Listing(paths, labels, classes, notes=notes)
    classes = sorted(set(names))
    index = {c: i for i, c in enumerate(classes)}
    return Listing(paths, [index[n] for n in names], classes)


def fingerprint(path: str) -> bytes:
    """Size + the first and last 4 KiB: equal for exact duplicates, read in O(1) per file."""
    with open(path, "rb") as f:
        head = f.read(4096)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(len(head), size - 4096))
        tail = f.read(4096)
    return hashlib.sha1(size.to_bytes(8, "little") + head + tail).digest()


class FileImageSet(ImageSet):
    """Image files on disk, decoded on demand (see the module docstring)."""

    def __init__(
        self, paths: PathTable, labels: torch.Tensor, img_size: int, in_chans: int, crop_pct: float, skip_bad: bool
    ):
        self.paths, self.labels, self.skip_bad = paths, labels, skip_bad
        self.img_size, self.in_chans, self.crop_pct = img_size, in_chans, crop_pct
        self.mode = "L" if in_chans == 1 else "RGB"

    def decode(self, index: int, min_side: int = 0) -> Image.Image:
        return decode(self.paths[index], self.mode, min_side)

    def decode_pixels(self, index: int, min_side: int = 0) -> torch.Tensor:
        return decode_pixels(self.paths[index], self.mode, min_side)

    def load_eval(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation views (short side to S / crop_pct, centre crop) and labels. A bad image
        fails, or with ``skip_bad`` is left out (with a warning on stderr)."""
        images, labels = [], []
        for i in indices:
            try:
                img = centre_view(self.decode(int(i), self.img_size), self.img_size, self.crop_pct)
            except BadImage as bad:
                if not self.skip_bad:
                    raise DilemmaError(
                        f"cannot read image {bad}. Remove or replace it, or set data.skip_bad_images=true "
                        "(dilemma check-data lists every bad file)"
                    ) from None
                print(f"warning: left out of evaluation: {bad}", file=sys.stderr)
                continue
            images.append(pil_to_uint8(img))
            labels.append(int(self.labels[int(i)]))
        if not images:  # every image of the batch was unreadable
            empty = torch.empty((0, self.in_chans, self.img_size, self.img_size), dtype=torch.uint8)
            return empty, torch.empty(0, dtype=torch.long)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long)

    def raw(self, indices) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
        """``(images, labels, problems)`` for training views: each image uint8 ``(C, H, W)`` at full
        resolution (a JPEG at most reduced to ``DECODE_MARGIN`` x the model size). A bad image is
        replaced by another one (the same one on every run) and reported in ``problems``."""
        images, labels, problems = [], [], []
        for i in indices:
            i = int(i)
            for attempt in range(16):
                j = (i + attempt * 7919) % len(self)  # deterministic stand-ins for a bad file
                try:
                    images.append(self.decode_pixels(j, DECODE_MARGIN * self.img_size))
                    labels.append(int(self.labels[j]))
                    break
                except BadImage as bad:
                    problems.append(f"{bad.path}: {bad.reason}")
            else:
                raise DilemmaError(f"16 images in a row could not be read, the last: {problems[-1]}")
        return images, torch.tensor(labels, dtype=torch.long), problems


def inspect_file(path: str) -> tuple[str, str | None, tuple[int, int] | None, str | None]:
    """``(path, problem or None, (width, height), stored mode)``: one file fully decoded."""
    try:
        size = decode(path, "RGB").size
        with Image.open(path) as img:
            return path, None, size, img.mode
    except BadImage as bad:
        return path, bad.reason, None, None
    except OSError as err:
        return path, f"unreadable ({err})", None, None


def scan_files(paths: list[str], workers: int, show_progress: bool = True):
    """Decode every file (``workers`` processes); yields ``inspect_file`` results in order."""
    from multiprocessing import get_context

    from tqdm import tqdm

    bar = tqdm(total=len(paths), disable=not show_progress, unit="img", desc="decoding", dynamic_ncols=True)
    if workers <= 1:
        for path in paths:
            bar.update(1)
            yield inspect_file(path)
    else:
        with get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(inspect_file, paths, chunksize=64):
                bar.update(1)
                yield result
    bar.close()
