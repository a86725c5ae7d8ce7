"""Batches for pretraining and evaluation.

Pretraining batches are a pure function of ``(seed, step)``: the epoch's permutation comes from
``(seed, epoch)`` and each image's views from a seed of ``(seed, step, its row in the global
batch)``. Resuming at step ``s`` therefore replays exactly the batches an uninterrupted run would
have seen, with any number of workers, and an image gets the same views however many processes
share the global batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dilemma.data.augment import Views
from dilemma.data.sets import ImageSet
from dilemma.errors import DilemmaError

_MASK64 = 2**64 - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser: nearby integers -> unrelated 64-bit ones."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def image_seed(seed: int, step: int, row: int) -> int:
    """The seed of one image's views at ``step``: a function of the run's seed, the step and the
    image's row in the global batch, not of which process or worker makes them. 32 bits: torch's
    CPU generator keeps no more."""
    return _mix(_mix(_mix(seed & _MASK64) + step) + row) >> 32


class Batch(NamedTuple):
    views: tuple[torch.Tensor, ...]  # the method's views after the worker stage, each uint8 (n, C, S', S')
    draws: tuple[torch.Tensor, ...]  # per view (n, Photometric.DRAWS): the device stage's uniforms (Views.finish)
    labels: torch.Tensor  # (n,)
    problems: list[str]  # bad image files met (and replaced) in this batch: "path: reason"


class PretrainBatches(Dataset):
    """``dataset[step]`` -> ``Batch``: the method's views (a tuple of batches) for global step
    ``step`` (drop-last epochs), decoded and cropped where this runs (a DataLoader worker); the
    trainer finishes them on its device (``Views.finish``).

    With ``world_size > 1`` each rank takes its share ``rank::world_size`` of the global batch.
    """

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        views: Views,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.images, self.batch_size, self.views, self.seed = images, batch_size, views, seed
        self.rank, self.world_size = rank, world_size
        self._order: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, its permutation)
        self.steps_per_epoch = len(images) // batch_size
        if self.steps_per_epoch < 1:
            raise DilemmaError(
                f"the training split has {len(images)} images, fewer than one batch of {batch_size}: "
                "lower data.batch_size"
            )

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of the training images, a function of ``(seed, epoch)`` (the last one cached)."""
        if self._order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = (epoch, torch.randperm(len(self.images), generator=generator))
        return self._order[1]

    def indices(self, step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        batch = self._epoch_order(epoch)[within * self.batch_size : (within + 1) * self.batch_size]
        return batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        return 2**62  # an endless stream of steps; the sampler decides which ones

    def __getitem__(self, step: int) -> Batch:
        images, labels, problems = self.images.raw(self.indices(step))
        rows = range(self.rank, self.batch_size, self.world_size)  # this rank's rows of the global batch
        crops, draws = self.views.crops(images, [image_seed(self.seed, step, row) for row in rows])
        return Batch(crops, draws, labels, problems)


def pretrain_loader(
    batches: PretrainBatches, start_step: int, end_step: int, num_workers: int, pin_memory: bool
) -> DataLoader:
    return DataLoader(
        batches,
        sampler=range(start_step, end_step),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers else None,
    )


def spread_over_classes(labels: torch.Tensor, n: int) -> list[int]:
    """``n`` indices that take the classes in turn (the first image of each class, then the second,
    ...), so a picture of a few images shows several classes; unlabelled images in order."""
    if n >= len(labels) or bool((labels < 0).all()):
        return list(range(min(n, len(labels))))
    per_class = [torch.nonzero(labels == c).flatten().tolist() for c in labels.unique().tolist()]
    order = [idx for rank in range(max(map(len, per_class))) for idx in (c[rank] for c in per_class if rank < len(c))]
    return order[:n]


class _EvalBatches(Dataset):
    def __init__(self, images: ImageSet, batch_size: int):
        self.images, self.batch_size = images, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images.load_eval(range(b * self.batch_size, min((b + 1) * self.batch_size, len(self.images))))


def eval_batches(images: ImageSet, batch_size: int, *, num_workers: int = 0, desc: str | None = None):
    """Yield ``(uint8 images (n, C, S, S), labels)`` in order, without augmentation, decoded by
    ``num_workers`` processes; a progress bar when ``desc`` names it."""
    batches = _EvalBatches(images, batch_size)
    loader = DataLoader(batches, batch_size=None, num_workers=num_workers, prefetch_factor=4 if num_workers else None)
    yield from tqdm(loader, desc=desc, disable=desc is None, unit="batch", leave=False, dynamic_ncols=True)
