"""``remap diff``: aligning two key sets (``alignment``: ``align``, ``diff``), showing the
alignment (``render``), and drafting rules from it (``draft``).

May import, at module level: ``remap.errors``, ``remap.files``, ``remap.meta``, ``remap.report``, ``remap.sources``, ``remap.rules``, ``remap.planning``, ``remap.loading``. Never ``api``, ``cli`` (docs/architecture.md; tests/test_architecture.py keeps it so).

Its main names are importable from here, loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

_EXPORTS = {
    "EVIDENCE": "alignment",
    "EVIDENCE_WORDS": "alignment",
    "Alignment": "alignment",
    "Pair": "alignment",
    "Conflict": "alignment",
    "Choice": "alignment",
    "PrefixChange": "alignment",
    "Regroup": "alignment",
    "align": "alignment",
    "diff": "alignment",
    "candidate_ops": "alignment",
    "index_tokens": "alignment",
    "tokens": "alignment",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .alignment import (
        EVIDENCE as EVIDENCE,
        EVIDENCE_WORDS as EVIDENCE_WORDS,
        Alignment as Alignment,
        Pair as Pair,
        Conflict as Conflict,
        Choice as Choice,
        PrefixChange as PrefixChange,
        Regroup as Regroup,
        align as align,
        diff as diff,
        candidate_ops as candidate_ops,
        index_tokens as index_tokens,
        tokens as tokens,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
