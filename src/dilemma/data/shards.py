"""WebDataset-layout tar shards: written once by ``dilemma shard``, then read by index.

A shard folder::

    manifest.json          format, classes, the split and what it was made from; per split its shards,
                           each with name, sample count, bytes and sha256
    train-000000.tar       samples ``{key}.{jpg,png,...}`` (the original file's bytes, never re-encoded)
                           and ``{key}.cls`` (the label as text); plain ustar, readable by ``tarfile``,
                           ``webdataset`` and any tar tool
    train-000000.idx.npy   its offset index: per sample, its position in the split, the image bytes'
                           offset and size in the tar, and its label (a numpy record array)
    val-000000.tar ...

A sample's key is its position in the split's listing (``000001234``): the samples are spread over
the shards in a seeded random order (so that a streaming reader's shuffle buffer sees every class),
and the reader puts them back in listing order, so the same files give the same dataset whether
they are read from their folder or from shards.

Reading is random access (``ShardImageSet``): one positioned read per sample (the tar header block
and the bytes behind it, the header checked against the index), file handles kept open per
process. Start-up reads the manifest and the indexes into four compact arrays (16 bytes a sample),
which DataLoader workers share with the parent. WebDataset's own indexed reader (``wids``) was
not used: it indexes a shard by scanning its tar when it opens it and keeps a few shards open (an
LRU of 10 by default, a warning above 200), so a global permutation, which touches a random shard
at every sample, would rescan tars all the time; and current ``webdataset`` releases no longer ship it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from dilemma.data.folders import IMAGE_SUFFIXES, MIN_IMAGE_SIDE, BadImage, FileImageSet, decode, decode_pixels
from dilemma.data.sets import Splits
from dilemma.errors import DilemmaError
from dilemma.files import Locked, atomic_write_text, take_lock, written_whole

FORMAT = "dilemma-shards-v1"
MANIFEST = "manifest.json"
LOCK = ".lock"  # held (flock) by the ``dilemma shard`` process writing the folder
PLAN = ".plan.json"  # what a conversion in progress makes: a resumed one must make the same
INDEX_SUFFIX = ".idx.npy"
SPLITS = ("train", "val")
INDEX_DTYPE = np.dtype([("position", "<i8"), ("offset", "<i8"), ("size", "<i8"), ("label", "<i4")])
BLOCK = tarfile.BLOCKSIZE  # 512: a tar header block; data starts on a block boundary
OPEN_SHARDS = 64  # file handles each process keeps open (an LRU): bounded, whatever the shard count


def index_path(tar: Path) -> Path:
    return tar.with_name(tar.name.removesuffix(".tar") + INDEX_SUFFIX)


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def is_shard_folder(path: Path) -> bool:
    return (path / MANIFEST).is_file() if path.is_dir() else path.name == MANIFEST and path.is_file()


# ---- locking: one writer per shard folder, and readers that refuse a folder being written ---------


def folder_lock(folder: Path, exclusive: bool) -> int | None:
    """The folder's lock held by this process (exclusive: the writer), or (shared) only the check
    that no ``dilemma shard`` is writing it; an error naming the writer's pid."""
    try:
        return take_lock(folder / LOCK, exclusive)
    except FileNotFoundError:
        return None  # a reader of a folder no writer ever locked
    except OSError as err:
        if not exclusive:
            return None  # a read-only copy of a finished folder: nobody can be writing it
        raise DilemmaError(f"cannot write to shard folder {str(folder)!r}: {err.strerror or err}") from None
    except Locked as held:
        raise DilemmaError(
            f"shard folder {str(folder)!r} is being written by a dilemma shard process (pid {held.holder}): "
            "wait for it to finish, then start again"
        ) from None


@contextlib.contextmanager
def writing(folder: Path) -> Iterator[None]:
    """The folder's writer lock held for the block (``dilemma shard``, ``--index``)."""
    fd = folder_lock(folder, exclusive=True)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def process_pool(workers: int, **kwargs):
    """A multiprocessing pool, forked where the platform can: forked workers inherit what the parent
    holds (a set's arrays, imported torch) instead of receiving it or importing it again (~2 s each)."""
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method).Pool(workers, **kwargs)


