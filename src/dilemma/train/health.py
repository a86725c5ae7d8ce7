"""Is the representation collapsing? Two numbers on each logged step's student embeddings (the batch
the online probe sees, before any projector), and one warning when they say so.

- ``rankme``: the effective rank of the batch's embeddings (RankMe, Garrido et al. 2023, Eq. 1):
  exp of the entropy of the normalised singular values; at most min(batch, dim), 1 when every
  embedding is the same direction (complete collapse), low when they span few dimensions
  (dimensional collapse).
- ``emb_std``: the mean per-dimension standard deviation of the L2-normalised embeddings, times
  sqrt(dim) (SimSiam, Chen & He 2021, Sec. 4.1): about 1 for embeddings spread over the sphere, 0
  when they all point one way.

DINO and iBOT also log ``teacher_entropy``: the mean entropy of the teacher's centred and sharpened
targets (``methods/dino.py``), log(out_dim) for uniform targets, 0 for one prototype taking all;
MoCo v3 and BYOL ``teacher_agreement``: the mean cosine of the student's predictions to the
momentum teacher's targets (``losses.agreement``).

A run is called collapsed when both say so: ``emb_std`` < 0.05 and ``rankme`` < 1.5 (a constant
embedding gives 0 and 1). Measured on the tests' tiny ViT (batch 32): MoCo v3, BYOL and I-JEPA stay
above 0.32 and 4 in their first steps; DINO is the lowest, down to 0.06 and 2.0 at step 6 and
about 0.2 and 2.5 from step 20 to 150, so either number alone would be too eager.
"""

from __future__ import annotations

import math

import torch

STD_FLOOR = 0.05
RANK_FLOOR = 1.5


@torch.no_grad()
def embedding_health(features: torch.Tensor) -> dict[str, float]:
    """``{"rankme", "emb_std"}`` of embeddings ``(B, D)``; empty for fewer than two."""
    z = features.detach().float()
    if z.ndim != 2 or z.shape[0] < 2:
        return {}
    sigma = torch.linalg.svdvals(z)  # (min(B, D),)
    p = sigma / sigma.sum().clamp_min(1e-12) + 1e-7  # RankMe's epsilon
    rankme = math.exp(-(p * p.log()).sum().item())
    normed = torch.nn.functional.normalize(z, dim=1)
    return {"rankme": rankme, "emb_std": normed.std(dim=0).mean().item() * math.sqrt(z.shape[1])}


def collapse_warning(record: dict) -> str | None:
    """One line when a logged record's numbers say the embeddings collapsed, else None."""
    std, rank = record.get("emb_std"), record.get("rankme")
    if std is None or rank is None or std >= STD_FLOOR or rank >= RANK_FLOOR:
        return None
    return (
        f"warning: the embeddings look collapsed at step {record['step']} (emb_std {std:.3f} < {STD_FLOOR} and "
        f"rankme {rank:.2f} < {RANK_FLOOR}: the batch's embeddings point (nearly) one way). Lower optim.lr, "
        "check the augmentations, or for teacher-student methods the teacher's temperature and momentum"
    )
