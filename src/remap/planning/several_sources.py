"""Running the steps over several named sources (``sources:``, :class:`~remap.sources.combined.CombinedSource`).

Source keys are joined names (``vision:embeddings.weight``); the steps see each key as its own
source names it (``embeddings.weight``), so two sources may hold equal keys. A step with
``from: NAME`` sees only the keys of source NAME; a step without ``from`` sees every key, and
where two sources still share a name it runs on each source's keys apart, so that equal names
never meet inside one step. Collisions within a source fail at the step that makes them, as
with one source; equal names across sources fail once the steps are done, naming both sources
and keys: by then the names are the target's.

>>> from remap.rules.parse import parse_rules
>>> from remap.planning.planner import make_plan
>>> rules = parse_rules({"version": 1, "rules": [{"add_prefix": "v.", "from": "vision"}]})
>>> plan = make_plan(rules, {"vision:w": [2], "text:w": [3]}, {"v.w": [2], "w": [3]}, source_names=("vision", "text"))
>>> plan.ok, [(a.target, a.sources) for a in plan.assignments]
(True, [('v.w', ('vision:w',)), ('w', ('text:w',))])
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Mapping, Sequence

from ..errors import RulesError
from ..meta import TensorMeta
from ..report.records import DROPPED, UNUSED, Failure, StepRecord
from ..rules.steps import Item, Step, StepContext, StepResult
from ..sources.combined import split_key
from .planner import _Fate, _ItemColumns, _names, _split_collisions

__all__ = ["check_reads", "run_steps_several", "origin_of"]


def check_reads(steps: Sequence[Step], names: Sequence[str] | None) -> None:
    """Every ``from:`` names one of the sources; with a single source, no step may say ``from``.

    >>> check_reads([], None)
    """
    for step in steps:
        if step.reads is None or (names is not None and step.reads in names):
            continue
        where = f" ({step.where})" if step.where else ""
        if names is None:
            raise RulesError(f"{step.label}{where}: `from: {step.reads}` reads a named source, but there is one source: give several "
                             f"(`sources:` in the rules, --source NAME=PATH, or a dict of name -> path to remap.load)")  # fmt: skip
        raise RulesError(f"{step.label}{where}: `from: {step.reads}` names no source; the sources are: {', '.join(names)}")


def origin_of(item: Item) -> str | None:
    """The source all of ``item``'s source keys come from; None for an item made from several.

    >>> origin_of(Item("w", ("text:w",), TensorMeta((2,))))
    'text'
    """
    found = {split_key(s)[0] for s in item.sources}
    return found.pop() if len(found) == 1 else None


def run_steps_several(steps: Sequence[Step], src: dict[str, TensorMeta], ctx: StepContext,
                      names: Sequence[str]) -> tuple[list[StepRecord], _ItemColumns, list[Failure]]:  # fmt: skip
    """The planner's ``_run_steps`` for joined source keys: every step in order, item by item."""
    check_reads(steps, names)
    rank = {n: i for i, n in enumerate(names)}
    items = [Item(split_key(k)[1], (k,), m) for k, m in src.items()]
    fates: dict[str, _Fate] = {}
    failures: list[Failure] = []
    records: list[StepRecord] = []
    for step in steps:
        result = _run_step(step, items, ctx)
        summary = step.summary() + (f", from source {step.reads!r}" if step.reads else "")
        records.append(StepRecord(step.index, step.kind, summary, result.matched, step.optional, result.counts, step.where))
        failures += result.failures
        for item in result.dropped:
            for s in item.sources:
                fates[s] = _Fate(item.hops_for(s), DROPPED, step.index, item.key)
        items = []
        for group in _by_origin(result.items, rank).values():  # within one source: as with a single source
            kept, collided = _split_collisions(group, step, failures)
            items += kept
            _set_aside(collided, f"{step.label} renamed it", fates)
    items, collided = _across(items, failures)
    _set_aside(collided, "after the last step it is named", fates)
    return records, _ItemColumns(items, src, fates), failures


def _run_step(step: Step, items: list[Item], ctx: StepContext) -> StepResult:
    """``step`` over the items it sees: its source's with ``from``; else all of them at once, or
    source by source where two sources still share a name."""
    if step.reads is not None:
        mine = [i for i in items if origin_of(i) == step.reads]
        rest = [i for i in items if origin_of(i) != step.reads]
        result = step.run(mine, ctx)
        return dataclasses.replace(result, items=rest + result.items)
    if len({i.key for i in items}) == len(items):
        return step.run(items, ctx)
    quiet = dataclasses.replace(step, optional=True)  # "matched no key" is judged over all sources together
    out, dropped, failures, totals = [], [], [], None
    for group in _by_origin(items, {}).values():
        result = quiet.run(group, ctx)
        out += result.items
        dropped += result.dropped
        failures += result.failures
        totals = result.counts if totals is None else tuple((p, n + m) for (p, n), (_, m) in zip(totals, result.counts))
    counts = totals or ()
    return StepResult(out, dropped, counts, failures + step.unmatched(counts, items))


def _by_origin(items: list[Item], rank: Mapping[str, int]) -> dict[str | None, list[Item]]:
    """Items by the source they come from, in the sources' order (items of several sources last)."""
    groups: dict[str | None, list[Item]] = defaultdict(list)
    for item in items:
        groups[origin_of(item)].append(item)
    order = sorted(groups, key=lambda n: rank.get(n, len(rank)) if n is not None else len(rank) + 1)
    return {n: groups[n] for n in order}


def _across(items: list[Item], failures: list[Failure]) -> tuple[list[Item], list[tuple[Item, Item]]]:
    """Keep the first item per final name; a later one of another source is a collision naming both."""
    first: dict[str, Item] = {}
    kept, collided = [], []
    for item in items:
        other = first.get(item.key)
        if other is None:
            first[item.key] = item
            kept.append(item)
            continue
        a, b = other.sources, item.sources
        failures.append(Failure("collision", f"source keys {_named(a)} and {_named(b)} both become {item.key!r} after the last "
                                             "step; rename one of them with a step that says `from: <source>`", (*a, *b)))  # fmt: skip
        collided.append((item, other))
    return kept, collided


def _named(keys: tuple[str, ...]) -> str:
    """``'embeddings.weight' of source 'text'`` for each key."""
    return ", ".join(f"{split_key(k)[1]!r} of source {split_key(k)[0]!r}" for k in keys)


def _set_aside(collided: list[tuple[Item, Item]], how: str, fates: dict[str, _Fate]) -> None:
    for item, winner in collided:
        note = f"{how} {item.key!r}, which {_names(winner.sources)} already holds (collision)"
        for s in item.sources:
            fates[s] = _Fate(item.hops_for(s), UNUSED, None, item.key, note=note)
