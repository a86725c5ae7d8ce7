"""Shape or texture? The cue-conflict read-out on Animal-Texture (``dilemma eval shape-bias``).

The frozen backbone's kNN bank and linear probe are fitted on the *agreeing* Animal-Texture train
images (each silhouette wears its own class's texture, so either cue solves the task); they then
classify the cue-conflict images made from the val silhouettes (shape of class a, texture of a
class b != a, ``data/texture.py``). Shape bias = shape decisions / (shape + texture decisions),
as in Geirhos et al. 2019 (ICLR), with the share of decisions that name neither class.
"""

from __future__ import annotations

from dilemma.config import DataConfig, EvalConfig
from dilemma.data.sources import load_cue_conflict, load_textured
from dilemma.data.texture import shape_bias
from dilemma.eval.readout import FrozenReadout
from dilemma.models import ViTEncoder


def shape_bias_eval(
    encoder: ViTEncoder,
    data: DataConfig,
    settings: EvalConfig,
    *,
    device="cpu",
    num_workers: int = 0,
    show_progress: bool = False,
) -> dict:
    """``{"knn": {...}, "linear": {...}, "agreeing_val": {...}, "protocol"}``: each classifier's
    shape bias and decision shares on the cue-conflict set, and its top-1 on agreeing val images.
    ``data``: the run's data section, whose ``val_fraction`` and ``split_seed`` split the silhouettes
    (so a run trained on Animal-MNIST or Animal-Texture never saw a cue-conflict silhouette)."""
    size, chans = encoder.vit.patch_embed.img_size[0], encoder.vit.patch_embed.proj.in_channels
    splits = load_textured(size, chans, data.val_fraction, data.split_seed)
    conflict, textures = load_cue_conflict(size, chans, data.val_fraction, data.split_seed)
    readout = FrozenReadout.fit(
        encoder, splits.train, len(splits.classes), settings, show_progress=show_progress, device=device,
        num_workers=num_workers,
    )  # fmt: skip
    decided = readout.predict(conflict, desc="cue-conflict features" if show_progress else None)
    s = settings
    protocol = (
        f"shape bias (Geirhos et al. 2019) on {len(conflict)} cue-conflict images (Animal-MNIST val silhouettes of "
        f"class a filled with the texture of a class b != a); kNN (k={s.knn_k}, T={s.knn_temperature}) and a linear "
        f"probe ({s.linear_epochs} epochs) fitted on {len(splits.train)} agreeing Animal-Texture train images; "
        "shape bias = shape / (shape + texture decisions); the silhouettes are Animal-MNIST's val split by the run's "
        f"data.val_fraction {data.val_fraction} and data.split_seed {data.split_seed} (a run trained on another copy "
        "of Animal-MNIST may have seen them)"
    )
    return {
        "knn": shape_bias(decided["knn"], decided["labels"], textures),
        "linear": shape_bias(decided["linear"], decided["labels"], textures),
        "agreeing_val": readout.top1(splits.val),
        "protocol": protocol,
    }
