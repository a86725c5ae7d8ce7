"""Run configuration: typed dataclasses, YAML files and ``--set key=value`` overrides.

Each section is a dataclass whose defaults are the only place a default is written: ``model``
(``models.ModelConfig``), ``method.<name>`` (each method's own ``Config``, in its file), and the
sections below. Every key is checked: an unknown key is an error with the closest known key as a
suggestion, and values are converted to the field's type or rejected with a message.

Reading a config never runs code: YAML is read safely and bounded (size, nesting, aliases
expanded), and a method kept in a file or module of one's own (``method.name: path.py:Class``) is
imported only when the command line names it (``--method`` / ``--set method.name=...``); a YAML
file or a checkpoint that names one is refused otherwise. A relative method file is stored
resolved, so a run does not depend on the folder a later command runs from.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dilemma.errors import DilemmaError, require
from dilemma.methods import METHODS, Method, method_class
from dilemma.models import GLOBAL_POOLS, ModelConfig
from dilemma.pretext import check_switches
from dilemma.redact import redacted


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
    saturation: float = 0.0  # RGB only, in the same jitter
    hue: float = 0.0  # RGB only, in the same jitter
    grayscale_prob: float = 0.0  # RGB only
    blur_prob: float = 0.2
    solarize_prob: float = 0.0
    asymmetric_views: bool = False  # BYOL / MoCo v3 / DINO: view 1 always blurred, view 2 p = 0.1 + solarised
    skip_bad_images: bool = False  # image files: replace (training) or leave out (evaluation) unreadable ones, counted


DEFAULT_METHOD = "mocov3"


def method_section(*extra: type[Method]):
    """The ``method`` section: ``name`` and one section per method (each method's own ``Config``
    dataclass), for the built-in methods and ``extra`` ones loaded from a user's file."""
    methods = {**METHODS, **{m.name: m for m in extra}}
    fields = [("name", str, field(default=DEFAULT_METHOD))]  # a built-in name or path/to/file.py:ClassName
    fields += [(name, m.Config, field(default_factory=m.Config)) for name, m in methods.items()]
    return dataclasses.make_dataclass("MethodConfig", fields)()


@dataclass
class DilemmaConfig:
    misplace_prob: float = 0.2  # p: chance that a kept token gets a wrong position
    drop_rate: float = 0.75  # r: fraction of patch tokens dropped from the student's views
    weight: float = 1.0  # lambda: weight of the position task's loss (detection BCE or position cross-entropy)
    task: str = "detect"  # detect (DILEMMA), predict (positions: DropPos / MP3), none (sparsity only)
    position_drop_prob: float = 0.75  # task predict: share of the kept tokens without a position (DropPos 0.75; MP3 1)
    position_smoothing: float = 0.0  # task predict: label width sigma (patches) at the start, linear to 0 (DropPos 1)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of training (progress: steps or wall-clock) over which the lr rises from 0
    scale_lr_with_batch: bool = False  # lr and min_lr are per 256 images: x data.batch_size / 256 (MoCo v3, MAE)
    grad_clip: typing.Optional[float] = 3.0


