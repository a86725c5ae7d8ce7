"""Data: sources (embedded, MNIST-IDX, image folders), augmentations, batches."""

from dilemma.data.augment import MultiViews, TwoViews, ViewSettings, multi_crop, normalize, view_transform
from dilemma.data.loader import PretrainBatches, eval_batches, pretrain_loader, spread_over_classes
from dilemma.data.sources import EMBEDDED, ImageSet, Splits, load_source, read_idx, split_train_val

__all__ = [
    "EMBEDDED",
    "ImageSet",
    "MultiViews",
    "PretrainBatches",
    "Splits",
    "TwoViews",
    "ViewSettings",
    "eval_batches",
    "load_source",
    "multi_crop",
    "normalize",
    "pretrain_loader",
    "read_idx",
    "split_train_val",
    "spread_over_classes",
    "view_transform",
]
