"""Shards (``dilemma shard``, ``data.source: <shard folder>``): other tools read them, conversion is
deterministic and resumable, and training on shards is training on the same files."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dilemma.cli import main
from dilemma.data import PretrainBatches, load_source
from dilemma.data.sharding import make_shards
from dilemma.data.shards import MANIFEST, folder_lock, index_path, read_manifest
from dilemma.errors import DilemmaError
from tests.imagefolder import make_image_folder

CROP = dict(img_size=32, in_chans=3, val_fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 8 images, JPEG and PNG, of different sizes."""
    root = tmp_path_factory.mktemp("images")
    make_image_folder(root, classes=3, per_class=5, sizes=(36, 70), suffix=".jpg")
    make_image_folder(root, classes=3, per_class=3, sizes=(36, 70), seed=1, suffix=".png")
    # the second call wrote img_00000..2.png beside img_00000..4.jpg: both kept (different names)
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "s"
    make_shards(str(folder), out, samples_per_shard=5, val_fraction=0.25, workers=1, show_progress=False)
    return out


def _listing(folder: Path):
    from dilemma.data import list_image_source

    train, val, _ = list_image_source(folder, 0.25, 0)
    return {"train": train, "val": val}


def test_other_tools_read_the_same_bytes_as_the_files(folder, shards):
    """tarfile and webdataset read every sample: the original file's bytes (never re-encoded), its
    label in ``.cls``, its key its position in the split's listing."""
    wds = pytest.importorskip("webdataset")
    listing = _listing(folder)
    manifest = read_manifest(shards)
    for split in ("train", "val"):
        seen = {}
        for entry in manifest["splits"][split]["shards"]:
            with tarfile.open(shards / entry["name"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar}
            for sample in wds.WebDataset(str(shards / entry["name"]), shardshuffle=False):
                position = int(sample["__key__"])
                path = listing[split].paths[position]
                ext = Path(path).suffix.lower().lstrip(".")
                assert sample[ext] == Path(path).read_bytes() == members[f"{sample['__key__']}.{ext}"]
                assert int(sample["cls"]) == listing[split].labels[position]
                seen[position] = True
        assert sorted(seen) == list(range(len(listing[split].paths)))  # every file once
    assert manifest["classes"] == listing["train"].classes


def test_the_same_input_gives_byte_identical_shards_serial_or_parallel(folder, shards, tmp_path):
    again = tmp_path / "again"
    make_shards(str(folder), again, samples_per_shard=5, val_fraction=0.25, workers=2, show_progress=False)
    names = sorted(p.name for p in shards.iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in again.iterdir() if not p.name.startswith("."))
    assert len([n for n in names if n.endswith(".tar")]) == 6  # 18 train / 6 val in shards of 5
    for name in names:
        assert (shards / name).read_bytes() == (again / name).read_bytes(), name


def test_a_killed_conversion_continues_and_a_different_one_is_refused(folder, shards, tmp_path, capsys):
    """A killed conversion leaves whole shards (index written last), temp files and no manifest;
    started again with the same plan it writes the rest, byte-identical to an uninterrupted one."""
    out = tmp_path / "killed"
    make_shards(str(folder), out, samples_per_shard=5, val_fraction=0.25, workers=1, show_progress=False)
    (out / MANIFEST).unlink()
    (out / "train-000002.tar").rename(out / ".train-000002.tar.tmp-999")  # mid-write
    index_path(out / "train-000002.tar").unlink()
    index_path(out / "val-000001.tar").unlink()  # killed between the tar and its index
    assert main(["shard", str(folder), "--out", str(out), "--samples-per-shard", "5", "--val-fraction", "0.25",
                 "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    assert "resuming the conversion" in capsys.readouterr().err
    for name in (p.name for p in shards.iterdir() if not p.name.startswith(".")):
        assert (shards / name).read_bytes() == (out / name).read_bytes(), name
    with pytest.raises(DilemmaError, match="another source or with other settings"):
        make_shards(str(folder), out, samples_per_shard=4, val_fraction=0.25, workers=1, show_progress=False)


def test_shards_give_the_same_batches_and_eval_images_as_the_folder(folder, shards):
    a, b = load_source(str(folder), **CROP), load_source(str(shards), **CROP)
    assert a.classes == b.classes and len(a.train) == len(b.train) and len(a.val) == len(b.val)
    assert torch.equal(a.train.labels.long(), b.train.labels.long())
    from dilemma.build import build_views
    from dilemma.config import load_config

    views = build_views(load_config(None, ["model.img_size=32", "model.in_chans=3", "model.patch_size=8"]))
    for step in (0, 3):  # the second epoch's permutation too
        x, y = PretrainBatches(a.train, 8, views, 0)[step], PretrainBatches(b.train, 8, views, 0)[step]
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views, strict=True))
        assert all(torch.equal(u, v) for u, v in zip(x.draws, y.draws, strict=True))
        assert torch.equal(x.labels, y.labels)
    ea, eb = a.val.load_eval(range(len(a.val))), b.val.load_eval(range(len(b.val)))
    assert torch.equal(ea[0], eb[0]) and torch.equal(ea[1], eb[1])


def test_memory_sources_become_png_shards_of_the_same_pixels(tmp_path):
    out = tmp_path / "animal"
    make_shards("animal-mnist", out, samples_per_shard=4000, workers=1, show_progress=False)
    a = load_source("animal-mnist", img_size=28, in_chans=1)
    b = load_source(str(out), img_size=28, in_chans=1)
    assert len(a.train) == len(b.train) == 8000 and a.classes == b.classes
    picked = [0, 17, 7999]
    assert torch.equal(a.train.load_eval(picked)[0], b.train.load_eval(picked)[0])
    assert torch.equal(a.train.labels[picked], b.train.labels[picked].long())


def test_tars_made_by_another_tool_are_indexed_with_one_command(tmp_path, capsys):
    """WebDataset's own TarWriter, keys that are not numbers, a val shard named as such: ``dilemma
    shard --index`` writes the indexes and a manifest, and the samples read back byte for byte."""
    wds = pytest.importorskip("webdataset")
    from PIL import Image

    folder, rng, written = tmp_path / "wds", np.random.default_rng(0), {}
    folder.mkdir()
    for name, count in (("data-train-000000.tar", 5), ("data-train-000001.tar", 4), ("data-val-000000.tar", 3)):
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(count):
                img = Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8))
                key = f"{name[5:-4]}_photo_{i}"
                sink.write({"__key__": key, "png": img, "cls": i % 2})
                written[key] = img
    with pytest.raises(DilemmaError, match=r"holds .tar files but no manifest.json: .*dilemma shard --index"):
        load_source(str(folder), img_size=20, in_chans=3)
    assert main(["shard", "--index", str(folder)]) == 0
    splits = load_source(str(folder), img_size=20, in_chans=3)
    assert (len(splits.train), len(splits.val), splits.classes) == (9, 3, ["0", "1"])
    first = splits.train.decode(0)
    assert np.array_equal(np.asarray(first), np.asarray(written["train-000000_photo_0"]))
    assert [int(v) for v in splits.val.labels] == [0, 1, 0]