LOGGERS = {  # train.loggers: what each needs installed, and the extra that installs it
    "jsonl": (None, None),  # metrics.jsonl, always written
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


@dataclass
class TrackingConfig:
    """Where ``train.loggers`` other than jsonl send a run (``train/trackers.py``). Null: what the
    tool's own environment variables say (WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_TAGS,
    MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), else its default."""

    project: typing.Optional[str] = None  # W&B project
    entity: typing.Optional[str] = None  # W&B team or user
    experiment: typing.Optional[str] = None  # MLflow experiment (default "dilemma")
    tracking_uri: typing.Optional[str] = None  # MLflow: http(s)://..., sqlite:///..., file:...
    run_name: typing.Optional[str] = None  # default: the run folder's name
    tags: typing.Optional[list[str]] = None
    group: typing.Optional[str] = None  # W&B group / MLflow parent run; dilemma compare sets it


@dataclass
class TrainConfig:
    # The run ends at whichever of these comes first (null: no such limit; at least one must be set)
    max_steps: typing.Optional[int] = 220
    epochs: typing.Optional[float] = None  # passes over the training split
    time_budget: typing.Optional[float] = 4.0  # minutes of training; schedules end when it runs out
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 100
    checkpoint_every_minutes: typing.Optional[float] = None  # also save when this much training time has passed
    keep_checkpoints: int = 2
    snapshot_every: typing.Optional[float] = (
        None  # also keep checkpoints every this fraction of training (read-out curves)
    )
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    show_progress: bool = True  # a progress bar on the terminal
    on_nonfinite: str = "stop"  # non-finite loss: stop (keep the last good checkpoint) or skip the step
    max_nonfinite_skips: int = 10  # with on_nonfinite=skip: stop after this many skipped steps
    precision: str = "fp32"  # fp32, bf16 or fp16 (autocast; fp16 with a gradient scaler)
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])  # and tensorboard, wandb, mlflow (rank 0)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    accum_steps: int = 1  # gradient accumulation: micro-batches per optimiser step
    grad_checkpointing: bool = False  # recompute block activations in the backward (less memory)
    compile: bool = False  # torch.compile the training model
    online_probe: bool = True  # a linear layer on detached features, its own optimiser; accuracy in metrics.jsonl


