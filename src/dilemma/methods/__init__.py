"""The SSL methods: the built-in ones, and any ``Method`` subclass in a file of your own.

``BUILTIN`` is the one list of built-in methods; the config sections, the CLI help, the tests and
the benchmarks read it. ``method.name`` is a built-in name or ``path/to/file.py:ClassName`` (or
``package.module:ClassName``) for a method kept outside this package.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path

from dilemma.errors import DilemmaError
from dilemma.methods.base import EMATeacherMethod, Method, MethodOutput
from dilemma.methods.byol import BYOL
from dilemma.methods.dino import DINO
from dilemma.methods.droppos import DropPos
from dilemma.methods.ibot import IBOT
from dilemma.methods.ijepa import IJEPA
from dilemma.methods.mae import MAE
from dilemma.methods.mocov3 import MoCoV3
from dilemma.methods.simclr import SimCLR
from dilemma.methods.vicreg import VICReg

BUILTIN: tuple[type[Method], ...] = (MoCoV3, DINO, SimCLR, MAE, BYOL, VICReg, IBOT, IJEPA, DropPos)
METHODS: dict[str, type[Method]] = {m.name: m for m in BUILTIN}


@functools.lru_cache(maxsize=None)
def _import_method(spec: str) -> type[Method]:
    """``path/to/file.py:ClassName`` or ``package.module:ClassName`` -> the class, checked."""
    where, _, class_name = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where).resolve()
            if not path.is_file():
                raise DilemmaError(f"method file {where!r} does not exist")
            module_name = f"dilemma_user_method_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # dataclasses and typing look their module up here
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except DilemmaError:
        raise
    except (Exception, SystemExit) as err:  # a syntax error, or anything the file raises while it loads
        sys.modules.pop(f"dilemma_user_method_{Path(where).stem}", None)
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise DilemmaError(f"cannot import the method in {where!r}: {type(err).__name__}: {first}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise DilemmaError(f"{spec!r}: {where} has no Method subclass named {class_name!r}")
    if not isinstance(getattr(cls, "name", None), str) or not hasattr(cls, "Config"):
        raise DilemmaError(f"{spec!r}: a Method declares `name` (its config section) and `Config` (its dataclass)")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise DilemmaError(f"{spec!r}: the name {cls.name!r} is taken by a built-in method; choose another")
    return cls


def method_class(name: str) -> type[Method]:
    """The method that ``method.name`` names."""
    if name in METHODS:
        return METHODS[name]
    if ":" in name:
        return _import_method(name)
    raise DilemmaError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}, or path/to/file.py:ClassName")


__all__ = [
    "BUILTIN",
    "BYOL",
    "DINO",
    "DropPos",
    "EMATeacherMethod",
    "IBOT",
    "IJEPA",
    "MAE",
    "METHODS",
    "Method",
    "MethodOutput",
    "MoCoV3",
    "SimCLR",
    "VICReg",
    "method_class",
]
