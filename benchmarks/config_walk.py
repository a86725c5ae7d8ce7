"""Follow the config from ``dilemma pretrain``: which modules a reader visits, and how often they
come back to one.

Runs ``dilemma pretrain`` for two steps (the end-of-run kNN on) under a tracer. A call is on the
walk when one of its arguments (``self`` included) is *of the config*: the ``args`` namespace of
``cli._pretrain``, the ``Config`` or one of its sections, or an object built from them (an object
whose constructor, or the package function that returned it, was given one; tensors and plain
values are data, not config), and the call that makes the ``Config``. A reader reads each function
once: only a function's first call counts. Each call from one module into another is an *entry*
into the callee's module; the first entry into a module is a visit, every later one a *re-entry*
(a return to the caller is neither).

    python benchmarks/config_walk.py [--out benchmarks/results/config_walk.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections import Counter
from pathlib import Path

import dilemma
from dilemma import config as config_module

PACKAGE = Path(dilemma.__file__).parent
PLAIN = (int, float, str, bytes, bool, type(None), list, tuple, dict, set, frozenset, Path)


def _module(code) -> str | None:
    path = Path(code.co_filename)
    return str(path.relative_to(PACKAGE)) if path.is_relative_to(PACKAGE) else None


def _section_types() -> tuple[type, ...]:
    """``Config`` and the types of its sections, at any depth (``train.tracking``, ``eval.finetune``)."""
    found, todo = [], [config_module.Config()]
    while todo:
        section = todo.pop()
        found.append(type(section))
        todo += [getattr(section, f.name) for f in dataclasses.fields(section)]
        todo = [t for t in todo if dataclasses.is_dataclass(t)]
    return tuple(found)


class Walk:
    """The tracer: which objects are of the config, and the edges of first calls between modules."""

    def __init__(self, receivers: bool = False):
        self.kinds, self.receivers = _section_types(), receivers
        self.of_config: set[int] = set()  # ids of objects built from the config
        self.keep: list = []  # the objects themselves (an id must not be reused while tracked)
        self.read: set = set()  # code objects already read
        self.edges: list[tuple[str, str, str]] = []  # (caller module, callee module, callee function)
        self.open: set = set()  # frames of calls on the walk (their return value is of the config)
        self.making: set = set()  # frames of other calls (one may return the config: load_config)

    def is_of_config(self, value) -> bool:
        return isinstance(value, self.kinds) or id(value) in self.of_config

    def track(self, value) -> None:
        import torch

        if isinstance(value, tuple) and not isinstance(value, torch.Tensor):
            for item in value:
                self.track(item)
        elif not isinstance(value, (*PLAIN, torch.Tensor)) and not callable(getattr(value, "__next__", None)):
            self.of_config.add(id(value))
            self.keep.append(value)

    def _caller(self, frame) -> str | None:
        frame = frame.f_back
        while frame is not None and _module(frame.f_code) is None:
            frame = frame.f_back  # torch's nn.Module.__call__ and the like: the package frame that called
        return None if frame is None else _module(frame.f_code)

    def __call__(self, frame, event, arg):
        code = frame.f_code
        module = _module(code)
        if module is None:
            return None
        if event == "call":
            names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            receiver = frame.f_locals.get(names[0]) if names and names[0] in ("self", "cls") else None
            values = [frame.f_locals.get(name) for name in names if self.receivers or name not in ("self", "cls")]
            if code.co_name == "_pretrain" and module == "cli.py":
                self.track(frame.f_locals["args"])  # the parsed command line
            if not any(self.is_of_config(v) for v in values):
                self.making.add(frame)  # not on the walk unless it returns the config (load_config)
                return self
            self.open.add(frame)
            if code.co_name == "__init__" and receiver is not None:
                self.track(receiver)  # the object being built
            if code not in self.read:
                self.read.add(code)
                self.edges.append((self._caller(frame), module, code.co_name))
        elif event == "return" and frame in self.open:
            self.open.discard(frame)
            self.track(arg)
        elif event == "return" and frame in self.making:
            self.making.discard(frame)
            if isinstance(arg, config_module.Config) and code not in self.read:  # the config is made here
                self.read.add(code)
                self.edges.append((self._caller(frame), module, code.co_name))
                self.track(arg)
        return self


def walk(argv: list[str], receivers: bool = False) -> list[tuple[str, str, str]]:
    from dilemma.cli import main

    tracer = Walk(receivers)
    sys.settrace(tracer)
    try:
        status = main(argv)
    finally:
        sys.settrace(None)
    if status != 0:
        raise SystemExit(f"pretrain failed with status {status}")
    return tracer.edges


def counts(edges: list[tuple[str, str, str]]) -> tuple[list[str], Counter]:
    """The modules in order of first visit, and each module's entries (calls into it from another)."""
    entries = [(caller, callee) for caller, callee, _ in edges if caller != callee]
    return list(dict.fromkeys(callee for _, callee in entries)), Counter(callee for _, callee in entries)


def summarise(edges: list[tuple[str, str, str]], receivers: bool) -> str:
    order, entered = counts(edges)
    reentries = sum(n - 1 for n in entered.values())
    given = "given (as `self` too)" if receivers else "given (as an argument, not as `self`)"
    lines = [
        f"## Calls {given} the config, a section of it or an object built from it",
        "",
        f"Modules visited: **{len(order)}**; re-entries in all: **{reentries}**.",
        "",
        "| module (first visit order) | entries | entered from |",
        "|---|---:|---|",
    ]
    for module in order:
        callers = list(dict.fromkeys(f"{c} ({f})" for c, m, f in edges if m == module and c != module))
        lines.append(f"| {module} | {entered[module]} | {', '.join(callers)} |")
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    parts = [
        "# Following the config from `dilemma pretrain`",
        "",
        "Every first call into the package that is given the config, a section of it or an object built from it, "
        "during a 2-step `dilemma pretrain` of the default config with the end-of-run kNN "
        "(`python benchmarks/config_walk.py`). An entry is a call from one module into another; the first entry "
        "into a module is a visit, each later one a re-entry (a return is neither). The first table is the "
        "walk of a reader who follows the config's objects where they are passed; the second also follows "
        "every method called on them (a subclass calling its base class in another module counts).",
        "",
    ]
    for receivers in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            argv = ["pretrain", "--out", f"{tmp}/run", "--max-steps", "2", "--set", "train.show_progress=false"]
            parts.append(summarise(walk(argv, receivers), receivers))
    text = "\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
