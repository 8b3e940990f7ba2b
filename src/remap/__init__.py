"""remap: selective and transfer loading of PyTorch weights, from a reviewed file of rules.

The one promise: ``strict=False`` without silent failure. Every key that is not loaded
is declared in the rules or fails the load, before the module is touched.

>>> import remap
>>> report = remap.load(model, "ckpt.pth", rules="rules.yaml")  # doctest: +SKIP
>>> plan = remap.plan(model, "ckpt.pth", "rules.yaml")           # doctest: +SKIP
>>> print(plan.explain("fc.weight"))                              # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .diff import align as align  # eager: the submodule remap.diff would otherwise shadow the function
from .diff import diff as diff
from .errors import CheckError as CheckError
from .errors import InternalError as InternalError
from .errors import RemapError as RemapError
from .errors import RulesError as RulesError
from .errors import SourceError as SourceError
from .errors import TargetError as TargetError
from .errors import UsageError as UsageError
from .errors import VerifyError as VerifyError

if TYPE_CHECKING:
    from .api import load as load
    from .api import plan as plan
    from .planner import Plan as Plan
    from .planner import make_plan as make_plan
    from .report import Report as Report
    from .rules import Rules as Rules
    from .render import format_report as format_report
    from .rules import load_rules as load_rules
    from .rules import parse_rules as parse_rules

#: Names imported on first use, so that ``remap validate`` or ``remap inspect`` does not pay
#: for the planner and what it imports (``import remap`` stays cheap).
_LAZY = {
    "load": "api", "plan": "api", "Plan": "planner", "make_plan": "planner",
    "Report": "report", "Rules": "rules", "load_rules": "rules", "parse_rules": "rules", "format_report": "render",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'remap' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__version__ = "0.1.0"

__all__ = [
    "load",
    "plan",
    "diff",
    "align",
    "make_plan",
    "Plan",
    "Report",
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
