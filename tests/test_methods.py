"""DINO, SimCLR, MAE, BYOL and VICReg on the common Method interface: losses, teachers, switches,
true positions."""

import pytest
import torch
import torch.nn.functional as F

from dilemma.losses import byol_loss, dino_loss, nt_xent_loss, vicreg_loss
from dilemma.methods import METHODS
from dilemma.methods.dino import teacher_temperature_at
from dilemma.methods.mae import patchify, unpatchify
from dilemma.pretext import TokenSample
from tests.conftest import IJEPA_RECIPE, block_inputs, embedded_views, tiny_method

_method = tiny_method


@pytest.mark.parametrize("name", ["dino", "simclr", "mae", "byol", "vicreg"])
def test_loss_goes_down_on_a_fixed_batch(name):
    method, cfg = _method(name)
    views = embedded_views(cfg, 16)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    progress = 0.5
    if name == "dino":  # fixed target: teacher momentum 1 (progress 1) and a frozen centre; with both
        progress, method.cfg.center_momentum = (
            1.0,
            1.0,
        )  # moving, centring first flattens the targets and the loss rises
    for step in range(15):
        out = method(views, progress, torch.Generator().manual_seed(step))
        loss, logs = out.loss, out.logs
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["recon_loss" if name == "mae" else "ssl_loss"].item())
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3, losses


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("arm", ["plain", "dilemma"])
def test_every_trainable_parameter_takes_part(name, arm):
    """DDP (no find_unused_parameters) fails on the second step if a trainable parameter took no part
    in the loss: every one gets a gradient, plain and with DILEMMA (I-JEPA: its average-pooled ViT)."""
    extra = list(METHODS[name].plain) if arm == "plain" else []
    if name == "ijepa":
        extra += IJEPA_RECIPE
    method, cfg = _method(name, *extra)
    views = embedded_views(cfg, 8)
    method(views, 0.3, torch.Generator().manual_seed(0)).loss.backward()
    idle = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not idle, idle


def test_registry_and_views_per_method():
    assert set(METHODS) == {"mocov3", "dino", "simclr", "mae", "byol", "vicreg", "ibot", "ijepa", "droppos"}
    shapes = {name: [tuple(v.shape) for v in embedded_views(_method(name)[1], 4)] for name in METHODS}
    assert shapes["mocov3"] == shapes["simclr"] == shapes["byol"] == shapes["vicreg"] == [(4, 1, 28, 28)] * 2
    assert shapes["dino"] == shapes["ibot"] == [(4, 1, 28, 28)] * 2 + [(4, 1, 16, 16)] * 2  # 2 global + 2 local
    assert shapes["mae"] == shapes["ijepa"] == shapes["droppos"] == [(4, 1, 28, 28)]


def test_dino_student_teacher_inputs_and_no_teacher_gradient():
    method, cfg = _method("dino")
    student, teacher = block_inputs(method.encoder), block_inputs(method.teacher_encoder)
    out = method(embedded_views(cfg, 8), 0.0, torch.Generator().manual_seed(0), True)
    loss, logs = out.loss, out.logs
    loss.backward()
    assert student == [(16, 1 + 12), (16, 1 + 16)]  # global crops sparse (K = 12); local crops dense 4 x 4
    assert teacher == [(16, 1 + 49)]  # global crops only, dense and clean
    frozen = [*method.teacher_encoder.parameters(), *method.teacher_head.parameters()]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert method.head.last_layer.weight.grad is not None and method.dilemma.head.proj.weight.grad is not None
    assert {"det_bce", "det_auroc", "teacher_temp", "momentum"} <= set(logs)


def test_dino_local_crops_can_be_corrupted_too():
    method, cfg = _method("dino", "method.dino.local_dilemma=true")
    student = block_inputs(method.encoder)
    method(embedded_views(cfg, 8), 0.0, torch.Generator().manual_seed(0))
    assert student == [(16, 1 + 12), (16, 1 + 4)]  # local: K = floor(16 * 0.25)


def test_dino_teacher_clean_positions_and_centre_update():
    method, cfg = _method("dino", "dilemma.misplace_prob=1.0", "dilemma.drop_rate=0.0")
    views = embedded_views(cfg, 8)
    assert method.center.abs().sum() == 0
    method.before_step(0.0)
    method(views[:2] + views[2:], 0.0, torch.Generator().manual_seed(0))
    assert method.center.abs().sum() == 0  # the forwards only observe; the centre moves once per step
    method.after_step()
    with torch.no_grad():
        teacher_out = method.teacher_head(method.teacher_encoder.vit.forward_features(torch.cat(views[:2]))[:, 0])
    assert torch.allclose(method.center, 0.1 * teacher_out.mean(0, keepdim=True), atol=1e-5)  # momentum 0.9 from 0
    assert "center" in method.state_dict()


