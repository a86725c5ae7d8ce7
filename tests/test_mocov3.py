"""MoCo v3 + DILEMMA: loss, gradients, the momentum branch's inputs, and the baselines."""

import pytest
import torch

from dilemma.build import build_method
from dilemma.config import load_config
from dilemma.schedules import momentum_at
from tests.conftest import TINY


def _method(*overrides):
    cfg = load_config(None, [*TINY, *overrides])
    torch.manual_seed(0)
    return build_method(cfg)


def _views(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randn(n, 1, 28, 28, generator=g)


def test_student_sparse_momentum_dense_and_no_teacher_gradient():
    method = _method()
    counts = {}

    def record(name):
        return lambda module, args: counts.setdefault(name, []).append(tuple(args[0].shape[:2]))

    method.encoder.vit.blocks[0].register_forward_pre_hook(record("student"))
    method.momentum_encoder.vit.blocks[0].register_forward_pre_hook(record("momentum"))
    out = method(_views(), 0.0, torch.Generator().manual_seed(0), True)
    loss, logs = out.loss, out.logs
    loss.backward()
    # each branch encodes both views (2 x 8 images) in one call
    assert counts["student"] == [(16, 1 + 12)]  # class token + K = floor(49 * 0.25)
    assert counts["momentum"] == [(16, 1 + 49)]  # dense and clean
    assert all(p.grad is None for p in [*method.momentum_encoder.parameters(), *method.momentum_projector.parameters()])
    assert (
        method.dilemma.head.proj.weight.grad is not None
        and method.encoder.vit.blocks[0].attn.qkv.weight.grad is not None
    )
    assert {"loss", "ssl_loss", "det_bce", "det_entropy", "det_acc", "det_auroc", "momentum"} <= set(logs)
    assert torch.isfinite(loss)


def test_momentum_encoder_gets_clean_positions():
    method = _method("dilemma.misplace_prob=1.0", "dilemma.drop_rate=0.0")
    x1, x2 = _views()
    method(_views(), 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():  # keys equal a plain dense forward of the momentum encoder
        assert torch.allclose(
            method.momentum_encoder(x1)[0], method.momentum_encoder.vit.forward_features(x1)[:, 0], atol=1e-5
        )


def test_momentum_update_and_schedule():
    method = _method()
    before = [p.clone() for p in method.momentum_encoder.parameters()]
    online = [p.clone() for p in method.encoder.parameters()]
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    method.update_teacher(0.9)
    for b, o, m in zip(before, online, method.momentum_encoder.parameters(), strict=True):
        assert torch.allclose(m, 0.9 * b + 0.1 * (o + 1.0), atol=1e-6)
    assert momentum_at(0.0, 0.99) == pytest.approx(0.99) and momentum_at(1.0, 0.99) == pytest.approx(1.0)


@pytest.mark.parametrize("p,r", [(0.0, 0.0), (0.0, 0.75), (0.2, 0.0)])
def test_baselines_and_partial_switches_run(p, r):
    method = _method(f"dilemma.misplace_prob={p}", f"dilemma.drop_rate={r}")
    out = method(_views(), 0.5, torch.Generator().manual_seed(0), True)
    loss, logs = out.loss, out.logs
    loss.backward()
    assert torch.isfinite(loss)
    assert ("det_bce" in logs) == (p > 0)


def test_loss_goes_down_on_a_fixed_batch():
    method = _method()
    opt = torch.optim.AdamW([q for q in method.parameters() if q.requires_grad], lr=1e-3)
    views = _views(16)
    losses = []
    for step in range(15):
        loss = method(views, 0.0, torch.Generator().manual_seed(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
