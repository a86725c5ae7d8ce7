"""Data: sources (embedded, MNIST-IDX, streamed image folders and file lists), views, batches."""

from dilemma.data.augment import Crop, View, Views, ViewSettings, multi_crop, two_views
from dilemma.data.folders import BadImage, FileImageSet, decode, decode_pixels
from dilemma.data.loader import Batch, PretrainBatches, eval_batches, image_seed, pretrain_loader, spread_over_classes
from dilemma.data.photometric import Photometric
from dilemma.data.sets import ImageSet, Splits, TensorImageSet
from dilemma.data.sources import EMBEDDED, list_image_source, load_source, read_idx, split_train_val
from dilemma.models import normalize  # the encoder's input contract, for callers that hold pixels

__all__ = [
    "EMBEDDED",
    "BadImage",
    "Batch",
    "Crop",
    "FileImageSet",
    "ImageSet",
    "TensorImageSet",
    "decode",
    "decode_pixels",
    "image_seed",
    "list_image_source",
    "Photometric",
    "PretrainBatches",
    "Splits",
    "two_views",
    "View",
    "Views",
    "ViewSettings",
    "eval_batches",
    "load_source",
    "multi_crop",
    "normalize",
    "pretrain_loader",
    "read_idx",
    "split_train_val",
    "spread_over_classes",
]
