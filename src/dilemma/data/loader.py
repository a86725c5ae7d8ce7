"""Batches for pretraining and evaluation.

Pretraining batches are a pure function of ``(seed, step)``: the epoch's permutation comes from
``(seed, epoch)`` and the augmentation RNG from ``(seed, step)``. Resuming at step ``s`` therefore
replays exactly the batches an uninterrupted run would have seen, with any number of workers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dilemma.data.sets import ImageSet
from dilemma.errors import DilemmaError


class Batch(NamedTuple):
    views: tuple[torch.Tensor, ...]  # the method's views, each uint8 (n, C, S', S'); the encoder normalises
    labels: torch.Tensor  # (n,)
    problems: list[str]  # bad image files met (and replaced) in this batch: "path: reason"


class PretrainBatches(Dataset):
    """``dataset[step]`` -> ``Batch``: the method's views (a tuple of batches) for global step
    ``step`` (drop-last epochs), decoded and augmented where this runs (a DataLoader worker).

    With ``world_size > 1`` each rank takes its share ``rank::world_size`` of the global batch.
    """

    def __init__(
        self,
        images: ImageSet,
        batch_size: int,
        views: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + step * 7919 + self.rank)
            return Batch(self.views(images), labels, problems)


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