def test_check_data_verify_names_a_shard_whose_checksum_differs(folder, shards, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    assert main(["check-data", str(copy), "--verify", "--no-progress", "--workers", "1"]) == 0
    assert "0 problems in 6 shards of 24 samples" in capsys.readouterr().out
    index = np.load(index_path(copy / "train-000001.tar"))
    with open(copy / "train-000001.tar", "r+b") as f:  # one byte of an image changed, the size kept
        f.seek(int(index["offset"][0]) + int(index["size"][0]) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SystemExit) as exit_status:
        main(["check-data", str(copy), "--verify", "--no-progress", "--workers", "1"])
    assert exit_status.value.code == 1
    out = capsys.readouterr().out
    assert "bad: shard 'train-000001.tar': checksum mismatch" in out and "1 problems" in out


def test_a_damaged_sample_is_replaced_and_counted_with_skip_bad_images(folder, shards, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    index = np.load(index_path(copy / "train-000000.tar"))
    with open(copy / "train-000000.tar", "r+b") as f:  # the first sample's bytes no longer an image
        f.seek(int(index["offset"][0]))
        f.write(b"\0" * int(index["size"][0]))
    images = load_source(str(copy), **CROP, skip_bad=True).train
    position = int(index["position"][0])
    got, _, problems = images.raw([position])
    assert len(got) == 1 and len(problems) == 1 and problems[0].startswith(f"train-000000.tar:{position:09d}.")
    keys = ["model.img_size=32", "model.in_chans=3", "model.patch_size=8", "data.batch_size=18", "model.depth=1",
            "data.val_fraction=0.25", "train.show_progress=false", "eval.knn_at_end=false"]  # fmt: skip
    sets = [arg for kv in keys for arg in ("--set", kv)] + ["--max-steps", "1", "--device", "cpu"]
    assert main(["pretrain", "--data", str(copy), "--out", str(tmp_path / "r1"), *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read image train-000000.tar:{position:09d}.") and err.count("\n") == 1
    run = ["pretrain", "--data", str(copy), "--out", str(tmp_path / "r2"), *sets, "--set", "data.skip_bad_images=true"]
    assert main(run) == 0
    assert "warning: skipped unreadable image train-000000.tar" in capsys.readouterr().err


def test_a_folder_being_written_is_refused_until_the_writer_ends(shards, tmp_path):
    fd = folder_lock(shards, exclusive=True)  # as a dilemma shard process holds it
    try:
        with pytest.raises(DilemmaError, match=r"is being written by a dilemma shard process \(pid \d+\)"):
            load_source(str(shards), **CROP)
    finally:
        os.close(fd)
    assert len(load_source(str(shards), **CROP).train) == 18


def test_a_shard_rewritten_while_training_reads_it_is_named(folder, shards, tmp_path):
    """The reader keeps a handle on each shard; a shard written into afterwards (another size, or
    other bytes where the index points) is named, never read as another sample."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    images = load_source(str(copy), **CROP).train
    index = np.load(index_path(copy / "train-000000.tar"))
    first, second = int(index["position"][0]), int(index["position"][1])
    images.decode_pixels(first)  # the shard is open now
    with open(copy / "train-000000.tar", "r+b") as f:
        f.seek(int(index["offset"][1]) - 512)
        f.write(b"\0" * 512)  # the second sample's header overwritten in place
    from dilemma.data import BadImage

    with pytest.raises(BadImage, match="the index does not match the tar"):
        images.decode_pixels(second)
    with open(copy / "train-000001.tar", "ab") as f:
        f.write(b"\0" * 1024)  # appended to: its size is not the manifest's
    other = int(np.load(index_path(copy / "train-000001.tar"))["position"][0])
    with pytest.raises(BadImage, match="changed since its manifest was written"):
        images.decode_pixels(other)


def test_start_up_reads_only_the_manifest_and_indexes_into_compact_arrays(shards):
    """16 bytes per sample (shard, offset in blocks, size, label), nothing per sample in Python objects."""
    images = load_source(str(shards), **CROP).train
    arrays = (images.shard, images.block, images.size, images.labels.numpy())
    assert sum(a.itemsize for a in arrays) == 16 and all(len(a) == 18 for a in arrays)


def test_the_manifest_holds_what_the_issue_lists(shards):
    manifest = json.loads((shards / MANIFEST).read_text())
    assert manifest["format"] == "dilemma-shards-v1"
    assert set(manifest["made_from"]) >= {"source", "layout", "val_fraction", "split_seed"}
    entry = manifest["splits"]["train"]["shards"][0]
    assert set(entry) == {"name", "index", "samples", "bytes", "sha256"}
    assert entry["bytes"] == (shards / entry["name"]).stat().st_size


def test_loader_workers_read_shards_with_their_own_handles(shards):
    """Forked DataLoader workers inherit the set (its arrays, not its open files) and give the
    batches one process gives."""
    from dilemma.build import build_views
    from dilemma.config import load_config
    from dilemma.data import pretrain_loader

    views = build_views(load_config(None, ["model.img_size=32", "model.in_chans=3", "model.patch_size=8"]))
    images = load_source(str(shards), **CROP).train
    images.decode_pixels(0)  # a handle open in the parent before the fork
    batches = PretrainBatches(images, 6, views, 0)
    with_workers = list(pretrain_loader(batches, 0, 4, num_workers=2, pin_memory=False))
    for step, batch in enumerate(with_workers):
        alone = batches[step]
        assert all(torch.equal(u, v) for u, v in zip(batch.views, alone.views, strict=True))
        assert torch.equal(batch.labels, alone.labels)


def test_skip_bad_leaves_unreadable_files_out_and_a_resume_says_the_same(folder, tmp_path, capsys):
    """--skip-bad: a broken file is left out (named on stderr, listed in the manifest), the others
    keep their listing order; a file-list entry without an image extension gets its format's."""
    import shutil

    source = tmp_path / "src"
    shutil.copytree(folder, source)
    (source / "class_1" / "img_00002.jpg").write_bytes(b"not a JPEG")
    shutil.copy(source / "class_0" / "img_00000.jpg", source / "class_0" / "img_00001.jpg")  # still a JPEG
    out = tmp_path / "shards"
    with pytest.raises(DilemmaError, match=r"img_00002.jpg: not an image PIL can read. .*--skip-bad"):
        make_shards(str(source), out, samples_per_shard=5, val_fraction=0.25, workers=1, show_progress=False)
    shutil.rmtree(out)
    manifest = make_shards(str(source), out, samples_per_shard=5, val_fraction=0.25, workers=1, skip_bad=True,
                           show_progress=False)  # fmt: skip
    assert "warning: left out unreadable image" in capsys.readouterr().err
    assert [Path(p).name for p in manifest["skipped"]] == ["img_00002.jpg"]
    files = load_source(str(source), **CROP)
    bad = next(i for i in range(len(files.train)) if files.train.paths[i].endswith("class_1/img_00002.jpg"))
    shards = load_source(str(out), **CROP)
    assert len(shards.train) == len(files.train) - 1
    keep = [i for i in range(len(files.train)) if i != bad]
    assert torch.equal(shards.train.labels.long(), files.train.labels[keep])
    (out / MANIFEST).unlink()  # killed before the manifest: the resume lists the same files
    index_path(out / "val-000000.tar").unlink()
    assert make_shards(str(source), out, samples_per_shard=5, val_fraction=0.25, workers=1, skip_bad=True,
                       show_progress=False)["skipped"] == manifest["skipped"]  # fmt: skip


def test_a_listed_file_without_an_image_extension_gets_its_formats(folder, tmp_path):
    listed = tmp_path / "photo_without_extension"
    listed.write_bytes(next(folder.rglob("*.png")).read_bytes())
    others = sorted(folder.rglob("*.jpg"))[:7]
    (tmp_path / "list.csv").write_text("".join(f"{p},{i % 2}\n" for i, p in enumerate([listed, *others])))
    out = tmp_path / "shards"
    make_shards(str(tmp_path / "list.csv"), out, samples_per_shard=100, val_fraction=0.25, workers=1,
                show_progress=False)  # fmt: skip
    names = [m for tar in out.glob("*.tar") for m in tarfile.open(tar).getnames()]
    assert sum(n.endswith(".png") for n in names) == 1 and sum(n.endswith(".jpg") for n in names) == 7
