"""Run configuration: typed dataclasses, YAML files and ``--set key=value`` overrides.

Every key is checked: an unknown key is an error with the closest known key as a suggestion,
and values are converted to the field's type or rejected with a message.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dilemma.errors import DilemmaError


@dataclass
class ModelConfig:
    name: str = "vit_tiny_patch16_224"  # any timm VisionTransformer
    img_size: int = 28  # images are resized to this; must be divisible by patch_size
    patch_size: int = 4
    in_chans: int = 1
    depth: typing.Optional[int] = 6  # override the model's depth (null: keep timm's)
    pos_embed: str = "sincos"  # sincos (fixed 2D, MoCo v3) or learned (timm's)
    drop_path_rate: float = 0.0


@dataclass
class DataConfig:
    source: str = "animal-mnist"  # embedded dataset name, MNIST-IDX folder, or image folder
    val_fraction: float = 0.2  # for sources without their own val split
    split_seed: int = 0
    batch_size: int = 128
    num_workers: int = 0
    crop_min_scale: float = 0.35  # RandomResizedCrop scale lower bound
    hflip: bool = True
    color_jitter: float = 0.4  # brightness/contrast strength, applied with p = 0.8
    blur_prob: float = 0.2
    skip_bad_images: bool = False  # image folders: skip (and count) unreadable images instead of failing


@dataclass
class MoCoV3Config:
    temperature: float = 0.2
    proj_hidden_dim: int = 1024
    proj_dim: int = 256
    momentum: float = 0.99  # EMA momentum at the start; cosine to 1


@dataclass
class DINOConfig:
    out_dim: int = 1024  # prototypes (65536 in the paper's ImageNet runs)
    hidden_dim: int = 1024
    bottleneck_dim: int = 128
    student_temp: float = 0.1
    teacher_temp: float = 0.07  # reached after the warm-up
    warmup_teacher_temp: float = 0.04
    teacher_temp_warmup: float = 0.3  # fraction of training over which the teacher temperature rises
    center_momentum: float = 0.9
    momentum: float = 0.99  # teacher EMA momentum at the start; cosine to 1
    local_crops: int = 2  # N small crops besides the 2 global ones
    local_crop_size: int = 16  # pixels; must be divisible by the patch size
    local_crop_scale: float = 0.35  # local crops cover 5 % .. this fraction of the image; global crops start here
    local_dilemma: bool = False  # also make the local crops sparse + corrupted


@dataclass
class SimCLRConfig:
    temperature: float = 0.2
    proj_hidden_dim: int = 1024
    proj_dim: int = 128
    clean_view: bool = False  # keep the second view dense and clean (DILEMMA on the first only)


@dataclass
class MAEConfig:
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_pix_loss: bool = True  # reconstruct per-patch normalised pixels


@dataclass
class MethodConfig:
    name: str = "mocov3"  # mocov3, dino, simclr or mae; only that method's section is used
    mocov3: MoCoV3Config = field(default_factory=MoCoV3Config)
    dino: DINOConfig = field(default_factory=DINOConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)


@dataclass
class DilemmaConfig:
    misplace_prob: float = 0.2  # p: chance that a kept token gets a wrong position
    drop_rate: float = 0.75  # r: fraction of patch tokens dropped from the student's views
    weight: float = 1.0  # lambda: weight of the detection loss


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 30
    grad_clip: typing.Optional[float] = 3.0


@dataclass
class TrainConfig:
    max_steps: int = 220
    time_budget: typing.Optional[float] = 4.0  # minutes of training (null: none); schedules end when it runs out
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    progress: bool = True
    on_nonfinite: str = "stop"  # non-finite loss: stop (keep the last good checkpoint) or skip the step
    max_nonfinite_skips: int = 10  # with on_nonfinite=skip: stop after this many skipped steps
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 with a gradient scaler)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimiser step
    grad_checkpointing: bool = False  # recompute block activations in the backward (less memory)
    compile: bool = False  # torch.compile the training model
    online_probe: bool = True  # a linear layer on detached features, its own optimiser; accuracy in metrics.jsonl


@dataclass
class EvalConfig:
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_at_end: bool = True
    batch_size: int = 256


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    dilemma: DilemmaConfig = field(default_factory=DilemmaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _suggest(key: str, known: typing.Iterable[str]) -> str:
    known = list(known)
    leaf = key.rsplit(".", 1)[-1]
    moved = [k for k in _all_keys() if k.startswith(key.split(".", 1)[0] + ".") and k.rsplit(".", 1)[-1] == leaf]
    if moved and key not in moved:  # e.g. 'method.temperature' -> 'method.mocov3.temperature'
        return f" (did you mean {' or '.join(repr(k) for k in moved)}?)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value, kind, key: str):
    """Convert a YAML value to the field type ``kind`` or raise a DilemmaError."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, str):
        return value
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DilemmaError(f"config key {key!r} needs a value of type {kind.__name__}, got {value!r}")


