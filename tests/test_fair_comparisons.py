"""What would confound a comparison of base vs base + DILEMMA: the lr schedule's shape, what the
switches mean, noisy teacher targets, which backbone is read out, pooling, loss precision and the
averaging of the detection loss. Each test failed before its fix."""

import json

import pytest
import torch

from dilemma.build import build_method
from dilemma.cli import main
from dilemma.config import load_config
from dilemma.losses import info_nce_loss, nt_xent_loss
from dilemma.models import create_encoder
from dilemma.pretext import Dilemma
from dilemma.rundir import load_checkpoint
from dilemma.schedules import learning_rate, progress
from dilemma.weights import encoder_from_checkpoint
from tests.conftest import TINY


def _sets(*extra):
    return [arg for kv in [*TINY, *extra] for arg in ("--set", kv)]


def test_lr_schedule_depends_on_progress_alone_and_reaches_the_set_lr(tmp_path):
    lr = dict(lr=1e-3, min_lr=1e-5, warmup=0.1)
    assert learning_rate(0.0, **lr) == 0.0 and learning_rate(0.05, **lr) == pytest.approx(5e-4)
    assert learning_rate(0.1, **lr) == pytest.approx(1e-3) and learning_rate(1.0, **lr) == pytest.approx(1e-5)
    # two arms of equal wall-clock, one stepping twice as fast: the same lr at the same time
    budget = 60.0
    for elapsed in (1.0, 5.0, 6.0, 30.0, 59.0):
        slow = learning_rate(progress(int(elapsed), 10**6, elapsed, budget), **lr)
        fast = learning_rate(progress(int(2 * elapsed), 10**6, elapsed, budget), **lr)
        assert slow == fast
    # a real run of 20 steps reaches the set lr (the step-counted warm-up of 30 steps never did)
    out = tmp_path / "run"
    sets = _sets("optim.lr=1e-3", "optim.warmup=0.1", "eval.knn_at_end=false")
    assert main(["pretrain", "--out", str(out), "--max-steps", "20", *sets]) == 0
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()[:-1]]
    assert max(lrs) == pytest.approx(1e-3, rel=1e-6) and lrs[0] < 1e-4 and lrs[-1] < 1e-4


def test_weight_zero_turns_detection_off_but_keeps_the_inputs_sparse():
    dilemma = Dilemma(32, 49, misplace_prob=0.2, drop_rate=0.75, weight=0.0)
    sample = dilemma.sample(16, generator=torch.Generator().manual_seed(0))
    assert dilemma.head is None and sample.keep.shape == (16, 12)  # sparse: K = 12 of 49
    assert torch.equal(sample.positions, sample.keep) and not sample.misplaced.any()  # nothing misplaced
    cfg = load_config(None, [*TINY, "dilemma.weight=0"])
    torch.manual_seed(0)
    out = build_method(cfg)(tuple(torch.randn(2, 4, 1, 28, 28)), 0.0, torch.Generator().manual_seed(0), True)
    assert "det_bce" not in out.logs and torch.isfinite(out.loss)


@pytest.mark.parametrize("name,teacher", [("mocov3", "momentum_encoder"), ("dino", "teacher_encoder")])
def test_teachers_have_no_stochastic_depth(name, teacher):
    cfg = load_config(None, [*TINY, f"method.name={name}", "model.drop_path_rate=0.5"])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert not torch.equal(method.encoder(x)[0], method.encoder(x)[0])  # the student's drop-path is on
        target = getattr(method, teacher)
        assert torch.equal(target(x)[0], target(x)[0])  # the teacher's targets are not noisy


def test_dino_is_read_out_on_its_teacher(tmp_path):
    out = tmp_path / "dino"
    sets = _sets("method.name=dino", "optim.lr=1e-2", "optim.warmup=0", "eval.knn_at_end=false")
    assert main(["pretrain", "--out", str(out), "--max-steps", "2", *sets]) == 0
    state = load_checkpoint(out)["model"]
    encoder, _ = encoder_from_checkpoint(out)
    key = "vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(state[f"encoder.{key}"], state[f"teacher_encoder.{key}"])
    assert torch.equal(encoder.state_dict()[key], state[f"teacher_encoder.{key}"])


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("vit_tiny_patch16_224", {"global_pool": "avg"}),  # class token kept, mean of patches, fc_norm
        ("vit_base_patch16_gap_224", {"embed_dim": 32, "num_heads": 2}),
        ("vit_tiny_patch16_224", {}),  # the class token
    ],
)
def test_the_image_embedding_is_pooled_as_timm_pools_it(name, kwargs):
    torch.manual_seed(0)
    encoder = create_encoder(name, img_size=28, patch_size=4, in_chans=1, depth=2, **kwargs).eval()
    x = torch.randn(3, 1, 28, 28)
    vit = encoder.vit
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(x), pre_logits=True)
        assert torch.allclose(encoder(x)[0], expected, atol=1e-5)
    encoder(x)[0].sum().backward()
    assert all(p.grad is not None for p in vit.fc_norm.parameters())  # fc_norm, when there is one, trains


@pytest.mark.parametrize("loss", [info_nce_loss, lambda q, k, t: nt_xent_loss(q, k, t)])
def test_contrastive_logits_stay_fp32_under_bf16_autocast(loss):
    torch.manual_seed(0)
    q, k = torch.randn(64, 128), torch.randn(64, 128)
    exact = loss(q, k, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(q, k, 0.1)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, exact, atol=1e-5), (mixed, exact)


def test_dino_detection_loss_is_the_mean_over_views():
    cfg = load_config(None, [*TINY, "method.name=dino", "method.dino.local_dilemma=true", "method.dino.local_crops=4"])
    torch.manual_seed(0)
    method = build_method(cfg)
    calls, real = [], method.dilemma.loss

    def recording(patches, sample, with_metrics=False, views=1):
        bce, logs = real(patches, sample, with_metrics, views)
        calls.append(bce.detach())
        return bce, logs

    method.dilemma.loss = recording
    views = (*torch.randn(2, 8, 1, 28, 28), *torch.randn(4, 8, 1, 16, 16))
    out = method(views, 0.0, torch.Generator().manual_seed(0), True)
    global_bce, local_bce = calls  # one pass over the 2 global crops, one over the 4 local crops
    assert out.logs["det_bce"] == pytest.approx(float((2 * global_bce + 4 * local_bce) / 6), rel=1e-6)
    # the weights matter: the two passes differ, so a plain mean of the passes would be another number
    assert abs(float(global_bce - local_bce)) > 1e-3
    assert out.logs["det_bce"] != pytest.approx(float((global_bce + local_bce) / 2), rel=1e-4)
    assert float(out.loss.detach()) == pytest.approx(float(out.logs["ssl_loss"]) + float(out.logs["det_bce"]), rel=1e-5)
