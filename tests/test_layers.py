"""The package reads bottom-up: a module imports only modules of the layers listed before its own
(README, "Layout"). A back-reference, e.g. a method importing the training loop, fails here."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dilemma"
LAYERS = [
    "errors",
    "allocator",
    "files",
    "distributed",
    "schedules",
    "models",
    "pretext",
    "heads",
    "losses",
    "data",
    "methods",
    "config",
    "build",
    "rundir",
    "eval",
    "train",
    "viz",
    "compare",
    "export",
    "cli",
]


def _layer(module: str) -> str:
    """``dilemma.methods.dino`` -> ``methods``; ``dilemma`` itself (the package __init__) -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.split(".")[0] == "dilemma"}


def test_every_module_imports_only_lower_layers():
    files = [p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py"]
    assert {(p.relative_to(PACKAGE).parts[0]).removesuffix(".py") for p in files} == set(LAYERS)
    back = []
    for path in files:
        own = LAYERS.index(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))
        for name in _imports(path):
            if _layer(name) and LAYERS.index(_layer(name)) > own:
                back.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not back, back


def test_no_method_imports_the_training_loop():
    for path in (PACKAGE / "methods").glob("*.py"):
        assert not any(_layer(name) in ("train", "config", "build", "rundir") for name in _imports(path)), path
