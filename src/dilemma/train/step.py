"""One optimiser step: token draws, micro-batches, mixed precision, DDP gradient sync, clipping.

The step's token draws come from a generator reset to ``(seed, step)`` for every micro-batch, and
each micro-batch / process takes the rows of its own images in the global batch
(``pretext.GlobalBatchRows``), so an image gets the same tokens however the batch is split: one
process or many, with or without gradient accumulation (both tested for equal losses and weights).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dilemma.config import check_precision
from dilemma.distributed import all_reduce_mean, is_distributed, rank, world_size
from dilemma.errors import DilemmaError
from dilemma.methods import Method
from dilemma.pretext import GlobalBatchRows

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


@dataclass
class StepResult:
    loss: torch.Tensor  # the global batch's loss (mean over micro-batches and processes), detached
    logs: dict  # this process's logs, averaged over micro-batches
    probe_features: torch.Tensor | None  # (local batch, D) detached, for the online probe; None when skipped
    skipped: bool = False  # non-finite loss: no update was made


class Stepper:
    """Runs ``model`` (a method, or a method wrapped in DDP and / or compiled) for one optimiser step."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device,
        precision: str = "fp32",
        accum_steps: int = 1,
        grad_clip: float | None = None,
        seed: int = 0,
    ):
        check_precision(precision)
        self.model, self.optimizer, self.device = model, optimizer, device
        self.method: Method = model.module if isinstance(model, DistributedDataParallel) else model
        self.dtype, self.accum_steps, self.grad_clip, self.seed = DTYPES[precision], accum_steps, grad_clip, seed
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.token_generator = torch.Generator(device=device)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def rows(self, local_batch: int) -> list[torch.Tensor]:
        """Global-batch rows of this process's images (``PretrainBatches`` gives rank r the images
        ``r::world``), split into the micro-batches."""
        global_rows = torch.arange(local_batch) * world_size() + rank()
        return list(global_rows.chunk(self.accum_steps))

    def step(self, views: tuple[torch.Tensor, ...], progress: float, step: int, with_metrics: bool) -> StepResult:
        local_batch = views[0].shape[0]
        if local_batch % self.accum_steps:
            raise DilemmaError(
                f"the per-process batch {local_batch} is not divisible by train.accum_steps={self.accum_steps}"
            )
        self.method.before_step(progress)
        self.method.dilemma.set_progress(progress)  # the position labels' width (task predict)
        self.token_generator.manual_seed(self.seed * 1_000_003 + step)
        step_state = self.token_generator.get_state()
        global_batch = local_batch * world_size()
        micro = local_batch // self.accum_steps
        losses, all_logs, features = [], [], []
        self.optimizer.zero_grad(set_to_none=True)
        for m, rows in enumerate(self.rows(local_batch)):
            self.token_generator.set_state(step_state)  # every micro-batch draws from the step's state
            chunk = tuple(v[m * micro : (m + 1) * micro] for v in views)
            last = m == self.accum_steps - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self.autocast():
                    out = self.model(
                        chunk, progress, GlobalBatchRows(self.token_generator, global_batch, rows), with_metrics
                    )
                if not self.all_finite(out.loss):
                    return StepResult(out.loss.detach(), out.logs, None, skipped=True)
                self.scaler.scale(out.loss / self.accum_steps).backward()
            losses.append(out.loss.detach().float())
            all_logs.append(out.logs)
            features.append(out.features)
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_step()
        logs = {key: sum(m_logs[key] for m_logs in all_logs) / len(all_logs) for key in all_logs[0]}
        # the logged loss is the global batch's (the other logs are this process's)
        loss = all_reduce_mean(torch.stack(losses).mean())
        if "loss" in logs:
            logs["loss"] = loss
        return StepResult(loss, logs, torch.cat(features))

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process: they must all skip a step together, or the
        others would wait in DDP's gradient all-reduce forever."""
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if is_distributed():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return not bool(bad.item())
