"""A frozen read-out fitted once and asked many times: the kNN memory bank and the linear probe on
dense, intact train features, scoring val features made under any corruption (occlusion, the
robustness panels, the cue-conflict set) with exactly the same classifiers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dilemma.config import EvalConfig
from dilemma.data import ImageSet
from dilemma.eval.corruptions import Corruption
from dilemma.eval.features import extract_features
from dilemma.eval.knn import knn_predict
from dilemma.eval.linear import LinearProbe, train_linear_probe
from dilemma.models import ViTEncoder


@dataclass
class FrozenReadout:
    encoder: ViTEncoder
    bank: torch.Tensor  # (N, D) L2-normalised train features
    bank_labels: torch.Tensor  # (N,)
    probe: LinearProbe
    num_classes: int
    settings: EvalConfig
    loading: dict  # batch size, device, decoding processes

    @classmethod
    def fit(
        cls,
        encoder: ViTEncoder,
        train: ImageSet,
        num_classes: int,
        settings: EvalConfig,
        *,
        show_progress: bool,
        **loading,
    ) -> FrozenReadout:
        """Features of the dense, intact ``train`` images; the bank and the probe (``settings``) on them."""
        loading = {"batch_size": settings.batch_size, **loading, "l2_normalize": False}
        feats, labels = extract_features(encoder, train, **loading, desc="train features" if show_progress else None)
        probe = train_linear_probe(
            feats, labels, num_classes, epochs=settings.linear_epochs, lr=settings.linear_lr, seed=settings.seed
        )
        return cls(encoder, F.normalize(feats, dim=1), labels, probe, num_classes, settings, loading)

    def predict(self, images: ImageSet, corrupt: Corruption | None = None, desc: str | None = None) -> dict:
        """``{"labels", "knn", "linear"}``: the true labels and each classifier's class per val image."""
        feats, labels = extract_features(
            self.encoder, images, **self.loading, corrupt=corrupt, seed=self.settings.seed, desc=desc
        )
        scores = knn_predict(
            self.bank,
            self.bank_labels,
            F.normalize(feats, dim=1),
            k=self.settings.knn_k,
            temperature=self.settings.knn_temperature,
            num_classes=self.num_classes,
        )
        return {"labels": labels, "knn": scores.argmax(1), "linear": self.probe.predict(feats).argmax(1)}

    def top1(self, images: ImageSet, corrupt: Corruption | None = None, desc: str | None = None) -> dict:
        """``{"knn_top1", "linear_top1"}`` in percent on ``images`` under ``corrupt``."""
        out = self.predict(images, corrupt, desc)
        return {f"{name}_top1": (out[name] == out["labels"]).float().mean().item() * 100 for name in ("knn", "linear")}
