"""Building blocks that several methods share: MLP heads and exponential-moving-average teachers."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU blocks and a final Linear (+ an affine-free BN when ``last_bn``), as in MoCo v3 / SimCLR v2."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in = in_dim if i == 0 else hidden_dim
        dim_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that takes no gradient: the start of an EMA teacher / momentum encoder."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def momentum_at(progress: float, base: float) -> float:
    """EMA momentum on a cosine from ``base`` at progress 0 to 1 at progress 1 (BYOL, MoCo v3, DINO)."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0))) * (1.0 - base)


@torch.no_grad()
def ema_update(pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for every ``(online, target)`` pair."""
    for online, target in pairs:
        for p, p_t in zip(online.parameters(), target.parameters()):
            p_t.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)