# ---- writing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: the samples' positions in their split, and where each one's bytes come
    from (a file path, or an in-memory image encoded as PNG)."""

    folder: str
    split: str
    number: int
    positions: tuple[int, ...]
    labels: tuple[int, ...]
    paths: tuple[str, ...] | None  # files; None: ``arrays`` holds the images
    arrays: np.ndarray | None = None  # uint8 (n, H, W) or (n, H, W, C) for IDX / embedded sources
    skip_bad: bool = False

    @property
    def name(self) -> str:
        return shard_name(self.split, self.number)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def _checked_bytes(path: str) -> tuple[bytes, str]:
    """A file's bytes and the extension its member gets (the file's own, or its format's where the
    name has none, e.g. from a file list), refused (``BadImage``) unless PIL recognises an image of
    at least ``MIN_IMAGE_SIDE`` px in them (the header only: the pixels are decoded when training reads them)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise BadImage(path, f"unreadable ({err.strerror or err})") from None
    if not data:
        raise BadImage(path, "empty (0-byte) file")
    try:
        with Image.open(io.BytesIO(data)) as img:
            (width, height), kind = img.size, img.format
    except Image.DecompressionBombError:
        raise BadImage(
            path, f"too large (over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except Exception:  # noqa: BLE001 - whatever PIL cannot identify is not an image
        raise BadImage(path, "not an image PIL can read") from None
    if min(width, height) < MIN_IMAGE_SIDE:
        raise BadImage(path, f"{width}x{height} px, smaller than {MIN_IMAGE_SIDE} px")
    suffix = os.path.splitext(path)[1].lower()
    return data, suffix[1:] if suffix in IMAGE_SUFFIXES else {"JPEG": "jpg", "TIFF": "tif"}.get(kind, str(kind).lower())


def _member(name: str, size: int) -> tarfile.TarInfo:
    """A tar member header that depends on nothing but the name and size (byte-identical shards)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_shard(job: ShardJob) -> tuple[dict, list[tuple[str, str]]]:
    """Write one shard and its index (temp files renamed: a killed conversion leaves none half-written;
    the index last, so a shard whose index exists is whole). Returns its manifest entry and the
    files skipped, ``(path, reason)``. A shard already written (its index exists) is only hashed again."""
    tar_path = Path(job.folder) / job.name
    entry = {"name": job.name, "index": index_path(tar_path).name}
    if index_path(tar_path).is_file() and tar_path.is_file():  # written by an earlier, killed conversion
        index = read_index(index_path(tar_path))
        missing = sorted(set(job.positions) - set(index["position"].tolist()))
        skipped = [(job.paths[job.positions.index(p)], "left out when this shard was written") for p in missing]
        whole = {"samples": len(index), "bytes": tar_path.stat().st_size, "sha256": sha256_of(tar_path)}
        return {**entry, **whole}, skipped
    rows, skipped = [], []
    with written_whole(tar_path) as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (position, label) in enumerate(zip(job.positions, job.labels, strict=True)):
            if job.paths is None:
                data, ext = _png(job.arrays[i]), "png"
            else:
                try:
                    data, ext = _checked_bytes(job.paths[i])
                except BadImage as bad:
                    if not job.skip_bad:
                        raise DilemmaError(
                            f"cannot read image {bad}. Remove or replace it, or add --skip-bad to leave it out "
                            "(counted)"
                        ) from None
                    skipped.append((bad.path, bad.reason))
                    continue
            key = f"{position:09d}"
            offset = tar.offset + BLOCK  # ustar: one header block, then the data
            tar.addfile(_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
            if label >= 0:
                text = str(label).encode()
                tar.addfile(_member(f"{key}.cls", len(text)), io.BytesIO(text))
            rows.append((position, offset, len(data), label))
    index = np.array(rows, dtype=INDEX_DTYPE)
    save_index(index, index_path(tar_path))
    return {**entry, "samples": len(index), "bytes": tar_path.stat().st_size, "sha256": sha256_of(tar_path)}, skipped


def save_index(index: np.ndarray, path: Path) -> None:
    with written_whole(path) as f:
        np.save(f, index, allow_pickle=False)


def index_tar(tar_path: Path, keys_are_positions: bool, first_position: int = 0) -> np.ndarray:
    """The index of a tar that has none (``dilemma shard --index``), made by this tool or any other:
    per key (WebDataset's: the member name up to the first dot of its base name) the first member
    with an image extension, and the ``.cls`` label (-1 without one). Positions are the keys
    (``keys_are_positions``: this tool's shards) or ``first_position`` onwards in the tar's order."""
    images, labels = {}, {}
    try:
        with tarfile.open(tar_path, mode="r:") as tar:
            for member in tar:
                folder, base = os.path.split(member.name)
                if not member.isfile() or "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(folder, stem)
                if f".{ext.lower()}" in IMAGE_SUFFIXES and key not in images:
                    images[key] = (member.offset_data, member.size)
                elif ext == "cls":
                    text = tar.extractfile(member).read(32).strip()
                    labels[key] = int(text) if text.isdigit() else -1
    except (OSError, tarfile.TarError, EOFError) as err:
        raise DilemmaError(f"cannot read tar {str(tar_path)!r}: {err}") from None
    if keys_are_positions and not all(key.isdigit() for key in images):
        raise DilemmaError(f"{str(tar_path)!r} holds keys that are not positions (not written by dilemma shard)")
    rows = [
        (int(key) if keys_are_positions else first_position + i, offset, size, labels.get(key, -1))
        for i, (key, (offset, size)) in enumerate(images.items())
    ]
    return np.array(rows, dtype=INDEX_DTYPE)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")


# ---- reading -----------------------------------------------------------------------------------------

MAX_MANIFEST_BYTES = 512 * 2**20


def read_manifest(folder: Path) -> dict:
    """The manifest, checked: this format version, and the fields the reader needs."""
    path = folder / MANIFEST
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise DilemmaError(f"{str(path)!r} is over {MAX_MANIFEST_BYTES >> 20} MB: not a shard manifest")
        manifest = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DilemmaError(f"cannot read shard manifest {str(path)!r}: {err}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != FORMAT:
        raise DilemmaError(
            f"{str(path)!r} is a shard manifest of format {found!r}; this dilemma reads {FORMAT!r}: "
            "convert the source again with this version's dilemma shard"
        )
    try:
        for split in SPLITS:
            part = manifest["splits"][split]
            assert isinstance(part["positions"], int) and 0 <= part["positions"] < 2**40
            for entry in part["shards"]:
                assert isinstance(entry["name"], str) and os.path.basename(entry["name"]) == entry["name"]
                assert entry["name"].endswith(".tar") and not entry["name"].startswith(".")
                assert isinstance(entry["samples"], int) and isinstance(entry["bytes"], int)
                assert isinstance(entry.get("sha256"), str)
        assert isinstance(manifest["classes"], list) and all(isinstance(c, str) for c in manifest["classes"])
    except (AssertionError, KeyError, TypeError) as err:
        raise DilemmaError(f"{str(path)!r} is not a whole shard manifest ({type(err).__name__} {err})") from None
    return manifest


_NPY_HEADER = re.compile(  # what np.save writes for a 1-D index (format 1.0)
    rf"\{{'descr': {re.escape(repr(INDEX_DTYPE.descr))}, 'fortran_order': False, 'shape': \((\d+),\), \}}\s*"
)


def read_index(path: Path) -> np.ndarray:
    """A shard index (``.npy``, never unpickled). The header ``np.save`` writes for this dtype is
    matched directly: parsing 10,000 headers with ``np.load`` (``ast.literal_eval``) costs 0.7 s of a
    10M-image start-up; any other header goes through ``np.load``, which checks it."""
    data = path.read_bytes()
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        found = _NPY_HEADER.fullmatch(data[10:end].decode("latin-1"))
        if found:
            return np.frombuffer(data, INDEX_DTYPE, count=int(found.group(1)), offset=end)
    return np.load(io.BytesIO(data), allow_pickle=False)


def _index_error(folder: Path, name: str, why: str) -> DilemmaError:
    return DilemmaError(
        f"shard {name!r} in {str(folder)!r}: {why}. Rebuild its index with: dilemma shard --index {folder}"
    )


def _load_index(folder: Path, entry: dict) -> np.ndarray:
    """A shard's index, checked against its manifest entry and its tar (present, whole, the samples
    inside it)."""
    tar, name = folder / entry["name"], entry["name"]
    try:
        size = tar.stat().st_size
    except OSError:
        raise DilemmaError(f"shard {name!r} is missing from {str(folder)!r} (the manifest lists it)") from None
    if size != entry["bytes"]:
        raise DilemmaError(
            f"shard {name!r} in {str(folder)!r} holds {size} bytes, its manifest says {entry['bytes']}: truncated, "
            "or changed since the manifest was written (dilemma check-data --verify checks every shard)"
        )
    try:
        index = read_index(index_path(tar))
    except FileNotFoundError:
        why = f"has no index ({index_path(tar).name}; a tar made by another tool?)"
        raise _index_error(folder, name, why) from None
    except (OSError, ValueError, EOFError) as err:
        raise _index_error(folder, name, f"its index cannot be read ({err})") from None
    if index.dtype != INDEX_DTYPE or index.ndim != 1 or len(index) != entry["samples"]:
        raise _index_error(folder, name, f"its index does not match its manifest entry ({entry['samples']} samples)")
    ends = index["offset"] + index["size"]
    if len(index) and (
        index["offset"].min() < BLOCK or (index["offset"] % BLOCK).any() or ends.max() > size or index["size"].min() < 0
    ):
        raise _index_error(folder, name, "its index points outside the tar")
    return index


class ShardImageSet(FileImageSet):
    """One split of a shard folder: sample ``i`` is the split's listing position ``i`` (as
    ``FileImageSet`` of the same files), read with one positioned read from its shard."""

    def __init__(self, folder: Path, manifest: dict, split: str, img_size: int, in_chans: int, crop_pct, skip_bad):
        self.folder, self.skip_bad = folder, skip_bad
        self.img_size, self.in_chans, self.crop_pct = img_size, in_chans, crop_pct
        self.mode = "L" if in_chans == 1 else "RGB"
        entries = manifest["splits"][split]["shards"]
        self.names = [e["name"] for e in entries]
        self.expected_bytes = [e["bytes"] for e in entries]
        # 16 bytes a sample, filled in listing order (positions); shared with forked workers untouched
        count = manifest["splits"][split]["positions"]
        shard = np.full(count, -1, dtype=np.int32)
        block = np.zeros(count, dtype=np.uint32)  # the data's offset in 512-byte blocks (shards up to 2 TiB)
        size = np.zeros(count, dtype=np.uint32)
        label = np.full(count, -1, dtype=np.int32)
        for s, entry in enumerate(entries):
            index = _load_index(folder, entry)
            positions = index["position"]
            if len(index) and (positions.min() < 0 or positions.max() >= count):
                raise _index_error(folder, entry["name"], "its index names positions outside the split")
            if (shard[positions] >= 0).any():
                raise _index_error(folder, entry["name"], "its index repeats samples of another shard")
            shard[positions], block[positions] = s, index["offset"] // BLOCK
            size[positions], label[positions] = index["size"], index["label"]
        keep = shard >= 0
        if int(keep.sum()) != sum(e["samples"] for e in entries):  # a position twice within one index
            raise DilemmaError(
                f"the indexes of {str(folder)!r} name a sample twice: rebuild them with dilemma shard --index {folder}"
            )
        if not keep.all():  # files skipped when the shards were made: the others keep their order
            shard, block, size, label = shard[keep], block[keep], size[keep], label[keep]
        self.shard, self.block, self.size = shard, block, size
        self.labels = torch.from_numpy(label)
        self._handles: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # file handles stay in the process that opened them
        return {**self.__dict__, "_handles": OrderedDict()}

    def _handle(self, s: int) -> int:
        if self._pid != os.getpid():  # a forked worker: its own handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        if s in self._handles:
            self._handles.move_to_end(s)
            return self._handles[s]
        name = self.names[s]
        try:
            fd = os.open(self.folder / name, os.O_RDONLY)
        except OSError as err:
            raise BadImage(name, f"shard cannot be opened ({err.strerror or err})") from None
        if os.fstat(fd).st_size != self.expected_bytes[s]:
            os.close(fd)
            raise BadImage(name, "shard changed since its manifest was written (its size differs): make it again")
        self._handles[s] = fd
        if len(self._handles) > OPEN_SHARDS:
            os.close(self._handles.popitem(last=False)[1])
        return fd

    def encoded(self, index: int) -> tuple[memoryview, str]:
        """Sample ``index``'s file bytes (writable) and its name (``shard.tar:key.ext``): the header
        block and the data in one positioned read, the header checked against the index."""
        s, size = int(self.shard[index]), int(self.size[index])
        offset = int(self.block[index]) * BLOCK
        where = f"{self.names[s]}@{offset}"
        buffer = bytearray(BLOCK + size)
        fd = self._handle(s)
        got = os.preadv(fd, [buffer], offset - BLOCK) if hasattr(os, "preadv") else _pread_into(fd, buffer, offset)
        if got < len(buffer):
            raise BadImage(where, "the shard ends before this sample (truncated, or rewritten while being read)")
        try:
            member = tarfile.TarInfo.frombuf(bytes(buffer[:BLOCK]), "utf-8", "surrogateescape")
        except tarfile.TarError:
            member = None
        if member is None or member.size != size:
            why = "no tar header of this sample here: the index does not match the tar"
            raise BadImage(where, f"{why} (rebuild it: dilemma shard --index {self.folder})")
        return memoryview(buffer)[BLOCK:], f"{self.names[s]}:{member.name}"

    def decode(self, index: int, min_side: int = 0) -> Image.Image:
        data, name = self.encoded(index)
        return decode(data, self.mode, min_side, name)

    def decode_pixels(self, index: int, min_side: int = 0) -> torch.Tensor:
        data, name = self.encoded(index)
        return decode_pixels(data, self.mode, min_side, name)


def _pread_into(fd: int, buffer: bytearray, offset: int) -> int:
    data = os.pread(fd, len(buffer), offset - BLOCK)
    buffer[: len(data)] = data
    return len(data)


def load_shards(path: Path, img_size: int, in_chans: int, crop_pct: float, skip_bad: bool) -> Splits:
    """A shard folder (or its ``manifest.json``) as train / val ``ShardImageSet``s."""
    folder = path if path.is_dir() else path.parent
    folder_lock(folder, exclusive=False)  # refuses a folder a conversion is still writing
    manifest = read_manifest(folder)
    train, val = (ShardImageSet(folder, manifest, s, img_size, in_chans, crop_pct, skip_bad) for s in SPLITS)
    if not len(train):
        raise DilemmaError(f"shard folder {str(folder)!r} holds no training samples")
    if not len(val):
        raise DilemmaError(f"shard folder {str(folder)!r} holds no val samples: make the shards with a val split")
    made = manifest.get("made_from", {})
    shards = sum(len(manifest["splits"][s]["shards"]) for s in SPLITS)
    notes = [f"{shards} WebDataset shards made from {made.get('layout', 'an unknown source')}"]
    return Splits(str(made.get("name") or folder.name), train, val, list(manifest["classes"]), notes)


# ---- checking (``dilemma check-data``) -----------------------------------------------------------------


def check_shard(folder: Path, entry: dict, verify: bool) -> str | None:
    """What is wrong with one shard (missing, truncated, its index, with ``verify`` its sha256), or None."""
    try:
        _load_index(folder, entry)
    except DilemmaError as err:
        return str(err)
    if verify and sha256_of(folder / entry["name"]) != entry["sha256"]:
        return (
            f"shard {entry['name']!r}: checksum mismatch (sha256 differs from the manifest's): the file was "
            "damaged or changed; make it again, or copy it again from where it was made"
        )
    return None


_scanned: ShardImageSet | None = None  # the set a scanning worker reads (set once per worker)


def _scan_with(images: ShardImageSet) -> None:
    global _scanned
    _scanned = images


def _scan_chunk(bounds: tuple[int, int]) -> list[str]:
    problems = []
    for i in range(*bounds):
        try:
            _scanned.decode(i)
        except BadImage as bad:
            problems.append(f"{bad.path}: {bad.reason}")
    return problems


def scan_samples(images: ShardImageSet, workers: int, show_progress: bool = True) -> list[str]:
    """Every sample read and decoded (``workers`` processes, forked where the platform can: the
    set's arrays are inherited, not sent); the problems, ``name: reason``."""
    from tqdm import tqdm

    chunks = [(start, min(start + 256, len(images))) for start in range(0, len(images), 256)]
    bar = tqdm(total=len(images), disable=not show_progress, unit="img", desc="decoding", dynamic_ncols=True)
    problems, pool = [], None
    try:
        if workers <= 1 or len(chunks) <= 1:
            _scan_with(images)
            results = map(_scan_chunk, chunks)
        else:
            pool = process_pool(workers, initializer=_scan_with, initargs=(images,))
            results = pool.imap(_scan_chunk, chunks)
        for (start, stop), found in zip(chunks, results, strict=True):
            problems += found
            bar.update(stop - start)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return problems
