import os
from pathlib import Path

import pytest
import torch

# The cores this process may use (not the machine's), as torch's default in the subprocesses some
# tests start: equal thread counts keep in-process and subprocess runs bitwise comparable.
torch.set_num_threads(min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
# A small, fast model for tests: ViT-Tiny widths, 2 blocks, 28 px images in 4 px patches (L = 49, odd).
TINY = [
    "model.depth=2",
    "model.img_size=28",
    "model.patch_size=4",
    "data.batch_size=32",
    "train.log_every=1",
    "train.show_progress=false",
    "train.time_budget=null",
    "method.mocov3.proj_hidden_dim=128",
    "method.mocov3.proj_dim=64",
    "method.simclr.proj_hidden_dim=128",
    "method.dino.out_dim=256",
    "method.dino.hidden_dim=128",
    "method.dino.local_crops=2",
    "method.byol.proj_hidden_dim=128",
    "method.byol.proj_dim=64",
    "method.vicreg.expander_dim=128",
    "method.ibot.out_dim=256",
    "method.ibot.hidden_dim=128",
    "method.ibot.patch_out_dim=256",
    "method.ibot.local_crops=2",
    "eval.batch_size=500",
]


# I-JEPA's model (no class token, average pooling) and its sparsity (the context block: r = 0)
IJEPA_RECIPE = ("model.global_pool=avg", "model.class_token=false", "dilemma.drop_rate=0")


def tiny_method(name: str, *overrides: str):
    """``(method, config)``: the built-in method ``name`` at TINY sizes, weights seeded."""
    from dilemma.build import build_method
    from dilemma.config import load_config
    from dilemma.methods import METHODS

    recipe = METHODS[name].recipe if name == "droppos" else ()  # DropPos's task is in its recipe
    cfg = load_config(None, [*TINY, f"method.name={name}", *recipe, *overrides])
    torch.manual_seed(0)
    return build_method(cfg), cfg


def embedded_views(cfg, n: int):
    """The method's views (``cfg``'s augmentation) of the first ``n`` embedded Animal-MNIST training images."""
    from dilemma.build import build_views
    from dilemma.data import load_source

    images = load_source("animal-mnist", img_size=28, in_chans=1, val_fraction=0.2, seed=0).train.load(list(range(n)))
    return build_views(cfg)(images, seeds=range(n))


def block_inputs(module) -> list[tuple[int, int]]:
    """Record ``(batch, tokens)`` entering the first block of the encoder ``module`` on each call."""
    counts = []
    module.vit.blocks[0].register_forward_pre_hook(lambda m, args: counts.append(tuple(args[0].shape[:2])))
    return counts


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture
def tiny_encoder():
    from dilemma.models import create_encoder

    def make(**kwargs):
        torch.manual_seed(0)
        args = {"img_size": 28, "patch_size": 4, "in_chans": 1, "depth": 2, "embed_dim": 32, "num_heads": 2}
        args.update(kwargs)
        return create_encoder("vit_tiny_patch16_224", **args)

    return make


def view_settings(img_size: int, in_chans: int = 1, **data):
    """``ViewSettings`` of the ``data`` section's defaults with ``data`` changed (e.g. ``hue=0.1``)."""
    from dilemma.config import DataConfig
    from dilemma.data import ViewSettings

    return ViewSettings.from_data(DataConfig(**data), img_size, in_chans)


def _bytes_written() -> int:
    """What this process wrote (``/proc/self/io`` wchar) plus its finished subprocesses' disk writes."""
    import resource

    try:
        own = int(dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())["wchar"])
    except (OSError, KeyError, ValueError):
        return -1  # not Linux
    return own + resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock * 512


_WRITTEN: dict[str, int] = {}  # test id -> bytes its setup, call and teardown wrote


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = _bytes_written()
    yield
    _WRITTEN[item.nodeid] = _bytes_written() - before


def pytest_terminal_summary(terminalreporter):
    """What the suite wrote and its three largest writers (checkpoints, mostly): a passed test's
    folder is removed at once (pyproject.toml), so what is on disk at any time is far less."""
    written = _bytes_written()
    if written >= 0:
        top = sorted(_WRITTEN.items(), key=lambda kv: -kv[1])[:3]
        most = ", ".join(f"{test} {n / 1e6:.0f} MB" for test, n in top)
        terminalreporter.write_line(f"the tests wrote {written / 1e6:.0f} MB (most: {most})")
