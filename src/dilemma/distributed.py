"""Processes and devices: which device to use, the ``torchrun`` process group, and collectives
that degrade to no-ops in a single process (gathers with and without gradient, global-batch
BatchNorm). The bottom layer that methods and the training loop share; it imports nothing of either.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from dilemma.errors import DilemmaError


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DilemmaError(f"train.device={name!r} but no CUDA device is available; use train.device=cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    mps = getattr(torch.backends, "mps", None)
    usable = {"cpu": True, "cuda": True, "mps": mps is not None and mps.is_available()}
    if device is None or not usable.get(device.type, False):
        raise DilemmaError(f"train.device={name!r} is not a device here (auto, cpu, cuda, cuda:N)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DilemmaError(f"train.device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0 (no gradient: for keys / targets)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums, over processes, the gradients of this process's
    slice (every process's loss may depend on every slice)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (same shape on every rank) from all ranks along dim 0, with a correct
    backward; DDP's gradient averaging then gives the gradient of the mean of the ranks' losses."""
    return _GatherWithGrad.apply(x) if is_distributed() else x


@torch.no_grad()
def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average ``x`` over ranks in place (e.g. DINO's centre); identity in one process."""
    if is_distributed():
        dist.all_reduce(x)
        x /= world_size()
    return x


def fail_together(error: Exception | None) -> None:
    """Raise ``error``, or, when it happened in another process, say so: processes must fail
    together, or the others wait in the next collective forever."""
    if is_distributed():
        messages: list[str | None] = [None] * world_size()
        dist.all_gather_object(messages, None if error is None else str(error))
        if error is None and any(m is not None for m in messages):
            failed = next(r for r, m in enumerate(messages) if m is not None)
            raise DilemmaError(f"process {failed} failed: {messages[failed]}")
    if error is not None:
        raise error


def init_from_env(device_name: str) -> torch.device | None:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*):
    NCCL with one GPU per process when CUDA is used, gloo on CPU. Returns this process's device, or
    None when not launched by torchrun (a single process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = resolve_device(device_name).type == "cuda"  # one GPU per process: cuda:LOCAL_RANK
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", **_restart_safe_store())
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def _restart_safe_store() -> dict:
    """Under torchrun's elastic agent, the group's store with a prefix per restart attempt.

    The agent keeps one store across restarts (``TORCHELASTIC_USE_AGENT_STORE``), and torch's env://
    rendezvous adds no per-attempt prefix to it (it assumes a new store for each attempt), so after a
    restart a process can read the previous attempt's gloo addresses and wait for a peer that is
    dead (seen with torch 2.14). Elsewhere (no agent, or no restarts) torch's own rendezvous."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from torch.distributed.constants import default_pg_timeout

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False, timeout=default_pg_timeout
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"dilemma/attempt_{attempt}/", agent_store), "rank": rank, "world_size": size}


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of a sum is the sum of the gradients (all-reduced too)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(x) if is_distributed() else x


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the global batch across processes, with
    a correct backward (an all-reduce whose backward all-reduces); ``nn.SyncBatchNorm`` does this on
    GPUs only. In one process, or in eval mode, it is a plain BatchNorm1d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        total = float(x.shape[0] * world_size())  # every process holds the same number of rows
        mean = all_reduce_with_grad(x.float().sum(0)) / total
        var = all_reduce_with_grad(((x.float() - mean) ** 2).sum(0)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * total / max(total - 1, 1), alpha=m)
        y = (x.float() - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make every BatchNorm1d use global-batch statistics: ``nn.SyncBatchNorm`` on CUDA, else ours."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm1d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            # the same Parameter and buffer objects (as convert_sync_batchnorm does): an optimiser built
            # before the conversion keeps updating them, a frozen teacher's stay frozen
            replacement._parameters = child._parameters
            replacement._buffers = child._buffers
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            sync_batchnorm(child, device)
    return module
