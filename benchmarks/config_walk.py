"""Follow the config from the pretrain entry point: which modules a reader visits, and how often.

Runs ``dilemma pretrain`` for a couple of steps under a tracer that records every call into the
package whose arguments include the config or one of its sections (the parameter walk a reader
makes, following ``cfg`` down the code). Prints the modules in order of first visit, how many
times the walk enters each (a run of calls inside one module counts once), and the total.

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


def _section_types() -> tuple[type, ...]:
    cfg = config_module.Config()
    sections = [type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)]
    return (config_module.Config, *sections)


def _carries_config(frame, kinds: tuple[type, ...]) -> bool:
    code = frame.f_code
    names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    return any(isinstance(frame.f_locals.get(name), kinds) for name in names)


def walk(argv: list[str]) -> list[str]:
    """The modules (relative to the package) of the calls that receive the config, in call order."""
    kinds, visits = _section_types(), []

    def tracer(frame, event, arg):
        if event == "call":
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(PACKAGE) and _carries_config(frame, kinds):
                visits.append(str(path.relative_to(PACKAGE)))
        return None

    from dilemma.cli import main

    sys.settrace(tracer)
    try:
        status = main(argv)
    finally:
        sys.settrace(None)
    if status != 0:
        raise SystemExit(f"pretrain failed with status {status}")
    return visits


def summarise(visits: list[str]) -> str:
    entries = [m for i, m in enumerate(visits) if i == 0 or visits[i - 1] != m]  # a run inside one module = 1
    counts = Counter(entries)
    order = list(dict.fromkeys(entries))
    lines = [
        "# Following the config from `dilemma pretrain`",
        "",
        "Every call into the package that receives the config or one of its sections, during a 2-step "
        "`dilemma pretrain` of the default config (`python benchmarks/config_walk.py`). A run of calls "
        "inside one module is one entry.",
        "",
        f"Modules visited: **{len(order)}**; entries in all: {len(entries)}.",
        "",
        "| module (first visit order) | entries |",
        "|---|---:|",
        *[f"| {m} | {counts[m]} |" for m in order],
        "",
        "Walk: " + " -> ".join(entries),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["pretrain", "--out", f"{tmp}/run", "--max-steps", "2", "--set", "train.show_progress=false"]
        argv += ["--set", "eval.knn_at_end=false"]
        text = summarise(walk(argv))
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
