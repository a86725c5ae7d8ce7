"""Scale: 2 CPU processes (gloo DDP), each making its own views, equal 1 process on the same global
batch; accumulation 2 x B/2 equals one step of B; every precision mode runs."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from dilemma.build import build_method, build_views, load_splits
from dilemma.cli import main
from dilemma.config import load_config
from dilemma.data import PretrainBatches
from dilemma.distributed import sync_batchnorm
from dilemma.train.step import Stepper
from tests.conftest import IJEPA_RECIPE, TINY

BATCH = 8


def _build(method: str, *extra):
    cfg = load_config(None, [*TINY, f"method.name={method}", f"data.batch_size={BATCH}", *extra])
    torch.manual_seed(0)
    model = build_method(cfg)
    # SGD: the update is the gradient itself, so equal weights mean equal gradients (Adam's first step,
    # ~ lr * sign(grad), would amplify float round-off on near-zero gradients into +-lr differences)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    return cfg, model, optimizer


def _views(method: str, rank: int = 0, world_size: int = 1):
    """This process's share of the method's views of the global batch at step 5, both stages made
    here as in training (MAE: one view; MoCo v3 / SimCLR: two; DINO: two global crops and two 16 px
    local crops): an image gets the same views however many processes share the batch."""
    cfg = load_config(None, [*TINY, f"method.name={method}", f"data.batch_size={BATCH}"])
    batches = PretrainBatches(load_splits(cfg).train, BATCH, build_views(cfg), 0, rank, world_size)
    batch = batches[5]
    return batches.views.finish(batch.views, batch.draws, torch.device("cpu"), cfg.model.mean, cfg.model.std)


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_worker(rank: int, port: int, method: str, out: str, nan_on_rank_1: bool = False, extra=()) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a mismatched collective fails within a minute instead of hanging the test suite
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        _, model, optimizer = _build(method, *extra)
        before = _state(model)
        ddp = torch.nn.parallel.DistributedDataParallel(sync_batchnorm(model, torch.device("cpu")))
        stepper = Stepper(ddp, optimizer, device=torch.device("cpu"), grad_clip=None, seed=0)
        views = _views(method, rank, world_size=2)  # rank r's images r::world, its views made here
        if nan_on_rank_1 and rank == 1:
            views[0][0, 0, 0, 0] = float("nan")
        result = stepper.step(views, 0.3, 5, False)
        skipped = [None, None]
        dist.all_gather_object(skipped, result.skipped)
        unchanged = all(torch.equal(before[k], v) for k, v in _state(model).items())
        if rank == 0:
            state = {k.replace("module.", ""): v for k, v in _state(model).items()}
            torch.save(
                {"loss": result.loss.reshape(()), "state": state, "skipped": skipped, "unchanged": unchanged}, out
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# RoPE encoders (timm's Eva), sparse and misplaced as configured. Not vit_*_rope_224 with its class
# token: at timm's init that token's output is the same for every image to 1 part in 4e5 (its
# mean / std over the batch), so the projector's batch norm normalises float round-off and any two
# summation orders (4 + 4 rows or 8) disagree by 1e-3 in the loss; its average-pooled output is
# well conditioned (mean / std 9), as DINOv3's class token is (4).
ROPE = [("mocov3", ("model.name=vit_small_patch16_dinov3",)),
        ("simclr", ("model.name=vit_small_patch16_rope_224", "model.global_pool=avg"))]  # fmt: skip


# position prediction (dilemma.task=predict) with its label smoothing, and DropPos (its recipe)
PREDICT = [("mocov3", ("dilemma.task=predict", "dilemma.position_smoothing=1")),
           ("droppos", ("dilemma.task=predict", "dilemma.position_smoothing=1"))]  # fmt: skip


@pytest.mark.parametrize(
    "method,extra", [*((m, ()) for m in ("mocov3", "simclr", "dino", "byol", "vicreg", "ibot")), *ROPE, *PREDICT]
)
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, method, extra):
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(_free_port(), method, str(out), False, extra), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    _, model, optimizer = _build(method, *extra)
    before = _state(model)
    single = Stepper(model, optimizer, device=torch.device("cpu"), grad_clip=None, seed=0)
    result = single.step(_views(method), 0.3, 5, False)
    assert torch.allclose(ddp["loss"], result.loss, rtol=1e-5, atol=1e-6), (ddp["loss"], result.loss)
    after = _state(model)
    moved = 0
    for key, value in after.items():
        update, ddp_update = value.float() - before[key].float(), ddp["state"][key].float() - before[key].float()
        # float round-off only: the updates agree to 1e-4 of their own size (a wrong gradient is off by O(1))
        assert (update - ddp_update).abs().max() <= 1e-4 * update.abs().max() + 1e-6, key
        moved += not torch.equal(before[key], value)
    assert moved > 10  # the step really changed the weights


def _ijepa_ddp_worker(rank: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        cfg, model, optimizer = _build("ijepa", *IJEPA_RECIPE)
        ddp = torch.nn.parallel.DistributedDataParallel(sync_batchnorm(model, torch.device("cpu")))
        stepper = Stepper(ddp, optimizer, device=torch.device("cpu"), grad_clip=None, seed=0)
        batches = PretrainBatches(load_splits(cfg).train, BATCH, build_views(cfg), 0, rank, 2)
        losses = []
        for step in (5, 6):  # DDP fails on the second step when a parameter took no part in the first
            batch = batches[step]
            views = batches.views.finish(batch.views, batch.draws, torch.device("cpu"), cfg.model.mean, cfg.model.std)
            losses.append(float(stepper.step(views, 0.3, step, False).loss))
        states = [None, None]
        dist.all_gather_object(states, _state(model))
        if rank == 0:
            same = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
            torch.save({"losses": torch.tensor(losses), "same": same}, out)
    finally:
        dist.destroy_process_group()


def test_ijepa_trains_under_ddp_with_its_average_pooled_vit(tmp_path):
    """I-JEPA's recipe (no class token, average pooling: the encoder's final norm sits in fc_norm) for
    two DDP steps: every parameter takes part, and the replicas stay equal."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_ijepa_ddp_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert result["losses"].isfinite().all() and result["same"]


