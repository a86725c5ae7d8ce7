"""The SSL losses: InfoNCE (MoCo v3), NT-Xent (SimCLR), DINO's cross-entropy (and iBOT's on masked
patches), BYOL's normalised regression, VICReg's variance-invariance-covariance.

Each is a function and a plain ``nn.Module`` around it, usable in any loop. Under DDP the
contrastive losses see the whole global batch: InfoNCE's keys are gathered without gradient (they
come from the momentum encoder), NT-Xent's views with a gather whose backward is correct, so the
gradient equals the single-process one (tested); VICReg's variance and covariance terms are
statistics of the global batch, gathered the same way. In one process the gathers are the identity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dilemma.distributed import gather_no_grad, gather_with_grad, rank


def _fp32(x: torch.Tensor):
    """A context where matmuls run in fp32 on ``x``'s device: under autocast a ``.float()`` alone is
    re-cast to bf16 / fp16 by the matmul, and logits / T of unit vectors need more than 3 digits."""
    return torch.autocast(x.device.type, enabled=False)


def info_nce_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries ``(n, d)`` against the keys of the global batch ``(N, d)``, the positive of
    query i being key i of this process's block; scaled by 2T as in MoCo v3. Logits in fp32."""
    q, k = F.normalize(q.float(), dim=1), gather_no_grad(F.normalize(k.float(), dim=1))
    with _fp32(q):
        logits = q @ k.T / temperature  # (n, N)
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * rank()
    return F.cross_entropy(logits.float(), labels) * (2 * temperature)


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent: cross-entropy of each of this process's 2n views against all 2N views but itself,
    the positive being the other view of the same image. Mean over this process's views; logits in fp32."""
    n = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, d): rows i and n + i are one image
    everything = gather_with_grad(local)  # (2N, d), process r's block at [2n r, 2n (r + 1))
    offset = 2 * n * rank()
    with _fp32(local):
        logits = local @ everything.T / temperature
    rows = torch.arange(2 * n, device=local.device)
    logits[rows, offset + rows] = float("-inf")  # a view is not its own negative
    positives = offset + (rows + n) % (2 * n)
    return F.cross_entropy(logits, positives)


def dino_loss(
    student: list[torch.Tensor],
    teacher: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Mean over (teacher crop i, student crop v != i) of H(softmax((t_i - c) / T_t), softmax(s_v / T_s));
    the first ``len(teacher)`` student crops are the same global crops as the teacher's."""
    targets = [F.softmax((t.float() - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    terms = [-(q * lp).sum(dim=-1).mean() for i, q in enumerate(targets) for v, lp in enumerate(log_probs) if v != i]
    return torch.stack(terms).mean()


def masked_patch_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    masked: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """iBOT's masked-patch self-distillation (Zhou et al. 2022, Eq. 2): for each image, the mean over
    its masked tokens ``masked`` (B, K) of H(softmax((t - c) / T_t), softmax(s / T_s)) between the
    teacher's output for the clean patch ``teacher`` (B, K, d) and the student's output at the mask
    token ``student`` (B, K, d); an image with no masked token counts 0; mean over images."""
    targets = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
    per_token = -(targets * F.log_softmax(student.float() / student_temp, dim=-1)).sum(dim=-1)  # (B, K)
    weights = masked.float()
    return ((per_token * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)).mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's regression of online predictions ``p`` (n, d) onto target projections ``z`` (n, d):
    ``|| p / |p| - z / |z| ||^2 = 2 - 2 cos(p, z)``, mean over the batch (Grill et al. 2020, Eq. 2).
    ``z`` gets no gradient (the target network's output)."""
    p, z = F.normalize(p.float(), dim=1), F.normalize(z.detach().float(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()


@torch.no_grad()
def agreement(*pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The mean cosine similarity of student predictions to their teacher targets over positive
    ``(prediction, target)`` pairs of ``(n, d)``: near 1 when the student predicts the teacher,
    near 0 for unrelated directions. A collapsed pair (every output one vector) also agrees: read it
    beside ``rankme`` and ``emb_std`` (train/health.py)."""
    return torch.stack([F.cosine_similarity(p.float(), z.float(), dim=1).mean() for p, z in pairs]).mean()


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The d (d - 1) off-diagonal entries of a square ``(d, d)`` matrix, flattened."""
    d = m.shape[0]
    return m.flatten()[:-1].view(d - 1, d + 1)[:, 1:].flatten()


def _variance_covariance(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """VICReg's variance term (hinge on the std of each dimension at 1) and covariance term (sum of
    squared off-diagonal covariances / d) of embeddings ``z`` (N, d) of the global batch."""
    z = z - z.mean(dim=0)
    std = torch.sqrt(z.var(dim=0) + eps)
    variance = F.relu(1 - std).mean()
    with _fp32(z):
        cov = z.T @ z / (z.shape[0] - 1)  # (d, d)
    return variance, _off_diagonal(cov).pow(2).sum() / z.shape[1]


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    invariance_weight: float = 25.0,
    variance_weight: float = 25.0,
    covariance_weight: float = 1.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """VICReg (Bardes et al. 2022, Eq. 6) of the two views' embeddings ``(n, d)``: lambda x the
    invariance term on this process's pairs, plus mu x the variance and nu x the covariance terms of
    each view over the global batch (gathered with gradient); the variance term is the mean over the
    two views, the covariance term their sum. As in the paper's code (for which 25 / 25 / 1 were
    tuned), the invariance term is the mean squared difference per coordinate (Eq. 5 sums over the d
    coordinates). Returns the loss and its three terms (detached)."""
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    var1, cov1 = _variance_covariance(gather_with_grad(z1), eps)
    var2, cov2 = _variance_covariance(gather_with_grad(z2), eps)
    variance, covariance = (var1 + var2) / 2, cov1 + cov2
    loss = invariance_weight * invariance + variance_weight * variance + covariance_weight * covariance
    terms = {"invariance": invariance.detach(), "variance": variance.detach(), "covariance": covariance.detach()}
    return loss, terms


class InfoNCELoss(nn.Module):
    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return info_nce_loss(q, k, self.temperature)


class NTXentLoss(nn.Module):
    def __init__(self, temperature: float = 0.2):
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(z1, z2, self.temperature)


class DINOLoss(nn.Module):
    """DINO's loss for a fixed student temperature; the teacher's temperature and centre are inputs
    (they follow schedules and the teacher's outputs, which the method owns)."""

    def __init__(self, student_temp: float = 0.1):
        super().__init__()
        self.student_temp = student_temp

    def forward(
        self, student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        return dino_loss(student, teacher, center, self.student_temp, teacher_temp)


class BYOLLoss(nn.Module):
    def forward(self, p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return byol_loss(p, z)


class VICRegLoss(nn.Module):
    """VICReg's loss with its three weights (the paper's 25 / 25 / 1 by default)."""

    def __init__(self, invariance_weight: float = 25.0, variance_weight: float = 25.0, covariance_weight: float = 1.0):
        super().__init__()
        self.weights = (invariance_weight, variance_weight, covariance_weight)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return vicreg_loss(z1, z2, *self.weights)
