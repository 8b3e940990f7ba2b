"""``remap export``: a fine-tuned model written back in the original's names, shapes, dtypes
and layout. The checked forward plan run backwards (``inverse``: each op's inverse, kept as
data beside it), the proof and the orchestration (``export``: ``run_export``), the
original's file layout (``layout``), and the account of every key (``report``:
``ExportReport``).

May import, at module level: ``remap.errors``, ``remap.files``, ``remap.meta``, ``remap.report``, ``remap.sources``, ``remap.rules``, ``remap.planning``, ``remap.loading``, ``remap.verifying``. Never ``diffing``, ``api``, ``cli`` (docs/architecture.md; tests/test_architecture.py keeps it so).

Its main names are importable from here, loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

_EXPORTS = {
    "ExportReport": "report",
    "ExportRecord": "report",
    "LeftOutTarget": "report",
    "format_export": "report",
    "Finetuned": "export",
    "run_export": "export",
    "invert": "inverse",
    "Layout": "layout",
    "plan_layout": "layout",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .export import Finetuned as Finetuned
    from .export import run_export as run_export
    from .inverse import invert as invert
    from .layout import Layout as Layout
    from .layout import plan_layout as plan_layout
    from .report import ExportRecord as ExportRecord
    from .report import ExportReport as ExportReport
    from .report import LeftOutTarget as LeftOutTarget
    from .report import format_export as format_export

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
