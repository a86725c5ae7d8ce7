"""``dilemma shard``: any data source -> a shard folder (``shards.py``), and indexes for tars without.

The source is listed and split exactly as training would list and split it (``data.val_fraction``,
the split seed), so training on the shards or on the source sees the same images in the same order.
Each split's samples go to the shards in a seeded random order, ``samples_per_shard`` a shard. The
conversion is deterministic (the same input gives byte-identical shards), parallel over processes
(one shard a task), and resumable: a shard is whole once its index exists, and a conversion started
again with the same plan keeps the shards written and makes the rest. The manifest comes last.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from dilemma.data.shards import (
    FORMAT,
    MANIFEST,
    PLAN,
    SPLITS,
    ShardJob,
    index_path,
    index_tar,
    process_pool,
    read_manifest,
    save_index,
    sha256_of,
    write_manifest,
    write_shard,
    writing,
)
from dilemma.data.sources import list_image_source, memory_arrays
from dilemma.errors import DilemmaError
from dilemma.files import atomic_write_text


def _listing(source: str, val_fraction: float, seed: int, skip_bad: bool) -> tuple[dict, list[str], dict]:
    """``(per split: (paths or None, arrays or None, labels), classes, made_from)``."""
    arrays = memory_arrays(source, val_fraction, seed)
    path = Path(source).expanduser()
    if arrays is not None:
        train_x, train_y, val_x, val_y, classes, notes = arrays
        parts = {"train": (None, train_x, train_y), "val": (None, val_x, val_y)}
        made = {"name": path.name if path.exists() else source, "layout": "; ".join(notes) + " (encoded as PNG)"}
    else:
        if not path.exists():
            raise DilemmaError(
                f"shard source {source!r} is neither an embedded dataset nor an existing folder or file list"
            )
        train, val, notes = list_image_source(path, val_fraction, seed, skip_bad)
        parts = {s: (listing.paths, None, np.array(listing.labels)) for s, listing in (("train", train), ("val", val))}
        classes = train.classes
        made = {"name": path.stem if path.is_file() else path.name, "layout": "; ".join(notes)}
    made.update(source=str(path.resolve()) if path.exists() else source, val_fraction=val_fraction, split_seed=seed)
    return parts, classes, made


def _jobs(folder: Path, parts: dict, samples_per_shard: int, seed: int, skip_bad: bool) -> list[ShardJob]:
    jobs = []
    for number_of_split, split in enumerate(SPLITS):
        paths, arrays, labels = parts[split]
        order = np.random.default_rng([seed, number_of_split]).permutation(len(labels))
        for number, start in enumerate(range(0, len(order), samples_per_shard)):
            positions = order[start : start + samples_per_shard]
            jobs.append(
                ShardJob(
                    folder=str(folder),
                    split=split,
                    number=number,
                    positions=tuple(int(p) for p in positions),
                    labels=tuple(int(labels[p]) for p in positions),
                    paths=None if paths is None else tuple(paths[p] for p in positions),
                    arrays=None if arrays is None else arrays[positions],
                    skip_bad=skip_bad,
                )
            )
    return jobs


def _plan(parts: dict, classes: list[str], made: dict, samples_per_shard: int, seed: int, skip_bad: bool) -> dict:
    """What the conversion makes: a conversion resumed into the folder must make the same."""
    import hashlib

    digest = hashlib.sha256()
    for split in SPLITS:
        paths, arrays, labels = parts[split]
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
        digest.update(arrays.tobytes() if arrays is not None else "\0".join(paths).encode("utf-8", "surrogateescape"))
    return {
        "format": FORMAT,
        "made_from": made,
        "classes": classes,
        "samples_per_shard": samples_per_shard,
        "shuffle_seed": seed,
        "skip_bad": skip_bad,
        "listing_sha256": digest.hexdigest(),
    }


def _claim(folder: Path, plan: dict) -> bool:
    """Whether ``folder`` (locked by this process) already holds this plan's finished shards; refuses
    a folder that holds anything else."""
    plan_file = folder / PLAN
    if plan_file.is_file():
        try:
            earlier = json.loads(plan_file.read_text())
        except (OSError, ValueError):
            earlier = None
        if earlier != plan:
            raise DilemmaError(
                f"{str(folder)!r} holds a conversion of another source or with other settings "
                f"({PLAN}): choose another --out, or remove the folder"
            )
        return (folder / MANIFEST).is_file()
    others = [p.name for p in folder.iterdir() if p.name != ".lock"]
    if others:
        raise DilemmaError(
            f"--out {str(folder)!r} is not empty ({others[0]!r}, ...): shards go into a new or empty folder"
        )
    atomic_write_text(plan_file, json.dumps(plan, indent=1) + "\n")
    return False


def _write_all(jobs: list, workers: int, show_progress: bool) -> tuple[dict, list[str]]:
    """Every shard of ``jobs`` (in ``workers`` processes), under a progress bar: ``{(split, number):
    manifest entry}`` and the paths of the images left out as unreadable."""
    from tqdm import tqdm

    bar = tqdm(
        total=sum(len(job.positions) for job in jobs), disable=not show_progress, unit="img", desc="sharding",
        dynamic_ncols=True,
    )  # fmt: skip
    entries, skipped = {}, []
    pool = process_pool(workers) if workers > 1 else None
    written = pool.imap(write_shard, jobs) if pool else map(write_shard, jobs)
    try:
        for job, (entry, bad) in zip(jobs, written, strict=True):
            entries[(job.split, job.number)] = entry
            for path, reason in bad:
                bar.write(f"warning: left out unreadable image {path}: {reason}", file=sys.stderr)
            skipped += [path for path, _ in bad]  # the manifest keeps the paths (the same after a resume)
            bar.update(len(job.positions))
    except BaseException:
        bar.leave = False  # the error line alone stays on the terminal
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    return entries, skipped


def make_shards(
    source: str,
    out: Path,
    *,
    samples_per_shard: int = 1000,
    val_fraction: float = 0.2,
    seed: int = 0,
    skip_bad: bool = False,
    workers: int = 1,
    show_progress: bool = True,
) -> dict:
    """Convert ``source`` into shards in ``out``; returns the manifest."""
    parts, classes, made = _listing(source, val_fraction, seed, skip_bad)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DilemmaError(f"cannot make --out folder {str(out)!r}: {err.strerror or err}") from None
    with writing(out):
        plan = _plan(parts, classes, made, samples_per_shard, seed, skip_bad)
        if _claim(out, plan):
            print(f"note: {out} already holds these shards; nothing to do", file=sys.stderr)
            return read_manifest(out)
        jobs = _jobs(out, parts, samples_per_shard, seed, skip_bad)
        done = sum(index_path(out / job.name).is_file() for job in jobs)
        if done:
            print(f"note: resuming the conversion in {out}: {done} of {len(jobs)} shards were written", file=sys.stderr)
        entries, skipped = _write_all(jobs, workers, show_progress)
        manifest = {
            **{k: plan[k] for k in ("format", "made_from", "classes", "samples_per_shard", "shuffle_seed")},
            "skipped": skipped,
            "splits": {
                split: {
                    "positions": len(parts[split][2]),
                    "samples": sum(e["samples"] for (s, _), e in entries.items() if s == split),
                    "shards": [e for (s, _), e in sorted(entries.items()) if s == split],
                }
                for split in SPLITS
            },
        }
        write_manifest(out, manifest)
        return manifest


def _held_out(tar_name: str) -> bool:
    """Whether a tar made by another tool holds the held-out split, by its name (``...-val-000000.tar``)."""
    return re.search(r"(^|[-_.])(val|valid|validation|test)([-_.]|$)", tar_name.lower()) is not None


def _manifest_for_tars(folder: Path) -> dict:
    """A manifest for tars made by another tool, each indexed (positions in name order); tars named
    like ``*-val-*`` / ``*-test-*`` hold the val split, the others train."""
    tars = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".tar" and not p.name.startswith("."))
    if not tars:
        raise DilemmaError(f"{str(folder)!r} holds no manifest and no .tar files: nothing to index")
    splits, labels = {split: {"positions": 0, "samples": 0, "shards": []} for split in SPLITS}, set()
    for tar in tars:
        part = splits["val" if _held_out(tar.name) else "train"]
        index = index_tar(tar, keys_are_positions=False, first_position=part["positions"])
        save_index(index, index_path(tar))
        part["positions"] += len(index)
        part["samples"] += len(index)
        part["shards"].append(
            {"name": tar.name, "index": index_path(tar).name, "samples": len(index),
             "bytes": tar.stat().st_size, "sha256": sha256_of(tar)}
        )  # fmt: skip
        labels.update(int(v) for v in np.unique(index["label"]))
    labelled = bool(labels) and min(labels) >= 0
    return {
        "format": FORMAT,
        "made_from": {"name": folder.name, "layout": "tars made by another tool", "source": str(folder.resolve())},
        "classes": [str(v) for v in range(max(labels) + 1)] if labelled else [],
        "skipped": [],
        "splits": splits,
    }


def make_indexes(folder: Path) -> dict:
    """The index of every shard of ``folder`` made again from its tar; a folder of tars made by
    another tool (no manifest) gets a manifest too. Returns the manifest."""
    with writing(folder):
        if not (folder / MANIFEST).is_file():
            manifest = _manifest_for_tars(folder)
            write_manifest(folder, manifest)
            return manifest
        manifest = read_manifest(folder)
        for split in SPLITS:
            for entry in manifest["splits"][split]["shards"]:
                tar = folder / entry["name"]
                if not tar.is_file():
                    raise DilemmaError(f"shard {entry['name']!r} is missing from {str(folder)!r}")
                save_index(index_tar(tar, keys_are_positions=True), index_path(tar))
        return manifest
