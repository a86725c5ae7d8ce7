"""From a ``Config`` to the objects it describes: the data splits, the views, the method.

Every caller (training, evaluation, inspection, comparison, benchmarks) builds through here, so a
setting means the same everywhere.
"""

from __future__ import annotations

from dilemma.config import Config
from dilemma.data import Splits, Views, ViewSettings, load_source
from dilemma.methods import Method, method_class
from dilemma.models import build_encoder, load_backbone
from dilemma.pretext import Dilemma


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
    )
    return method_class(cfg.method.name)(encoder, dilemma, _method_section(cfg))
