"""End-to-end fine-tuning (the MAE / BEiT protocol, scaled down).

All weights train: timm's ViT gets a fresh linear head (``reset_classifier``), AdamW with
layer-wise lr decay (timm's ``param_groups_layer_decay``: block i's lr is scaled by
``decay ** (depth + 1 - i)``), warm-up + cosine, drop-path, label smoothing, random resized crop
+ flip; top-1 on the val split with a dense, centre (un-augmented) forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dilemma.data import Splits, eval_batches, normalize, view_transform
from dilemma.models import ViTEncoder
from dilemma.schedules import cosine, warmup_factor

try:
    from timm.optim import param_groups_layer_decay
except ImportError:  # timm < 1.0.12 has it only here
    from timm.optim.optim_factory import param_groups_layer_decay


@dataclass
class FinetuneResult:
    top1: float
    history: list[dict]
    protocol: str


@torch.no_grad()
def classify_top1(vit, images, batch_size: int, device) -> float:
    vit.eval()
    correct = 0
    for x, y in eval_batches(images, batch_size):
        correct += (vit(x.to(device)).argmax(1).cpu() == y).sum().item()
    return correct / len(images) * 100


def finetune(
    encoder: ViTEncoder,
    splits: Splits,
    *,
    epochs: int = 5,
    lr: float = 1e-3,
    layer_decay: float = 0.75,
    weight_decay: float = 0.05,
    label_smoothing: float = 0.1,
    warmup_epochs: float = 1.0,
    batch_size: int = 128,
    crop_min_scale: float = 0.35,
    seed: int = 0,
    device="cpu",
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``encoder`` (built with the drop-path rate wanted) on ``splits``; returns val top-1."""
    torch.manual_seed(seed)
    vit = encoder.vit
    vit.reset_classifier(len(splits.classes))
    vit.to(device)
    groups = param_groups_layer_decay(
        vit, weight_decay, no_weight_decay_list=vit.no_weight_decay(), layer_decay=layer_decay
    )
    optimizer = torch.optim.AdamW(groups, lr=lr)
    augment = view_transform(
        encoder.img_size[0], crop_min_scale=crop_min_scale, hflip=True, color_jitter=0.0, blur_prob=0.0
    )
    steps_per_epoch = len(splits.train) // batch_size
    total, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    history, step = [], 0
    bar = tqdm(total=total, disable=not progress, unit="step", desc="fine-tune")
    for epoch in range(epochs):
        vit.train()
        order = torch.randperm(len(splits.train), generator=generator)
        running = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            images = normalize(torch.stack([augment(img) for img in splits.train.load(idx)])).to(device)
            labels = splits.train.labels[idx].to(device)
            # linear warm-up, then a cosine to 0 over the remaining steps
            scale = (
                warmup_factor(step, warmup)
                if step < warmup
                else cosine((step - warmup) / max(1, total - warmup), 1.0, 0.0)
            )
            for group in optimizer.param_groups:
                group["lr"] = lr * scale * group.get("lr_scale", 1.0)
            loss = F.cross_entropy(vit(images), labels, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
            bar.update(1)
        history.append(
            {
                "epoch": epoch + 1,
                "train_loss": running / steps_per_epoch,
                "val_top1": classify_top1(vit, splits.val, 256, device),
            }
        )
        bar.set_postfix(val_top1=f"{history[-1]['val_top1']:.2f}")
    bar.close()
    protocol = (
        f"fine-tune: all weights, AdamW lr {lr} (batch {batch_size}), layer decay {layer_decay}, weight decay "
        f"{weight_decay}, warm-up {warmup_epochs} epoch + cosine, {epochs} epochs, drop-path "
        f"{_drop_path_rate(vit):g}, label smoothing {label_smoothing}, random resized crop + flip; "
        f"top-1 on {splits.name} val ({len(splits.val)}), dense un-augmented images"
    )
    return FinetuneResult(history[-1]["val_top1"] if history else float("nan"), history, protocol)


def _drop_path_rate(vit) -> float:
    last = vit.blocks[-1].drop_path1
    return float(getattr(last, "drop_prob", 0.0))