@dataclass
class FinetuneConfig:
    """Fine-tuning all weights (``dilemma eval finetune``): a short protocol for small data and CPUs.
    ``--protocol mae`` starts from MAE's recipe instead (``eval/finetune.py``: PRESETS)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3  # peak lr for the whole batch
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    warmup_epochs: float = 1.0
    crop_min_scale: float = 0.35
    auto_augment: typing.Optional[str] = None  # timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1
    mixup: float = 0.0  # alpha; 0: off
    cutmix: float = 0.0  # alpha; 0: off
    reprob: float = 0.0  # random erasing probability


@dataclass
class EvalConfig:
    """The read-outs: ``dilemma eval``, ``compare`` and the end-of-run kNN read these (the one place of
    their defaults); an eval command's flags, or its ``--set eval.x=...``, override them."""

    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_at_end: bool = True
    batch_size: int = 256  # images per forward when extracting features
    linear_epochs: int = 100
    linear_lr: float = 0.1  # per 256 images
    occlusion_fractions: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.1])
    shuffle_grids: typing.Optional[list[int]] = None  # patch shuffle g x g; None: 1, 2, 4, ... + the token grid
    position_fractions: list[float] = field(default_factory=lambda: [0.0, 0.2, 0.5, 1.0])  # position shuffle q
    detection_misplace_prob: float = 0.2  # p of the val-image detection AUROC (runs with a detection head)
    seed: int = 0  # the linear probe's initialisation and order, every corruption's draws, fine-tuning
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: typing.Any = field(default_factory=method_section)  # built from the method registry
    dilemma: DilemmaConfig = field(default_factory=DilemmaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        """The config as plain values, as it is written and sent (credentials in URIs removed:
        ``redact.py``; the objects a run holds keep them for its own connections)."""
        return redacted(dataclasses.asdict(self))


# Keys an earlier version had: a saved config (checkpoint) drops them; a user who sets one is told why.
RETIRED = {
    "optim.warmup_steps": "optim.warmup_steps was replaced by optim.warmup, a fraction of training "
    "(steps or wall-clock) such as 0.1, so that runs of equal time get the same lr schedule",
    "train.progress": "train.progress was renamed train.show_progress (the progress bar); "
    "'progress' is the fraction of training the schedules follow",
}


def _without_retired(saved: dict) -> dict:
    saved = {section: dict(value) if isinstance(value, dict) else value for section, value in saved.items()}
    for key in RETIRED:
        section, leaf = key.split(".")
        if isinstance(saved.get(section), dict):
            saved[section].pop(leaf, None)
    return saved


def _all_keys(obj, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _suggest(key: str, known: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    moved = [k for k in known if k.startswith(key.split(".", 1)[0] + ".") and k.rsplit(".", 1)[-1] == leaf]
    if moved and key not in moved:  # e.g. 'method.temperature' -> 'method.mocov3.temperature'
        return f" (did you mean {' or '.join(repr(k) for k in moved)}?)"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _short(value, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error line stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class TypedText:
    """A ``--set`` value YAML reads as a number, boolean or date, with the text as typed: a key
    that holds a string keeps the text (``data.source=010`` is the folder ``010``, not ``8``)."""

    text: str
    value: typing.Any


def _coerce(value, kind, key: str):
    """Convert a YAML value to the field type ``kind`` or raise a DilemmaError."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(kind)
        if value is None and type(None) in args:
            return None
        kind = next(a for a in args if a is not type(None))
    if isinstance(value, TypedText):
        value = value.text if kind is str else value.value
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values:
            raise DilemmaError(f"config key {key!r} needs at least one value")
        return [_coerce(v, item, key) for v in values]
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise DilemmaError(f"config key {key!r} needs a finite number, got {_short(value)}")
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise DilemmaError(f"config key {key!r} needs a value of type {kind.__name__}, got {_short(value)}")


def _merge(target, updates: dict, known: list[str], prefix: str = "") -> None:
    """Set ``updates`` (nested dicts) on the dataclass ``target``; ``known`` = every key, for suggestions."""
    hints = typing.get_type_hints(type(target))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if f"{prefix}{key}" in RETIRED:
            raise DilemmaError(RETIRED[f"{prefix}{key}"])
        if key not in hints:
            while isinstance(value, dict) and len(value) == 1:  # a --set key: name the whole key
                leaf, value = next(iter(value.items()))
                path = f"{path}.{leaf}"
            raise DilemmaError(f"unknown config key {_short(path)}{_suggest(path, known)}")
        section = getattr(target, key)
        if dataclasses.is_dataclass(section):
            if not isinstance(value, dict):
                raise DilemmaError(f"config section {path!r} must be a mapping, got {_short(value)}")
            _merge(section, value, known, prefix=f"{path}.")
        else:
            setattr(target, key, _coerce(value, hints[key], path))


MAX_CONFIG_BYTES = 2**20  # a config is a few KB; this bounds what a mistaken path can make us read
MAX_YAML_NODES = 100_000  # with every alias expanded: a 400-byte "billion laughs" file expands to billions
MAX_YAML_DEPTH = 32


def _expanded_shape(root: yaml.Node, where: str) -> tuple[int, int]:
    """``(nodes, depth)`` of a composed YAML graph with every alias expanded, counted without
    expanding (each shared node once); a recursive alias is refused."""
    shapes: dict[int, tuple[int, int]] = {}
    on_path: set[int] = set()
    pending = [(root, False)]
    while pending:
        node, children_done = pending.pop()
        children = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if not children_done:
            if id(node) in shapes:
                continue
            if id(node) in on_path:
                raise DilemmaError(f"{where} holds a recursive YAML alias (a value that contains itself)")
            on_path.add(id(node))
            pending.append((node, True))
            pending.extend((child, False) for child in children if id(child) not in shapes)
            continue
        on_path.discard(id(node))
        nodes = 1 + sum(shapes[id(c)][0] for c in children)
        depth = 1 + max((shapes[id(c)][1] for c in children), default=0)
        shapes[id(node)] = (min(nodes, 2 * MAX_YAML_NODES), depth)  # capped: counts stay small integers
    return shapes[id(root)]


def safe_yaml(text: str, where: str):
    """``yaml.safe_load`` with bounds: at most ``MAX_YAML_NODES`` nodes once aliases are expanded and
    ``MAX_YAML_DEPTH`` levels of nesting (what a consumer walking the result would meet)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        nodes, depth = _expanded_shape(node, where)
        if nodes > MAX_YAML_NODES or depth > MAX_YAML_DEPTH:
            raise DilemmaError(
                f"{where} is too large once its aliases are expanded (over {MAX_YAML_NODES} values or "
                f"{MAX_YAML_DEPTH} levels of nesting); a config is a few sections of settings"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise DilemmaError(f"{where} is nested too deeply to be a config") from None
    finally:
        loader.dispose()


def parse_override(text: str) -> dict:
    """``'optim.lr=3e-4'`` -> ``{'optim': {'lr': 0.0003}}`` (the value is read as YAML; the key is
    checked when the override is applied)."""
    if "=" not in text:
        raise DilemmaError(f"--set needs key=value, got {_short(text)}")
    key, raw = text.split("=", 1)
    try:
        value = safe_yaml(raw, f"--set {_short(key, 60)}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if value is not None and not isinstance(value, (str, list, dict)):
        value = TypedText(raw.strip(), value)
    nested: dict = {}
    node = nested
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return nested


def keys_set_in(path: str | Path | None) -> set[str]:
    """The ``section.key`` names a YAML config file sets (none without a file)."""
    tree = read_yaml(path) if path else {}
    return {f"{section}.{key}" for section, values in tree.items() if isinstance(values, dict) for key in values}


def given_value(key: str, path: str | Path | None, overrides: typing.Sequence[str]):
    """The value the last of the config file and ``--set`` overrides gives ``section.key``, unchecked
    (None where none gives it)."""
    section, _, leaf = key.partition(".")
    value = None
    for layer in [read_yaml(path) if path else {}, *(parse_override(text) for text in overrides)]:
        values = layer.get(section) if isinstance(layer, dict) else None
        if isinstance(values, dict) and leaf in values:
            value = values[leaf]
    return value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise DilemmaError(
            f"config file {str(path)!r} is a folder; give a YAML file (e.g. configs/mocov3_dilemma.yaml)"
        )
    if not path.exists():
        raise DilemmaError(f"config file {str(path)!r} does not exist")
    if not path.is_file():
        raise DilemmaError(f"config file {str(path)!r} is not a regular file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise DilemmaError(f"config file {str(path)!r} is over {MAX_CONFIG_BYTES // 2**20} MB; a config is a few KB")
    try:
        data = safe_yaml(path.read_text(encoding="utf-8"), f"config file {str(path)!r}")
    except OSError as err:
        raise DilemmaError(f"cannot read config file {str(path)!r}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise DilemmaError(f"config file {str(path)!r} is not UTF-8 (byte {err.start}); save it as UTF-8") from None
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


MAX_IMG_SIZE = 4096
WORKERS_PER_CORE, MIN_WORKER_CAP = 4, 16


def max_workers() -> int:
    """The most loader processes a setting may ask for on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(MIN_WORKER_CAP, WORKERS_PER_CORE * cores)


MAX_TOKENS = 16_384  # patch tokens per image (1024 px in 8 px patches); attention memory grows with its square


def validate_model(m: ModelConfig) -> None:
    """The model section's ranges; also checked for a checkpoint's saved config, which is untrusted
    input whose sizes decide what is allocated."""
    require(m.img_size > 0 and m.patch_size > 0, "model.img_size and model.patch_size must be positive")
    require(
        m.img_size <= MAX_IMG_SIZE,
        f"model.img_size must be <= {MAX_IMG_SIZE} px (tokens and memory grow with its square), got {m.img_size}",
    )
    require(
        (m.img_size // m.patch_size) ** 2 <= MAX_TOKENS,
        f"model.img_size / model.patch_size gives {(m.img_size // m.patch_size) ** 2} patch tokens per image, "
        f"over {MAX_TOKENS}: use larger patches",
    )
    require(
        m.img_size % m.patch_size == 0,
        f"model.img_size {m.img_size} is not divisible by model.patch_size {m.patch_size}",
    )
    require(m.in_chans in (1, 3), f"model.in_chans must be 1 or 3, got {m.in_chans}")
    require(m.depth is None or 1 <= m.depth <= 64, f"model.depth must be in [1, 64] or null, got {m.depth}")
    require(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    require(
        m.global_pool is None or m.global_pool in GLOBAL_POOLS,
        f"model.global_pool must be null or one of {', '.join(GLOBAL_POOLS)}, got {m.global_pool!r}",
    )
    require(
        m.class_token is not False or m.global_pool not in (None, "token"),
        "model.class_token=false leaves no class token to read out: set model.global_pool (e.g. avg)",
    )
    for key in ("mean", "std"):
        values = getattr(m, key)
        require(
            len(values) in (1, m.in_chans),
            f"model.{key} needs 1 or model.in_chans={m.in_chans} values, got {values}",
        )
    require(all(s > 0 for s in m.std), f"model.std values must be > 0, got {m.std}")
    require(0.5 <= m.crop_pct <= 1.0, f"model.crop_pct must be in [0.5, 1] (timm's are 0.875-1), got {m.crop_pct}")


PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision: fp16 with a gradient scaler (train/step.py)


def check_precision(precision: str) -> None:
    require(precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def validate(cfg: Config) -> Config:
    """Range checks that need no model or data, section by section (each method section checks
    itself); raises DilemmaError. Each key is checked in one place."""
    d = cfg.dilemma
    check_switches(d.misplace_prob, d.drop_rate, d.weight, d.task, d.position_drop_prob, d.position_smoothing)
    validate_model(cfg.model)
    validate_data(cfg.data)
    for f in dataclasses.fields(cfg.method):
        section = getattr(cfg.method, f.name)
        if hasattr(section, "check"):
            section.check()
    validate_optim(cfg.optim)
    validate_train(cfg.train, cfg.data)
    validate_eval(cfg.eval)
    return cfg


def validate_data(data: DataConfig) -> None:
    require(
        data.batch_size >= 2, f"data.batch_size must be >= 2 (contrastive losses need negatives), got {data.batch_size}"
    )
    require(data.num_workers >= 0, f"data.num_workers must be >= 0, got {data.num_workers}")
    require(
        data.num_workers <= max_workers(),
        f"data.num_workers={data.num_workers} is more than {max_workers()} ({WORKERS_PER_CORE} per usable CPU core, "
        f"at least {MIN_WORKER_CAP}): each worker is a process with its own memory, and more than the cores "
        "can run only compete",
    )
    require(0.0 < data.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {data.val_fraction}")
    require(0.0 < data.crop_min_scale <= 1.0, f"data.crop_min_scale must be in (0, 1], got {data.crop_min_scale}")
    for key in ("color_jitter", "saturation"):
        require(getattr(data, key) >= 0, f"data.{key} must be >= 0, got {getattr(data, key)}")
    require(0.0 <= data.hue <= 0.5, f"data.hue must be in [0, 0.5], got {data.hue}")
    for key in ("grayscale_prob", "blur_prob", "solarize_prob"):
        require(
            0.0 <= getattr(data, key) <= 1.0, f"data.{key} must be a probability in [0, 1], got {getattr(data, key)}"
        )
    require(0 <= data.split_seed < 2**31, f"data.split_seed must be in [0, 2^31), got {data.split_seed}")


def validate_optim(o: OptimConfig) -> None:
    require(o.lr > 0, f"optim.lr must be > 0, got {o.lr}")
    require(0.0 <= o.min_lr <= o.lr, f"optim.min_lr must be in [0, optim.lr = {o.lr}], got {o.min_lr}")
    require(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    require(
        o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip must be > 0 or null (no clipping), got {o.grad_clip}"
    )
    require(0.0 <= o.warmup < 1.0, f"optim.warmup must be a fraction of training in [0, 1), got {o.warmup}")


def validate_train(t: TrainConfig, data: DataConfig) -> None:
    require(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1 or null, got {t.max_steps}")
    require(t.epochs is None or 0 < t.epochs <= 1e5, f"train.epochs must be in (0, 1e5] or null, got {t.epochs}")
    require(t.time_budget is None or t.time_budget > 0, f"train.time_budget must be > 0 minutes, got {t.time_budget}")
    require(
        not (t.max_steps is None and t.epochs is None and t.time_budget is None),
        "the run has no end: set train.max_steps, train.epochs or train.time_budget (whichever comes first ends it)",
    )
    require(t.log_every >= 1 and t.ckpt_every >= 1, "train.log_every and train.ckpt_every must be >= 1")
    require(
        t.checkpoint_every_minutes is None or 0 < t.checkpoint_every_minutes <= 1e6,
        f"train.checkpoint_every_minutes must be > 0 (minutes) or null, got {t.checkpoint_every_minutes}",
    )
    require(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    require(
        t.snapshot_every is None or 0.01 <= t.snapshot_every < 1.0,
        f"train.snapshot_every must be a fraction of training in [0.01, 1) (at most 99 snapshots) or null, "
        f"got {t.snapshot_every}",
    )
    require(t.on_nonfinite in ("stop", "skip"), f"train.on_nonfinite must be stop or skip, got {t.on_nonfinite!r}")
    require(t.max_nonfinite_skips >= 0, f"train.max_nonfinite_skips must be >= 0, got {t.max_nonfinite_skips}")
    require(
        t.accum_steps >= 1 and data.batch_size % t.accum_steps == 0 and data.batch_size // t.accum_steps >= 2,
        f"train.accum_steps must divide data.batch_size {data.batch_size} into micro-batches of at least 2 images "
        f"(batch norm and contrastive losses need two), got {t.accum_steps}",
    )
    check_precision(t.precision)
    require(0 <= t.seed < 2**31, f"train.seed must be in [0, 2^31), got {t.seed}")
    check_loggers(t.loggers)


def check_loggers(loggers: list[str]) -> None:
    """Known names, each installed (found without importing it): one line naming the extra otherwise."""
    for name in loggers:
        if name not in LOGGERS:
            raise DilemmaError(f"train.loggers: unknown logger {name!r}; choose from {', '.join(LOGGERS)}")
        module, extra = LOGGERS[name]
        if module is not None and importlib.util.find_spec(module) is None:
            raise DilemmaError(
                f"train.loggers asks for {name}, which is not installed: pip install 'dilemma[{extra}]' "
                f"(or pip install {module})"
            )


def validate_eval(e: EvalConfig) -> None:
    """The read-out settings' ranges (also for settings an eval command made from its flags)."""
    require(e.knn_k >= 1, f"eval.knn_k must be >= 1, got {e.knn_k}")
    require(e.knn_temperature > 0, f"eval.knn_temperature must be > 0, got {e.knn_temperature}")
    require(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    require(1 <= e.linear_epochs <= 100_000, f"eval.linear_epochs must be in [1, 100000], got {e.linear_epochs}")
    require(0 < e.linear_lr <= 100, f"eval.linear_lr must be in (0, 100], got {e.linear_lr}")
    require(
        all(0 < f <= 1 for f in e.occlusion_fractions),
        f"eval.occlusion_fractions must be in (0, 1], got {e.occlusion_fractions}",
    )
    require(
        all(1 <= g <= 4096 for g in e.shuffle_grids or []),
        f"eval.shuffle_grids must be in [1, 4096], got {e.shuffle_grids}",
    )
    require(
        all(0 <= q <= 1 for q in e.position_fractions) and e.position_fractions != [],
        f"eval.position_fractions must be in [0, 1], got {e.position_fractions}",
    )
    require(
        0 < e.detection_misplace_prob < 1,
        f"eval.detection_misplace_prob must be in (0, 1) (an AUROC needs both kinds of token), "
        f"got {e.detection_misplace_prob}",
    )
    require(0 <= e.seed < 2**31, f"eval.seed must be in [0, 2^31), got {e.seed}")
    f = e.finetune
    require(1 <= f.epochs <= 100_000 and f.batch_size >= 1, "eval.finetune.epochs must be in [1, 1e5], batch_size >= 1")
    require(0 < f.lr <= 100, f"eval.finetune.lr must be in (0, 100], got {f.lr}")
    require(0 < f.layer_decay <= 1, f"eval.finetune.layer_decay must be in (0, 1], got {f.layer_decay}")
    require(f.weight_decay >= 0, f"eval.finetune.weight_decay must be >= 0, got {f.weight_decay}")
    for key in ("drop_path", "label_smoothing"):
        require(0 <= getattr(f, key) < 1, f"eval.finetune.{key} must be in [0, 1), got {getattr(f, key)}")
    require(0 <= f.warmup_epochs <= 100_000, f"eval.finetune.warmup_epochs must be in [0, 1e5], got {f.warmup_epochs}")
    require(0 < f.crop_min_scale <= 1, f"eval.finetune.crop_min_scale must be in (0, 1], got {f.crop_min_scale}")
    for key in ("mixup", "cutmix"):
        alpha = getattr(f, key)
        require(
            alpha == 0 or 1e-3 <= alpha <= 100, f"eval.finetune.{key} must be 0 (off) or in [0.001, 100], got {alpha}"
        )
    require(0 <= f.reprob <= 1, f"eval.finetune.reprob must be in [0, 1], got {f.reprob}")


def _method_name(layers: list[dict]) -> str | None:
    """The ``method.name`` the layers set (the last one that sets it), or None."""
    name = None
    for layer in layers:
        section = layer.get("method")
        if isinstance(section, dict) and "name" in section:
            name = section["name"].text if isinstance(section["name"], TypedText) else section["name"]
    return name


def resolved_method(name: str) -> str:
    """``path/file.py:Class`` with the path made absolute (relative to the working folder now);
    built-in names and ``module:Class`` unchanged."""
    where, _, class_name = name.rpartition(":")
    if where.endswith(".py"):
        return f"{Path(where).expanduser().resolve()}:{class_name}"
    return name


def _trusted_method(files: list[dict], command_line: list[dict]) -> str:
    """The method the layers name, imported only if it is built in or the command line names it:
    a YAML file or a checkpoint that names a method in a file or module of one's own is refused
    (reading them must not run code), unless ``--method`` names the same one."""
    chosen = _method_name(command_line)
    saved = _method_name(files)
    name = chosen if chosen is not None else saved if saved is not None else DEFAULT_METHOD
    if not isinstance(name, str):
        raise DilemmaError(f"method.name must be a method's name, got {_short(name)}")
    if name in METHODS or ":" not in name:
        return name  # a built-in, or an unknown name (method_class says so)
    if chosen is None:
        raise DilemmaError(
            f"the config names the method {_short(name)}, kept in a file or module of its own: reading a "
            "config or checkpoint never imports code, so pass --method with that name to trust it"
        )
    return resolved_method(chosen)


def _build(layers: list[dict], method: str) -> Config:
    """Defaults, then each layer in turn. The method comes first: a method from a user's file
    brings its own config section, which the layers may set."""
    cfg = Config(method=method_section(method_class(method)))
    known = _all_keys(cfg)
    for layer in layers:
        _merge(cfg, layer, known)
    cfg.method.name = method
    return cfg


def load_config(
    path: str | Path | None = None, overrides: typing.Sequence[str] = (), base: dict | None = None
) -> Config:
    """Defaults, then ``base`` (e.g. a checkpoint's config), then the YAML file, then ``--set``
    overrides (the command line: the only layer that may name a method kept in a file)."""
    files = [_without_retired(base or {}), read_yaml(path) if path is not None else {}]
    command_line = [parse_override(text) for text in overrides]
    return validate(_build([*files, *command_line], _trusted_method(files, command_line)))


def config_from_dict(data: dict, method: str | None = None) -> Config:
    """A saved config (``Config.to_dict()``, e.g. a checkpoint's), unvalidated. ``method``: the
    method the user named (``--method``), which a saved config naming a method in a file or module
    must match (``_trusted_method``)."""
    saved = _without_retired(data)
    trusted = _trusted_method([saved], [] if method is None else [{"method": {"name": method}}])
    if method is not None and resolved_method(str(_method_name([saved]))) != trusted:
        raise DilemmaError(
            f"the checkpoint names the method {_short(_method_name([saved]))}, not {_short(method)}: "
            "pass the --method it was trained with"
        )
    cfg = _build([saved], trusted)
    try:  # every section, as a config file's: its sizes decide what is allocated
        return validate(cfg)
    except DilemmaError as err:
        raise DilemmaError(f"the checkpoint's config is not one this dilemma accepts: {err}") from None
