"""remap: selective and transfer loading of PyTorch weights, from a reviewed file of rules.

The one promise: ``strict=False`` without silent failure. Every key that is not loaded
is declared in the rules or fails the load, before the module is touched.

>>> import remap
>>> report = remap.load(model, "ckpt.pth", rules="rules.yaml")  # doctest: +SKIP
>>> plan = remap.plan(model, "ckpt.pth", "rules.yaml")           # doctest: +SKIP
>>> print(plan.explain("fc.weight"))                              # doctest: +SKIP
"""

from __future__ import annotations

from .api import load as load
from .api import plan as plan
from .diff import align as align
from .diff import diff as diff
from .errors import CheckError as CheckError
from .errors import InternalError as InternalError
from .errors import RemapError as RemapError
from .errors import RulesError as RulesError
from .errors import SourceError as SourceError
from .errors import TargetError as TargetError
from .errors import UsageError as UsageError
from .errors import VerifyError as VerifyError
from .planner import Plan as Plan
from .planner import make_plan as make_plan
from .report import Report as Report
from .rules import Rules as Rules
from .rules import load_rules as load_rules
from .rules import parse_rules as parse_rules

__version__ = "0.1.0"

__all__ = [
    "load",
    "plan",
    "diff",
    "align",
    "make_plan",
    "Plan",
    "Report",
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
