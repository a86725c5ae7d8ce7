"""Export the pretrained backbone as a plain timm checkpoint (safetensors).

Only the student ViT is written (no projector, predictor, teacher or detection head), under timm's
own parameter names, so that

    vit = timm.create_model(name, img_size=..., patch_size=..., in_chans=..., depth=..., num_classes=0)
    vit.load_state_dict(safetensors.torch.load_file(path), strict=True)

gives the same dense features as ``dilemma``'s encoder. The file's metadata holds that call.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from dilemma.errors import DilemmaError
from dilemma.models import timm_kwargs
from dilemma.rundir import encoder_from_checkpoint


def export_backbone(checkpoint: str | Path, out: str | Path) -> str:
    """Write ``out`` (.safetensors); returns the Python lines that load it with timm."""
    encoder, cfg = encoder_from_checkpoint(checkpoint)
    kwargs = timm_kwargs(cfg.model)
    tensors = {name: t.detach().contiguous().clone() for name, t in encoder.vit.state_dict().items()}
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        save_file(
            tensors,
            str(tmp),
            metadata={"timm_model": cfg.model.name, "timm_kwargs": json.dumps(kwargs), "format": "dilemma-backbone-1"},
        )
        tmp.replace(out)
    except OSError as err:
        raise DilemmaError(f"cannot write {str(out)!r}: {err}") from None
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (
        f"import timm, safetensors.torch\n"
        f"vit = timm.create_model({cfg.model.name!r}, {args})\n"
        f"vit.load_state_dict(safetensors.torch.load_file({str(out)!r}), strict=True)"
    )
