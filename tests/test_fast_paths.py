"""The faster training step computes what the slower, per-view definition computes.

One encoder call over several stacked views (student and teacher branches), per-view token draws,
the fused EMA and the fused / multi-tensor AdamW each give the same numbers as the direct version
to float round-off: losses, logs and gradients.
"""

import pytest
import torch

from dilemma.build import adamw, build_method, param_groups
from dilemma.config import load_config
from dilemma.errors import DilemmaError
from dilemma.methods.base import Detection, Method, StudentOutput
from dilemma.pretext import Dilemma, GlobalBatchRows, TokenSample, sample_tokens
from dilemma.train.loop import Run
from tests.conftest import TINY


def _method(name, *overrides):
    cfg = load_config(None, [*TINY, f"method.name={name}", *overrides])
    torch.manual_seed(0)
    return build_method(cfg)


def _views(shapes):
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(shape, generator=g) for shape in shapes)


def test_stacked_views_draw_as_if_each_were_alone():
    dilemma = Dilemma(32, 49, misplace_prob=0.3, drop_rate=0.75)
    stacked = dilemma.sample(3 * 5, generator=torch.Generator().manual_seed(0), views=3)
    g = torch.Generator().manual_seed(0)
    alone = [sample_tokens(5, 49, 0.75, 0.3, generator=g) for _ in range(3)]
    for field in ("keep", "positions", "misplaced"):
        assert torch.equal(getattr(stacked, field), torch.cat([getattr(s, field) for s in alone]))
    # in a global batch of 8, a micro-batch holding images 2 and 5 gets those rows of each view
    rows = GlobalBatchRows(torch.Generator().manual_seed(0), 8, torch.tensor([2, 5]))
    part = dilemma.sample(2 * 2, generator=rows, views=2)
    full = dilemma.sample(2 * 8, generator=torch.Generator().manual_seed(0), views=2)
    for field in ("keep", "positions", "misplaced"):
        assert torch.equal(getattr(part, field), getattr(full, field)[[2, 5, 10, 13]])
    with pytest.raises(DilemmaError, match="views="):  # stacked views passed as one: refused, not mis-drawn
        dilemma.sample(2 * 2, generator=rows)


def test_detection_logs_are_the_mean_over_views():
    torch.manual_seed(0)
    dilemma = Dilemma(16, 49, misplace_prob=0.2, drop_rate=0.5)
    sample = dilemma.sample(2 * 6, generator=torch.Generator().manual_seed(0), views=2)
    patches = torch.randn(12, sample.keep.shape[1], 16)
    bce, logs = dilemma.loss(patches, sample, with_metrics=True, views=2)
    views = [TokenSample(sample.keep[r], sample.positions[r], sample.misplaced[r]) for r in (slice(0, 6), slice(6, 12))]
    halves = [dilemma.loss(patches[r], view, True) for r, view in zip((slice(0, 6), slice(6, 12)), views, strict=True)]
    assert torch.allclose(bce, (halves[0][0] + halves[1][0]) / 2, atol=1e-6)
    for key in ("det_acc", "det_auroc"):
        assert logs[key] == pytest.approx((halves[0][1][key] + halves[1][1][key]) / 2)


def _per_view_student(self, images, draws, with_metrics, corrupt=True, views=1, patches=True):
    """The direct definition: each stacked view encoded by its own call (a full forward, whether or
    not the patch tokens are read), then put back together."""
    outs = [_batched_student(self, chunk, draws, with_metrics, corrupt) for chunk in images.chunk(views)]
    detections = [o.detection for o in outs if o.detection is not None]
    detection = None
    if detections:  # the mean over the views, counted as that many views
        logs = {k: sum(d.logs[k] for d in detections) / views for k in detections[0].logs}
        detection = Detection(torch.stack([d.bce for d in detections]).mean(), logs, views)
    embeddings, patches = torch.cat([o.embedding for o in outs]), torch.cat([o.patches for o in outs])
    return StudentOutput(embeddings, patches, detection)


_batched_student = Method.student


