"""``pretrain``: set up, train, finish — three functions that read top to bottom.

``setup``: config -> data -> method -> AdamW -> (DDP) -> state restored from the last checkpoint.
``train``: steps until ``train.max_steps`` or the wall-clock budget, lr on warm-up + cosine,
logging to ``metrics.jsonl``, atomic checkpoints, a clean stop on SIGTERM / SIGINT.
``finish``: the last checkpoint, the method's pictures and the kNN read-out.
"""

from __future__ import annotations

import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from dilemma.build import NO_STEP_LIMIT, RunPlan, resolve_run
from dilemma.config import Config
from dilemma.data import Batch, PretrainBatches, Splits, eval_batches, pretrain_loader
from dilemma.distributed import (
    fail_together,
    init_from_env,
    is_distributed,
    is_main,
    rank,
    resolve_device,
    sync_batchnorm,
    world_size,
)
from dilemma.errors import DilemmaError
from dilemma.eval.knn import knn_eval
from dilemma.files import atomic_write_text
from dilemma.methods import Method
from dilemma.rundir import FORMAT, CheckpointDir, RunDir, provenance
from dilemma.train.health import collapse_warning, embedding_health
from dilemma.train.metrics import MetricsLog, as_json
from dilemma.train.probe import OnlineProbe
from dilemma.train.seeding import rng_state, seed_everything, set_rng_state
from dilemma.train.signals import Interrupted, stop_on_signals
from dilemma.train.step import Stepper
from dilemma.train.trackers import Trackers
from dilemma.weights import pretrained_state

# Parts of the config that fix the shapes of the saved state, and the data it trains on: a resume
# must not change them.
FROZEN_ON_RESUME = ("model", "method", "dilemma")
FROZEN_DATA_KEYS = ("source", "val_fraction", "split_seed")


def _frozen_keys(config: dict, section: str) -> dict:
    """The keys of ``section`` a resume may not change: for ``method``, its name and the run's own
    method's settings (another method's section shapes nothing this run saved)."""
    values = config.get(section, {})
    if section != "method":
        return values
    name = values.get("name")
    own = values.get(name) if isinstance(values.get(name), dict) else {}
    return {"name": name, **{f"{name}.{key}": value for key, value in own.items()}}


def check_resume_config(saved: dict, cfg: Config) -> None:
    current = cfg.to_dict()
    changed = []
    for section in FROZEN_ON_RESUME:
        before, now = _frozen_keys(saved, section), _frozen_keys(current, section)
        changed += [
            f"{section}.{key}: {value!r} -> {now.get(key)!r}" for key, value in before.items() if now.get(key) != value
        ]
    changed += [
        f"data.{key}: {saved['data'][key]!r} -> {current['data'][key]!r}"
        for key in FROZEN_DATA_KEYS
        if key in saved.get("data", {}) and saved["data"][key] != current["data"][key]
    ]
    if changed:
        raise DilemmaError(
            "cannot resume: the checkpoint was made with another model, method or data config ("
            + "; ".join(changed)
            + ")"
        )


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def bad_images(batch: Batch, skip: bool) -> list[str]:
    """The batch's unreadable files; an error unless ``data.skip_bad_images``."""
    if batch.problems and not skip:
        more = f" (and {len(batch.problems) - 1} more in this batch)" if len(batch.problems) > 1 else ""
        raise DilemmaError(
            f"cannot read image {batch.problems[0]}{more}. Remove or replace it, or set data.skip_bad_images=true "
            "to train on without it (dilemma check-data DIR lists every bad file)"
        )
    return batch.problems


