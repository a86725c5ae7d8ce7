"""End-to-end fine-tuning (the MAE / BEiT protocol, through timm's own pieces).

All weights train: timm's ViT gets a fresh linear head (``reset_classifier``), AdamW with
layer-wise lr decay as MAE and BEiT define it (MAE's ``util/lr_decay.py``, ``get_layer_id_for_vit``:
the embeddings are layer 0, block i layer i + 1, everything else (final norm, pooled norm, head)
layer depth + 1; the lr scale is ``decay ** (depth + 1 - layer)``, so block i gets
``decay ** (depth - i)`` and the final norm and head 1.0), warm-up + cosine, drop-path, label smoothing, timm's training
transform (random resized crop + flip, optionally RandAugment and random erasing) and Mixup /
CutMix; top-1 on the val split with a dense, centre (un-augmented) forward. ``dilemma eval
finetune --protocol mae`` sets MAE's values; the default is a short protocol for small data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import to_pil_image
from tqdm import tqdm

from dilemma.config import FinetuneConfig
from dilemma.data import Splits, eval_batches
from dilemma.errors import DilemmaError
from dilemma.models import ViTEncoder
from dilemma.schedules import cosine, warmup_factor

EMBEDDINGS = ("cls_token", "reg_token", "dist_token", "pos_embed", "patch_embed")


def layer_id(name: str, depth: int) -> int:
    """MAE's ``get_layer_id_for_vit``: 0 for the embeddings, i + 1 for block i, depth + 1 for the rest."""
    if name.startswith(EMBEDDINGS):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(vit, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups by MAE's ``param_groups_lrd``: an ``lr_scale`` per layer (``layer_id``), no weight
    decay on 1-D parameters and the no-weight-decay tokens and embeddings."""
    depth, skip_decay, groups = len(vit.blocks), vit.no_weight_decay(), {}
    for name, param in vit.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        decay = 0.0 if param.ndim == 1 or name in skip_decay else weight_decay
        group = groups.setdefault(
            (layer, decay), {"params": [], "weight_decay": decay, "lr_scale": layer_decay ** (depth + 1 - layer)}
        )
        group["params"].append(param)
    return list(groups.values())


@dataclass
class FinetuneResult:
    top1: float
    history: list[dict]
    protocol: str


@torch.no_grad()
def classify_top1(encoder: ViTEncoder, images, batch_size: int, device) -> float:
    """Top-1 of ``encoder.vit`` (with its classifier head) on un-augmented images."""
    encoder.vit.eval()
    correct = total = 0
    for x, y in eval_batches(images, batch_size):
        correct += (encoder.vit(encoder.normalize(x.to(device))).argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / max(1, total) * 100


class _TrainImages(Dataset):
    """Index -> (augmented, normalised image, label), decoded and augmented in a loader worker."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        raw, labels, _ = self.images.raw([index])  # crops come from the full-resolution image
        image = to_pil_image(raw[0])  # timm's transforms take PIL images
        return self.transform(image), labels[0]


def train_transform(encoder: ViTEncoder, settings: FinetuneConfig):
    """timm's training transform: random resized crop (bicubic) + flip [+ RandAugment] + normalise
    [+ random erasing]; no colour jitter (MAE's fine-tuning)."""
    return create_transform(
        encoder.img_size[0],
        is_training=True,
        scale=(settings.crop_min_scale, 1.0),
        hflip=0.5,
        color_jitter=None,
        auto_augment=settings.auto_augment,
        interpolation="bicubic",
        mean=encoder.mean,
        std=encoder.std,
        re_prob=settings.reprob,
        re_mode="pixel",
    )


# Named starting points for ``settings`` (``--protocol``): only what differs from ``eval.finetune``.
PRESETS: dict[str, dict] = {
    "short": {},  # eval.finetune as it is: small data, CPUs
    # MAE (He et al. 2022, FINETUNE.md, ViT-B): blr 5e-4 x 1024 / 256, layer decay 0.65, 100 epochs
    "mae": {"epochs": 100, "batch_size": 1024, "lr": 2e-3, "layer_decay": 0.65, "warmup_epochs": 5.0,
            "crop_min_scale": 0.08, "auto_augment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0,
            "reprob": 0.25},
}  # fmt: skip


def preset(settings: FinetuneConfig, name: str) -> FinetuneConfig:
    if name not in PRESETS:
        raise DilemmaError(f"unknown fine-tuning protocol {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(settings, **PRESETS[name])


def finetune(
    encoder: ViTEncoder,
    splits: Splits,
    settings: FinetuneConfig,
    *,
    seed: int,
    device="cpu",
    num_workers: int = 0,
    show_progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``encoder`` (built with ``settings.drop_path``) on ``splits``; returns val top-1.
    ``auto_augment`` (e.g. ``rand-m9-mstd0.5-inc1``), ``mixup`` / ``cutmix`` (alphas) and
    ``reprob`` (random erasing) are timm's; MAE uses 0.8 / 1.0 / 0.25."""
    torch.manual_seed(seed)  # before reset_classifier: the fresh head's init is part of the run
    vit = encoder.vit
    vit.reset_classifier(len(splits.classes))
    vit.to(device)
    optimizer = _optimizer(vit, settings)
    loader = _train_loader(encoder, splits, settings, seed=seed, num_workers=num_workers)
    mix = _mixup(settings, len(splits.classes))
    steps_per_epoch = len(loader)
    total, warmup = settings.epochs * steps_per_epoch, int(settings.warmup_epochs * steps_per_epoch)
    history, step = [], 0
    bar = tqdm(total=total, disable=not show_progress, unit="step", desc="fine-tune")
    for epoch in range(settings.epochs):
        running, step = _train_epoch(
            vit, loader, optimizer, mix, settings, step=step, warmup=warmup, total=total, device=device, bar=bar
        )
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": running / max(1, steps_per_epoch),
                "val_top1": classify_top1(encoder, splits.val, 256, device),
            }
        )
        bar.set_postfix(val_top1=f"{history[-1]['val_top1']:.2f}")
    bar.close()
    protocol = _protocol(settings, splits, drop_path=_drop_path_rate(vit), mixing=mix is not None)
    return FinetuneResult(history[-1]["val_top1"] if history else float("nan"), history, protocol)


def _optimizer(vit, settings: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over MAE's layer-decay groups; each group's ``lr_scale`` is applied per step."""
    return torch.optim.AdamW(layer_decay_groups(vit, settings.weight_decay, settings.layer_decay), lr=settings.lr)


def _train_loader(
    encoder: ViTEncoder, splits: Splits, settings: FinetuneConfig, *, seed: int, num_workers: int
) -> DataLoader:
    """Shuffled, augmented training batches (full batches only); fails if there is not even one."""
    transform = train_transform(encoder, settings)
    images = _TrainImages(splits.train, transform)
    loader = DataLoader(
        images,
        batch_size=settings.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),  # its own generator: the order depends on the seed only
        persistent_workers=num_workers > 0,
    )
    if len(loader) == 0:
        raise DilemmaError(
            f"the training split has {len(images)} images, fewer than one batch of {settings.batch_size}: "
            "lower --batch-size"
        )
    return loader


def _mixup(settings: FinetuneConfig, num_classes: int) -> Mixup | None:
    """timm's Mixup / CutMix (it also smooths the labels), or None when both alphas are 0."""
    if settings.mixup <= 0 and settings.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=settings.mixup,
        cutmix_alpha=settings.cutmix,
        label_smoothing=settings.label_smoothing,
        num_classes=num_classes,
    )


def _lr_scale(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then a cosine to 0 over the remaining steps."""
    if step < warmup:
        return warmup_factor(step, warmup)
    return cosine((step - warmup) / max(1, total - warmup), 1.0, 0.0)


def _train_epoch(
    vit,
    loader: DataLoader,
    optimizer,
    mix: Mixup | None,
    settings: FinetuneConfig,
    *,
    step: int,
    warmup: int,
    total: int,
    device,
    bar: tqdm,
) -> tuple[float, int]:
    """One pass over ``loader``; returns the summed loss and the global step after it."""
    vit.train()
    running = 0.0
    for x, labels in loader:
        x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        scale = _lr_scale(step, warmup, total)
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * scale * group.get("lr_scale", 1.0)
        if mix is not None:  # soft targets (label smoothing included)
            x, targets = mix(x, labels)
            loss = torch.sum(-targets * F.log_softmax(vit(x), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(vit(x), labels, label_smoothing=settings.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        running += loss.item()
        step += 1
        bar.update(1)
    return running, step


def _protocol(settings: FinetuneConfig, splits: Splits, *, drop_path: float, mixing: bool) -> str:
    """One line that says how the number was made (for the report)."""
    f = settings
    extras = [f"RandAugment {f.auto_augment}"] if f.auto_augment else []
    extras += [f"mixup {f.mixup} / cutmix {f.cutmix}"] if mixing else []
    extras += [f"random erasing {f.reprob}"] if f.reprob else []
    return (
        f"fine-tune: all weights, AdamW lr {f.lr} (batch {f.batch_size}), layer decay {f.layer_decay} (MAE's layers: "
        f"embeddings 0, block i i+1, final norm and head depth+1), weight decay "
        f"{f.weight_decay}, warm-up {f.warmup_epochs} epoch + cosine, {f.epochs} epochs, drop-path "
        f"{drop_path:g}, label smoothing {f.label_smoothing}, random resized crop + flip"
        + "".join(f", {e}" for e in extras)
        + f"; top-1 on {splits.name} val ({len(splits.val)}), dense un-augmented images"
    )


def _drop_path_rate(vit) -> float:
    last = vit.blocks[-1].drop_path1
    return float(getattr(last, "drop_prob", 0.0))
