"""Indexable images with labels: the interface every data source gives the rest of the library."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Sequence

import torch


class ImageSet(abc.ABC):
    """Images and integer labels (-1 where unlabelled).

    - ``raw(indices)``: what training views crop from (full-resolution images of any size), with
      their labels and the problems met (bad files replaced by others);
    - ``load_eval(indices)``: uint8 ``(n, C, S, S)`` at the model's size, and labels;
    - ``load(indices)``: the same images without labels (pictures, tests).
    """

    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def raw(self, indices) -> tuple[Sequence, torch.Tensor, list[str]]:
        """``(images, labels, problems)``; each image a uint8 ``(C, H, W)`` tensor of any size."""

    @abc.abstractmethod
    def load_eval(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uint8 (n, C, S, S), labels (n,))``; unreadable images may be left out."""

    def load(self, indices) -> torch.Tensor:
        return self.load_eval(indices)[0]


class TensorImageSet(ImageSet):
    """Images already decoded in memory at the model's size (IDX sources, the embedded dataset)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def raw(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return self.images[indices], self.labels[indices], []

    def load_eval(self, indices):
        indices = torch.as_tensor(indices, dtype=torch.long)
        return self.images[indices], self.labels[indices]


@dataclass
class Splits:
    name: str
    train: ImageSet
    val: ImageSet
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # what the start line should say about the data

    @property
    def labelled(self) -> bool:
        return bool(self.classes)