@dataclass
class Run:
    """A training run: its plan (``build.resolve_run``) and what advances as it trains (``step``,
    ``elapsed``, ``skipped``)."""

    plan: RunPlan
    dir: RunDir
    stepper: Stepper  # the optimiser, precision, accumulation and the token draws
    probe: OnlineProbe | None
    metrics: MetricsLog
    checkpoints: CheckpointDir  # one for the run: it remembers what it saved (a snapshot then links to it)
    run_id: str  # made when the run starts; its checkpoints and this folder's provenance carry it
    step: int = 0
    elapsed: float = 0.0  # seconds of training so far (across resumes): the clock of the schedules
    skipped: int = 0  # optimiser steps skipped for a non-finite loss
    saved_at: float = 0.0  # ``elapsed`` at the last checkpoint (train.checkpoint_every_minutes)
    bad_images: set = field(default_factory=set)  # unreadable files met (and replaced), "path: reason"
    collapse_said: bool = False  # the collapse warning is given once a run

    @property
    def device(self) -> torch.device:
        return self.stepper.device

    @property
    def method(self) -> Method:  # the module whose state is saved (the stepper's model may wrap it in DDP)
        return self.plan.method

    @property
    def splits(self) -> Splits:
        return self.plan.splits

    @property
    def batches(self) -> PretrainBatches:
        return self.plan.batches

    @property
    def end(self) -> int:
        return self.plan.schedule.end

    def progress(self) -> float:
        """How far training is, in [0, 1]: steps or wall-clock, whichever is further (the schedules' clock)."""
        return self.plan.schedule.progress(self.step, self.elapsed)

    def state(self) -> dict:
        return {
            "format": FORMAT,
            "run_id": self.run_id,
            "config": self.plan.config,
            "step": self.step,
            "epoch": self.step / self.batches.steps_per_epoch,
            "elapsed": self.elapsed,
            "nonfinite_skips": self.skipped,
            "model": self.method.state_dict(),
            "optimizer": self.stepper.optimizer.state_dict(),
            "scaler": self.stepper.scaler.state_dict(),
            "probe": self.probe.full_state() if self.probe is not None else None,
            "rng": rng_state(self.stepper.token_generator),
            "trackers": self.metrics.trackers.state,  # their run ids: a resume continues the same runs
        }

    def save(self) -> None:
        if is_main():  # one writer per run folder
            self.checkpoints.save(self.state(), self.step)
        self.saved_at = self.elapsed

    def save_snapshots(self) -> None:
        """Keep a checkpoint at every ``train.snapshot_every`` fraction of training reached (once
        each, also across a resume)."""
        fractions, done = self.plan.checkpoints.snapshot_fractions(), self.progress()
        if not fractions or not is_main():
            return
        due = [f for f in fractions if f <= done + 1e-9 and not self.checkpoints.snapshot_path(f).exists()]
        if due:  # several at once when a step crosses several fractions (a short run): one file
            self.checkpoints.save_snapshots(self.state(), self.step, due)

    def restore(self, ckpt: dict) -> None:
        self.method.load_state_dict(ckpt["model"])
        optimizer = self.stepper.optimizer
        # the saved groups carry their implementation (fused / foreach), which load_state_dict would
        # restore: keep the one chosen for this device and torch (a checkpoint may come from another)
        saved = {**ckpt["optimizer"], "param_groups": [dict(g) for g in ckpt["optimizer"]["param_groups"]]}
        for group, current in zip(saved["param_groups"], optimizer.param_groups, strict=False):
            group.update({key: current[key] for key in ("fused", "foreach") if key in current})
        optimizer.load_state_dict(saved)
        if self.probe is not None and ckpt.get("probe"):
            self.probe.load_full_state(ckpt["probe"])
        # rank 0's RNG states: the other ranks draw their own again
        set_rng_state(ckpt["rng"], self.stepper.token_generator)
        if rank():
            seed_everything(self.plan.seed + rank() + 1_000_003 * ckpt["step"])
        if ckpt.get("scaler"):
            self.stepper.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.elapsed, self.skipped = ckpt["step"], ckpt["elapsed"], ckpt.get("nonfinite_skips", 0)
        self.saved_at = self.elapsed


