"""Does the backbone use the layout of its input? Read-outs under patch shuffle, position shuffle and
token drop, and the detector's AUROC on val images (``dilemma eval robustness``).

The paper's motivation (Sec. 1) is that ViTs lean on local texture and ignore where things are;
detecting wrong positions should push them towards layout. One kNN bank and one linear probe are
fitted on dense, intact train features (``readout.py``); every val read-out uses those same two
classifiers, so a drop in accuracy is the corruption's alone:

- patch shuffle (``eval.shuffle_grids``): g = 1 is the intact image; at the token grid, only what
  lies inside a cell (texture, local parts) is left, not the layout;
- position shuffle (``eval.position_fractions``): q of the tokens told a wrong position; q = 0 is
  the intact read-out; a backbone that ignores positions loses nothing;
- token drop (``eval.occlusion_fractions``): ``occlusion.py``'s curve;
- detection AUROC at p = ``eval.detection_misplace_prob`` on val images, with the run's own drop
  rate, for a run that trained a detection head (the student encoder and its head).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass

import torch

from dilemma.config import EvalConfig
from dilemma.data import ImageSet, Splits, eval_batches
from dilemma.errors import DilemmaError
from dilemma.eval.corruptions import default_grids, patch_shuffle, position_shuffle
from dilemma.eval.knn import require_labels
from dilemma.eval.occlusion import occlusion_points, occlusion_protocol, tracker_numbers
from dilemma.eval.readout import FrozenReadout
from dilemma.models import ViTEncoder
from dilemma.pretext import DetectionHead, auroc, sample_tokens

SHUFFLES = ("patch_shuffle", "position_shuffle")


@dataclass
class Robustness:
    intact: dict  # {"knn_top1", "linear_top1"} on the val images as they are
    patch_shuffle: list[dict]  # {"grid", "knn_top1", "linear_top1"}; grid 1 = intact
    position_shuffle: list[dict]  # {"fraction", "knn_top1", "linear_top1"}; fraction 0 = intact
    token_drop: list[dict]  # occlusion points: {"keep_fraction", "tokens", "knn_top1", "linear_top1"}
    detection_auroc: float | None  # None: the run has no detection head
    chance: float  # percent
    protocols: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)

    def numbers(self) -> dict[str, float | None]:
        """The panels as flat names for a tracker: ``robustness/grid_7/linear_top1``,
        ``robustness/q_0.5/knn_top1``, ``occlusion/keep_0.25/linear_top1``, ... (no name is a folder
        of another: MLflow's file store keeps each metric in a file of that path)."""
        numbers = {**self.intact, "robustness/det_auroc_val": self.detection_auroc, **tracker_numbers(self.token_drop)}
        for panel, key, tag in (("patch_shuffle", "grid", "grid"), ("position_shuffle", "fraction", "q")):
            for point in getattr(self, panel):
                numbers |= {f"robustness/{tag}_{point[key]:g}/{n}": point[n] for n in ("knn_top1", "linear_top1")}
        return numbers


@torch.no_grad()
def detection_auroc(
    encoder: ViTEncoder,
    head: DetectionHead,
    images: ImageSet,
    *,
    misplace_prob: float,
    drop_rate: float,
    seed: int,
    batch_size: int,
    device="cpu",
    num_workers: int = 0,
) -> float:
    """AUROC of ``head``'s misplacement logits on ``images`` corrupted by the pretext itself
    (``sample_tokens`` at ``drop_rate`` and ``misplace_prob``, draws fixed by ``seed``)."""
    was_training = encoder.training
    encoder.eval()
    generator = torch.Generator().manual_seed(seed)
    scores, flags = [], []
    for x, _ in eval_batches(images, batch_size, num_workers=num_workers):
        sample = sample_tokens(x.shape[0], encoder.num_patches, drop_rate, misplace_prob, generator=generator)
        x = encoder.normalize(x.to(device, non_blocking=True))
        _, patches = encoder(x, sample.keep.to(device), sample.positions.to(device))  # (B, K, D)
        scores.append(head(patches).float().cpu())  # (B, K) logits
        flags.append(sample.misplaced)
    encoder.train(was_training)
    return auroc(torch.cat(scores), torch.cat(flags))


def grids_for(encoder: ViTEncoder, settings: EvalConfig) -> list[int]:
    """The patch-shuffle grids: ``eval.shuffle_grids`` (each must divide the image side), or 1, 2, 4,
    ... and the token grid."""
    img_size, patch = encoder.vit.patch_embed.img_size[0], encoder.vit.patch_embed.patch_size[0]
    if not settings.shuffle_grids:
        return default_grids(img_size, patch)
    if bad := [g for g in settings.shuffle_grids if img_size % g]:
        fits = [g for g in range(1, img_size + 1) if img_size % g == 0]
        raise DilemmaError(
            f"eval.shuffle_grids {bad} do not divide the {img_size}-px image into equal cells: choose among {fits}"
        )
    return list(settings.shuffle_grids)


def _protocols(
    readout: FrozenReadout, splits: Splits, grids: list[int], detection: str | None, shuffles: Collection[str]
) -> dict[str, str]:
    s, patch = readout.settings, readout.encoder.vit.patch_embed.patch_size[0]
    fitted = (
        f"kNN (k={s.knn_k}, T={s.knn_temperature}) and a linear probe ({s.linear_epochs} epochs) fitted on dense, "
        f"intact {splits.name} train features ({len(splits.train)}); top-1 on val ({len(splits.val)}), seed {s.seed}"
    )
    shuffled = {
        "patch_shuffle": f"patch shuffle: each val image cut into g x g cells (g in {grids}), the cells permuted "
        f"at random per image (a cell may stay in place; cells not a whole number of {patch} px patches cut "
        f"through tokens); {fitted}",
        "position_shuffle": "position shuffle: pixels intact, every token enters, each with probability q given the "
        "positional embedding of another position, never its own (the pretext's corruption, nothing dropped); "
        + fitted,
    }
    return {
        **{panel: text for panel, text in shuffled.items() if panel in shuffles},
        "token_drop": occlusion_protocol(readout, splits),
        "detection": detection or "no detection head: the run trained without DILEMMA",
    }


def robustness(
    encoder: ViTEncoder,
    splits: Splits,
    settings: EvalConfig,
    *,
    detector: tuple[ViTEncoder, DetectionHead, float] | None = None,
    shuffles: Collection[str] = SHUFFLES,
    device="cpu",
    num_workers: int = 0,
    show_progress: bool = False,
) -> Robustness:
    """Every panel for ``encoder`` (the evaluated backbone); ``detector``: ``(student encoder, head,
    the run's drop rate)`` for a run that trained a detection head; ``shuffles``: the shuffle
    panels to read out (one left out stays empty)."""
    require_labels(splits, "the robustness read-out")
    # before any work: a grid that does not fit fails at once
    grids = grids_for(encoder, settings) if "patch_shuffle" in shuffles else []
    readout = FrozenReadout.fit(
        encoder, splits.train, len(splits.classes), settings, show_progress=show_progress, device=device,
        num_workers=num_workers,
    )  # fmt: skip
    bar = (lambda what: f"val features, {what}") if show_progress else (lambda what: None)
    patch = [{"grid": g, **readout.top1(splits.val, patch_shuffle(g), bar(f"{g} x {g} cells"))} for g in grids]
    position = [
        {"fraction": q, **readout.top1(splits.val, position_shuffle(q), bar(f"q = {q}"))}
        for q in (settings.position_fractions if "position_shuffle" in shuffles else [])
    ]
    det, det_protocol = None, None
    if detector is not None:
        student, head, drop_rate = detector
        p = settings.detection_misplace_prob
        det = detection_auroc(
            student.to(device), head.to(device), splits.val, misplace_prob=p, drop_rate=drop_rate, seed=settings.seed,
            batch_size=settings.batch_size, device=device, num_workers=num_workers,
        )  # fmt: skip
        det_protocol = (
            f"detection AUROC: the student and its head on {splits.name} val images, the run's drop rate "
            f"r = {drop_rate}, p = {p} (seed {settings.seed}); chance 0.5"
        )
    return Robustness(
        readout.top1(splits.val, None, bar("intact")),
        patch,
        position,
        occlusion_points(readout, splits, show_progress=show_progress),
        det,
        100.0 / len(splits.classes),
        _protocols(readout, splits, grids, det_protocol, shuffles),
    )