def _forward_and_grads(method, views):
    out = method(views, 0.3, torch.Generator().manual_seed(0), True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize(
    "name, overrides, shapes",
    [
        ("mocov3", (), [(8, 1, 28, 28)] * 2),
        ("simclr", (), [(8, 1, 28, 28)] * 2),
        ("simclr", ("method.simclr.clean_view=true",), [(8, 1, 28, 28)] * 2),
        ("dino", (), [(8, 1, 28, 28)] * 2 + [(8, 1, 16, 16)] * 2),
        ("dino", ("method.dino.local_dilemma=true",), [(8, 1, 28, 28)] * 2 + [(8, 1, 16, 16)] * 2),
        ("mocov3", ("dilemma.misplace_prob=0",), [(8, 1, 28, 28)] * 2),  # sparse only: nothing detected
        ("byol", (), [(8, 1, 28, 28)] * 2),
        ("vicreg", (), [(8, 1, 28, 28)] * 2),
        ("vicreg", ("method.vicreg.clean_view=true",), [(8, 1, 28, 28)] * 2),
        ("dino", ("dilemma.misplace_prob=0", "dilemma.drop_rate=0"), [(8, 1, 28, 28)] * 2 + [(8, 1, 16, 16)] * 2),
        ("ibot", (), [(8, 1, 28, 28)] * 2 + [(8, 1, 16, 16)] * 2),  # the local crops' one call
    ],
)
def test_one_encoder_call_over_the_views_equals_one_call_per_view(name, overrides, shapes, monkeypatch):
    method, views = _method(name, *overrides), _views(shapes)
    fast, fast_grads = _forward_and_grads(method, views)
    for branch in ("momentum_encoder", "target_encoder"):  # MoCo v3's / BYOL's EMA branch: one full forward per view
        if hasattr(method, branch):
            ema = getattr(method, branch)
            monkeypatch.setattr(ema, "embed", lambda images, ema=ema: torch.cat([ema(v)[0] for v in images.chunk(2)]))
    if hasattr(method, "teacher_encoder"):  # DINO's teacher: the full forward (all tokens through the last block)
        teacher = method.teacher_encoder
        monkeypatch.setattr(teacher, "embed", lambda images: teacher(images)[0])
    monkeypatch.setattr(Method, "student", _per_view_student)
    slow, slow_grads = _forward_and_grads(method, views)
    assert torch.allclose(fast.loss, slow.loss, rtol=1e-5, atol=1e-6)
    assert fast.logs.keys() == slow.logs.keys()
    for key, value in fast.logs.items():
        assert float(value) == pytest.approx(float(slow.logs[key]), rel=1e-5, abs=1e-6), key
    assert fast_grads.keys() == slow_grads.keys()
    for key in fast_grads:  # fp32 round-off, relative to each gradient's size
        assert (fast_grads[key] - slow_grads[key]).norm() <= 1e-4 * slow_grads[key].norm() + 1e-6, key


@pytest.mark.parametrize(
    "name, overrides, last_mlp_tokens",
    [
        ("mocov3", (), [13]),  # 12 kept patch tokens + the class token: the detection head reads them
        ("mocov3", ("dilemma.misplace_prob=0",), [1]),  # sparse, nothing to detect
        ("mocov3", ("dilemma.misplace_prob=0", "dilemma.drop_rate=0"), [1]),  # plain
        ("simclr", ("method.simclr.clean_view=true",), [13, 1]),
        ("byol", (), [13]),
        ("vicreg", ("method.vicreg.clean_view=true",), [13, 1]),
        ("dino", (), [13, 1]),  # global crops detected, local crops dense and clean
        ("dino", ("method.dino.local_dilemma=true",), [13, 5]),
        ("ibot", (), [13, 1]),  # global crops: every kept token is read (mask tokens, detection)
        ("ibot", ("dilemma.misplace_prob=0", "dilemma.drop_rate=0"), [50, 1]),
    ],
)
def test_the_student_skips_patch_work_only_where_nothing_reads_the_patches(name, overrides, last_mlp_tokens):
    method = _method(name, *overrides)
    shapes = [(8, 1, 28, 28)] * 2 + ([(8, 1, 16, 16)] * 2 if name in ("dino", "ibot") else [])
    seen = []
    method.encoder.vit.blocks[-1].mlp.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    method(_views(shapes), 0.3, torch.Generator().manual_seed(0))
    assert seen == last_mlp_tokens


def _students_view_by_view(method, x1, x2):
    """Each view drawn and encoded on its own, as the paper's pseudo-code writes it: the class
    embeddings of both views and their mean detection BCE, with the draws the method makes."""
    g = torch.Generator().manual_seed(0)
    s1, s2 = method.dilemma.sample(8, generator=g), method.dilemma.sample(8, generator=g)
    (c1, p1), (c2, p2) = (method.encoder(x, keep=s.keep, positions=s.positions) for x, s in ((x1, s1), (x2, s2)))
    return c1, c2, (method.dilemma.loss(p1, s1)[0] + method.dilemma.loss(p2, s2)[0]) / 2


def test_mocov3_is_its_per_view_definition():
    """MoCo v3's forward written out view by view, as in the paper's pseudo-code."""
    method = _method("mocov3")
    x1, x2 = _views([(8, 1, 28, 28)] * 2)
    out = method((x1, x2), 0.3, torch.Generator().manual_seed(0))
    c1, c2, bce = _students_view_by_view(method, x1, x2)
    q1, q2 = method.predictor(method.projector(c1)), method.predictor(method.projector(c2))
    with torch.no_grad():
        k1 = method.momentum_projector(method.momentum_encoder(x1)[0])
        k2 = method.momentum_projector(method.momentum_encoder(x2)[0])
    expected = method.criterion(q1, k2) + method.criterion(q2, k1) + method.dilemma.weight * bce
    assert torch.allclose(out.loss, expected, rtol=1e-5)


def test_fused_ema_equals_its_formula():
    method = _method("mocov3")
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(torch.randn_like(p))
    teacher = [p.clone() for p in method.momentum_encoder.parameters()]
    online = [p.clone() for p in method.encoder.parameters()]
    method.update_teacher(0.9)
    for t, o, now in zip(teacher, online, method.momentum_encoder.parameters(), strict=True):
        assert torch.allclose(now, 0.9 * t + 0.1 * o, atol=1e-6)


def test_simclr_is_its_per_view_definition():
    """SimCLR's forward written out view by view: the projector's batch norm sees each view alone."""
    method = _method("simclr")
    x1, x2 = _views([(8, 1, 28, 28)] * 2)
    out = method((x1, x2), 0.3, torch.Generator().manual_seed(0))
    c1, c2, bce = _students_view_by_view(method, x1, x2)
    expected = method.criterion(method.projector(c1), method.projector(c2)) + method.dilemma.weight * bce
    assert torch.allclose(out.loss, expected, rtol=1e-5)


@pytest.mark.parametrize("use_scaler", [False, True])
def test_training_optimiser_equals_reference_adamw(use_scaler):
    """``adamw`` (fused where this torch has it, else multi-tensor) makes the for-loop AdamW's updates."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2)) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    fast = adamw(param_groups(models[0], 0.05), 1e-2, use_scaler=use_scaler)
    reference = torch.optim.AdamW(param_groups(models[1], 0.05), lr=1e-2, foreach=False)
    for step in range(5):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
        for model, optimizer in zip(models, (fast, reference), strict=True):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    fused_here = not use_scaler and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    assert (fast.defaults["fused"], fast.defaults["foreach"]) == ((True, None) if fused_here else (None, True))


def test_resume_keeps_the_optimiser_implementation_of_this_machine(tmp_path):
    """A checkpoint's optimiser state from another implementation (a for-loop AdamW: older runs, or
    another device) resumes into the one chosen here, and the training continues from it."""
    from dilemma.cli import main
    from dilemma.rundir import atomic_save, load_checkpoint

    out = tmp_path / "run"
    common = ["--max-steps", "2", *(f"--set={s}" for s in [*TINY, "eval.knn_at_end=false"])]
    assert main(["pretrain", "--out", str(out), *common]) == 0
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    for group in ckpt["optimizer"]["param_groups"]:
        group.update(fused=None, foreach=False)  # as a plain torch.optim.AdamW(params, lr) saves it
    atomic_save(ckpt, out / "checkpoints" / "last.pt")
    restored = {}
    real_restore = Run.restore

    def spy(run, state):
        real_restore(run, state)
        restored.update(run.stepper.optimizer.param_groups[0])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "restore", spy)
        assert main(["pretrain", "--out", str(out), "--resume", "--max-steps", "3", *common[2:]]) == 0
    expected = adamw(param_groups(torch.nn.Linear(2, 2), 0.0), 1e-3).defaults
    assert (restored["fused"], restored["foreach"]) == (expected["fused"], expected["foreach"])
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3