def pretrain(cfg: Config, out_dir: str | Path, *, resume: bool = False, log=print) -> dict:
    """Train ``cfg`` into ``out_dir``; returns the final metrics record (with ``knn_top1``). The run
    folder is locked for the whole run: one writer per folder."""
    run_dir, run, status = RunDir(out_dir), None, "FAILED"
    try:
        plan, ckpt = _resolve(cfg, run_dir, resume)
        run = setup(plan, run_dir, ckpt)
        final = finish(run, train(run), log)
        status = "FINISHED"
        return final
    except (Interrupted, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        if run is not None:
            run.metrics.close(status)  # the trackers' runs end as the run did (a second close is nothing)
        run_dir.unlock()


def _checkpoint_to_resume(cfg: Config, run_dir: RunDir) -> dict:
    """The checkpoint ``--resume`` continues, checked to belong to this folder and config before
    anything in the folder is written (the lock first: a second resume of a running folder is refused)."""
    if is_main():
        run_dir.lock()
    _, ckpt, note = run_dir.resume_checkpoint()
    run_dir.check_owns(ckpt, FROZEN_ON_RESUME)
    check_resume_config(ckpt["config"], cfg)
    if note and is_main():
        _stderr(note)
    return ckpt


def _first_batch_then_folder(plan: RunPlan, run_dir: RunDir, resume: bool) -> None:
    """Decode one batch now, so a wrong source fails before a run folder exists; then make the
    folder. Every process stops, or none does."""
    problem = None
    try:
        bad_images(plan.batches[0], plan.skip_bad_images)
        if not resume and is_main():
            run_dir.create()
    except DilemmaError as err:
        problem = err
    fail_together(problem)


def _stepper(plan: RunPlan) -> Stepper:
    """The step: the method wrapped in DDP under torchrun, compiled with ``train.compile``."""
    model, device = plan.method, plan.device
    if is_distributed():
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(sync_batchnorm(model, device), device_ids=device_ids)
    if plan.compile:
        model.compile()
    return Stepper(
        model, plan.optimizer, device=device, precision=plan.precision, accum_steps=plan.accum_steps,
        grad_clip=plan.grad_clip, seed=plan.seed,
    )  # fmt: skip


def _resolve(cfg: Config, run_dir: RunDir, resume: bool) -> tuple[RunPlan, dict | None]:
    """The plan of the run (``build.resolve_run``) and the checkpoint it continues: the last reads
    of the config."""
    device = init_from_env(cfg.train.device) or resolve_device(cfg.train.device)
    ckpt = _checkpoint_to_resume(cfg, run_dir) if resume else None
    seed_everything(cfg.train.seed + rank())  # before the weights are made
    pretrained = None
    if cfg.model.pretrained and ckpt is None:  # a resume continues from its own weights
        pretrained = pretrained_state(cfg.model.pretrained, method=cfg.method.name if ":" in cfg.method.name else None)
    log = _stderr if is_main() else None
    return resolve_run(cfg, device, pretrained=pretrained, rank=rank(), world=world_size(), log=log), ckpt


def setup(plan: RunPlan, run_dir: RunDir, ckpt: dict | None) -> Run:
    """The plan's run in ``run_dir``: its folder, the state of the checkpoint resumed, its trackers."""
    _first_batch_then_folder(plan, run_dir, ckpt is not None)
    if is_main():
        _stderr(f"run folder: {run_dir.path}  ({plan.understood})")
    dim, classes = plan.method.encoder.embed_dim, len(plan.splits.classes)
    probe = OnlineProbe(dim, classes).to(plan.device) if plan.online_probe else None
    trackers = Trackers(run_dir.path, list(plan.loggers), plan.tracking, enabled=is_main())  # rank 0 only
    run = Run(
        plan, run_dir, _stepper(plan), probe, MetricsLog(run_dir.path, enabled=is_main(), trackers=trackers),
        CheckpointDir(run_dir.path, plan.checkpoints.keep), run_id=(ckpt or {}).get("run_id") or uuid.uuid4().hex,
    )  # fmt: skip
    resumed = {}  # for the trackers: what they were sent before the run stopped, and what metrics.jsonl keeps
    if ckpt is not None:
        run.restore(ckpt)
        held, kept = run.metrics.truncate_after(run.step)  # steps after the checkpoint run (and log) again
        resumed = {"saved": ckpt.get("trackers") or {}, "held_up_to": held, "backfill": kept}
    if is_main():
        atomic_write_text(run_dir.config, yaml.safe_dump(plan.config, sort_keys=False))
        record = {**provenance(plan.device, world_size()), "run_id": run.run_id, "resumed_at_step": run.step}
        run_dir.record_provenance(record)
        run.metrics.trackers.start(plan.config, record, **resumed)
    return run


def _agree(stop: bool, clock: float, device: torch.device) -> tuple[bool, float]:
    """Processes must agree on stopping (budget, signal), or the others wait in a collective forever,
    and on the clock that drives the schedules, or they apply different lrs."""
    if not is_distributed():
        return stop, clock
    both = torch.tensor([float(stop), clock], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
    return bool(both[0].item()), float(both[1].item())


def _nonfinite(run: Run, loss: float) -> None:
    """A skipped step: warn, or stop (``train.on_nonfinite``, ``train.max_nonfinite_skips``)."""
    plan = run.plan
    run.skipped += 1
    if plan.on_nonfinite == "stop" or run.skipped > plan.max_nonfinite_skips:
        last = run.checkpoints.last if run.checkpoints.last.exists() else None
        kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint had been written yet"
        why = (
            ""
            if plan.on_nonfinite == "stop"
            else f" for the {run.skipped}th time (train.max_nonfinite_skips={plan.max_nonfinite_skips})"
        )
        raise DilemmaError(
            f"loss became {loss} at step {run.step}{why}; stopping ({kept}). "
            "Try a lower optim.lr or a smaller optim.grad_clip, or train.on_nonfinite=skip."
        )
    _stderr(f"warning: loss became {loss} at step {run.step}; step skipped ({run.skipped} so far)")


def _read_problems(run: Run, batch: Batch) -> DilemmaError | None:
    """Warn once per unreadable file the batch replaced, or return the error that stops the run."""
    try:
        problems = bad_images(batch, run.plan.skip_bad_images)
    except DilemmaError as err:
        return err
    for problem in problems:
        if problem not in run.bad_images:
            run.bad_images.add(problem)
            _stderr(f"warning: skipped unreadable image {problem} ({len(run.bad_images)} so far)")
    return None


# ---- the steps of ``train``'s loop, in their order ------------------------------------------------


def check_images(run: Run, batch: Batch) -> None:
    """Unreadable files the batch met: a warning, or (without ``data.skip_bad_images``, in any
    process) a saved checkpoint and a stop. Also brings the processes' clocks together."""
    error = _read_problems(run, batch)
    failed, run.elapsed = _agree(error is not None, run.elapsed, run.device)
    if failed:
        run.save()
        raise error or DilemmaError("another process met an unreadable image (see its error)")


def set_learning_rate(run: Run) -> float:
    """Warm-up + cosine at the run's progress, set on every parameter group."""
    lr = run.plan.schedule.lr(run.progress())
    for group in run.stepper.optimizer.param_groups:
        group["lr"] = lr
    return lr


@dataclass
class Throughput:
    """Images per second since the last log line, and the clock that continues a run's elapsed time."""

    start: float  # time.perf_counter() at which the run's elapsed time was 0
    since: float = field(default_factory=time.perf_counter)
    images: int = 0

    def rate(self) -> float:
        now = time.perf_counter()
        rate, self.since, self.images = self.images / (now - self.since), now, 0
        return rate


def _method_file_error(method: Method, err: Exception) -> DilemmaError | None:
    """A failure in a method kept in a file of one's own (``--method file.py:Class``), as one line that
    names the line of that file and the interface; None for a built-in method (a bug of ours)."""
    import inspect
    import traceback

    try:
        source = inspect.getsourcefile(type(method))
    except TypeError:
        return None
    if source is None or Path(source).resolve().is_relative_to(Path(__file__).resolve().parents[1]):
        return None
    lines = [frame.f_lineno for frame, _ in traceback.walk_tb(err.__traceback__) if frame.f_code.co_filename == source]
    where = f"{source}:{lines[-1]}" if lines else source
    text = str(err).splitlines()[0] if str(err) else ""
    hint = (
        " Method.student() returns a StudentOutput (.embedding, .patches, .detection), not a tuple."
        if "unpack" in text or "subscriptable" in text
        else ""
    )
    return DilemmaError(
        f"method {type(method).__name__} failed at {where}: {type(err).__name__}: {text}.{hint} The interface: "
        "docs/adding_a_method.md"
    )


def take_step(run: Run, batch: Batch, with_metrics: bool, clock: Throughput):
    """The device stage of the batch's views and one optimiser step; the online probe; the step
    counted. Returns the step's result (``skipped`` for a non-finite loss, which may stop the run)."""
    # uint8 crops travel to the device; their photometric ops and normalisation run there
    encoder = run.method.encoder
    views = run.batches.views.finish(batch.views, batch.draws, run.device, encoder.mean, encoder.std)
    try:
        result = run.stepper.step(views, run.progress(), run.step, with_metrics)
    except Exception as err:
        plugin = _method_file_error(run.method, err)
        if plugin is None:
            raise
        raise plugin from None
    if result.skipped:
        _nonfinite(run, result.loss.item())
    elif run.probe is not None:
        run.probe.step(result.probe_features, batch.labels.to(run.device, non_blocking=True))
    run.step += 1
    run.elapsed = time.perf_counter() - clock.start
    clock.images += 0 if result.skipped else run.batches.batch_size
    return result


def log_step(run: Run, result, lr: float, clock: Throughput, bar) -> None:
    """A line of ``metrics.jsonl`` every ``train.log_every`` steps; the progress bar."""
    bar.update(1)
    if run.step % run.plan.log_every:
        return
    record = {
        "step": run.step,
        "epoch": run.step / run.batches.steps_per_epoch,
        "elapsed_s": run.elapsed,
        "lr": lr,
        "img_per_s": clock.rate(),
        **result.logs,
    }
    if run.probe is not None:
        record["probe_acc"] = run.probe.window_accuracy()
    if result.probe_features is not None:
        record.update(embedding_health(result.probe_features))
    if run.bad_images:
        record["bad_images"] = len(run.bad_images)
    warning = collapse_warning(record)
    if warning and not run.collapse_said and is_main():
        _stderr(warning)
        run.collapse_said = True
    run.metrics.write(record)
    bar.set_postfix({k: f"{as_json({k: record[k]})[k]:.3f}" for k in ("loss", "det_bce") if k in record})


def save_checkpoints(run: Run) -> None:
    """Every ``train.ckpt_every`` steps or ``train.checkpoint_every_minutes`` of training, whichever
    comes first (what a failure can lose), and the snapshots at fractions of training."""
    if run.plan.checkpoints.due(run.step, run.elapsed, run.saved_at):
        run.save()
    run.save_snapshots()


def stop_if_asked(run: Run, stop_request, bar) -> None:
    """SIGTERM / SIGINT (in any process): a checkpoint, then every process stops together."""
    if not _agree(bool(stop_request), 0.0, run.device)[0]:
        return
    run.save()
    bar.close()
    if is_distributed():  # no process exits (and gets the others killed) before the save
        torch.distributed.barrier()
    name, signum = stop_request.name or "SIGTERM", stop_request.signum or 15  # another process: as for SIGTERM
    raise Interrupted(f"stopped by {name} at step {run.step}; checkpoint saved.", signum, _resume_hint(run))


def _resume_hint(run: Run) -> str:
    return f"Continue with: dilemma pretrain --out {run.dir.path} --resume"


def train(run: Run) -> str:
    """Step until the last step or the time budget; returns what stopped it."""
    loader = pretrain_loader(run.batches, run.step, run.end, run.plan.num_workers, pin_memory=run.device.type == "cuda")
    show = run.plan.show_progress and is_main()
    total = None if run.end == NO_STEP_LIMIT else run.end
    bar = tqdm(total=total, initial=run.step, disable=not show, unit="step", dynamic_ncols=True)
    clock = Throughput(start=time.perf_counter() - run.elapsed)  # the clock continues from the checkpoint's
    run.method.train()
    with stop_on_signals() as stop_request:
        try:
            for batch in loader:
                check_images(run, batch)
                if run.plan.schedule.out_of_time(run.elapsed):
                    return "time_budget"
                lr = set_learning_rate(run)
                result = take_step(run, batch, with_metrics=(run.step + 1) % run.plan.log_every == 0, clock=clock)
                if result.skipped:  # a non-finite loss, warned of: no update to log or save
                    continue
                log_step(run, result, lr, clock, bar)
                save_checkpoints(run)
                stop_if_asked(run, stop_request, bar)
        except KeyboardInterrupt:  # a second Ctrl-C
            run.save()
            raise Interrupted(f"interrupted at step {run.step}; checkpoint saved.", 2, _resume_hint(run)) from None
        finally:
            bar.close()
    return "max_steps"


def finish(run: Run, stopped_by: str, log) -> dict:
    """Save, draw the method's pictures, read out kNN; the final record goes to ``metrics.jsonl``."""
    run.save()
    final = {
        "step": run.step,
        "epoch": run.step / run.batches.steps_per_epoch,
        "elapsed_s": run.elapsed,
        "stopped_by": stopped_by,
    }
    settings = run.plan.knn
    if is_main():
        images = run.method.encoder.normalize(next(eval_batches(run.splits.val, 8))[0].to(run.device))
        pictures = run.method.pictures(images, run.dir.path)
        final.update({"pictures": [str(p) for p in pictures]} if pictures else {})
        for picture in pictures:
            run.metrics.picture(picture, run.step)
        if settings and run.splits.labelled and run.splits.train.labels.unique().numel() < 2:
            _stderr("note: no kNN read-out: the train split holds one class")
        elif settings and run.splits.labelled:
            encoder, workers = run.method.evaluated_encoder(), run.plan.num_workers
            knn = knn_eval(encoder, run.splits, settings, device=run.device, num_workers=workers)
            final.update(knn_top1=knn.top1, knn_top5=knn.top5, knn_protocol=knn.protocol)
            log(knn.line())
    run.metrics.write(final)
    run.metrics.close()
    if stopped_by == "time_budget" and is_main():  # the last line: a run that ends early says so
        of = f" of {run.end}" if run.end != NO_STEP_LIMIT else ""
        _stderr(
            f"note: stopped by the time budget (train.time_budget = {run.plan.schedule.budget_min:g} min) at step "
            f"{run.step}{of}; the lr and momentum schedules ended with it"
        )
    return final