def test_dino_loss_and_temperature_schedule():
    s = [torch.randn(4, 8) for _ in range(3)]
    t = [torch.randn(4, 8) for _ in range(2)]
    c = torch.zeros(1, 8)
    expected = []
    for i in range(2):
        q = F.softmax(t[i] / 0.05, -1)
        expected += [-(q * F.log_softmax(s[v] / 0.1, -1)).sum(-1).mean() for v in range(3) if v != i]
    assert torch.allclose(dino_loss(s, t, c, 0.1, 0.05), torch.stack(expected).mean())
    # a global crop never meets itself: with the pairs v == i included the loss would be another number
    with_self = [
        -(F.softmax(t[i] / 0.05, -1) * F.log_softmax(s[v] / 0.1, -1)).sum(-1).mean() for i in range(2) for v in range(3)
    ]
    assert not torch.allclose(dino_loss(s, t, c, 0.1, 0.05), torch.stack(with_self).mean())
    assert teacher_temperature_at(0.0, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert teacher_temperature_at(0.15, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert teacher_temperature_at(0.5, 0.04, 0.07, 0.3) == pytest.approx(0.07)


def test_nt_xent_matches_a_direct_computation():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    losses = []
    for i in range(10):
        positive = (i + 5) % 10
        others = [j for j in range(10) if j != i]
        sims = torch.stack([z[i] @ z[j] / 0.5 for j in others])
        losses.append(-(sims[others.index(positive)] - torch.logsumexp(sims, 0)))
    assert torch.allclose(nt_xent_loss(z1, z2, 0.5), torch.stack(losses).mean(), atol=1e-6)


@pytest.mark.parametrize("name", ["simclr", "vicreg"])
@pytest.mark.parametrize("clean_view", [False, True])
def test_two_student_views_and_clean_view_switch(name, clean_view):
    method, cfg = _method(name, f"method.{name}.clean_view={clean_view}")
    student = block_inputs(method.encoder)
    out = method(embedded_views(cfg, 8), 0.0, torch.Generator().manual_seed(0), True)
    loss, logs = out.loss, out.logs
    loss.backward()
    # both views sparse: one encoder call over both; a clean second view: a sparse call and a dense one
    assert student == ([(8, 1 + 12), (8, 1 + 49)] if clean_view else [(16, 1 + 12)])
    head = method.projector if name == "simclr" else method.expander
    assert "det_bce" in logs and head[0].weight.grad is not None


def test_mae_decoder_uses_true_positions_when_encoder_saw_wrong_ones():
    method, cfg = _method("mae", "dilemma.misplace_prob=1.0")
    images = embedded_views(cfg, 4)[0]
    seen = block_inputs(method.encoder)
    sample = method.dilemma.sample(4, generator=torch.Generator().manual_seed(0))
    assert (sample.positions != sample.keep).all()  # every visible token misplaced
    cls, patches = method.encoder(images, keep=sample.keep, positions=sample.positions)
    tokens = method.decoder_tokens(cls, patches, sample.keep)[:, 1:]
    embedded = method.decoder_embed(patches) + method.decoder_pos_embed[sample.keep]
    for b in range(4):  # the token encoded from patch keep[b, i] sits at keep[b, i], with keep[b, i]'s PE
        assert torch.allclose(tokens[b, sample.keep[b]], embedded[b], atol=1e-6)
        masked = torch.ones(49, dtype=torch.bool)
        masked[sample.keep[b]] = False
        assert torch.allclose(tokens[b, masked], method.mask_token[0, 0] + method.decoder_pos_embed[masked], atol=1e-6)
    assert seen == [(4, 1 + 12)]


def test_mae_loss_only_on_masked_patches_and_patchify_round_trip():
    method, cfg = _method("mae", "dilemma.misplace_prob=0")
    images = embedded_views(cfg, 4)[0]
    keep = torch.arange(12).repeat(4, 1)
    sample = TokenSample(keep, keep, torch.zeros(4, 12, dtype=torch.bool))
    pred = torch.randn(4, 49, 16)
    changed = pred.clone()
    changed[:, :12] += 5.0  # visible patches: no effect on the loss
    assert torch.equal(
        method.reconstruction_loss(pred, images, sample), method.reconstruction_loss(changed, images, sample)
    )
    changed[:, 20] += 5.0
    assert method.reconstruction_loss(changed, images, sample) > method.reconstruction_loss(pred, images, sample)
    assert torch.equal(unpatchify(patchify(images, 4), 4, 1, (7, 7)), images)
    assert torch.equal(patchify(images, 4)[:, 8], images[:, 0, 4:8, 4:8].reshape(4, 16))  # row 1, col 1 of the grid


def test_mae_needs_masking_and_draws_a_picture(tmp_path):
    from dilemma.errors import DilemmaError

    with pytest.raises(DilemmaError, match="drop_rate > 0"):
        _method("mae", "dilemma.drop_rate=0")
    method, cfg = _method("mae")
    (path,) = method.pictures(embedded_views(cfg, 8)[0], tmp_path)
    assert path.name == "mae_reconstruction.png" and path.stat().st_size > 500


def test_encoder_accepts_local_crop_sizes(tiny_encoder):
    enc = tiny_encoder()
    cls, patches = enc(torch.randn(2, 1, 16, 16))
    assert patches.shape == (2, 16, 32)
    _, pe = enc._split_pos_embed((7, 7))
    assert torch.equal(pe, enc.vit.pos_embed[0, 1:])  # native grid: the PE itself, not a resample


def test_byol_online_sparse_target_dense_and_no_target_gradient():
    method, cfg = _method("byol")
    online, target = block_inputs(method.encoder), block_inputs(method.target_encoder)
    out = method(embedded_views(cfg, 8), 0.0, torch.Generator().manual_seed(0), True)
    out.loss.backward()
    assert online == [(16, 1 + 12)]  # both views in one call, sparse (K = 12)
    assert target == [(16, 1 + 49)]  # dense and clean
    frozen = [*method.target_encoder.parameters(), *method.target_projector.parameters()]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert method.predictor[0].weight.grad is not None and method.dilemma.head.proj.weight.grad is not None
    assert {"det_bce", "det_auroc", "momentum"} <= set(out.logs)


def test_byol_loss_matches_a_direct_computation():
    """The method's loss, recomputed from the networks' outputs: dense, clean views (p = r = 0), so
    the online network's input is known; prediction of each view against the other view's target."""
    method, cfg = _method("byol", "dilemma.misplace_prob=0", "dilemma.drop_rate=0")
    views = embedded_views(cfg, 8)
    out = method(views, 0.0, torch.Generator().manual_seed(0))
    with torch.no_grad():
        p = [method.predictor(method.projector(method.encoder.vit.forward_features(v)[:, 0])) for v in views]
        z = [method.target_projector(method.target_encoder.vit.forward_features(v)[:, 0]) for v in views]
    direct = sum(
        ((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
        for a, b in ((p[0], z[1]), (p[1], z[0]))
    )
    assert torch.allclose(out.logs["ssl_loss"], direct, atol=1e-5)
    # the function alone: 2 - 2 cos, no gradient into the target
    a, b = torch.randn(6, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True)
    assert torch.allclose(byol_loss(a, b), (2 - 2 * F.cosine_similarity(a, b)).mean(), atol=1e-6)
    byol_loss(a, b).backward()
    assert a.grad is not None and b.grad is None


def test_vicreg_loss_matches_a_direct_computation():
    torch.manual_seed(0)
    n, d = 12, 6
    z1, z2 = torch.randn(n, d) * 0.5, torch.randn(n, d) * 2.0  # one view under the std hinge, one above
    invariance = sum((z1[i, k] - z2[i, k]) ** 2 for i in range(n) for k in range(d)) / (n * d)
    variance, covariance = 0.0, 0.0
    for z in (z1, z2):
        std = torch.stack([torch.sqrt(z[:, k].var(unbiased=True) + 1e-4) for k in range(d)])
        variance = variance + torch.clamp(1 - std, min=0).mean() / 2
        cov = torch.cov(z.T)  # (d, d), normalised by n - 1
        covariance = covariance + sum(cov[a, b] ** 2 for a in range(d) for b in range(d) if a != b) / d
    loss, terms = vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    assert torch.allclose(terms["invariance"], invariance, atol=1e-5)
    assert torch.allclose(terms["variance"], variance, atol=1e-5) and 0 < terms["variance"] < 1
    assert torch.allclose(terms["covariance"], covariance, atol=1e-5)
    assert torch.allclose(loss, 25 * invariance + 25 * variance + covariance, atol=1e-4)
    # the weights are the config's: a method built with others logs the same terms, another total
    method, cfg = _method("vicreg", "method.vicreg.covariance_weight=0", "method.vicreg.variance_weight=0")
    out = method(embedded_views(cfg, 8), 0.0, torch.Generator().manual_seed(0))
    assert torch.allclose(out.logs["ssl_loss"], 25 * out.logs["invariance"])