def _merge(target, updates: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in hints:
            known = [f"{prefix}{k}" for k in hints]
            raise DilemmaError(f"unknown config key {path!r}{_suggest(path, known)}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise DilemmaError(f"config section {path!r} must be a mapping, got {value!r}")
            _merge(getattr(target, key), value, prefix=f"{path}.")
        else:
            setattr(target, key, _coerce(value, kind, path))


def _all_keys(obj=None, prefix: str = "") -> list[str]:
    obj = Config() if obj is None else obj
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def parse_override(text: str) -> dict:
    """``'optim.lr=3e-4'`` -> ``{'optim': {'lr': 0.0003}}`` (the value is read as YAML)."""
    if "=" not in text:
        raise DilemmaError(f"--set needs key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in _all_keys():
        raise DilemmaError(f"unknown config key {key!r}{_suggest(key, _all_keys())}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    node = nested
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return nested


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DilemmaError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise DilemmaError(f"config file {str(path)!r} is not valid YAML ({where}{problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DilemmaError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _method_checks(m: MethodConfig) -> list[tuple[bool, str]]:
    dino = m.dino
    return [
        (m.mocov3.temperature > 0 and m.simclr.temperature > 0, "method.*.temperature must be > 0"),
        (0.0 <= m.mocov3.momentum <= 1.0 and 0.0 <= dino.momentum <= 1.0, "method.*.momentum must be in [0, 1]"),
        (min(dino.student_temp, dino.teacher_temp, dino.warmup_teacher_temp) > 0, "method.dino temperatures must be > 0"),
        (0.0 <= dino.teacher_temp_warmup <= 1.0, f"method.dino.teacher_temp_warmup must be in [0, 1], got {dino.teacher_temp_warmup}"),
        (0.0 <= dino.center_momentum < 1.0, f"method.dino.center_momentum must be in [0, 1), got {dino.center_momentum}"),
        (dino.local_crops >= 0, f"method.dino.local_crops must be >= 0, got {dino.local_crops}"),
        (0.05 < dino.local_crop_scale < 1.0, f"method.dino.local_crop_scale must be in (0.05, 1), got {dino.local_crop_scale}"),
        (min(m.mocov3.proj_dim, m.mocov3.proj_hidden_dim, m.simclr.proj_dim, m.simclr.proj_hidden_dim,
             dino.out_dim, dino.hidden_dim, dino.bottleneck_dim, m.mae.decoder_dim, m.mae.decoder_depth, m.mae.decoder_heads) >= 1,
         "method head sizes (dims, depths, heads) must be >= 1"),
    ]


def validate(cfg: Config) -> Config:
    """Range checks that need no model or data; raises DilemmaError."""
    checks = [
        (0.0 <= cfg.dilemma.drop_rate < 1.0, f"dilemma.drop_rate must be in [0, 1), got {cfg.dilemma.drop_rate}"),
        (0.0 <= cfg.dilemma.misplace_prob <= 1.0, f"dilemma.misplace_prob must be in [0, 1], got {cfg.dilemma.misplace_prob}"),
        (cfg.dilemma.weight >= 0, f"dilemma.weight must be >= 0, got {cfg.dilemma.weight}"),
        (cfg.model.img_size > 0 and cfg.model.patch_size > 0, "model.img_size and model.patch_size must be positive"),
        (cfg.model.img_size % max(cfg.model.patch_size, 1) == 0,
         f"model.img_size {cfg.model.img_size} is not divisible by model.patch_size {cfg.model.patch_size}"),
        (cfg.model.in_chans in (1, 3), f"model.in_chans must be 1 or 3, got {cfg.model.in_chans}"),
        (cfg.data.batch_size >= 2, f"data.batch_size must be >= 2 (contrastive losses need negatives), got {cfg.data.batch_size}"),
        (cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}"),
        (0.0 < cfg.data.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {cfg.data.val_fraction}"),
        (0.0 < cfg.data.crop_min_scale <= 1.0, f"data.crop_min_scale must be in (0, 1], got {cfg.data.crop_min_scale}"),
        *_method_checks(cfg.method),
        (cfg.optim.lr > 0, f"optim.lr must be > 0, got {cfg.optim.lr}"),
        (cfg.optim.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}"),
        (cfg.train.max_steps >= 1, f"train.max_steps must be >= 1, got {cfg.train.max_steps}"),
        (cfg.train.time_budget is None or cfg.train.time_budget > 0, f"train.time_budget must be > 0 minutes, got {cfg.train.time_budget}"),
        (cfg.train.log_every >= 1 and cfg.train.ckpt_every >= 1, "train.log_every and train.ckpt_every must be >= 1"),
        (cfg.train.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {cfg.train.keep_checkpoints}"),
        (cfg.train.on_nonfinite in ("stop", "skip"), f"train.on_nonfinite must be stop or skip, got {cfg.train.on_nonfinite!r}"),
        (cfg.train.max_nonfinite_skips >= 0, f"train.max_nonfinite_skips must be >= 0, got {cfg.train.max_nonfinite_skips}"),
        (cfg.train.precision in ("fp32", "bf16", "fp16"), f"train.precision must be fp32, bf16 or fp16, got {cfg.train.precision!r}"),
        (cfg.train.accum_steps >= 1 and cfg.data.batch_size % cfg.train.accum_steps == 0,
         f"train.accum_steps must be >= 1 and divide data.batch_size {cfg.data.batch_size}, got {cfg.train.accum_steps}"),
        (cfg.eval.knn_k >= 1, f"eval.knn_k must be >= 1, got {cfg.eval.knn_k}"),
        (cfg.eval.knn_temperature > 0, f"eval.knn_temperature must be > 0, got {cfg.eval.knn_temperature}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DilemmaError(message)
    return cfg


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (), base: dict | None = None) -> Config:
    """Defaults, then ``base`` (e.g. a checkpoint's config), then the YAML file, then ``--set`` overrides."""
    cfg = Config()
    if base:
        _merge(cfg, base)
    if path is not None:
        _merge(cfg, read_yaml(path))
    for text in overrides:
        _merge(cfg, parse_override(text))
    return validate(cfg)


def config_from_dict(data: dict) -> Config:
    cfg = Config()
    _merge(cfg, data)
    return cfg
