"""``Plan.explain(key)``: the journey of one key through the steps, as text.

    target 'fc.weight' [10, 512] float32 parameter: loaded, trainable
      from source 'module.fc.weight' [10, 512] float32
        step 1 (strip_prefix 'module.'): -> 'fc.weight'
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..report.records import DROPPED, DUPLICATE, SKIPPED, UNUSED, USED

if TYPE_CHECKING:
    from .planner import Plan
    from ..rules.steps import Step

__all__ = ["explain"]


def explain(plan: Plan, key: str) -> str:
    """Explain a source key, a target key, or both when the name is both."""
    parts = []
    if key in plan.target_meta:
        parts.append(_explain_target(plan, key))
    if key in plan.source_meta:
        parts.append(_explain_source(plan, key, indent=""))
    if not parts:
        near = difflib.get_close_matches(key, list(dict.fromkeys([*plan.target_meta, *plan.source_meta])), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
        raise UsageError(f"{key!r} is neither a source nor a target key{hint}")
    return "\n".join(parts)


def _shape(shape: tuple[int, ...], dtype: str) -> str:
    return f"{list(shape)} {dtype}"


def _explain_target(plan: Plan, key: str) -> str:
    rec = plan.report.target_record(key)
    state = rec.status
    if rec.trainable is not None:
        state += ", trainable" if rec.trainable else ", frozen"
    if rec.declared and rec.status not in ("loaded", "tied"):
        state += " (allowed by expect.missing)"
    lines = [f"target {key!r} {_shape(rec.shape, rec.dtype)} {rec.kind}: {state}"]
    if rec.tied_to:
        lines.append(f"  tied to {rec.tied_to!r}: loaded once, under that name")
    for src in rec.sources:
        lines.append(_explain_source(plan, src, indent="  ", prefix="from "))
    assignment = next((a for a in plan.assignments if a.target == key), None)
    if assignment is not None and assignment.recipe is not None:
        lines.append(f"  computed as {assignment.recipe.describe()}")
    if rec.status == "mismatched" and rec.source_shape is not None:
        lines.append(f"  not written: the source has shape {list(rec.source_shape)}, the target {list(rec.shape)}")
    if rec.status == "missing" and not rec.sources:
        lines.append("  no source key reaches this name")
    return "\n".join(lines)


def _explain_source(plan: Plan, key: str, *, indent: str, prefix: str = "") -> str:
    meta = plan.source_meta[key]
    fate = plan.fates.get(key)
    lines = [f"{indent}{prefix}source {key!r} {_shape(meta.shape, meta.dtype)}"]
    steps = {s.index: s for s in plan.rules.steps}
    previous = key
    for step, after in fate.hops if fate else ():
        change = f"-> {after!r}" if after != previous else "(tensor op)"
        lines.append(f"{indent}  {_acting(steps[step], previous)}: {change}")
        previous = after
    dropped_by = ""
    if fate is not None and fate.fate == DROPPED and fate.step in steps:
        dropped_by = _acting(steps[fate.step], fate.final or previous)  # final: its name when dropped
    lines.append(f"{indent}  => {_fate_words(fate, dropped_by)}")
    return "\n".join(lines)


# The field of each step kind that holds what its ``labels()`` count, one entry per pattern.
_PATTERN_FIELDS = ("rules", "prefixes", "match", "patterns")


def _acting(step: Step, name: str) -> str:
    """``step N (summary)`` as the step acted on a key named ``name``: of a step with
    several patterns, only the ones that matched it, and which of how many they are
    (``step 2 (rename '\\.norm1\\.' -> '.ln_1.', pattern 1 of 6)``)."""
    whole = f"step {step.index} ({step.summary()})"
    labels = step.labels() if hasattr(step, "labels") else tuple(getattr(step, "patterns", ()))
    if len(labels) < 2:
        return whole
    hits = _hits(step, name, labels)
    field = next((f for f in _PATTERN_FIELDS if len(getattr(step, f, ())) == len(labels)), None)
    if not hits or field is None:
        return whole
    narrowed = dataclasses.replace(step, **{field: tuple(getattr(step, field)[n] for n in hits)})  # type: ignore[arg-type]
    which = ", ".join(str(n + 1) for n in hits)
    return f"step {step.index} ({narrowed.summary()}, pattern{'s' if len(hits) > 1 else ''} {which} of {len(labels)})"


def _hits(step: Step, name: str, labels: tuple[str, ...]) -> tuple[int, ...]:
    """The indexes of the patterns of ``step`` that act on ``name``, as the step decides it
    (the first that matches, or for ``strip_prefix`` each prefix it removes)."""
    from ..rules.patterns import compile_regex, search

    name_map = getattr(step, "name_map", None)
    if name_map is not None:
        try:
            return tuple(name_map(name)[1])
        except ValueError:  # index arithmetic on a non-integer: the failure says which
            return ()
    return next(((n,) for n, p in enumerate(labels) if search(compile_regex(p), name)), ())


def _fate_words(fate, dropped_by: str) -> str:  # type: ignore[no-untyped-def]
    if fate is not None and fate.note:
        return f"unused: {fate.note}"
    if fate is None or fate.fate == UNUSED:
        final = fate.final if fate else None
        return f"unused: no target key named {final!r}" if final else "unused"
    if fate.fate == DROPPED:
        return f"dropped by {dropped_by or f'step {fate.step}'}"
    if fate.fate == USED:
        return f"loaded into {', '.join(map(repr, fate.targets))}"
    if fate.fate == SKIPPED:
        return f"not loaded: shape differs from target {', '.join(map(repr, fate.targets))}"
    if fate.fate == DUPLICATE:
        return f"duplicate of a tied parameter {', '.join(map(repr, fate.targets))}: checked equal, loaded once"
    return fate.fate
