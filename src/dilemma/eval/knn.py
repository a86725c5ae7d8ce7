"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Cosine similarity of L2-normalised class-token features; the k most similar training images
vote for their label with weight ``exp(similarity / T)``; the train split is the memory bank
and the val split the queries. k and T: ``eval.knn_k``, ``eval.knn_temperature`` (`docs/method.md`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dilemma.config import EvalConfig
from dilemma.data import Splits
from dilemma.errors import DilemmaError
from dilemma.eval.features import extract_features
from dilemma.models import ViTEncoder


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    *,
    k: int,
    temperature: float,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``(Q, C)`` for each query from its k nearest training features (weighted vote)."""
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, train_feats.shape[0])
    scores = []
    for start in range(0, query_feats.shape[0], chunk):
        sims = query_feats[start : start + chunk] @ train_feats.T
        top_sims, top_idx = sims.topk(k, dim=1)
        # exp(s / T) relative to the query's best neighbour: the same ranking of classes, and no
        # overflow to inf (float32 overflows past exp(88.7), i.e. any T < 0.0113 at similarity 1)
        weights = ((top_sims - top_sims[:, :1]) / temperature).exp()
        votes = torch.zeros(top_sims.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


@dataclass
class KNNResult:
    top1: float  # percent
    top5: float | None  # percent; None with fewer than 6 classes
    protocol: str

    def line(self) -> str:
        top5 = f", top-5 {self.top5:.2f}%" if self.top5 is not None else ""
        return f"kNN top-1 {self.top1:.2f}%{top5}  [{self.protocol}]"


def knn_accuracy(
    train_f, train_y, val_f, val_y, *, k: int, temperature: float, num_classes: int
) -> tuple[float, float | None]:
    """``(top-1 %, top-5 % or None with fewer than 6 classes)`` of L2-normalised query features."""
    scores = knn_predict(train_f, train_y, val_f, k=k, temperature=temperature, num_classes=num_classes)
    top1 = (scores.argmax(1) == val_y).float().mean().item() * 100
    top5 = None
    if num_classes > 5:
        top5 = (scores.topk(5, dim=1).indices == val_y[:, None]).any(1).float().mean().item() * 100
    return top1, top5


def require_labels(splits: Splits, protocol: str) -> None:
    """A read-out needs labels and at least two classes among the training images (one class makes
    every accuracy 100 %, a number that means nothing)."""
    if not splits.labelled:
        raise DilemmaError(
            f"{protocol} needs labels, but {splits.name!r} is unlabelled: use a folder of class sub-folders"
        )
    present = splits.train.labels.unique().numel()
    if present < 2:
        raise DilemmaError(f"{protocol} needs at least 2 classes, but {splits.name!r} has {present} in its train split")


def knn_protocol(k: int, temperature: float, splits: Splits, features: str = "final-norm class tokens") -> str:
    """The protocol, flagging a k larger than the memory bank (every training image then votes)."""
    if k > len(splits.train):
        k = f"{len(splits.train)} (k={k} asked, but the train split has only {len(splits.train)} images)"
    return (
        f"weighted kNN, k={k}, T={temperature}, cosine on L2-normalised {features} of the "
        f"frozen dense backbone; bank = {splits.name} train ({len(splits.train)}), queries = val ({len(splits.val)})"
    )


def knn_eval(
    encoder: ViTEncoder,
    splits: Splits,
    settings: EvalConfig,
    *,
    device="cpu",
    num_workers: int = 0,
    show_progress: bool = False,
) -> KNNResult:
    """kNN top-1 / top-5 of ``encoder``'s features: ``settings.knn_k``, ``knn_temperature``, ``batch_size``."""
    require_labels(splits, "kNN")
    k, temperature = settings.knn_k, settings.knn_temperature
    loading = {"batch_size": settings.batch_size, "device": device, "num_workers": num_workers}
    train_f, train_y = extract_features(
        encoder, splits.train, **loading, desc="kNN: train features" if show_progress else None
    )
    val_f, val_y = extract_features(encoder, splits.val, **loading, desc="kNN: val features" if show_progress else None)
    top1, top5 = knn_accuracy(
        train_f, train_y, val_f, val_y, k=k, temperature=temperature, num_classes=len(splits.classes)
    )
    return KNNResult(top1, top5, knn_protocol(k, temperature, splits, encoder.embedding_kind()))
