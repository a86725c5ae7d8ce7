"""``pretrain``: one training loop that reads top to bottom.

Data -> model -> method -> AdamW with warm-up + cosine -> steps until ``max_steps`` or the
wall-clock budget -> checkpoints (atomic) -> kNN read-out. ``metrics.jsonl`` gets one JSON
object per logged step; the last one holds the kNN result.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from dilemma.config import Config
from dilemma.data import PretrainBatches, eval_batches, load_source, pretrain_loader
from dilemma.errors import DilemmaError
from dilemma.eval.knn import knn_eval
from dilemma.methods import build_method, build_views
from dilemma.models import build_encoder
from dilemma.train.checkpoint import FORMAT, CheckpointDir, load_checkpoint, rng_state, set_rng_state
from dilemma.train.distributed import (fail_together, init_from_env, is_distributed, is_main, rank, sync_batchnorm,
                                      world_size)
from dilemma.train.metrics import MetricsLog, as_json
from dilemma.train.probe import OnlineProbe
from dilemma.train.signals import Interrupted, stop_on_signals
from dilemma.train.step import Stepper
from dilemma.train.schedule import learning_rate, progress

# Parts of the config that fix the shapes of the saved state: a resume must not change them.
FROZEN_ON_RESUME = ("model", "method", "dilemma")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DilemmaError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DilemmaError(f"train.device={name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, positional embeddings and prefix tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def check_resume_config(saved: dict, cfg: Config) -> None:
    current = cfg.to_dict()
    changed = [f"{section}.{key}: {saved[section][key]!r} -> {current[section][key]!r}"
               for section in FROZEN_ON_RESUME for key in saved[section] if saved[section][key] != current[section][key]]
    if changed:
        raise DilemmaError("cannot resume: the checkpoint was made with another model/method config (" + "; ".join(changed) + ")")


def prepare_run_dir(out_dir: Path, resume: bool) -> None:
    if resume:
        if not (out_dir / "checkpoints" / "last.pt").exists():
            raise DilemmaError(f"--resume: no checkpoint in {str(out_dir)!r} (expected checkpoints/last.pt); "
                               "start without --resume or point --out at an earlier run")
        return
    if (out_dir / "checkpoints").exists():
        raise DilemmaError(f"{str(out_dir)!r} already holds a run: add --resume to continue it, or choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise DilemmaError(f"cannot write to output folder {str(out_dir)!r}: {err}") from None


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def pretrain(cfg: Config, out_dir: str | Path, *, resume: bool = False, log=print) -> dict:
    """Train ``cfg`` into ``out_dir``; returns the final metrics record (with ``knn_top1``)."""
    out_dir = Path(out_dir)
    ckpt = None
    if resume:
        prepare_run_dir(out_dir, resume)
        ckpt = load_checkpoint(out_dir / "checkpoints" / "last.pt")
        check_resume_config(ckpt["config"], cfg)
    device = init_from_env(cfg.train.device) or resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed + rank())

    splits = load_source(cfg.data.source, img_size=cfg.model.img_size, in_chans=cfg.model.in_chans,
                         val_fraction=cfg.data.val_fraction, seed=cfg.data.split_seed,
                         skip_bad=cfg.data.skip_bad_images)
    encoder = build_encoder(cfg.model)
    d, t = cfg.data, cfg.train
    encoder.vit.set_grad_checkpointing(t.grad_checkpointing)
    method = build_method(cfg, encoder).to(device)
    if d.batch_size % world_size():
        raise DilemmaError(f"data.batch_size {d.batch_size} is not divisible by the {world_size()} processes")
    batches = PretrainBatches(splits.train, d.batch_size, build_views(cfg), t.seed, rank(), world_size())
    problem = None
    try:
        batches[0]  # decode one batch now: unreadable images fail here, before a run folder exists
        if not resume and is_main():
            prepare_run_dir(out_dir, resume)
    except DilemmaError as err:
        problem = err
    fail_together(problem)
    if is_main():
        _stderr(f"run folder: {out_dir}  ({splits.name}: {len(splits.train)} train / {len(splits.val)} val, "
            f"{sum(p.numel() for p in method.encoder.parameters()) / 1e6:.2f}M-parameter encoder, device {device}, "
            f"{world_size()} process(es), {t.precision})")
    optimizer = torch.optim.AdamW(param_groups(method, cfg.optim.weight_decay), lr=cfg.optim.lr)
    probe = OnlineProbe(encoder.embed_dim, len(splits.classes)).to(device) if t.online_probe and splits.labelled else None
    model = method
    if is_distributed():
        model = torch.nn.parallel.DistributedDataParallel(sync_batchnorm(method, device),
                                                          device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        model.compile()
    stepper = Stepper(model, method, optimizer, device=device, precision=t.precision, accum_steps=t.accum_steps,
                      grad_clip=cfg.optim.grad_clip, seed=t.seed)
    tokens = stepper.tokens
    step, elapsed, skipped = 0, 0.0, 0
    if ckpt is not None:
        method.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if probe is not None and ckpt.get("probe"):
            probe.load_full_state(ckpt["probe"])
        set_rng_state(ckpt["rng"], tokens)  # rank 0's states: the other ranks draw their own again
        if rank():
            seed_everything(t.seed + rank() + 1_000_003 * ckpt["step"])
        if ckpt.get("scaler"):
            stepper.scaler.load_state_dict(ckpt["scaler"])
        step, elapsed, skipped = ckpt["step"], ckpt["elapsed"], ckpt.get("nonfinite_skips", 0)
    if is_main():
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    per_rank_batch = d.batch_size // world_size()
    loader = pretrain_loader(batches, step, t.max_steps, d.num_workers, pin_memory=device.type == "cuda")

    def agree(stop: bool, clock: float) -> tuple[bool, float]:
        """Processes must agree on stopping (budget, signal), or the others wait in a collective
        forever, and on the clock that drives the schedules, or they apply different lrs."""
        if not is_distributed():
            return stop, clock
        both = torch.tensor([float(stop), clock], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        return bool(both[0].item()), float(both[1].item())
    checkpoints = CheckpointDir(out_dir, t.keep_checkpoints)
    budget = t.time_budget * 60 if t.time_budget else None
    metrics = MetricsLog(out_dir, enabled=is_main())
    if ckpt is not None:
        metrics.truncate_after(step)  # steps logged after the checkpoint will be run (and logged) again

    def state() -> dict:
        return {"format": FORMAT, "config": cfg.to_dict(), "step": step, "epoch": step / batches.steps_per_epoch,
                "elapsed": elapsed, "nonfinite_skips": skipped, "model": method.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": stepper.scaler.state_dict(), "probe": probe.full_state() if probe is not None else None,
                "rng": rng_state(tokens)}

    def save() -> None:
        if is_main():
            checkpoints.save(state(), step)

    bar = tqdm(total=t.max_steps, initial=step, disable=not (t.progress and is_main()), unit="step", dynamic_ncols=True)
    method.train()
    start, window_start, window_images = time.perf_counter() - elapsed, time.perf_counter(), 0
    stopped_by = "max_steps"
    with stop_on_signals() as stop_request:
        try:
            for views, labels in loader:
                _, elapsed = agree(False, elapsed)
                prog = progress(step, t.max_steps, elapsed, budget)
                if budget and elapsed >= budget:
                    stopped_by = "time_budget"
                    break
                lr = learning_rate(step, prog, lr=cfg.optim.lr, min_lr=cfg.optim.min_lr, warmup_steps=cfg.optim.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with_metrics = (step + 1) % t.log_every == 0
                views = tuple(v.to(device, non_blocking=True) for v in views)
                result = stepper.step(views, labels, prog, step, with_metrics)
                logs = result.logs
                if result.skipped:
                    skipped += 1
                    loss = result.loss.item()
                    if t.on_nonfinite == "stop" or skipped > t.max_nonfinite_skips:
                        last = checkpoints.last if checkpoints.last.exists() else None
                        kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint had been written yet"
                        why = "" if t.on_nonfinite == "stop" else f" for the {skipped}th time (train.max_nonfinite_skips={t.max_nonfinite_skips})"
                        raise DilemmaError(f"loss became {loss} at step {step}{why}; stopping ({kept}). "
                                           "Try a lower optim.lr or a smaller optim.grad_clip, or train.on_nonfinite=skip.")
                    _stderr(f"warning: loss became {loss} at step {step}; step skipped ({skipped} so far)")
                    step += 1
                    elapsed = time.perf_counter() - start
                    continue
                if probe is not None:
                    probe.step(result.probe_features, labels.to(device, non_blocking=True))
                step += 1
                elapsed = time.perf_counter() - start
                window_images += per_rank_batch * world_size()
                bar.update(1)
                if with_metrics:
                    now = time.perf_counter()
                    record = {"step": step, "epoch": step / batches.steps_per_epoch, "elapsed_s": elapsed, "lr": lr,
                              "img_per_s": window_images / (now - window_start), **logs}
                    if probe is not None:
                        record["probe_acc"] = probe.window_accuracy()
                    window_start, window_images = now, 0
                    metrics.write(record)
                    bar.set_postfix({k: f"{as_json({k: record[k]})[k]:.3f}" for k in ("loss", "det_bce") if k in record})
                if step % t.ckpt_every == 0:
                    save()
                if agree(bool(stop_request), 0.0)[0]:
                    save()
                    bar.close()
                    if is_distributed():  # no process exits (and gets the others killed) before the save
                        torch.distributed.barrier()
                    signum = stop_request.signum or 15  # another process was signalled: stop as for SIGTERM
                    raise Interrupted(f"stopped by {stop_request.name or 'SIGTERM'} at step {step}; checkpoint saved. "
                                      f"Continue with: dilemma pretrain --out {out_dir} --resume", signum)
        except KeyboardInterrupt:
            save()
            bar.close()
            raise Interrupted(f"interrupted at step {step}; checkpoint saved. Continue with: "
                              f"dilemma pretrain --out {out_dir} --resume", 2) from None
    bar.close()
    save()

    final = {"step": step, "epoch": step / batches.steps_per_epoch, "elapsed_s": elapsed, "stopped_by": stopped_by}
    if is_main():
        pictures = method.pictures(next(eval_batches(splits.val, 8))[0].to(device), out_dir)
        final.update({"pictures": [str(p) for p in pictures]} if pictures else {})
    if cfg.eval.knn_at_end and is_main() and splits.labelled:
        knn = knn_eval(method.encoder, splits, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                       batch_size=cfg.eval.batch_size, device=device)
        final.update(knn_top1=knn.top1, knn_top5=knn.top5, knn_protocol=knn.protocol)
        log(knn.line())
    metrics.write(final)
    metrics.close()
    return final

