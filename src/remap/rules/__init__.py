"""The rules language: the YAML source with lines and columns (``yaml_source``), the rules
file's schema and parsed form (``parse``: ``Rules``, ``parse_rules``, ``load_rules``), the step
registry and the name steps (``steps``), the tensor steps (``tensor_steps``) and the ops they run
(``ops``), key patterns and templates (``patterns``), the ``verify:`` section (``verify_spec``).

May import, at module level: ``remap.errors``, ``remap.files``, ``remap.meta``, ``remap.report``, ``remap.sources``. Never ``planning``, ``loading``, ``diffing``, ``api``, ``cli`` (docs/architecture.md; tests/test_architecture.py keeps it so).

``remap.rules`` was a module before the packages; its names (and the others below) stay importable from here, loaded on first use so that importing one submodule never imports its siblings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

_EXPORTS = {
    "Rules": "parse",
    "SourceSpec": "parse",
    "TargetSpec": "parse",
    "ShapePolicy": "parse",
    "Expect": "parse",
    "Freeze": "parse",
    "Output": "parse",
    "parse_rules": "parse",
    "load_rules": "parse",
    "SECTIONS": "parse",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .parse import (
        Rules as Rules,
        SourceSpec as SourceSpec,
        TargetSpec as TargetSpec,
        ShapePolicy as ShapePolicy,
        Expect as Expect,
        Freeze as Freeze,
        Output as Output,
        parse_rules as parse_rules,
        load_rules as load_rules,
        SECTIONS as SECTIONS,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
