"""Package faces that import on first use: `pkdq --help` and `pkdq validate` stay torch-free.

A stage package's `__init__` names its public entry points in one table; this module turns that
table into a module `__getattr__` (PEP 562), so `from tasks.prune import prune_stage` imports
`tasks.prune.stage` (and torch) only when the name is used, and an unknown name fails as usual.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str], modules: tuple[str, ...] = ()
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """(__getattr__, __dir__) for `package`, whose public names live in the given submodules.

    `exports` maps each public name to the submodule (relative to the package) defining it;
    `modules` names submodules that are public as a whole (a set of helpers used together).
    """

    def __getattr__(name: str) -> Any:
        if name in modules:
            return importlib.import_module(f"{package}.{name}")
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted([*exports, *modules])

    return __getattr__, __dir__
