"""Export the pretrained backbone for timm: a folder in timm's own layout, or one safetensors file.

Only the evaluated ViT is written (no projector, predictor, teacher or detection head; DINO's
teacher), under timm's own parameter names.

- A folder (``--out DIR``): ``model.safetensors`` + ``config.json`` (architecture, the arguments
  that rebuild it, and the ``pretrained_cfg``: input size, channels, mean, std, interpolation,
  crop) + ``README.md``, so that ``timm.create_model("local-dir:DIR", pretrained=True)`` gives
  the backbone and ``timm.data.resolve_data_config(model=...)`` the right preprocessing. The same
  folder can be uploaded to the Hugging Face Hub as it is (``hf-hub:user/name``).
- A file (``--out backbone.safetensors``): the weights, with the ``timm.create_model`` call in
  its metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

from dilemma.errors import DilemmaError
from dilemma.files import written_whole
from dilemma.models import timm_kwargs
from dilemma.pretext import active_task
from dilemma.weights import encoder_from_checkpoint

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def _weights(vit) -> dict:
    """The ViT's state dict as safetensors stores it: CPU, contiguous, no shared memory."""
    return {name: t.detach().cpu().contiguous().clone() for name, t in vit.state_dict().items()}


def pretrained_cfg(model_cfg, num_classes: int = 0) -> dict:
    """timm's ``pretrained_cfg`` for a model trained with ``model_cfg``: what its inputs must look like."""
    m = model_cfg
    per_channel = [list(v) * m.in_chans if len(v) == 1 else list(v) for v in (m.mean, m.std)]
    return {
        "input_size": [m.in_chans, m.img_size, m.img_size],
        "fixed_input_size": True,
        "interpolation": "bicubic",
        "crop_pct": m.crop_pct,
        "crop_mode": "center",
        "mean": per_channel[0],
        "std": per_channel[1],
        "num_classes": num_classes,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
    }


def timm_config(model_cfg, vit, label_names: list[str] | None = None) -> dict:
    """``config.json`` as timm reads it from a local folder or the Hub."""
    model_args = {k: v for k, v in timm_kwargs(model_cfg).items() if k != "num_classes"}
    config = {
        "architecture": model_cfg.name,
        "num_classes": vit.num_classes,
        "num_features": vit.num_features,
        "global_pool": vit.global_pool,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg(model_cfg, vit.num_classes),
        "dilemma_pos_embed": model_cfg.pos_embed,  # a start from this folder keeps it (timm ignores the key)
    }
    if label_names:
        config["label_names"] = list(label_names)
    return config


def save_timm_folder(vit, model_cfg, out: str | Path, readme: str, label_names: list[str] | None = None) -> str:
    """Write ``vit`` (a timm ViT, with or without its classifier) as a timm folder; returns how to load it."""
    out = Path(out)
    if out.exists():
        raise DilemmaError(f"{str(out)!r} already exists: choose a new folder for the export")
    tensors = _weights(vit)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(timm_config(model_cfg, vit, label_names), indent=2) + "\n")
        (tmp / "README.md").write_text(readme)
        os.replace(tmp, out)  # the folder appears complete or not at all
    except (OSError, SafetensorError) as err:  # read-only, full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise DilemmaError(f"cannot write {str(out)!r}: {err}") from None
    return f'import timm\nvit = timm.create_model("local-dir:{out}", pretrained=True)'


def model_card(cfg, source: str, what: str = "Backbone only (`num_classes=0`).") -> str:
    d = cfg.dilemma
    task = {
        "predict": f"position prediction, q = {d.position_drop_prob}, sigma = {d.position_smoothing}",
        "detect": f"DILEMMA: misplaced-token detection, p = {d.misplace_prob}",
        "none": "no position task",
    }[active_task(d.task, d.weight, d.misplace_prob, d.position_drop_prob)]
    return (
        f"# {cfg.model.name}, pretrained with dilemma\n\n"
        f"Self-supervised: {cfg.method.name} with {task} (token drop rate r = {d.drop_rate}, weight {d.weight}) "
        f"on `{cfg.data.source}`.\n"
        f"Exported from `{source}`. {what}\n\n"
        "```python\nimport timm\n"
        'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)\n'
        "config = timm.data.resolve_data_config(model=model)  # size, mean, std, crop of the training\n"
        "transform = timm.data.create_transform(**config)\n```\n"
    )


def export_backbone(checkpoint: str | Path, out: str | Path, method: str | None = None) -> str:
    """Write ``out`` (a folder, or a ``.safetensors`` file); returns the Python lines that load it.
    ``method``: as in ``encoder_from_checkpoint``."""
    encoder, cfg = encoder_from_checkpoint(checkpoint, method=method)
    out = Path(out)
    if out.suffix.lower() == ".safetensors":  # B.SAFETENSORS too: the extension is matched without case
        return _export_file(_weights(encoder.vit), cfg, out)
    return save_timm_folder(encoder.vit, cfg.model, out, model_card(cfg, str(checkpoint)))


def _export_file(tensors: dict, cfg, out: Path) -> str:
    kwargs = timm_kwargs(cfg.model)
    metadata = {
        "timm_model": cfg.model.name,
        "timm_kwargs": json.dumps(kwargs),
        "pretrained_cfg": json.dumps(pretrained_cfg(cfg.model)),
        "format": "dilemma-backbone-1",
    }
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with written_whole(out) as f:
            f.write(safetensors_bytes(tensors, metadata=metadata))
    except (OSError, SafetensorError) as err:  # read-only, full disk
        raise DilemmaError(f"cannot write {str(out)!r}: {err}") from None
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (
        f"import timm, safetensors.torch\n"
        f"vit = timm.create_model({cfg.model.name!r}, {args})\n"
        f"vit.load_state_dict(safetensors.torch.load_file({str(out)!r}), strict=True)"
    )
