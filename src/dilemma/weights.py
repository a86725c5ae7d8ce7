"""Weights from elsewhere: a run's backbone and detection head, and the start a run is given
(``model.pretrained``): a run or checkpoint, an exported folder, a weights file, or a timm model
whose weights are already on this machine. Every file is untrusted input: read with
``weights_only=True`` or as safetensors; a checkpoint's parts are found by building its method
from its config and asking it (``Method.evaluated_encoder``, ``Dilemma.head``), not by key prefixes.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from dilemma.build import build_method
from dilemma.config import Config, config_from_dict, resolved_method
from dilemma.errors import DilemmaError
from dilemma.methods import Method
from dilemma.models import ViTEncoder
from dilemma.pretext import DetectionHead
from dilemma.rundir import load_checkpoint


def method_from_checkpoint(
    path: str | Path, *, ckpt: dict | None = None, method: str | None = None, drop_path_rate: float | None = None
) -> tuple[Method, Config]:
    """The whole method of a checkpoint or run folder, its weights loaded, in eval mode, and its
    config. ``ckpt``: the checkpoint, when loaded already; ``method``: the user's ``--method``,
    needed (and then imported) only when the checkpoint names a method kept in a file or module of
    its own; ``drop_path_rate``: rebuilt with that stochastic depth (fine-tuning)."""
    ckpt = ckpt if ckpt is not None else load_checkpoint(path)
    cfg = config_from_dict(ckpt["config"], method)
    if drop_path_rate is not None:
        cfg.model.drop_path_rate = drop_path_rate
    built = build_method(cfg)
    try:
        built.load_state_dict(ckpt["model"])
    except RuntimeError as err:  # missing / unexpected keys, other shapes
        first = str(err).splitlines()[0]
        raise DilemmaError(f"checkpoint {str(path)!r} does not match its own model config ({first[:200]})") from None
    return built.eval(), cfg


def encoder_from_checkpoint(
    path: str | Path,
    *,
    drop_path_rate: float | None = None,
    student: bool = False,
    ckpt: dict | None = None,
    method: str | None = None,
) -> tuple[ViTEncoder, Config]:
    """The evaluated backbone of a checkpoint or run folder (``Method.evaluated_encoder``: the
    student, DINO's teacher; no projector, no detection head) and its config, in eval mode.
    ``student`` takes the student even where the teacher is evaluated (the detection head reads it)."""
    built, cfg = method_from_checkpoint(path, ckpt=ckpt, method=method, drop_path_rate=drop_path_rate)
    return (built.encoder if student else built.evaluated_encoder()).eval(), cfg


def detection_head_from_checkpoint(path: str | Path, method: str | None = None) -> DetectionHead:
    built, _ = method_from_checkpoint(path, method=method)
    if built.dilemma.head is None:
        raise DilemmaError(
            f"checkpoint {str(path)!r} has no detection head: it was trained without DILEMMA "
            "(dilemma.misplace_prob = 0 or dilemma.weight = 0)"
        )
    return built.dilemma.head.eval()


def _exported_folder_weights(path: Path) -> Path | None:
    """The weights file of a folder ``dilemma export`` (or timm / Hugging Face) wrote, if it is one."""
    if (path / "checkpoints").exists():
        return None
    return next((path / name for name in ("model.safetensors", "pytorch_model.bin") if (path / name).is_file()), None)


def _read_state_dict(path: Path) -> dict:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable or unsafe: say which
        raise DilemmaError(f"model.pretrained: cannot read {str(path)!r} as weights ({err})") from None
    if not isinstance(state, dict):
        raise DilemmaError(f"model.pretrained: {str(path)!r} holds no state dict")
    return state


def local_timm_weights(name: str) -> Path | None:
    """The file of timm model ``name``'s pretrained weights if it is already on this machine (the
    Hugging Face cache, ``$HF_HUB_CACHE``, or torch hub's), found without any network request."""
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - an unknown tag
        return None
    if cfg is None:
        return None
    if cfg.file and Path(cfg.file).is_file():
        return Path(cfg.file)
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url and cfg.url.rsplit(".", 1)[-1] in ("pth", "pt", "bin", "safetensors"):
        cached = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        if cached.is_file():
            return cached
    return None


def pretrained_inputs(spec: str) -> dict[str, object]:
    """The model and input contract the weights ``model.pretrained`` names were trained with, as
    ``model.*`` settings: architecture (full depth), image size, patch size, channels, mean, std and
    crop from a timm name's pretrained config (and its learned positional embedding kept, not replaced
    by sin-cos), or from the ``config.json`` of a folder ``dilemma export`` (or timm, or the Hugging
    Face Hub) wrote. Empty for a run, a checkpoint or a bare weights file: their model is the config's.
    Reads no weights and makes no network request."""
    path = Path(spec).expanduser()
    if path.is_dir() and _exported_folder_weights(path) is not None and (path / "config.json").is_file():
        return _folder_inputs(path)
    if path.exists() or os.sep in spec or path.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors"):
        return {}
    import timm
    from timm.models import get_pretrained_cfg

    name = spec.split(".")[0]
    try:
        cfg = get_pretrained_cfg(spec) if timm.is_model(name) else None
        with torch.device("meta"):  # the architecture's own patch size, class token and PE; no memory
            vit = timm.create_model(name, pretrained=False, num_classes=0) if cfg is not None else None
        patch = vit.patch_embed.patch_size[0]
    except Exception:  # noqa: BLE001 - an unknown tag, not a ViT: pretrained_state / load_backbone say what
        return {}
    settings = {"name": name, "depth": None, "patch_size": patch}
    settings |= _input_settings(cfg.input_size, cfg.mean, cfg.std, cfg.crop_pct)
    if getattr(vit, "pos_embed", None) is not None:
        settings["pos_embed"] = "learned"
    return {f"model.{key}": value for key, value in settings.items()}


def _folder_inputs(path: Path) -> dict[str, object]:
    import json

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        args, cfg = config.get("model_args", {}), config["pretrained_cfg"]
        settings = {"name": str(config["architecture"]), "depth": args.get("depth")}
        if "patch_size" in args:
            settings["patch_size"] = int(args["patch_size"])
        settings |= {key: args[key] for key in ("class_token", "global_pool") if key in args}
        settings |= _input_settings(cfg["input_size"], cfg["mean"], cfg["std"], cfg.get("crop_pct", 1.0))
        # its PE kept: the one this run was trained with (dilemma's export says), else learned weights
        settings["pos_embed"] = str(config.get("dilemma_pos_embed", "learned"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError, RecursionError) as err:
        raise DilemmaError(f"model.pretrained: {str(path)!r} has no readable config.json ({err!r})") from None
    return {f"model.{key}": value for key, value in settings.items()}


def _input_settings(input_size, mean, std, crop_pct) -> dict[str, object]:
    """timm's ``pretrained_cfg`` input fields as ``model`` settings."""
    channels, _, size = (int(v) for v in input_size)
    return {"img_size": size, "in_chans": channels, "mean": [float(v) for v in mean],
            "std": [float(v) for v in std], "crop_pct": float(crop_pct)}  # fmt: skip


def pretrained_state(spec: str, method: str | None = None) -> tuple[dict, str]:
    """``model.pretrained`` -> ``(ViT state dict, where from)``: a run folder or dilemma checkpoint
    (its evaluated backbone; ``method`` as in ``encoder_from_checkpoint``), a folder ``dilemma
    export`` wrote, a ``.safetensors`` / ``.pth`` / ``.bin`` state dict, or a timm model name
    whose weights are already on this machine (nothing is downloaded, and no network request is
    made: a missing file is an error that says how to provide it)."""
    path = Path(spec).expanduser()
    if path.is_dir() and (exported := _exported_folder_weights(path)) is not None:
        return _read_state_dict(exported), f"exported folder {str(path)!r}"
    ckpt = _dilemma_checkpoint_or_none(path)
    if path.is_dir() or ckpt is not None:
        ckpt = ckpt if ckpt is not None else load_checkpoint(path)
        saved = ckpt["config"].get("method", {}).get("name", "")
        if ":" in str(saved) and (method is None or resolved_method(method) != resolved_method(str(saved))):
            raise DilemmaError(
                f"model.pretrained: {spec!r} was trained with the method {saved!r}, kept in a file of its own, "
                f"and reading it never imports code: export its backbone first (dilemma export {spec} --out DIR "
                f"--method {saved}) and start from that folder"
            )
        encoder, _ = encoder_from_checkpoint(path, ckpt=ckpt, method=method)
        return encoder.vit.state_dict(), f"run {str(path)!r}"
    if path.is_file():
        return _read_state_dict(path), f"file {str(path)!r}"
    if os.sep in spec or path.suffix.lower() in (".pt", ".pth", ".bin", ".safetensors"):
        raise DilemmaError(f"model.pretrained: {spec!r} does not exist")
    import timm

    if not timm.is_model(spec.split(".")[0]):
        raise DilemmaError(f"model.pretrained: {spec!r} is neither a file, a run folder, nor a timm model name")
    weights = local_timm_weights(spec)
    if weights is None:
        raise DilemmaError(
            f"model.pretrained: timm weights {spec!r} are not on this machine, and dilemma downloads nothing. "
            "Download them where there is internet (timm.create_model(name, pretrained=True) fills the "
            "Hugging Face cache), or point model.pretrained at a .safetensors file"
        )
    state = _read_state_dict(weights)  # read here, safely (weights_only / safetensors), not by timm
    try:
        vit = timm.create_model(spec, pretrained=True, num_classes=0, pretrained_cfg_overlay={"state_dict": state})
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DilemmaError(f"model.pretrained: cannot load timm weights {str(weights)!r} ({first})") from None
    return vit.state_dict(), f"timm {spec!r} ({weights})"


def _dilemma_checkpoint_or_none(path: Path) -> dict | None:
    """The dilemma checkpoint a ``.pt`` file holds (loaded once), or None for any other file."""
    if path.suffix.lower() != ".pt" or not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        return load_checkpoint(path)
    except DilemmaError:
        return None
