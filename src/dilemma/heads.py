"""Projection heads the SSL methods put on the backbone; plain ``nn.Module``s for any loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, last_bn: bool = True) -> nn.Sequential:
    """Linear-BN-ReLU blocks and a final Linear (+ an affine-free BN when ``last_bn``): MoCo v3's
    projector (3 layers) and predictor (2 layers), SimCLR v2's projector (2 layers, no last BN)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        dim_in = in_dim if i == 0 else hidden_dim
        dim_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))  # a BN follows: a bias would be redundant
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


class NormalizedLinear(nn.Module):
    """Linear layer whose weight rows are L2-normalised: ``weight_norm`` with g fixed to 1 (DINO's
    ``norm_last_layer=True``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """DINO's head: 3-layer MLP with GELU to an L2-normalised bottleneck, then a weight-normalised
    linear layer to ``out_dim`` prototypes (Caron et al. 2021, Sec. 3.1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
