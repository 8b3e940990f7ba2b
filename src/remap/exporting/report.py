"""The account of one export: what became of every key of the original and of the target.

Every key of ``--like`` (the original source) is accounted for: exported from the target
tensors, kept or approximated past a lossy op, taken unchanged from ``--like``, or left out;
so is every target key no source key fed (left out, with why). ``to_json()`` writes the
versioned JSON form; ``str(report)`` is what ``remap export`` prints.

>>> r = ExportReport(keys=(ExportRecord("w", "exported", (2,), "float32", targets=("v",)),))
>>> r.ok, r.totals()["exported"]
(True, 1)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..report.grouping import fold_keys, printable
from ..report.records import OPT_LOADED, OPT_RESET, Failure, OptimizerReport
from .inverse import APPROXIMATED, EXPORTED, KEPT, LEFT_OUT, STATUSES, UNCHANGED

__all__ = ["EXPORT_SCHEMA_VERSION", "ExportRecord", "LeftOutTarget", "ExportReport"]

EXPORT_SCHEMA_VERSION = 1

#: How the text report names each status.
STATUS_WORDS = {
    EXPORTED: "exported",
    APPROXIMATED: "lossy, approximated",
    KEPT: "lossy, --like kept",
    UNCHANGED: "from --like unchanged",
    LEFT_OUT: "left out",
}


@dataclass(frozen=True)
class ExportRecord:
    """One key of the original (``--like``): ``status`` is one of ``STATUSES``.

    ``targets`` are the target keys it was computed from; ``ops`` the forward ops undone
    (in the order undone); ``notes`` what happened on the way (a slice written back, a pad
    cut off, a lossy op kept or approximated, why a key came unchanged from ``--like``).
    """

    key: str
    status: str
    shape: tuple[int, ...]
    dtype: str
    targets: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class LeftOutTarget:
    """A target key that no source key fed (a new head), so no key of the export holds it."""

    key: str
    reason: str


@dataclass(frozen=True, repr=False)
class ExportReport:
    """The full account of one export. ``ok`` is true iff ``failures`` is empty.

    ``state_dict`` holds the exported tensors in ``--like``'s order (not part of the JSON);
    ``saved`` says what was written, or is None when nothing was.
    """

    rules: str | None = None
    source: dict[str, Any] = field(default_factory=dict)  # the fine-tuned model or checkpoint (--from)
    like: dict[str, Any] = field(default_factory=dict)  # the original (--like)
    keys: tuple[ExportRecord, ...] = ()
    left_out: tuple[LeftOutTarget, ...] = ()
    failures: tuple[Failure, ...] = ()
    warnings: tuple[str, ...] = ()
    saved: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerReport | None = None  # set by an export given the fine-tuned optimizer
    state_dict: Mapping[str, Any] = field(default_factory=dict, compare=False)
    optimizer_state_dict: Mapping[str, Any] | None = field(default=None, compare=False)  # for the original model (not in the JSON)

    @property
    def ok(self) -> bool:
        return not self.failures

    def replace(self, **changes: Any) -> ExportReport:
        return replace(self, **changes)

    def record(self, key: str) -> ExportRecord:
        """The record of one key of the original (KeyError when there is none)."""
        for rec in self.keys:
            if rec.key == key:
                return rec
        raise KeyError(key)

    def keys_with(self, status: str) -> list[str]:
        return [r.key for r in self.keys if r.status == status]

    def totals(self) -> dict[str, int]:
        """Keys of the original per status, and the target keys left out."""
        counts = dict.fromkeys(STATUSES, 0)
        for r in self.keys:
            counts[r.status] += 1
        return {"like_keys": len(self.keys), **counts, "written": sum(counts[s] for s in (EXPORTED, APPROXIMATED, KEPT, UNCHANGED)),
                "targets_left_out": len(self.left_out)}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``schema``: :data:`EXPORT_SCHEMA_VERSION`; ``kind``: ``"export"``)."""
        return {
            "schema": EXPORT_SCHEMA_VERSION,
            "kind": "export",
            "ok": self.ok,
            "rules": self.rules,
            "from": self.source,
            "like": self.like,
            "options": self.options,
            "saved": self.saved,
            "totals": self.totals(),
            "failures": [asdict(f) for f in self.failures],
            "warnings": list(self.warnings),
            "keys": {r.key: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(r).items() if k != "key"} for r in self.keys},
            "left_out": {t.key: {"reason": t.reason} for t in self.left_out},
            "optimizer": self.optimizer.to_dict() if self.optimizer is not None else None,
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def __repr__(self) -> str:
        t = self.totals()
        state = "ok" if self.ok else f"FAILED ({', '.join(dict.fromkeys(f.kind for f in self.failures))})"
        return (f"<ExportReport {state}: {t['written']} of {t['like_keys']} keys written, {t[EXPORTED]} exported, "
                f"{t[UNCHANGED]} unchanged, {t[KEPT] + t[APPROXIMATED]} lossy; {t['targets_left_out']} target keys left out>")  # fmt: skip

    def __str__(self) -> str:
        return format_export(self)


