"""iBOT: block-wise masks, how mask tokens co-exist with dropped and misplaced tokens, the loss
against a direct computation, the teacher, the patch centre."""

import pytest
import torch
import torch.nn.functional as F

from dilemma.losses import dino_loss
from dilemma.masks import batch_draws, block_masks
from dilemma.methods.dino import teacher_temperature_at
from dilemma.pretext import Dilemma, GlobalBatchRows, hide_under_mask, sample_tokens
from tests.conftest import block_inputs, embedded_views, tiny_method


def _ibot(*overrides):
    return tiny_method("ibot", *overrides)


def test_block_masks_meet_their_budget_in_blocks():
    ratios = torch.tensor([0.0, 0.1, 0.3, 0.5] * 50)
    masks = block_masks(ratios, (14, 14), generator=torch.Generator().manual_seed(0))
    again = block_masks(ratios, (14, 14), generator=torch.Generator().manual_seed(0))
    assert masks.shape == (200, 196) and masks.dtype == torch.bool and torch.equal(masks, again)
    share = masks.float().mean(dim=1)
    assert (share <= ratios + 1e-6).all()  # never more than the budget (BEiT's rule)
    assert share[ratios == 0].sum() == 0
    for target in (0.1, 0.3, 0.5):  # close to it on average: blocks are added until the budget is met
        assert share[ratios == target].mean() > target - 0.03, (target, share[ratios == target].mean())
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    grid = masks.view(-1, 14, 14)
    neighbour = torch.zeros_like(grid)
    neighbour[:, 1:] |= grid[:, :-1]
    neighbour[:, :-1] |= grid[:, 1:]
    neighbour[:, :, 1:] |= grid[:, :, :-1]
    neighbour[:, :, :-1] |= grid[:, :, 1:]
    # (a block of at least 16 patches at 14 x 14; only a budget's last few patches may stand alone, as in BEiT)
    assert (grid & neighbour).sum() >= 0.97 * grid.sum()


def test_block_masks_are_the_same_however_the_batch_is_split():
    def draw(rows, generator):
        return block_masks(torch.full((rows,), 0.4), (7, 7), generator=generator)

    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    whole = batch_draws(GlobalBatchRows(gen, 6, torch.arange(6)), 6, draw)
    parts = []
    for rows in (torch.tensor([0, 2, 4]), torch.tensor([1, 3, 5])):  # two processes' rows
        gen.set_state(state)
        parts.append(batch_draws(GlobalBatchRows(gen, 6, rows), 3, draw))
    assert torch.equal(whole[0::2], parts[0]) and torch.equal(whole[1::2], parts[1])


def test_mask_tokens_keep_their_place_and_are_never_misplaced():
    sample = sample_tokens(64, 49, 0.5, 1.0, generator=torch.Generator().manual_seed(0))  # every kept token misplaced
    mask = torch.rand(64, 49, generator=torch.Generator().manual_seed(1)) < 0.5
    hidden, masked = hide_under_mask(sample, mask)
    assert torch.equal(masked, mask.gather(1, sample.keep))  # masked: the kept patches under the mask
    assert torch.equal(hidden.keep, sample.keep)  # dropped patches stay dropped
    assert torch.equal(hidden.positions[masked], sample.keep[masked])  # a mask token at its true place
    assert not hidden.misplaced[masked].any()
    visible = ~masked
    assert torch.equal(hidden.positions[visible], sample.positions[visible]) and hidden.misplaced[visible].all()
    assert hide_under_mask(None, mask) == (None, mask)  # dense and clean: the mask on the full grid