def test_one_process_with_a_nonfinite_loss_makes_every_process_skip(tmp_path):
    """MAE's loss is per process: a NaN image on rank 1 alone must not leave rank 0 stepping (and
    waiting in DDP's gradient all-reduce for a rank that skipped)."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(_free_port(), "mae", str(out), True), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    assert ddp["skipped"] == [True, True] and ddp["unchanged"]


@pytest.mark.parametrize("method", ["mae", "dino", "ibot"])
def test_accumulating_two_half_batches_equals_one_full_batch(method):
    """MAE, DINO and iBOT + DILEMMA: per-sample losses and no BatchNorm, so 2 x B/2 must equal B
    (DINO's and iBOT's centres move once per step, by the whole batch's mean; iBOT's masks are drawn
    per image of the global batch). Contrastive losses see fewer negatives per micro-batch, so for
    them accumulation is not the same objective; nor for I-JEPA, whose contexts are cut to each
    micro-batch's smallest (as I-JEPA per GPU)."""
    states = []
    for accum in (1, 2):
        _, model, optimizer = _build(method)
        stepper = Stepper(model, optimizer, device=torch.device("cpu"), accum_steps=accum, seed=0)
        result = stepper.step(_views(method), 0.3, 5, True)
        states.append((result.loss, _state(model), result.logs))
    (loss1, state1, logs1), (loss2, state2, logs2) = states
    assert torch.allclose(loss1, loss2, atol=1e-6) and float(logs1["det_bce"]) == pytest.approx(
        float(logs2["det_bce"]), abs=1e-6
    )
    for key in state1:
        assert torch.allclose(state1[key], state2[key], atol=1e-6), key


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_precision_modes_run(tmp_path, precision):
    out = tmp_path / precision
    args = [
        arg
        for kv in [*TINY, "eval.knn_at_end=false", f"train.precision={precision}", "train.accum_steps=2"]
        for arg in ("--set", kv)
    ]
    assert main(["pretrain", "--out", str(out), "--max-steps", "2", *args]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] is not None and r["loss"] > 0 for r in records[:2])
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ("scale" in ckpt["scaler"]) == (precision == "fp16")  # the fp16 gradient scaler is saved


def test_stepper_rejects_unknown_precision():
    from dilemma.errors import DilemmaError

    _, model, optimizer = _build("mocov3")
    with pytest.raises(DilemmaError, match="train.precision"):
        Stepper(model, optimizer, device=torch.device("cpu"), precision="fp8")


def test_torchrun_two_cpu_processes_train_and_save_once(tmp_path):
    """The real launcher end to end: torchrun sets the environment, the CLI joins a gloo group,
    rank 0 alone writes the run folder, both processes stop together and exit 0."""
    import subprocess
    import sys

    out = tmp_path / "run"
    sets = [arg for kv in [*TINY, "eval.knn_at_end=false", "data.num_workers=0"] for arg in ("--set", kv)]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "dilemma.cli",
            "pretrain",
            "--device",
            "cpu",
            "--max-steps",
            "2",
            "--out",
            str(out),
            *sets,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("run folder:") == 1 and "2 process(es)" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 2] and records[-1]["stopped_by"] == "max_steps"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step_0000002.pt"]


def _fail_worker(rank: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    from dilemma.distributed import fail_together
    from dilemma.errors import DilemmaError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a lost peer fails the test within a minute instead of hanging the suite
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        fail_together(DilemmaError("no images found in 'x'") if rank == 1 else None)
    except DilemmaError as err:
        if rank == 0:
            with open(out, "w") as f:
                f.write(str(err))
    finally:
        dist.destroy_process_group()


def test_an_error_in_one_process_stops_them_all(tmp_path):
    out = tmp_path / "message.txt"
    mp.spawn(_fail_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    assert out.read_text() == "process 1 failed: no images found in 'x'"