#: How the first line counts each status.
HEAD_WORDS = {EXPORTED: "exported", APPROXIMATED: "lossy approximated", KEPT: "lossy kept", UNCHANGED: "unchanged from --like",
              LEFT_OUT: "left out"}  # fmt: skip


def _rows(records: list[ExportRecord], verbose: bool) -> list[str]:
    """Records grouped by what the report says of them (their notes), keys folded."""
    by_notes: dict[tuple[str, ...], list[str]] = {}
    for r in records:
        by_notes.setdefault(r.notes, []).append(r.key)
    lines = []
    for notes, keys in by_notes.items():
        groups = fold_keys(keys)
        shown = groups if verbose or len(groups) <= 4 else groups[:3]
        text = ", ".join(g.text for g in shown) + (f" and {len(groups) - len(shown)} more groups" if len(shown) < len(groups) else "")
        lines.append(f"    {text}" + (f": {printable('; '.join(notes))}" if notes else ""))
    return lines


def format_export(report: ExportReport, *, verbose: bool = False) -> str:
    """The export report as text: totals, then each status with its keys (folded) and why."""
    t = report.totals()
    if not report.keys and report.failures:
        head = "export: not computed: the forward plan (the rules from --like onto the fine-tuned keys) failed its checks"
    else:
        counts = ", ".join(f"{t[s]} {HEAD_WORDS[s]}" for s in STATUSES if t[s])
        head = f"export: {t['written']} of {t['like_keys']} keys of the original written" + (f" ({counts})" if counts else "")
    lines = [head]
    for status in (EXPORTED, APPROXIMATED, KEPT, UNCHANGED, LEFT_OUT):
        records = [r for r in report.keys if r.status == status]
        if records:
            lines.append(f"  {STATUS_WORDS[status]}: {len(records)}")
            lines += _rows(records, verbose or status != EXPORTED)
    if report.left_out:
        lines.append(f"  target keys left out: {len(report.left_out)}")
        by_reason: dict[str, list[str]] = {}
        for rec in report.left_out:
            by_reason.setdefault(rec.reason, []).append(rec.key)
        for reason, keys in by_reason.items():
            lines.append(f"    {', '.join(g.text for g in fold_keys(keys))}: {printable(reason)}")
    lines += _optimizer_lines(report.optimizer)
    for w in report.warnings:
        lines.append(f"warning: {printable(w)}")
    for f in report.failures:
        lines.append(f"FAILED {f.kind}: {printable(f.message.splitlines()[0])}")
        lines += [f"  {printable(line)}" for line in f.message.splitlines()[1:]]
    if report.saved and report.saved.get("path"):
        where = report.saved.get("path")
        shards = report.saved.get("shards")
        lines.append(f"saved: {printable(str(where))} ({report.saved.get('format')}" + (f", {len(shards)} shards)" if shards else ")"))
    if report.saved and report.saved.get("optimizer"):
        lines.append(f"saved optimizer state: {printable(str(report.saved['optimizer'].get('path')))}")
    lines.append("ok" if report.ok else "FAILED: nothing was written")
    return "\n".join(lines)


def _optimizer_lines(section: OptimizerReport | None) -> list[str]:
    """The optimizer section: the original's parameters whose state came back, and those
    that got none (why), grouped as the keys are."""
    if section is None:
        return []
    t = section.totals()
    order = "source.model's named_parameters()" if section.names == "source.model" else "--like's key order"
    lines = [f"  optimizer ({section.optimizer}): state for {t[OPT_LOADED]} of {t['params']} parameters of the original "
             f"(positions in {order}), {t['saved']} fine-tuned parameters"]  # fmt: skip
    loaded = [r.key for r in section.targets if r.status == OPT_LOADED]
    if loaded:
        lines.append(f"    state exported: {', '.join(g.text for g in fold_keys(loaded))}")
    by_reason: dict[str, list[str]] = {}
    for r in section.targets:
        if r.status == OPT_RESET:
            by_reason.setdefault(r.reason or "no state", []).append(r.key)
    for reason, keys in by_reason.items():
        lines.append(f"    dropped: {', '.join(g.text for g in fold_keys(keys))}: {printable(reason)}")
    return lines
