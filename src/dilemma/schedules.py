"""Schedules over training: progress, warm-up, cosine (lr, EMA momentum), all driven by progress.

Progress in [0, 1] is ``step / max_steps``, or the fraction of the wall-clock budget used when
that is further along: with ``--time-budget`` the schedules (lr cosine, EMA momentum) finish
exactly when time runs out, so runs of equal time are each complete (the paper's comparison).
"""

from __future__ import annotations

import math


def progress(step: int, max_steps: int, elapsed: float = 0.0, budget_seconds: float | None = None) -> float:
    """The schedule fraction in [0, 1]: the further of steps done and time spent (of a time budget)."""
    by_steps = step / max_steps
    by_time = elapsed / budget_seconds if budget_seconds else 0.0
    return min(1.0, max(by_steps, by_time))


def cosine(fraction: float, start: float, end: float) -> float:
    """Half a cosine from ``start`` at progress 0 to ``end`` at progress 1."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(fraction, 0.0), 1.0)))


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up: ``(step + 1) / warmup_steps``, then 1."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def learning_rate(fraction: float, *, lr: float, min_lr: float, warmup: float) -> float:
    """Linear warm-up from 0 to ``lr`` over the first ``warmup`` fraction of progress, then a cosine
    to ``min_lr`` over the rest. A function of progress alone, so runs of equal time (or equal
    steps) have the same schedule shape however fast they step, and the set lr is reached."""
    if fraction < warmup:
        return lr * fraction / warmup
    return cosine((fraction - warmup) / (1.0 - warmup), lr, min_lr)


def momentum_at(fraction: float, base: float) -> float:
    """EMA momentum on a cosine from ``base`` at progress 0 to 1 at progress 1 (BYOL, MoCo v3, DINO)."""
    return cosine(fraction, base, 1.0)
