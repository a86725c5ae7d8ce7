"""Data sources, the embedded split, batches and data errors."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from dilemma.data import load_source
from dilemma.errors import DilemmaError


@pytest.fixture(scope="module")
def animal():
    return load_source("animal-mnist", img_size=28, in_chans=1)


def test_embedded_split_is_stratified_and_duplicate_free(animal):
    assert len(animal.train) == 8000 and len(animal.val) == 2000
    assert torch.bincount(animal.val.labels).tolist() == [200] * 10
    assert torch.bincount(animal.train.labels).tolist() == [800] * 10
    assert animal.train.images.shape == (8000, 1, 28, 28) and animal.train.images.dtype == torch.uint8
    train_hashes = {hashlib.sha1(x.numpy().tobytes()).digest() for x in animal.train.images}
    val_hashes = [hashlib.sha1(x.numpy().tobytes()).digest() for x in animal.val.images]
    assert not train_hashes & set(val_hashes)
    assert len(set(val_hashes)) == len(val_hashes)
    assert animal.classes[0] == "Bear" and animal.classes[-1] == "Zebra"


def test_split_is_seeded(animal):
    again = load_source("animal-mnist", img_size=28, in_chans=1)
    other = load_source("animal-mnist", img_size=28, in_chans=1, seed=1)
    assert torch.equal(again.val.images, animal.val.images)
    assert not torch.equal(other.val.images, animal.val.images)


def test_resize_and_channels():
    s = load_source("animal-mnist", img_size=32, in_chans=3)
    assert s.train.load([0, 1]).shape == (2, 3, 32, 32)


def test_fashion_mnist_idx_folder(shared_datasets):
    s = load_source(str(shared_datasets / "fashion-mnist"), img_size=28, in_chans=1)
    assert len(s.train) == 60000 and len(s.val) == 10000 and s.classes[0] == "T-shirt/top"
    assert torch.bincount(s.val.labels).tolist() == [1000] * 10


def _write_pngs(folder, layout):
    rng = np.random.default_rng(0)
    for name in layout:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = "RGB" if name.endswith("rgb.png") else "L"
        shape = (20, 24, 3) if mode == "RGB" else (24, 20)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


def test_labelled_image_folder(tmp_path):
    _write_pngs(tmp_path, [f"{c}/{i}{'rgb' if i % 2 else ''}.png" for c in ("cat", "dog") for i in range(10)])
    s = load_source(str(tmp_path), img_size=16, in_chans=1, val_fraction=0.2)
    assert s.classes == ["cat", "dog"] and len(s.train) == 16 and len(s.val) == 4
    assert s.train.load([0, 1, 2]).shape == (3, 1, 16, 16)


def test_unlabelled_folder_and_train_val_layout(tmp_path):
    _write_pngs(tmp_path / "flat", [f"{i}.png" for i in range(10)])
    flat = load_source(str(tmp_path / "flat"), img_size=8, in_chans=3)
    assert not flat.labelled and (flat.train.labels == -1).all() and flat.train.load([0]).shape == (1, 3, 8, 8)
    _write_pngs(tmp_path / "tv", [f"{split}/{c}/{i}.png" for split in ("train", "val") for c in "ab" for i in range(3)])
    tv = load_source(str(tmp_path / "tv"), img_size=8, in_chans=1)
    assert len(tv.train) == 6 and len(tv.val) == 6 and tv.classes == ["a", "b"]


def test_data_errors(tmp_path):
    with pytest.raises(DilemmaError, match="neither an embedded dataset"):
        load_source(str(tmp_path / "missing"), img_size=28, in_chans=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DilemmaError, match="no images found"):
        load_source(str(tmp_path / "empty"), img_size=28, in_chans=1)


def test_a_bad_file_is_found_when_read(tmp_path):
    """Streaming: nothing is decoded up front; a bad file fails when read, or is replaced
    (training) / left out (evaluation) and reported with ``skip_bad``."""
    _write_pngs(tmp_path / "bad", [f"a/{i}.png" for i in range(5)])
    (tmp_path / "bad" / "a" / "0.png").write_bytes(b"not a png")
    for skip in (False, True):
        s = load_source(str(tmp_path / "bad"), img_size=8, in_chans=1, val_fraction=0.4, skip_bad=skip)
        assert len(s.train) + len(s.val) == 5
        where = next(
            (part, i) for part in (s.train, s.val) for i in range(len(part)) if part.paths[i].endswith("0.png")
        )
        part, i = where
        images, labels, problems = part.raw([i])
        assert len(images) == 1 and len(problems) == 1 and "0.png: unreadable" in problems[0]
        if skip:
            x, y = part.load_eval(range(len(part)))
            assert len(x) == len(y) == len(part) - 1
        else:
            with pytest.raises(DilemmaError, match=r"cannot read image .*0.png.*unreadable.*skip_bad_images"):
                part.load_eval(range(len(part)))


def test_pictures_take_their_images_from_several_classes():
    from dilemma.data import spread_over_classes

    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    assert spread_over_classes(labels, 5) == [0, 3, 5, 1, 4]  # each class in turn
    assert spread_over_classes(torch.full((4,), -1), 3) == [0, 1, 2]  # unlabelled: in order
    assert spread_over_classes(labels, 20) == list(range(8))
