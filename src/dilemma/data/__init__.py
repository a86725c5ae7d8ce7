"""Data: sources (embedded, MNIST-IDX, streamed image folders and file lists), views, batches."""

from dilemma.data.augment import MultiViews, ViewSettings, multi_crop, two_views, view_transform
from dilemma.data.folders import BadImage, FileImageSet, decode
from dilemma.data.loader import Batch, PretrainBatches, eval_batches, pretrain_loader, spread_over_classes
from dilemma.data.sets import ImageSet, Splits, TensorImageSet
from dilemma.data.sources import EMBEDDED, list_image_source, load_source, read_idx, split_train_val
from dilemma.models import normalize  # the encoder's input contract, for callers that hold pixels

__all__ = [
    "EMBEDDED",
    "BadImage",
    "Batch",
    "FileImageSet",
    "ImageSet",
    "TensorImageSet",
    "decode",
    "list_image_source",
    "MultiViews",
    "PretrainBatches",
    "Splits",
    "two_views",
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
