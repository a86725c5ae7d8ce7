"""The DILEMMA pretext: sparse token sampling, misplacement, and the detection loss.

Paper: arXiv 2204.04788 (Sec. 3); the rules below are ``docs/method.md``'s "One student forward".
Per image, independently: keep ``K = floor(L * (1 - r))`` random patches; flag each kept token
misplaced with probability ``p``; give a flagged token a wrong position, never its own: drawn
without replacement from the image's *dropped* positions when there are at least as many
dropped positions as flagged tokens, otherwise uniformly from the other ``L - 1`` positions (so
then its PE may equal another kept token's). A linear head on each patch token predicts the
flag; binary cross-entropy, whose constant-predictor value is ``H(p)``, is the loss.

``task`` switches the position task (``dilemma.task``): ``detect`` (the above), ``predict`` (the
position pretexts DILEMMA is compared with, ``position_task.py``: a share of the kept tokens gets no
position, drawn with the same flags, and a head classifies their true positions), or ``none``
(sparsity only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dilemma.errors import DilemmaError
from dilemma.position_task import NoPosition, PositionHead, position_loss, position_metrics

TASKS = ("detect", "predict", "none")


@dataclass(frozen=True)
class TokenSample:
    """Which patches enter the encoder and with which positional embedding; all ``(B, K)``.

    ``keep``: patch indices (sorted per image); ``positions``: the PE index each token gets, -1 for
    none (position prediction); ``misplaced``: the labels, True exactly where ``positions`` is another
    patch's.
    """

    keep: torch.Tensor
    positions: torch.Tensor
    misplaced: torch.Tensor

    @property
    def unplaced(self) -> torch.Tensor:
        """``(B, K)`` bool: the tokens that enter without a position (their true one is ``keep``)."""
        return self.positions < 0


def check_switches(
    misplace_prob: float = 0.0,
    drop_rate: float = 0.0,
    weight: float = 1.0,
    task: str = "detect",
    position_drop_prob: float = 0.0,
    position_smoothing: float = 0.0,
) -> None:
    """The ranges of the switches (the one place they are checked; the config's ``dilemma`` section
    is checked here too)."""
    if task not in TASKS:
        raise DilemmaError(f"dilemma.task must be one of {', '.join(TASKS)}, got {task!r}")
    if not 0.0 <= position_drop_prob <= 1.0:
        raise DilemmaError(f"dilemma.position_drop_prob must be in [0, 1], got {position_drop_prob}")
    if not 0.0 <= position_smoothing <= 100.0:
        raise DilemmaError(f"dilemma.position_smoothing must be in [0, 100] patches, got {position_smoothing}")
    if not 0.0 <= drop_rate < 1.0:
        raise DilemmaError(f"dilemma.drop_rate must be in [0, 1), got {drop_rate}")
    if not 0.0 <= misplace_prob <= 1.0:
        raise DilemmaError(f"dilemma.misplace_prob must be in [0, 1], got {misplace_prob}")
    if weight < 0:
        raise DilemmaError(f"dilemma.weight must be >= 0, got {weight}")


def active_task(task: str, weight: float, misplace_prob: float, position_drop_prob: float) -> str:
    """The position task that runs (``detect``, ``predict`` or ``none``): a task needs lambda > 0 and
    its share (p, or q) > 0; otherwise the student is sparse only (or plain, at r = 0)."""
    if weight > 0 and task == "detect" and misplace_prob > 0:
        return "detect"
    if weight > 0 and task == "predict" and position_drop_prob > 0:
        return "predict"
    return "none"


def num_kept(num_patches: int, drop_rate: float) -> int:
    """``K = floor(L * (1 - r))`` (with a tolerance for float round-off), checked to be >= 1."""
    check_switches(drop_rate=drop_rate)
    kept = math.floor(num_patches * (1.0 - drop_rate) + 1e-9)
    if kept < 1:
        raise DilemmaError(
            f"drop rate {drop_rate} keeps K = 0 of {num_patches} patches: lower the drop rate "
            f"(at most {1 - 1 / num_patches:.4f}) or use more patches per image"
        )
    return kept


def sample_tokens(
    batch_size: int,
    num_patches: int,
    drop_rate: float,
    misplace_prob: float,
    *,
    unplace_prob: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenSample:
    """Draw keep sets, misplacement flags and wrong positions for a batch (rules in the module doc);
    with ``unplace_prob`` (position prediction; ``misplace_prob`` 0) a kept token whose flag draw is
    below it gets no position (-1) instead: the same draws, so detect and predict see the same keep sets."""
    check_switches(misplace_prob, drop_rate, position_drop_prob=unplace_prob)
    if batch_size < 1 or num_patches < 1:
        raise DilemmaError(f"need batch_size >= 1 and num_patches >= 1, got {batch_size} and {num_patches}")
    if misplace_prob > 0 and num_patches < 2:
        raise DilemmaError("cannot misplace tokens with a single patch per image: use a smaller patch size")
    kept = num_kept(num_patches, drop_rate)

    # A random permutation per image (MAE's random_masking): its first K entries are the kept
    # patches, the rest the dropped ones. keep is sorted so tokens enter the ViT in raster order.
    order = torch.rand(batch_size, num_patches, generator=generator, device=device).argsort(dim=1)  # (B, L)
    keep = order[:, :kept].sort(dim=1).values  # (B, K)
    dropped = order[:, kept:]  # (B, L - K), random order: taking them in turn is sampling without replacement
    shape = (batch_size, kept)
    flags = torch.rand(shape, generator=generator, device=device)  # (B, K)
    other = torch.randint(0, max(num_patches - 1, 1), shape, generator=generator, device=device)
    return _unplace(_misplace(keep, dropped, flags < misplace_prob, other), flags < unplace_prob)


@dataclass(frozen=True)
class PositionDraws:
    """Random variates for every patch position of each image, drawn before the keep set is known
    (I-JEPA's context is cut per micro-batch); ``misplace_tokens`` reads them at the kept positions,
    so an image's draws are the same however the batch is split. All ``(B, L)``."""

    order: torch.Tensor  # uniform: dropped positions are handed out in increasing order
    flag: torch.Tensor  # uniform: the token of a patch is misplaced when its flag < p
    other: torch.Tensor  # long in [0, L - 1): the fallback's wrong position (see ``_misplace``)

    @classmethod
    def draw(cls, batch: int, num_patches: int, *, generator=None, device=None) -> PositionDraws:
        shape = (batch, num_patches)
        return cls(
            order=torch.rand(shape, generator=generator, device=device),
            flag=torch.rand(shape, generator=generator, device=device),
            other=torch.randint(0, max(num_patches - 1, 1), shape, generator=generator, device=device),
        )


def misplace_tokens(
    keep: torch.Tensor, draws: PositionDraws, misplace_prob: float, unplace_prob: float = 0.0
) -> TokenSample:
    """Misplacement (the rules of the module doc) for a keep set chosen elsewhere: ``keep`` ``(B, K)``
    sorted patch indices (I-JEPA's context); every other position counts as dropped. ``unplace_prob``:
    as in ``sample_tokens``."""
    check_switches(misplace_prob, position_drop_prob=unplace_prob)
    num_patches = draws.order.shape[1]
    if misplace_prob > 0 and num_patches < 2:
        raise DilemmaError("cannot misplace tokens with a single patch per image: use a smaller patch size")
    # the positions not kept, in the drawn order: kept ones sort last (score 2 > any uniform)
    dropped = draws.order.scatter(1, keep, 2.0).argsort(dim=1)[:, : num_patches - keep.shape[1]]  # (B, L - K)
    flags = draws.flag.gather(1, keep)  # (B, K)
    return _unplace(_misplace(keep, dropped, flags < misplace_prob, draws.other.gather(1, keep)), flags < unplace_prob)


def _unplace(sample: TokenSample, unplaced: torch.Tensor) -> TokenSample:
    """``sample`` with the tokens ``unplaced`` ``(B, K)`` given no position (-1); never misplaced ones."""
    unplaced = unplaced & ~sample.misplaced
    return TokenSample(sample.keep, torch.where(unplaced, -1, sample.positions), sample.misplaced)


def _misplace(keep: torch.Tensor, dropped: torch.Tensor, misplaced: torch.Tensor, other: torch.Tensor) -> TokenSample:
    """Wrong positions for the flagged kept tokens: ``keep`` (B, K), the dropped positions of each image
    in a random order ``dropped`` (B, L - K), the flags ``misplaced`` (B, K), and ``other`` (B, K)
    uniform in [0, L - 1) for the fallback."""
    num_dropped = dropped.shape[1]
    # Fallback: uniform over the L - 1 positions other than the token's own (draw from L - 1 values,
    # then shift the ones at or above the token's own index up by one, so its own is never drawn).
    wrong = other + (other >= keep).long()  # (B, K)
    if num_dropped > 0:
        # The j-th misplaced token of an image (counting from 0 along the row) takes dropped[j]:
        # turn = (running count of misplaced tokens) - 1. Unflagged tokens get a clamped, unused index.
        turn = (misplaced.long().cumsum(dim=1) - 1).clamp(0, num_dropped - 1)  # (B, K)
        enough = misplaced.sum(dim=1, keepdim=True) <= num_dropped  # (B, 1): rows where no dropped PE repeats
        wrong = torch.where(enough, dropped.gather(1, turn), wrong)
    positions = torch.where(misplaced, wrong, keep)  # (B, K): the PE index each kept token receives
    return TokenSample(keep=keep, positions=positions, misplaced=misplaced)


def hide_under_mask(sample: TokenSample | None, mask: torch.Tensor) -> tuple[TokenSample | None, torch.Tensor]:
    """Masked image modelling (iBOT) on top of the pretext: ``mask`` ``(B, L)`` marks the patches the
    student sees as the mask token. Returns the sample with every masked kept token back in its own
    place, and which kept tokens are masked ``(B, K)`` (``(B, L)`` for a dense, clean sample: None).

    A mask token carries no content, so whether it sits in the right place cannot be detected: it
    keeps its true PE (the prediction made at it belongs to that place), is never misplaced, and
    ``Dilemma.loss`` leaves it out (``counted``). Dropped patches stay dropped, masked or not."""
    if sample is None:
        return None, mask
    masked = mask.gather(1, sample.keep)  # (B, K)
    positions = torch.where(masked, sample.keep, sample.positions)
    return TokenSample(keep=sample.keep, positions=positions, misplaced=sample.misplaced & ~masked), masked


def binary_entropy(p: float) -> float:
    """``H(p)`` in nats: the BCE of the best constant predictor (0.500 at p = 0.2)."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


class DetectionHead(nn.Module):
    """One ``Linear(D, 1)`` shared by all patch tokens: a logit for "this token is misplaced"."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(embed_dim, 1)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(patch_tokens).squeeze(-1)


def detection_loss(logits: torch.Tensor, misplaced: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over kept tokens and batch. With ``counted`` ``(B, K)``
    bool: per image the mean over its counted tokens (0 when none), then the mean over images, so
    that the loss stays a mean of per-image terms (the same however the batch is split)."""
    if logits.shape != misplaced.shape:
        raise DilemmaError(f"detection logits {tuple(logits.shape)} and labels {tuple(misplaced.shape)} differ")
    if counted is None:
        return F.binary_cross_entropy_with_logits(logits.float(), misplaced.float())
    per_token = F.binary_cross_entropy_with_logits(logits.float(), misplaced.float(), reduction="none")
    weights = counted.float()
    return ((per_token * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)).mean()


@torch.no_grad()
def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count half); NaN without both classes."""
    scores, labels = scores.flatten().float(), labels.flatten().bool()
    num_pos = int(labels.sum())
    num_neg = labels.numel() - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    first_rank = counts.cumsum(0) - counts + 1  # 1-based rank of each distinct value's first copy
    mean_rank = first_rank.double() + (counts.double() - 1) / 2
    pos_rank_sum = mean_rank[inverse][labels].sum().item()
    return (pos_rank_sum - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg)


@torch.no_grad()
def detection_metrics(logits: torch.Tensor, misplaced: torch.Tensor) -> dict[str, float]:
    """Accuracy at logit 0 and AUROC of the detector."""
    accuracy = ((logits > 0) == misplaced).float().mean().item()
    return {"det_acc": accuracy, "det_auroc": auroc(logits, misplaced)}


@dataclass(frozen=True)
class GlobalBatchRows:
    """Where a micro-batch sits in the step's global batch, and the generator for the step's draws.

    ``Dilemma.sample`` then draws for all ``total`` rows and keeps only ``rows``. When every process
    (DDP) and every accumulation micro-batch resets ``generator`` to the step's state and takes its
    own rows, an image gets the same keep set and wrong positions however the global batch is split
    (tested)."""

    generator: torch.Generator
    total: int
    rows: torch.Tensor  # (n,) long: positions of this micro-batch's images in the global batch


TokenDraws = torch.Generator | GlobalBatchRows | None  # what a method passes on to ``Dilemma.sample``


class Dilemma(nn.Module):
    """The pretext as one module for any SSL method: ``sample`` the student's tokens, then
    ``loss`` on its patch embeddings. The switches are orthogonal: ``misplace_prob = 0`` or
    ``weight = 0`` turns detection off (no head, no misplaced tokens), ``drop_rate = 0`` gives
    dense inputs; detection off and dense is the plain base method. ``task`` picks the position
    task (module doc): with ``predict``, ``position_drop_prob`` is the share of kept tokens without a
    position and ``position_smoothing`` the labels' Gaussian width in patches at the start of
    training, decaying linearly to 0 (``set_progress``); ``grid`` is the patch grid (rows, columns).
    """

    def __init__(
        self, embed_dim: int, num_patches: int, misplace_prob: float = 0.2, drop_rate: float = 0.75,
        weight: float = 1.0, task: str = "detect", position_drop_prob: float = 0.75, position_smoothing: float = 0.0,
        grid: tuple[int, int] | None = None,
    ):  # fmt: skip
        super().__init__()
        check_switches(misplace_prob, drop_rate, weight, task, position_drop_prob, position_smoothing)
        self.num_patches = num_patches
        self.num_kept = num_kept(num_patches, drop_rate)
        self.task = task
        # lambda = 0 turns the task off: no head and no misplaced (or unplaced) tokens (a wrong position
        # that nothing learns to detect would only be noise); the inputs stay sparse as r says.
        running = active_task(task, weight, misplace_prob, position_drop_prob)
        self.misplace_prob = misplace_prob if running == "detect" else 0.0
        self.unplace_prob = position_drop_prob if running == "predict" else 0.0
        self.drop_rate = drop_rate
        self.weight = weight
        self.entropy = binary_entropy(self.misplace_prob)
        self.head = DetectionHead(embed_dim) if self.misplace_prob > 0 else None
        side = math.isqrt(num_patches)
        self.grid = grid if grid is not None else (side, num_patches // max(side, 1))
        self.smoothing_start = position_smoothing
        self.smoothing = position_smoothing  # sigma now (set_progress)
        predicts = self.unplace_prob > 0
        self.position_head = PositionHead(embed_dim, num_patches) if predicts else None
        self.no_position = NoPosition(embed_dim) if predicts else None

    @property
    def identity(self) -> bool:
        """True when the student sees dense, clean inputs (the plain base method)."""
        return self.misplace_prob == 0 and self.unplace_prob == 0 and self.drop_rate == 0

    @property
    def no_position_embedding(self) -> torch.Tensor | None:
        """What a token without a position gets in place of its PE (``ViTEncoder.tokens``), or None."""
        return None if self.no_position is None else self.no_position.embedding

    def set_progress(self, progress: float) -> None:
        """Once per step: the position labels' width, linear from ``position_smoothing`` to 0 (DropPos)."""
        self.smoothing = self.smoothing_start * max(0.0, 1.0 - progress)

    def sample(
        self,
        batch_size: int,
        *,
        num_patches: int | None = None,
        generator: TokenDraws = None,
        device=None,
        views: int = 1,
    ) -> TokenSample | None:
        """Token sample for a batch; ``num_patches`` overrides L for inputs of another size (local crops).

        The batch may stack ``views`` views of the same n images (``batch_size = views * n``, view by
        view, as ``torch.cat(views)`` lays them out). Each view draws in turn, exactly as if it were
        encoded alone, so encoding the views in one call changes nothing about the pretext."""
        if self.identity:
            return None
        n = batch_size // views
        if batch_size % views or (isinstance(generator, GlobalBatchRows) and n != len(generator.rows)):
            raise DilemmaError(
                f"a batch of {batch_size} is not {views} stacked view(s) of the micro-batch's images: "
                "pass views= (the number of views stacked with torch.cat) to Method.student / Dilemma.sample"
            )
        num_patches = self._checked_grid(num_patches)

        def draw(rows: int, gen: torch.Generator | None) -> TokenSample:
            return sample_tokens(rows, num_patches, self.drop_rate, self.misplace_prob,
                                 unplace_prob=self.unplace_prob, generator=gen, device=device)  # fmt: skip

        per_view = []
        for _ in range(views):
            if isinstance(generator, GlobalBatchRows):
                # Draw for every image of the global batch and keep this micro-batch's rows.
                full = draw(generator.total, generator.generator)
                rows = generator.rows.to(full.keep.device)
                per_view.append(TokenSample(full.keep[rows], full.positions[rows], full.misplaced[rows]))
            else:
                per_view.append(draw(n, generator))
        if views == 1:
            return per_view[0]
        return TokenSample(
            keep=torch.cat([s.keep for s in per_view]),
            positions=torch.cat([s.positions for s in per_view]),
            misplaced=torch.cat([s.misplaced for s in per_view]),
        )

    def _checked_grid(self, num_patches: int | None) -> int:
        """The views' patch count (the main grid's when None); position prediction needs the main grid."""
        if num_patches is not None and num_patches != self.num_patches and self.unplace_prob > 0:
            raise DilemmaError(
                f"position prediction classifies among the {self.num_patches} positions of the main grid, not "
                f"views of {num_patches} patches (DINO's local crops: keep method.dino.local_dilemma=false)"
            )
        return self.num_patches if num_patches is None else num_patches

    def detects(self, sample: TokenSample | None) -> bool:
        """Whether ``loss`` has anything to learn from ``sample``'s tokens (a head, and a corrupted view)."""
        return (self.head is not None or self.position_head is not None) and sample is not None

    def loss(
        self,
        patch_tokens: torch.Tensor,
        sample: TokenSample | None,
        with_metrics: bool = False,
        views: int = 1,
        counted: torch.Tensor | None = None,
    ):
        """``(loss, metrics)`` for the student's patch tokens, or ``(None, {})`` when there is nothing to
        learn: the detection BCE, or the position cross-entropy (task predict). With ``views`` stacked
        views (``sample``'s) it is the mean over all their tokens (detection; the position loss: per
        image over its asked tokens, then over images), which is the mean over views (each has n x K
        tokens), and each metric the mean of the views'. ``counted`` ``(B, K)`` bool: only
        these tokens count (iBOT: not the mask tokens). Metrics (accuracy, AUROC, position top-1)
        cost a device sync, so they are computed only when asked for."""
        if not self.detects(sample):
            return None, {}
        if self.position_head is not None:
            return self._position_loss(patch_tokens, sample, with_metrics, views, counted)
        logits = self.head(patch_tokens)  # (views * n, K)
        bce = detection_loss(logits, sample.misplaced, counted)  # None: the plain mean, as it always was
        if not with_metrics:
            return bce, {}
        if counted is None:
            counted = torch.ones_like(sample.misplaced)
        per_view = [
            detection_metrics(view_logits[view_counted], view_labels[view_counted])
            for view_logits, view_labels, view_counted in zip(
                logits.chunk(views), sample.misplaced.chunk(views), counted.chunk(views), strict=True
            )
        ]
        return bce, {key: sum(m[key] for m in per_view) / views for key in per_view[0]}

    def _position_loss(self, patch_tokens, sample: TokenSample, with_metrics: bool, views: int, counted):
        """Task predict: the cross-entropy of each unplaced token's true position (``position_task``)."""
        asked = sample.unplaced if counted is None else sample.unplaced & counted  # (B, K)
        logits = self.position_head(patch_tokens)  # (B, K, N)
        loss = position_loss(logits, sample.keep, asked, self.grid, self.smoothing)
        if not with_metrics:
            return loss, {}
        per_view = [
            position_metrics(view_logits[view_asked], view_labels[view_asked], self.grid)
            for view_logits, view_labels, view_asked in zip(
                logits.chunk(views), sample.keep.chunk(views), asked.chunk(views), strict=True
            )
        ]
        return loss, {key: sum(m[key] for m in per_view) / views for key in per_view[0]}