def test_detection_counts_only_the_visible_tokens():
    det = Dilemma(8, 16, misplace_prob=0.5, drop_rate=0.5)
    sample = det.sample(4, generator=torch.Generator().manual_seed(0))
    tokens = torch.randn(4, 8, 8)
    counted = torch.rand(4, 8, generator=torch.Generator().manual_seed(2)) < 0.6
    bce, _ = det.loss(tokens, sample, counted=counted)
    logits = det.head(tokens)
    per_image = [  # each image's mean over its counted tokens, then the mean over images
        F.binary_cross_entropy_with_logits(logits[b][counted[b]], sample.misplaced[b][counted[b]].float())
        for b in range(4)
    ]
    assert counted.any(dim=1).all() and torch.allclose(bce, torch.stack(per_image).mean())
    assert torch.allclose(det.loss(tokens, sample)[0], det.loss(tokens, sample, counted=torch.ones_like(counted))[0])


def test_the_mask_token_replaces_the_patch_content_before_the_position(tiny_encoder):
    encoder = tiny_encoder()
    images = torch.randn(2, 1, 28, 28)
    token = torch.randn(32)
    all_masked = torch.ones(2, 49, dtype=torch.bool)
    cls, patches = encoder(images, masked=all_masked, mask_token=token)
    cls_other, patches_other = encoder(torch.randn(2, 1, 28, 28), masked=all_masked, mask_token=token)
    assert torch.allclose(patches, patches_other) and torch.allclose(cls, cls_other)  # content hidden
    assert not torch.allclose(patches[0, 0], patches[0, 1])  # ... but each mask token has its own place
    none_masked = torch.zeros(2, 49, dtype=torch.bool)
    assert torch.allclose(encoder(images, masked=none_masked, mask_token=token)[1], encoder(images)[1])


def test_student_teacher_inputs_and_no_teacher_gradient():
    method, cfg = _ibot()
    student, teacher = block_inputs(method.encoder), block_inputs(method.teacher_encoder)
    out = method(embedded_views(cfg, 8), 0.0, torch.Generator().manual_seed(0), True)
    out.loss.backward()
    assert student == [(16, 1 + 12), (16, 1 + 16)]  # global crops sparse (K = 12); local crops dense
    assert teacher == [(16, 1 + 49)]  # global crops only, dense, clean, unmasked
    frozen = [*method.teacher_encoder.parameters(), *method.teacher_head.parameters()]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    assert method.patch_head is method.head  # shared head (the paper's default)
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    assert method.dilemma.head.proj.weight.grad is not None
    assert {"cls_loss", "patch_loss", "masked_share", "det_bce", "det_auroc"} <= set(out.logs)


