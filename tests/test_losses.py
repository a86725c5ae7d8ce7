"""Losses, heads and the EMA teacher as plain modules, each checked against a direct computation."""

import pytest
import torch
import torch.nn.functional as F

from dilemma.build import build_method
from dilemma.config import load_config
from dilemma.heads import DINOHead, mlp
from dilemma.losses import (
    BYOLLoss,
    DINOLoss,
    InfoNCELoss,
    NTXentLoss,
    VICRegLoss,
    byol_loss,
    dino_loss,
    info_nce_loss,
    nt_xent_loss,
    vicreg_loss,
)
from tests.conftest import TINY


def test_info_nce_matches_a_direct_computation():
    torch.manual_seed(0)
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    losses = [-(torch.log_softmax(qn[i] @ kn.T / 0.2, 0)[i]) for i in range(6)]  # positive: key i
    expected = torch.stack(losses).mean() * (2 * 0.2)
    assert torch.allclose(info_nce_loss(q, k, 0.2), expected, atol=1e-6)
    assert torch.allclose(InfoNCELoss(0.2)(q, k), expected, atol=1e-6)
    assert info_nce_loss(k, k, 0.2) < info_nce_loss(q, k, 0.2)  # matching pairs score lower


def test_loss_modules_equal_their_functions():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(NTXentLoss(0.5)(z1, z2), nt_xent_loss(z1, z2, 0.5))
    s, t = [torch.randn(4, 8) for _ in range(3)], [torch.randn(4, 8) for _ in range(2)]
    c = torch.randn(1, 8)
    assert torch.equal(DINOLoss(0.1)(s, t, c, 0.05), dino_loss(s, t, c, 0.1, 0.05))
    assert torch.equal(BYOLLoss()(z1, z2), byol_loss(z1, z2))
    assert torch.equal(VICRegLoss(2.0, 3.0, 4.0)(z1, z2)[0], vicreg_loss(z1, z2, 2.0, 3.0, 4.0)[0])


def test_mlp_heads_shapes_and_batchnorm():
    head = mlp(8, 16, 4, num_layers=3)
    assert head(torch.randn(5, 8)).shape == (5, 4)
    assert [type(m).__name__ for m in head] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert not head[-1].affine  # MoCo v3's last BN has no affine parameters
    assert type(mlp(8, 16, 4, num_layers=2, last_bn=False)[-1]).__name__ == "Linear"


def test_dino_head_last_layer_is_weight_normalised():
    torch.manual_seed(0)
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=4)
    x = torch.randn(3, 8)
    before = head(x)
    assert before.shape == (3, 32)
    with torch.no_grad():
        head.last_layer.weight.mul_(7.0)  # the norm of each prototype does not matter: g is fixed to 1
    assert torch.allclose(head(x), before, atol=1e-6)
    assert before.abs().max() <= 1.0 + 1e-6  # unit bottleneck . unit prototype = a cosine


@pytest.mark.parametrize("name", ["mocov3", "dino", "byol"])
def test_ema_teacher_follows_every_paired_module(name):
    cfg = load_config(None, [*TINY, f"method.name={name}"])
    method = build_method(cfg)
    pairs = method._ema_pairs
    assert len(pairs) == 2 and all(not p.requires_grad for _, t in pairs for p in t.parameters())
    online = [p.detach().clone() + 1.0 for o, _ in pairs for p in o.parameters()]
    teacher = [p.detach().clone() for _, t in pairs for p in t.parameters()]
    with torch.no_grad():
        for o, _ in pairs:
            for p in o.parameters():
                p.add_(1.0)
    method.update_teacher(0.75)
    after = [p for _, t in pairs for p in t.parameters()]
    assert all(
        torch.allclose(a, 0.75 * t + 0.25 * o, atol=1e-6) for a, t, o in zip(after, teacher, online, strict=True)
    )
