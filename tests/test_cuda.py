"""The CUDA paths: autocast bf16 / fp16 with the gradient scaler, the fused optimiser, pinned-memory
loaders, SyncBatchNorm in a one-process NCCL group, ``torch.compile``, a whole run and its resume.

Marked ``cuda`` and skipped without a GPU; ``benchmarks/gpu_check.py`` runs them first
(``python -m pytest -m cuda``). Their CPU counterparts are in the other test files.
"""

import datetime
import json
import shutil

import pytest
import torch

from dilemma.build import adamw, build_method, build_views, load_splits, param_groups
from dilemma.cli import main
from dilemma.config import load_config
from dilemma.data import PretrainBatches, pretrain_loader
from dilemma.distributed import sync_batchnorm
from dilemma.rundir import load_checkpoint
from dilemma.train.step import Stepper
from tests.conftest import TINY, view_settings

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


def _setup(method: str, precision: str = "fp32", *extra):
    cfg = load_config(None, [*TINY, f"method.name={method}", "data.batch_size=16", *extra])
    torch.manual_seed(0)
    model = build_method(cfg).to(CUDA)
    optimizer = adamw(param_groups(model, 0.05), 1e-3, use_scaler=precision == "fp16")
    batches = PretrainBatches(load_splits(cfg).train, 16, build_views(cfg), seed=0)
    batch = batches[0]
    views = batches.views.finish(batch.views, batch.draws, CUDA, model.encoder.mean, model.encoder.std)
    return cfg, model, optimizer, views


@pytest.mark.parametrize("method", ["mocov3", "dino", "simclr", "mae", "byol", "vicreg", "ibot", "ijepa"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_update_the_weights(method, precision):
    _, model, optimizer, views = _setup(method, precision)
    stepper = Stepper(model, optimizer, device=CUDA, precision=precision, grad_clip=3.0)
    before = [p.detach().clone() for p in model.encoder.parameters() if p.requires_grad]
    for step in range(3):
        result = stepper.step(views, 0.1, step, with_metrics=True)
        assert not result.skipped and torch.isfinite(result.loss)
    after = [p for p in model.encoder.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert stepper.scaler.is_enabled() == (precision == "fp16")
    assert optimizer.defaults.get("fused")  # CUDA has the fused AdamW in every supported torch


def test_contrastive_logits_stay_fp32_under_bf16():
    from dilemma.losses import info_nce_loss

    q, k = torch.randn(8, 16, device=CUDA), torch.randn(8, 16, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = info_nce_loss(q, k, 0.2)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, info_nce_loss(q, k, 0.2), rtol=1e-5)


def test_pinned_loader_batches_equal_the_unpinned_ones():
    cfg = load_config(None, TINY)
    batches = PretrainBatches(load_splits(cfg).train, 16, build_views(cfg), seed=0)
    pinned = next(iter(pretrain_loader(batches, 0, 2, num_workers=2, pin_memory=True)))
    assert all(v.is_pinned() for v in pinned.views)
    for got, expected in zip(pinned.views, batches[0].views, strict=True):
        assert torch.equal(got.to(CUDA, non_blocking=True).cpu(), expected)


def test_the_device_stage_never_waits_for_the_gpu_and_equals_the_cpus():
    """Every RGB op, with pinned crops as the loader gives them: no host-device synchronisation
    (which would stall the CPU behind the queued step), and the CPU's pixels to float round-off."""
    from dilemma.data import TensorImageSet, multi_crop

    images = TensorImageSet(torch.randint(0, 256, (32, 3, 48, 48), dtype=torch.uint8), torch.zeros(32).long())
    settings = view_settings(
        48, 3, saturation=0.2, hue=0.1, grayscale_prob=0.2, solarize_prob=0.2, asymmetric_views=True
    )
    batches = PretrainBatches(images, 16, multi_crop(settings, 16, 3, local_max_scale=0.4), seed=0)
    batch = next(iter(pretrain_loader(batches, 0, 1, num_workers=0, pin_memory=True)))
    finish = lambda device: batches.views.finish(batch.views, batch.draws, device, (0.4,) * 3, (0.2,) * 3)  # noqa: E731
    finish(CUDA)  # warm-up: the pinned host allocator's first blocks
    torch.cuda.set_sync_debug_mode("error")
    try:
        on_gpu = finish(CUDA)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for gpu, cpu in zip(on_gpu, finish(torch.device("cpu")), strict=True):
        assert (gpu.cpu() - cpu).abs().max() < 1e-4


def test_sync_batchnorm_in_a_one_process_nccl_group_equals_the_plain_step(tmp_path):
    import torch.distributed as dist

    def sgd(model):  # the update is the gradient itself: no Adam sign flips from near-zero gradients
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)

    _, plain, _, views = _setup("mocov3")
    Stepper(plain, sgd(plain), device=CUDA, seed=0).step(views, 0.1, 0, False)
    dist.init_process_group(
        "nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        _, model, _, views = _setup("mocov3")
        ddp = torch.nn.parallel.DistributedDataParallel(sync_batchnorm(model, CUDA), device_ids=[0])
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        Stepper(ddp, sgd(model), device=CUDA, seed=0).step(views, 0.1, 0, False)
    finally:
        dist.destroy_process_group()
    for a, b in zip(plain.encoder.parameters(), model.encoder.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_compiled_step_equals_the_eager_step():
    _, eager, eager_opt, views = _setup("mocov3")
    _, compiled, compiled_opt, _ = _setup("mocov3")
    compiled.compile()
    losses = []
    for model, optimizer in ((eager, eager_opt), (compiled, compiled_opt)):
        stepper = Stepper(model, optimizer, device=CUDA, seed=0)
        losses.append([stepper.step(views, 0.1, step, False).loss.item() for step in range(2)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_a_bf16_run_on_the_gpu_resumes_where_it_stopped(tmp_path):
    common = ["--device", "cuda", "--precision", "bf16", "--max-steps", "4"]
    common += [f"--set={s}" for s in [*TINY, "data.num_workers=2", "train.ckpt_every=2"]]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["pretrain", "--out", str(straight), *common]) == 0
    (stopped / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step_0000002.pt", stopped / "checkpoints" / "last.pt")
    assert main(["pretrain", "--out", str(stopped), "--resume", *common]) == 0
    a, b = (load_checkpoint(run / "checkpoints" / "last.pt") for run in (straight, stopped))
    assert a["step"] == b["step"] == 4
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-4), key
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert "knn_top1" in records[-1]
