"""remap: selective and transfer loading of PyTorch weights, from a reviewed file of rules.

The one promise: ``strict=False`` without silent failure. Every key that is not loaded
is declared in the rules or fails the load, before the module is touched.

>>> import remap
>>> report = remap.load(model, "ckpt.pth", rules="rules.yaml")  # doctest: +SKIP
>>> plan = remap.plan(model, "ckpt.pth", "rules.yaml")           # doctest: +SKIP
>>> print(plan.explain("fc.weight"))                              # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .exports import lazy_exports

from .errors import CheckError as CheckError
from .errors import InternalError as InternalError
from .errors import RemapError as RemapError
from .errors import RulesError as RulesError
from .errors import SourceError as SourceError
from .errors import TargetError as TargetError
from .errors import UsageError as UsageError
from .errors import VerifyError as VerifyError

if TYPE_CHECKING:
    from .api import export as export
    from .api import load as load
    from .loading.empty import empty_weights as empty_weights
    from .diffing.alignment import align as align
    from .exporting.report import ExportReport as ExportReport
    from .diffing.alignment import diff as diff
    from .api import plan as plan
    from .api import verify as verify
    from .planning.planner import Plan as Plan
    from .planning.planner import make_plan as make_plan
    from .report.records import Report as Report
    from .rules.parse import Rules as Rules
    from .report.render import format_report as format_report
    from .rules.parse import load_rules as load_rules
    from .rules.parse import parse_rules as parse_rules

#: Names imported on first use, so that ``remap validate`` or ``remap inspect`` does not pay
#: for the planner and what it imports (``import remap`` stays cheap).
_LAZY = {
    "load": "api", "plan": "api", "verify": "api", "empty_weights": "loading.empty", "export": "api", "ExportReport": "exporting.report", "diff": "diffing.alignment", "align": "diffing.alignment", "Plan": "planning.planner", "make_plan": "planning.planner",
    "Report": "report.records", "Rules": "rules.parse", "load_rules": "rules.parse", "parse_rules": "rules.parse", "format_report": "report.render",
}  # fmt: skip


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__version__ = "0.1.0"

__all__ = [
    "load",
    "plan",
    "verify",
    "empty_weights",
    "export",
    "diff",
    "align",
    "make_plan",
    "Plan",
    "Report",
    "ExportReport",
    "format_report",
    "Rules",
    "load_rules",
    "parse_rules",
    "RemapError",
    "RulesError",
    "UsageError",
    "SourceError",
    "TargetError",
    "CheckError",
    "VerifyError",
    "InternalError",
    "__version__",
]

# Old module paths that the docs named before the packages, kept importable: the old name
# is a module that forwards to the new one.
_OLD_PATHS = {
    "remap.yaml_source": "remap.rules.yaml_source",
    "remap.patterns": "remap.rules.patterns",
    "remap.saving": "remap.loading.saving",
    "remap.render": "remap.report.render",
}


class _OldPath:
    """Finder and loader of _OLD_PATHS."""

    @staticmethod
    def find_spec(name: str, path: object = None, target: object = None) -> object:
        if name not in _OLD_PATHS:
            return None
        from importlib.machinery import ModuleSpec

        return ModuleSpec(name, _OldPath)

    @staticmethod
    def create_module(spec: object) -> None:
        return None

    @staticmethod
    def exec_module(module: object) -> None:
        from importlib import import_module

        new = import_module(_OLD_PATHS[module.__name__])
        module.__doc__ = f"Old path of {new.__name__}: import from there."
        module.__all__ = list(getattr(new, "__all__", ()))
        module.__getattr__ = lambda name: getattr(new, name)
        module.__dir__ = lambda: dir(new)


import sys as _sys  # noqa: E402

_sys.meta_path.append(_OldPath)
