"""Names a package re-exports from its modules, imported on first use.

A package's ``__init__`` names what it re-exports and where each name lives; importing
the package then imports none of its modules, so ``remap validate`` or ``remap inspect``
never pays for the planner or torch.

>>> getattr_, dir_ = lazy_exports("remap.errors", {"RulesError": ""})
>>> getattr_("RulesError").__name__
'RulesError'
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the module
    (relative to the package; ``""`` for the package itself) that defines it. The value is
    bound on the package once looked up."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = f"{package}.{exports[name]}" if exports[name] else package
        value = getattr(import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