@pytest.mark.parametrize(
    "overrides",
    [(), ("method.ibot.shared_head=false",), ("dilemma.misplace_prob=0", "dilemma.drop_rate=0")],
    ids=["dilemma", "separate-head", "plain"],
)
def test_loss_is_the_direct_computation(overrides):
    """Replay the forward's draws, then recompute L_[CLS] (DINO's cross-view terms) and L_MIM (a loop
    over images and their masked tokens against the teacher's clean patch at the same place). Centres
    non-zero and temperatures in their warm-up, the patch schedule other than the class one, so a mix-up
    of centres or schedules shows."""
    temps = ("method.ibot.warmup_teacher_patch_temp=0.05", "method.ibot.teacher_patch_temp=0.06")
    method, cfg = _ibot("method.ibot.mask_prob=1.0", *temps, *overrides)
    with torch.no_grad():
        method.center.normal_(generator=torch.Generator().manual_seed(5))
        method.patch_center.normal_(generator=torch.Generator().manual_seed(6))
    views, n, progress = embedded_views(cfg, 8), 8, 0.1
    out = method(views, progress, torch.Generator().manual_seed(0))
    c = cfg.method.ibot
    cls_temp = teacher_temperature_at(progress, 0.04, 0.07, 0.3)  # 0.05
    patch_temp = teacher_temperature_at(progress, 0.05, 0.06, 0.3)  # 0.0533

    gen = torch.Generator().manual_seed(0)
    mask = method.draw_masks(n, (7, 7), gen, "cpu")
    sample = method.dilemma.sample(2 * n, generator=gen, views=2)
    sample, masked = hide_under_mask(sample, mask)
    keep = torch.arange(49).expand(2 * n, -1) if sample is None else sample.keep
    global_views = torch.cat(views[:2])
    with torch.no_grad():
        if sample is None:
            s_cls, s_patch = method.encoder(global_views, masked=masked, mask_token=method.mask_token)
        else:
            s_cls, s_patch = method.encoder(global_views, sample.keep, sample.positions, masked, method.mask_token)
        local = [method.head(method.encoder(v)[0]) for v in views[2:]]
        t_cls, t_patch = method.teacher_encoder(global_views)
        cls_loss = dino_loss(
            [*method.head(s_cls).chunk(2), *local],
            list(method.teacher_head(t_cls).chunk(2)),
            method.center,
            0.1,
            cls_temp,
        )
        s_out, t_out = method.patch_head(s_patch), method.teacher_patch_head(t_patch)
        per_image = []
        for b in range(2 * n):
            terms = [
                -(
                    F.softmax((t_out[b, keep[b, k]] - method.patch_center[0]) / patch_temp, -1)
                    * F.log_softmax(s_out[b, k] / c.student_temp, -1)
                ).sum()
                for k in range(masked.shape[1])
                if masked[b, k]
            ]
            per_image.append(torch.stack(terms).mean() if terms else torch.tensor(0.0))
        patch_loss = torch.stack(per_image).mean()
    assert masked.any() and torch.allclose(out.logs["cls_loss"], cls_loss, atol=1e-5)
    assert torch.allclose(out.logs["patch_loss"], patch_loss, atol=1e-5)
    assert torch.allclose(out.logs["ssl_loss"], cls_loss + patch_loss, atol=1e-5)


def test_patch_centre_moves_once_per_step_by_the_teacher_patch_mean():
    method, cfg = _ibot("method.ibot.shared_head=false")
    views = embedded_views(cfg, 8)
    method.before_step(0.0)
    method(views, 0.0, torch.Generator().manual_seed(0))
    assert method.patch_center.abs().sum() == 0 and method.center.abs().sum() == 0
    method.after_step()
    with torch.no_grad():
        out = method.teacher_patch_head(method.teacher_encoder(torch.cat(views[:2]))[1])  # (2n, L, d)
    assert torch.allclose(method.patch_center, 0.1 * out.mean(dim=(0, 1))[None], atol=1e-5)
    assert {"center", "patch_center", "mask_token"} <= set(method.state_dict())
    assert not method.center.equal(method.patch_center[:, : method.center.shape[1]])


def test_loss_goes_down_on_a_fixed_batch():
    method, cfg = _ibot()
    method.cfg.center_momentum = 1.0  # fixed targets: frozen centres, and teacher momentum 1 at progress 1
    views = embedded_views(cfg, 16)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(15):
        out = method(views, 1.0, torch.Generator().manual_seed(0))  # the same masks and tokens each step
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.logs["ssl_loss"].item())
    assert sum(losses[-3:]) / 3 < 0.97 * sum(losses[:3]) / 3, [round(v, 3) for v in losses]


def test_masked_share_follows_the_config():
    dense = ("dilemma.misplace_prob=0", "dilemma.drop_rate=0")
    method, cfg = _ibot("method.ibot.mask_prob=0", *dense)
    out = method(embedded_views(cfg, 8), 0.0, torch.Generator().manual_seed(0))
    assert out.logs["masked_share"] == 0 and out.logs["patch_loss"] == 0  # no mask: DINO's loss alone
    method, cfg = _ibot(
        "method.ibot.mask_prob=1", "method.ibot.mask_min_ratio=0.4", "method.ibot.mask_max_ratio=0.4", *dense
    )
    out = method(embedded_views(cfg, 8), 0.0, torch.Generator().manual_seed(0))
    assert 0.3 < out.logs["masked_share"] <= 0.4
