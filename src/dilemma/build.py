"""From a ``Config`` to the objects it describes: the data splits, the views, the method, and a
whole training run (``resolve_run``: what the loop steps with, so it never reads the config).

Every caller (training, evaluation, inspection, comparison, benchmarks) builds through here, so a
setting means the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dilemma.config import Config, EvalConfig, TrackingConfig
from dilemma.data import PretrainBatches, Splits, Views, ViewSettings, load_source
from dilemma.errors import DilemmaError
from dilemma.methods import Method, method_class
from dilemma.models import build_encoder, load_backbone
from dilemma.pretext import Dilemma, active_task
from dilemma.schedules import learning_rate, progress

NO_STEP_LIMIT = 10**12  # only the time budget ends the run


def load_splits(cfg: Config, source: str | None = None) -> Splits:
    """The train / val splits of ``cfg.data`` at the model's size and channels (``source`` replaces
    ``data.source``, e.g. to evaluate a checkpoint on other data)."""
    data = cfg.data
    return load_source(
        source or data.source,
        img_size=cfg.model.img_size,
        in_chans=cfg.model.in_chans,
        val_fraction=data.val_fraction,
        seed=data.split_seed,
        skip_bad=data.skip_bad_images,
        crop_pct=cfg.model.crop_pct,
    )


def _method_section(cfg: Config):
    """The chosen method's own config section, e.g. ``cfg.method.mocov3``."""
    return getattr(cfg.method, method_class(cfg.method.name).name)


def build_views(cfg: Config) -> Views:
    """The method's views: crops in the loader workers, photometric ops on the training device."""
    settings = ViewSettings.from_data(cfg.data, cfg.model.img_size, cfg.model.in_chans)
    return method_class(cfg.method.name).views(_method_section(cfg), settings)


def build_method(cfg: Config, pretrained: tuple[dict, str] | None = None, log=None) -> Method:
    """A fresh encoder with the DILEMMA pretext and the configured method around it.

    ``pretrained``: ``(ViT state dict, where from)`` loaded into the encoder first
    (``models.load_backbone``), so teachers start as copies of it; ``log`` gets the summary."""
    encoder = build_encoder(cfg.model)
    if pretrained is not None:
        summary = load_backbone(encoder, *pretrained)
        if log is not None:
            log(summary)
    switches = cfg.dilemma
    dilemma = Dilemma(
        encoder.embed_dim,
        encoder.num_patches,
        misplace_prob=switches.misplace_prob,
        drop_rate=switches.drop_rate,
        weight=switches.weight,
        task=switches.task,
        position_drop_prob=switches.position_drop_prob,
        position_smoothing=switches.position_smoothing,
        grid=encoder.grid_size,
    )
    return method_class(cfg.method.name)(encoder, dilemma, _method_section(cfg))


# ---- a training run, resolved once -----------------------------------------------------------------


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, positional embeddings and prefix tokens."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (major, minor)


