"""The package reads bottom-up: a module imports only modules of the layers listed before its own,
in the README's "Layout" list (read from the README, so the list and the code cannot drift apart).
Every import form counts: ``import dilemma.x``, ``from dilemma.x import ...``, ``from dilemma import
x`` and relative imports, also inside functions."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dilemma"


def readme_layers() -> list[str]:
    """``errors``, ``allocator``, ...: the modules and folders of the README's Layout, in order."""
    layout = ROOT.joinpath("README.md").read_text().split("## Layout", 1)[1].split("```", 2)[1]
    return re.findall(r"^  (\w+)(?:\.py|/)\s", layout, flags=re.M)


def _layer_of(module: str) -> str:
    """``dilemma.methods.dino`` -> ``methods``; ``dilemma`` itself (the package __init__) -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, own: str | None = None) -> set[str]:
    """Every ``dilemma`` module ``path`` (the module ``own``) imports, in any form."""
    own = own or _module_name(path)
    package = own if path.name == "__init__.py" else own.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # ``from dilemma import x``
    return {name for name in found if name.split(".")[0] == "dilemma"}


def test_the_readme_lists_every_module():
    files = [p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py"]
    assert {(p.relative_to(PACKAGE).parts[0]).removesuffix(".py") for p in files} == set(readme_layers())


def test_every_module_imports_only_lower_layers():
    layers = readme_layers()
    files = [p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.name != "__init__.py"]
    back = []
    for path in files:
        own = layers.index(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))
        for name in imported_modules(path):
            layer = _layer_of(name)
            if layer in layers and layers.index(layer) > own:
                back.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not back, back


def test_the_checker_sees_every_import_form(tmp_path):
    """A module of the methods layer importing the training loop, in each form, is caught."""
    layers = readme_layers()
    for code in (
        "import dilemma.train.loop\n",
        "from dilemma.train import loop\n",
        "from dilemma import train\n",
        "from ..train import loop\n",
        "def f():\n    from ...dilemma.train import loop\n",
    ):
        probe = tmp_path / "probe.py"
        probe.write_text(code)
        layers_seen = {_layer_of(name) for name in imported_modules(probe, own="dilemma.methods.probe")}
        assert "train" in layers_seen and layers.index("train") > layers.index("methods"), code


def _module_graph() -> dict[str, set[str]]:
    """Every package module and the package modules it imports (at the top or inside a function)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imported_modules(path) if m in paths and m != name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle of ``graph`` (``[a, b, a]``), or ``[]``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return []

    return next((found for node in sorted(graph) if node not in state and (found := visit(node, [node]))), [])


def test_no_module_imports_itself_round_a_circle():
    """Within a layer too: no two modules import each other, directly or through others (a package's
    ``__init__`` re-exporting its modules is not a circle of theirs)."""
    graph = _module_graph()
    for name in graph:  # a module importing its own package's __init__ (which imports it) is fine
        graph[name] -= {n for n in graph if name.startswith(f"{n}.")}
    assert _cycle(graph) == []
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the checker sees one


def test_no_function_is_longer_than_50_lines():
    """A function a reader can hold in view; the argparse builder (a list of flags) is the one exception."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "build_parser":
                if node.end_lineno - node.lineno + 1 > 50:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long, long
