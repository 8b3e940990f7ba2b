"""What happened to every key: the report's records (``records``: ``Report``, ``Failure``),
its JSON schema (``report.schema.json``), terminal and text rendering (``render``:
``format_report``, ``print_report``), and key folding (``grouping``).

May import, at module level: ``remap.errors``, ``remap.files``, ``remap.meta``. Never ``sources``, ``rules``, ``planning``, ``loading``, ``diffing``, ``api``, ``cli`` (docs/architecture.md; tests/test_architecture.py keeps it so).

``remap.report`` was a module before the packages; its names (and the others below) stay importable from here, loaded on first use so that importing one submodule never imports its siblings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

_EXPORTS = {
    "REPORT_SCHEMA_VERSION": "records",
    "TargetRecord": "records",
    "SourceRecord": "records",
    "StepRecord": "records",
    "Failure": "records",
    "Totals": "records",
    "FreezeRecord": "records",
    "Report": "records",
    "format_report": "render",
    "print_report": "render",
    "rich_lines": "render",
    "format_html": "render",
    "format_count": "render",
    "format_shape": "render",
    "verdict": "render",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .records import (
        REPORT_SCHEMA_VERSION as REPORT_SCHEMA_VERSION,
        TargetRecord as TargetRecord,
        SourceRecord as SourceRecord,
        StepRecord as StepRecord,
        Failure as Failure,
        Totals as Totals,
        FreezeRecord as FreezeRecord,
        Report as Report,
    )
    from .render import (
        format_report as format_report,
        print_report as print_report,
        rich_lines as rich_lines,
        format_html as format_html,
        format_count as format_count,
        format_shape as format_shape,
        verdict as verdict,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