def adamw(groups: list[dict], lr: float, use_scaler: bool = False) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one for the parameters' device (CUDA; CPU from
    torch 2.4, not under the fp16 gradient scaler there): one pass over all parameters instead of a
    dozen small ops per parameter, the same update to float round-off (tested). Elsewhere the
    multi-tensor (foreach) implementation."""
    first = next((p for group in groups for p in group["params"]), None)
    device = first.device.type if first is not None else "cpu"
    fused = device == "cuda" or (device == "cpu" and _torch_at_least(2, 4) and not use_scaler)
    return torch.optim.AdamW(groups, lr=lr, fused=True) if fused else torch.optim.AdamW(groups, lr=lr, foreach=True)


def step_limits(cfg: Config, steps_per_epoch: int) -> dict[str, int]:
    """The step limits the config sets: ``train.max_steps`` and ``train.epochs`` in steps."""
    t, limits = cfg.train, {}
    if t.max_steps is not None:
        limits["train.max_steps"] = t.max_steps
    if t.epochs is not None:
        limits["train.epochs"] = max(1, round(t.epochs * steps_per_epoch))
    return limits


def total_steps(cfg: Config, batches: PretrainBatches) -> int:
    """The step the run ends at: the first of ``train.max_steps`` and ``train.epochs`` (one rule:
    every limit set is a cap), or none when only the time budget is set."""
    return min(step_limits(cfg, batches.steps_per_epoch).values(), default=NO_STEP_LIMIT)


def run_length(cfg: Config, batches: PretrainBatches) -> str:
    """What ends the run, for the start line: each limit set, the one that binds first named."""
    limits, t = step_limits(cfg, batches.steps_per_epoch), cfg.train
    parts = []
    if limits:
        key, steps = min(limits.items(), key=lambda kv: kv[1])
        epochs = f" = {steps / batches.steps_per_epoch:.3g} epochs" if key == "train.max_steps" else ""
        parts.append(f"ends at step {steps} ({key}{epochs}")
        parts[-1] += "".join(f"; {k} would be {v} steps" for k, v in limits.items() if k != key) + ")"
    if t.time_budget:
        parts.append(f"{'or after' if limits else 'ends after'} {t.time_budget:g} min (train.time_budget)")
    return " ".join(parts) + (", whichever comes first" if limits and t.time_budget else "")


def peak_lr(cfg: Config) -> tuple[float, float]:
    """``(lr, min_lr)``, scaled by batch / 256 with ``optim.scale_lr_with_batch``."""
    scale = cfg.data.batch_size / 256 if cfg.optim.scale_lr_with_batch else 1.0
    return cfg.optim.lr * scale, cfg.optim.min_lr * scale


@dataclass(frozen=True)
class Schedule:
    """How long the run trains and its lr: warm-up + cosine over its progress, which is steps or
    wall-clock, whichever is further."""

    end: int  # the last step (``NO_STEP_LIMIT``: only the budget ends the run)
    budget_min: float | None  # minutes of training (train.time_budget)
    peak_lr: float
    min_lr: float
    warmup: float  # fraction of the progress

    @property
    def budget_s(self) -> float | None:
        return self.budget_min * 60 if self.budget_min else None

    def progress(self, step: int, elapsed: float) -> float:
        return progress(step, self.end, elapsed, self.budget_s)

    def lr(self, fraction: float) -> float:
        return learning_rate(fraction, lr=self.peak_lr, min_lr=self.min_lr, warmup=self.warmup)

    def out_of_time(self, elapsed: float) -> bool:
        return self.budget_s is not None and elapsed >= self.budget_s


@dataclass(frozen=True)
class CheckpointPolicy:
    """When a run saves (what a failure can lose), how many step files it keeps, and the snapshots
    kept at fractions of training (read-out curves)."""

    every_steps: int
    every_s: float | None
    keep: int
    snapshot_every: float | None

    def due(self, step: int, elapsed: float, saved_at: float) -> bool:
        return step % self.every_steps == 0 or (self.every_s is not None and elapsed - saved_at >= self.every_s)

    def snapshot_fractions(self) -> list[float]:
        every = self.snapshot_every
        return [i * every for i in range(1, int(1 / every + 1e-9) + 1) if i * every < 1 - 1e-9] if every else []


@dataclass(frozen=True)
class RunPlan:
    """A training run resolved once from its config, the checkpoint it resumes and its pretrained
    start: everything the loop steps with (it never reads the config)."""

    config: dict  # the resolved config as saved (config.yaml, checkpoints, the trackers)
    device: torch.device
    splits: Splits
    method: Method  # on the device; a new run's pretrained start loaded
    batches: PretrainBatches  # this process's share of each global batch
    optimizer: torch.optim.AdamW
    schedule: Schedule
    checkpoints: CheckpointPolicy
    precision: str  # fp32, bf16, fp16
    accum_steps: int
    grad_clip: float | None
    compile: bool
    seed: int
    log_every: int
    show_progress: bool
    on_nonfinite: str  # stop, skip
    max_nonfinite_skips: int
    skip_bad_images: bool
    num_workers: int
    online_probe: bool  # and the data is labelled
    knn: EvalConfig | None  # the end-of-run kNN's settings; None: none
    loggers: tuple[str, ...]
    tracking: TrackingConfig
    understood: str  # what was understood (data, model, method, schedule, device): the start line


def resolve_run(
    cfg: Config, device: torch.device, *, pretrained: tuple[dict, str] | None = None, rank: int = 0, world: int = 1,
    log=None,
) -> RunPlan:  # fmt: skip
    """``cfg`` as a ``RunPlan``: splits, the method on ``device`` (``pretrained`` loaded into a new
    run's encoder), this process's batches, AdamW, the schedule and the checkpoint policy."""
    t, splits = cfg.train, load_splits(cfg)
    method = build_method(cfg, pretrained, log=log)
    method.encoder.vit.set_grad_checkpointing(t.grad_checkpointing)
    method.to(device)
    if cfg.data.batch_size % world:
        raise DilemmaError(f"data.batch_size {cfg.data.batch_size} is not divisible by the {world} processes")
    batches = PretrainBatches(splits.train, cfg.data.batch_size, build_views(cfg), t.seed, rank, world)
    lr, min_lr = peak_lr(cfg)
    schedule = Schedule(total_steps(cfg, batches), t.time_budget, lr, min_lr, cfg.optim.warmup)
    every_s = t.checkpoint_every_minutes * 60 if t.checkpoint_every_minutes else None
    return RunPlan(
        cfg.to_dict(), device, splits, method, batches,
        adamw(param_groups(method, cfg.optim.weight_decay), cfg.optim.lr, use_scaler=t.precision == "fp16"),
        schedule, CheckpointPolicy(t.ckpt_every, every_s, t.keep_checkpoints, t.snapshot_every),
        t.precision, t.accum_steps, cfg.optim.grad_clip, t.compile, t.seed, t.log_every, t.show_progress,
        t.on_nonfinite, t.max_nonfinite_skips, cfg.data.skip_bad_images, cfg.data.num_workers,
        t.online_probe and splits.labelled, cfg.eval if cfg.eval.knn_at_end else None, tuple(t.loggers), t.tracking,
        _understood(cfg, splits, method, run_length(cfg, batches), f"device {device}, {world} process(es)"),
    )  # fmt: skip


def _pretext_words(d) -> str:
    """The student's pretext as the start line says it (``pretext.active_task``'s rule; sparsity alone
    under the detection task is said as DILEMMA's switches, ``p=0 r=..``)."""
    if active_task(d.task, d.weight, d.misplace_prob, d.position_drop_prob) == "predict":
        return f"position prediction q={d.position_drop_prob:g} sigma={d.position_smoothing:g} r={d.drop_rate:g}"
    if d.task == "detect" and d.weight:
        return f"p={d.misplace_prob:g} r={d.drop_rate:g}"
    return f"no position task, r={d.drop_rate:g}"


def _understood(cfg: Config, splits: Splits, method: Method, length: str, where: str) -> str:
    """What was understood: data (layout, classes, images, size, channels), model, schedule, device."""
    m = cfg.model
    classes = f"{len(splits.classes)} classes" if splits.labelled else "unlabelled"
    notes = "".join(f"; {note}" for note in splits.notes)
    params = sum(p.numel() for p in method.encoder.parameters()) / 1e6
    pretrained = f", from {m.pretrained}" if m.pretrained else ""
    values = ", ".join(f"{v:g}" for v in m.mean), ", ".join(f"{v:g}" for v in m.std)
    return (
        f"{splits.name}: {len(splits.train)} train / {len(splits.val)} val, {classes}{notes}; {m.img_size} px x "
        f"{m.in_chans} channel(s), patch {m.patch_size}, mean ({values[0]}) std ({values[1]}); "
        f"{cfg.method.name} on {m.name} ({params:.2f}M-parameter encoder{pretrained}), "
        f"{_pretext_words(cfg.dilemma)}; {length}; batch {cfg.data.batch_size}, "
        f"lr {peak_lr(cfg)[0]:.3g}; {where}, {cfg.train.precision}"
    )
