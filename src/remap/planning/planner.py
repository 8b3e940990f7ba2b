"""Planning: rules x source metadata x target metadata -> :class:`Plan`, reading no tensor.

:func:`make_plan` is a pure function of names, shapes and dtypes. It runs every step over
the source keys, pairs the survivors with target keys, checks shapes, tied parameters,
expectations and freeze patterns, and returns a :class:`Plan` whose ``report`` is the
dry-run report. Applying the plan to a module is the engine's job (:meth:`Plan.apply`).

>>> from remap.rules.parse import parse_rules
>>> rules = parse_rules({"version": 1, "rules": [{"strip_prefix": "module."}]})
>>> plan = make_plan(rules, {"module.fc.weight": [10, 4]}, {"fc.weight": [10, 4]})
>>> plan.ok, plan.assignments[0].sources
(True, ('module.fc.weight',))
"""

from __future__ import annotations

import dataclasses
import math
import re
from functools import cached_property
from itertools import compress, filterfalse, repeat
from operator import attrgetter, eq, is_, is_not, not_
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..collector import collector_paused, collector_paused_in
from ..meta import TargetMeta, TensorMeta, source_meta, target_meta
from ..rules.patterns import compile_regex, pattern_budget, quote
from ..report.records import (
    DROPPED,
    DUPLICATE,
    LOADED,
    MISMATCHED,
    MISSING,
    SKIPPED,
    TIED,
    UNUSED,
    USED,
    Failure,
    FreezeRecord,
    Report,
    SourceRecord,
    StepRecord,
    TargetRecord,
    Totals,
)
from ..rules.parse import Rules
from .lazy import LazyMapping, LazySequence
from .name_pass import NamePass, leading_name_steps, run_name_steps
from ..rules.steps import Item, Recipe, Step, StepContext

if TYPE_CHECKING:
    import torch

    from ..sources.readers import Source

__all__ = ["Assignment", "Plan", "make_plan", "BATCHNORM_TYPES"]

BATCHNORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm2d")
FROZEN_BN_SUPPORTED = ("BatchNorm2d", "SyncBatchNorm")


@dataclass(frozen=True)
class Assignment:
    """One target key that will be written: from which source keys, through which ops.

    ``recipe`` is None when the source tensor is loaded as it is (no op, no copy).
    """

    target: str
    sources: tuple[str, ...]
    recipe: Recipe | None
    meta: TensorMeta

    @property
    def ops(self) -> tuple[str, ...]:
        return self.recipe.ops() if self.recipe is not None else ()


@dataclass(frozen=True)
class Duplicate:
    """A source key that feeds a tied parameter already fed by ``first``: checked equal, not loaded."""

    source: str
    first: str
    target: str


@dataclass(frozen=True)
class _Fate:
    hops: tuple[tuple[int, str], ...]
    fate: str
    step: int | None = None
    final: str | None = None
    targets: tuple[str, ...] = ()
    note: str | None = None


@dataclass(repr=False)
class Plan:
    """The checked recipe of one load. ``report`` is its dry-run report; ``ok`` says whether
    applying it would load as declared. Nothing in a plan holds tensor data. ``print(plan)``
    shows the dry-run report as the command line does; ``repr`` is one line."""

    rules: Rules
    source_meta: dict[str, TensorMeta]
    target_meta: dict[str, TargetMeta]
    assignments: Sequence[Assignment]  # built on first read
    duplicates: tuple[Duplicate, ...]
    frozen: frozenset[str]
    batchnorm_modules: tuple[str, ...]
    report: Report
    fates: Mapping[str, _Fate] = field(repr=False)  # built on first read
    source: Source | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.report.ok

    def __repr__(self) -> str:
        return "<Plan " + repr(self.report).removeprefix("<Report ")

    def __str__(self) -> str:
        return str(self.report)

    @property
    def failures(self) -> tuple[Failure, ...]:
        return self.report.failures

    def explain(self, key: str) -> str:
        """The journey of one source or target key through the steps, as text.

        >>> print(plan.explain("fc.weight"))  # doctest: +SKIP
        target 'fc.weight' [10, 4] float32 parameter: loaded
          from source 'module.fc.weight' [10, 4] float32
            step 1 (strip_prefix 'module.'): -> 'fc.weight'
        """
        from .explain import explain

        return explain(self, key)

    def apply(self, module: torch.nn.Module, *, dry_run: bool = False, **options: Any) -> Report:
        """Load the plan into ``module``; ``options`` are :func:`remap.loading.engine.apply_plan`'s
        (device, dtype, batch_bytes, progress)."""
        from ..loading.engine import apply_plan

        return apply_plan(self, module, dry_run=dry_run, **options)


# --------------------------------------------------------------------------- planning


def make_plan(
    rules: Rules,
    source: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    source_description: Mapping[str, Any] | None = None,
    target_description: Mapping[str, Any] | None = None,
    batchnorm_modules: Mapping[str, str] | None = None,
    source_handle: Source | None = None,
    source_names: Sequence[str] | None = None,
) -> Plan:
    """Plan ``rules`` from source metadata (key -> shape | (shape, dtype) | TensorMeta)
    onto target metadata (key -> the same, or TargetMeta). Pure: reads no tensor data.

    ``batchnorm_modules`` maps module names to class names, for ``freeze.batchnorm``.
    Everything a check needs is computed here; the per-key records, fates and
    assignments are built when first read. ``source_names``: the source keys are several named
    sources' joined keys (``vision:embeddings.weight``, :mod:`remap.planning.several_sources`).
    """
    with collector_paused(), pattern_budget():  # a pattern's time is bounded over all its keys, not key by key
        return _make_plan(rules, source, target, source_description, target_description, batchnorm_modules, source_handle,
                          source_names)  # fmt: skip


def _make_plan(rules: Rules, source: Mapping[str, Any], target: Mapping[str, Any], source_description: Mapping[str, Any] | None,
               target_description: Mapping[str, Any] | None, batchnorm_modules: Mapping[str, str] | None,
               source_handle: Source | None, source_names: Sequence[str] | None = None) -> Plan:  # fmt: skip
    src = source_meta(source)
    tgt = target if _all_target_meta(target) else target_meta(target)
    view = _TargetView(tgt)
    steps, cols, failures = _run_steps(rules.steps, src, StepContext(tgt), source_names)
    pairing = _pair(cols, tgt, rules, view)
    failures += pairing.failures
    saved, freeze_failures = _saved_frozen(rules, pairing, cols, source_handle, source_description)
    frozen, bn_names, more_failures = _plan_freeze(rules, tgt, batchnorm_modules or {}, saved)
    failures += freeze_failures + more_failures
    bn_prefixes = tuple(f"{n}." for n in bn_names) if rules.freeze.batchnorm == "frozen" else ()
    fates, unused_parts = cols.fates(pairing)
    tally = _tally(view, pairing, frozen, bn_prefixes, rules)
    sources_tally = cols.source_tally(pairing, fates, rules)
    totals = dataclasses.replace(tally.totals, source_keys=len(src), **sources_tally.counts)
    failures += _expectations(tally.undeclared_missing, sources_tally.undeclared_unused, totals, rules)
    failures += _unused_parts(unused_parts, rules)
    failures += _hints(sources_tally.undeclared_unused_finals, tally.missing)
    if not failures and rules.expect.min_loaded is None and totals.loaded == 0 and totals.target_keys:
        failures.append(Failure("min_loaded", _nothing_loaded(totals)))  # declared all the way to an empty load
    report = Report(
        dry_run=True,
        source=dict(source_description or {"kind": "metadata"}),
        target=dict(target_description or {"kind": "metadata"}),
        rules=rules.filename,
        steps=tuple(steps),
        targets=LazySequence(lambda: _target_records(tgt, pairing, cols, frozen, bn_prefixes, rules, fates)),
        sources=LazySequence(lambda: _source_records(src, cols.fate_rows(pairing, fates), rules, several=source_names is not None)),
        failures=tuple(_merge_hints(failures)),
        warnings=tuple(_warnings(rules, view, pairing, cols)),
        totals=totals,
        freeze=FreezeRecord(rules.freeze.batchnorm, tuple(bn_names)),
    )
    assignments = LazySequence(lambda: (cols.assignment(c, j) for c, j in pairing.loaded.items()))
    return Plan(rules, src, dict(tgt), assignments, tuple(pairing.duplicates_of(cols)), frozenset(frozen),
                tuple(bn_names), report, fates, source_handle)  # fmt: skip


def _all_target_meta(target: Mapping[str, Any]) -> bool:
    return isinstance(target, Mapping) and set(map(type, target.values())) <= {TargetMeta}


def _run_steps(steps: Sequence[Step], src: dict[str, TensorMeta], ctx: StepContext,
               source_names: Sequence[str] | None = None) -> tuple[list[StepRecord], _Columns, list[Failure]]:  # fmt: skip
    """Every step over the source keys: the leading name-only steps once per key shape
    (:mod:`remap.planning.name_pass`), the rest item by item; several named sources'
    keys item by item (:mod:`remap.planning.several_sources`)."""
    if source_names is not None or any(s.reads for s in steps):
        from .several_sources import check_reads, run_steps_several

        check_reads(steps, source_names)
        return run_steps_several(steps, src, ctx, source_names)  # type: ignore[arg-type]
    records: list[StepRecord] = []
    leading = leading_name_steps(steps)
    names = run_name_steps(leading, src) if leading or not steps else None  # no step: the pass is the source as it is
    if names is not None:
        for (step, _), n in zip(leading, names.counts):
            pairs = tuple(zip(step.labels(), n))
            records.append(StepRecord(step.index, step.kind, step.summary(), sum(n), step.optional, pairs, step.where))
        rest = steps[len(leading):]
        if not rest:
            return records, _PassColumns(names, src), []
    fates: dict[str, _Fate] = {}
    if names is not None:
        items = names.items(src)
        for item, step in names.dropped_items(src):
            fates[item.sources[0]] = _Fate(item.hops, DROPPED, step.index, item.key)
    else:
        items, rest = [Item.source(k, m) for k, m in src.items()], steps
    failures: list[Failure] = []
    for step in rest:
        result = step.run(items, ctx)
        records.append(StepRecord(step.index, step.kind, step.summary(), result.matched, step.optional, result.counts, step.where))
        failures += result.failures
        for item in result.dropped:
            for s in item.sources:
                fates[s] = _Fate(item.hops_for(s), DROPPED, step.index, item.key)
        items, collided = _split_collisions(result.items, step, failures)
        for item, winner in collided:
            note = f"{step.label} renamed it onto {item.key!r}, which {_names(winner.sources)} already holds (collision)"
            for s in item.sources:
                fates[s] = _Fate(item.hops_for(s), UNUSED, None, item.key, note=note)
    return records, _ItemColumns(items, src, fates), failures


def _split_collisions(items: list[Item], step: Step, failures: list[Failure]) -> tuple[list[Item], list[tuple[Item, Item]]]:
    """Keep the first item per key; report and set aside every later one."""
    if len({i.key for i in items}) == len(items):
        return items, []
    first: dict[str, Item] = {}
    kept, collided = [], []
    for item in items:
        if item.key in first:
            a, b = first[item.key].sources, item.sources
            failures.append(
                Failure(
                    "collision",
                    f"{step.label}: source keys {_names(a)} and {_names(b)} both become {item.key!r}",
                    (*a, *b),
                )
            )
            collided.append((item, first[item.key]))
        else:
            first[item.key] = item
            kept.append(item)
    return kept, collided


def _names(keys: tuple[str, ...]) -> str:
    return ", ".join(map(repr, keys))


# --------------------------------------------------------------------------- columns


@dataclass
class _SourceTally:
    counts: dict[str, int]  # used, dropped, unused (Totals fields)
    undeclared_unused: list[str]
    undeclared_unused_finals: list[str]


class _Columns:
    """What pairing needs of the items that reach the end of the steps, column by column:
    ``names[j]`` and ``shapes[j]`` of item ``j``; the rest on demand."""

    names: list[str]
    shapes: list[tuple[int, ...]]

    def item(self, j: int) -> Item:
        raise NotImplementedError

    def sources(self, j: int) -> tuple[str, ...]:
        return self.item(j).sources

    def meta(self, j: int) -> TensorMeta:
        return self.item(j).meta

    def dtypes(self) -> set[str]:
        """The dtypes of all items."""
        return {self.meta(j).dtype for j in range(len(self.names))}

    def assignment(self, target: str, j: int) -> Assignment:
        item = self.item(j)
        return Assignment(target, item.sources, item.recipe, item.meta)

    def hop_steps(self, j: int, fates: Mapping[str, _Fate]) -> tuple[int, ...]:
        """The indexes of the steps item ``j``'s source keys went through."""
        return tuple(sorted({i for s in self.sources(j) for i, _ in fates[s].hops}))

    def fate_rows(self, pairing: _Pairing, fates: Mapping[str, _Fate]) -> Mapping[str, _Fate]:
        """What a source record needs of each source key's fate (``hops`` may be left empty)."""
        return fates

    def fates(self, pairing: _Pairing) -> tuple[Mapping[str, _Fate], list[Item]]:
        """One fate per source key, and the parts of split sources that reach no target."""
        raise NotImplementedError

    def source_tally(self, pairing: _Pairing, fates: Mapping[str, _Fate], rules: Rules) -> _SourceTally:
        raise NotImplementedError


class _PassColumns(_Columns):
    """Items straight from the name pass: item ``j`` is source key ``survivors[j]``, untouched
    by any op, so fates and records follow from the columns without building an item."""

    def __init__(self, names: NamePass, src: dict[str, TensorMeta]) -> None:
        self.npass, self.src = names, src
        keys = names.keys
        if len(names.survivors) == len(keys):  # nothing dropped: the source as it is
            self.keys, metas = keys, src.values()
        else:
            self.keys = list(map(keys.__getitem__, names.survivors))
            metas = map(src.__getitem__, self.keys)  # type: ignore[assignment]
        self.names = names.names
        self.shapes = list(map(attrgetter("shape"), metas))
        self._items: list[Item] | None = None

    def item(self, j: int) -> Item:
        if self._items is None:
            self._items = self.npass.items(self.src)
        return self._items[j]

    def sources(self, j: int) -> tuple[str, ...]:
        return (self.keys[j],)

    def meta(self, j: int) -> TensorMeta:
        return self.src[self.keys[j]]

    def dtypes(self) -> set[str]:
        return set(map(attrgetter("dtype"), self.src.values()))

    def assignment(self, target: str, j: int) -> Assignment:
        return Assignment(target, (self.keys[j],), None, self.src[self.keys[j]])

    def hop_steps(self, j: int, fates: Mapping[str, _Fate]) -> tuple[int, ...]:
        return self.npass.hop_steps(self.npass.survivors[j])

    def fate_rows(self, pairing: _Pairing, fates: Mapping[str, _Fate]) -> Mapping[str, _Fate]:
        return self._fates(pairing, lambda i: ())  # a source record needs no hops

    def fates(self, pairing: _Pairing) -> tuple[Mapping[str, _Fate], list[Item]]:
        return LazyMapping(lambda: self._fates(pairing, self.npass.hops)), []

    @collector_paused_in
    def _fates(self, pairing: _Pairing, hops: Callable[[int], tuple[tuple[int, str], ...]]) -> dict[str, _Fate]:
        """One fate per source key, in source order; ``hops(i)`` gives key ``i``'s renames."""
        npass = self.npass
        out: dict[str, _Fate] = {}
        for j, (i, name) in enumerate(zip(npass.survivors, npass.names)):
            t = pairing.target[j]
            out[npass.keys[i]] = _Fate(hops(i), pairing.fate[j], None, name, (t,) if t is not None else ())
        for i, step, name in npass.dropped:
            out[npass.keys[i]] = _Fate(hops(i), DROPPED, step.index, name)
        return {k: out[k] for k in npass.keys}

    def source_tally(self, pairing: _Pairing, fates: Mapping[str, _Fate], rules: Rules) -> _SourceTally:
        count = Counter(pairing.fate)
        declared = _matcher(rules.expect.unused)
        unused = [(k, n) for k, n, f in zip(self.keys, self.names, pairing.fate) if f == UNUSED] if count[UNUSED] else []
        undeclared = [(k, n) for k, n in unused if not declared(k, n)]
        counts = {"used": count[USED] + count[DUPLICATE], "dropped": len(self.npass.dropped), "unused": count[UNUSED] + count[SKIPPED]}
        return _SourceTally(counts, [k for k, _ in undeclared], [n for _, n in undeclared])


class _ItemColumns(_Columns):
    """Items after tensor steps (merges, splits, ops): fates settle item by item."""

    def __init__(self, items: list[Item], src: dict[str, TensorMeta], early: dict[str, _Fate]) -> None:
        self.items, self.src, self.early = items, src, early
        self.names = [i.key for i in items]
        self.shapes = [i.meta.shape for i in items]

    def item(self, j: int) -> Item:
        return self.items[j]

    def fates(self, pairing: _Pairing) -> tuple[Mapping[str, _Fate], list[Item]]:
        fates = dict(self.early)
        outcomes = [(item, f, t) for item, f, t in zip(self.items, pairing.fate, pairing.target)]
        unused_parts = _settle(outcomes, fates)
        return fates, unused_parts

    def source_tally(self, pairing: _Pairing, fates: Mapping[str, _Fate], rules: Rules) -> _SourceTally:
        declared = _matcher(rules.expect.unused)
        count: Counter[str] = Counter()
        undeclared: list[tuple[str, str]] = []
        for key in self.src:
            f = fates.get(key) or _Fate((), UNUSED, None, key)
            count[f.fate] += 1
            if f.fate == UNUSED and f.note is None and not declared(key, f.final):
                undeclared.append((key, f.final or key))
        counts = {"used": count[USED] + count[DUPLICATE], "dropped": count[DROPPED], "unused": count[UNUSED] + count[SKIPPED]}
        return _SourceTally(counts, [k for k, _ in undeclared], [n for _, n in undeclared])


# --------------------------------------------------------------------------- pairing


@dataclass
class _Pairing:
    """Item ``j`` against the target: ``fate[j]`` (used, skipped, duplicate, unused) and
    ``target[j]``; ``loaded`` and ``mismatched`` map a target key to its item."""

    fate: list[str]
    target: list[str | None]  # not to be changed in place: it may be the items' names
    loaded: Mapping[str, int] = field(default_factory=dict)
    mismatched: dict[str, int] = field(default_factory=dict)
    duplicates: list[tuple[int, int, str]] = field(default_factory=list)  # (item, item it duplicates, target)
    failures: list[Failure] = field(default_factory=list)

    def duplicates_of(self, cols: _Columns) -> list[Duplicate]:
        return [Duplicate(cols.sources(d)[0], cols.sources(first)[0], t) for d, first, t in self.duplicates]


FATE_RANK = {USED: 0, SKIPPED: 1, DUPLICATE: 2, UNUSED: 3}  # a source split into parts takes its best part's fate


class _TargetView:
    """The target's metadata column by column, read once per plan: its keys, and those
    that are not aliases of a tied parameter (``own``)."""

    def __init__(self, tgt: Mapping[str, TargetMeta]) -> None:
        self.tgt = tgt
        self.keys = list(tgt)
        self.metas = list(tgt.values())
        tied = list(map(attrgetter("tied_to"), self.metas))
        self.has_tied = any(map(is_not, tied, repeat(None)))
        if self.has_tied:
            own = list(map(is_, tied, repeat(None)))
            self.own_keys, self.own_metas = list(compress(self.keys, own)), list(compress(self.metas, own))
        else:
            self.own_keys, self.own_metas = self.keys, self.metas

    @cached_property
    def dtypes(self) -> set[str]:
        return set(map(attrgetter("dtype"), self.metas))


def _pair(cols: _Columns, tgt: Mapping[str, TargetMeta], rules: Rules, view: _TargetView) -> _Pairing:
    """Item ``j`` against the target key of its name: loaded when the shapes agree."""
    if view.has_tied:
        return _pair_tied(cols, tgt, rules)
    names, shapes = cols.names, cols.shapes  # unique names: no two items meet at one key
    theirs = list(map(getattr, map(tgt.get, names), repeat("shape"), repeat(None)))
    same = list(map(eq, shapes, theirs))
    out = _Pairing([USED] * len(names), names)
    if all(same):  # the common case: built when first read
        out.loaded = LazyMapping(lambda: dict(zip(names, range(len(names)))), length=len(names))
    else:
        out.loaded = dict(compress(zip(names, range(len(names))), same))
        out.fate = [USED if ok else UNUSED if t is None else SKIPPED for ok, t in zip(same, theirs)]
        out.target = [n if t is not None else None for n, t in zip(names, theirs)]
        out.mismatched = {names[j]: j for j in compress(range(len(names)), map(SKIPPED.__eq__, out.fate))}
    _check_mismatches(out, cols, tgt, rules)
    return out


def _pair_tied(cols: _Columns, tgt: Mapping[str, TargetMeta], rules: Rules) -> _Pairing:
    """Pairing when some target keys are aliases of a tied parameter: every item named
    after one of its names feeds it, the first (its own name first) loads."""
    names, shapes = cols.names, cols.shapes
    out = _Pairing([UNUSED] * len(names), [None] * len(names))
    first: dict[str, int] = {}
    more: dict[str, list[int]] = {}
    get = tgt.get
    for j, name in enumerate(names):
        meta = get(name)
        if meta is None:
            continue
        canonical = meta.tied_to or name
        if canonical in first:
            more.setdefault(canonical, []).append(j)
        else:
            first[canonical] = j
    for canonical, rest in more.items():  # several items for one tied parameter
        group = sorted([first[canonical], *rest], key=lambda j: names[j] != canonical)  # the first name loads
        first[canonical] = group[0]
        for dup in group[1:]:
            _duplicate(out, cols, dup, group[0], canonical)
    fate, target = out.fate, out.target
    for canonical, j in first.items():
        target[j] = canonical
        if shapes[j] != tgt[canonical].shape:
            out.mismatched[canonical] = j
            fate[j] = SKIPPED
            continue
        out.loaded[canonical] = j
        fate[j] = USED
    _check_mismatches(out, cols, tgt, rules)
    return out


def _check_mismatches(out: _Pairing, cols: _Columns, tgt: Mapping[str, TargetMeta], rules: Rules) -> None:
    """A failure for the mismatched keys that ``shapes.skip`` does not allow."""
    shapes = cols.shapes
    skips = rules.shapes.skips
    mismatches = [(k, j) for k, j in out.mismatched.items() if not skips(k)]
    if mismatches:
        lines = [f"{k}: checkpoint {list(shapes[j])} (from {_names(cols.sources(j))}) vs model {list(tgt[k].shape)}"
                 + (" (reversed)" if _reversed(shapes[j], tgt[k].shape) else "") for k, j in mismatches]  # fmt: skip
        reversed_keys = [k for k, j in mismatches if _reversed(shapes[j], tgt[k].shape)]
        hint = _transpose_hint(reversed_keys, [*out.loaded, *out.mismatched], tgt)
        out.failures.append(
            Failure(
                "shape_mismatch",
                f"{len(mismatches)} mapped key(s) differ in shape from the target (shapes: error):\n  "
                + "\n  ".join(lines)
                + (f"\n{hint}" if hint else "")
                + "\nFix the rules, or allow skipping them with `shapes: {skip: [pattern]}` and list them in expect.missing.",
                tuple(k for k, _ in mismatches),
            )
        )


def _reversed(source: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """A shape that is the target's read backwards (a Dense or Conv1D kernel stored (in, out)).

    >>> _reversed((768, 2304), (2304, 768)), _reversed((3, 3), (3, 3)), _reversed((4,), (4,))
    (True, False, False)
    """
    return len(source) >= 2 and tuple(source) != tuple(target) and tuple(source)[::-1] == tuple(target)


def _transpose_hint(keys: list[str], paired: list[str], tgt: Mapping[str, TargetMeta]) -> str | None:
    """The ``transpose`` step that fixes ``keys`` (reversed shapes), as ``diff`` would draft it:
    one pattern per leaf name (``.c_attn.weight``) when it matches no other paired key, else
    the keys themselves. Placed last in the rules, a step sees the target's names.

    >>> tgt = {k: TargetMeta((2, 3), "float32", True, True) for k in ("h.0.fc.weight", "h.1.fc.weight")}
    >>> print(_transpose_hint(["h.0.fc.weight", "h.1.fc.weight"], list(tgt), tgt))
    hint: shapes reversed: add `- transpose: '\\.fc\\.weight$'` at the end of rules
    """
    if not keys:
        return None
    wanted = set(keys)
    patterns: list[str] = []
    for key in keys:
        leaf = ".".join(key.split(".")[-2:])
        if key.count(".") >= 2 and all(k in wanted for k in paired if k.endswith("." + leaf)):
            pattern = "\\." + re.escape(leaf) + "$"
        else:
            pattern = "^" + re.escape(key) + "$"
        if pattern not in patterns:
            patterns.append(pattern)
    step = f"`- transpose: {quote(patterns[0])}`" if len(patterns) == 1 else f"`- transpose: [{', '.join(map(quote, patterns))}]`"
    ndim = len(tgt[keys[0]].shape)
    if ndim > 2 or any(len(tgt[k].shape) != ndim for k in keys):
        return f"hint: shapes reversed: add a transpose step with dims reversed for {', '.join(map(quote, patterns))} at the end of rules"
    return f"hint: shapes reversed: add {step} at the end of rules"


def _duplicate(out: _Pairing, cols: _Columns, dup: int, first: int, canonical: str) -> None:
    out.duplicates.append((dup, first, canonical))
    out.fate[dup], out.target[dup] = DUPLICATE, canonical
    if cols.shapes[dup] != cols.shapes[first]:
        a, b = cols.sources(first), cols.sources(dup)
        out.failures.append(
            Failure(
                "tied_conflict",
                f"{canonical!r} is a tied parameter fed by two source tensors of different shapes: "
                f"{_names(a)} {list(cols.shapes[first])} and {_names(b)} {list(cols.shapes[dup])}; drop one of them",
                (*a, *b),
            )
        )


def _settle(outcomes: list[tuple[Item, str, str | None]], fates: dict[str, _Fate]) -> list[Item]:
    """One fate per source key from the fates of the items it reached (several after a
    split); returns the parts of used sources that reach no target."""
    unused_parts: list[Item] = []
    by_source: dict[str, list[tuple[Item, str, str | None]]] = defaultdict(list)
    for outcome in outcomes:
        item = outcome[0]
        if len(item.sources) == 1 and not item.parents and item.sources[0] not in by_source:
            fates[item.sources[0]] = _Fate(item.hops, outcome[1], None, item.key, (outcome[2],) if outcome[2] else ())
        for s in item.sources:
            by_source[s].append(outcome)
    for s, reached in by_source.items():
        if len(reached) == 1 and len(reached[0][0].sources) == 1 and not reached[0][0].parents:
            continue  # settled above: the common case of one key, one item
        best = min(reached, key=lambda o: FATE_RANK[o[1]])
        targets = tuple(dict.fromkeys(t for item, fate, t in reached if fate == best[1] and t))
        fates[s] = _Fate(best[0].hops_for(s), best[1], None, best[0].key, targets)
        if best[1] == USED:
            unused_parts.extend(item for item, fate, _ in reached if fate == UNUSED and item not in unused_parts)
    return unused_parts


# --------------------------------------------------------------------------- target side


def _trainable(key: str, meta: TargetMeta, frozen: set[str], bn_prefixes: tuple[str, ...]) -> bool | None:
    """None for a buffer; else whether the parameter keeps requires_grad after freezing."""
    if not meta.is_param:
        return None
    return meta.requires_grad and (meta.tied_to or key) not in frozen and key not in frozen and not key.startswith(bn_prefixes)


@dataclass
class _TargetTally:
    totals: Totals
    missing: set[str]  # missing and not declared
    undeclared_missing: list[str]  # target keys failing expect.missing, in target order


def _tally(view: _TargetView, pairing: _Pairing, frozen: set[str], bn_prefixes: tuple[str, ...], rules: Rules) -> _TargetTally:
    """The target's totals and the keys that fail ``expect.missing``, without a record per key."""
    loaded, mismatched = pairing.loaded, pairing.mismatched
    keys, metas = view.own_keys, view.own_metas
    is_param = list(map("parameter".__eq__, map(attrgetter("kind"), metas)))
    if all(is_param):
        params, param_metas = keys, metas
    else:
        params, param_metas = list(compress(keys, is_param)), list(compress(metas, is_param))
    numel = list(map(_Numel().__getitem__, map(attrgetter("shape"), param_metas)))
    if frozen or bn_prefixes:
        trainable = [bool(_trainable(k, m, frozen, bn_prefixes)) for k, m in zip(params, param_metas)]
    else:
        trainable = list(map(attrgetter("requires_grad"), param_metas))
    everything = len(loaded) == len(keys)  # every key of the target is loaded (names are unique)
    loaded_keys = set() if everything else set(loaded)
    missing = [] if everything else list(filterfalse((loaded_keys | mismatched.keys()).__contains__, keys))
    n_trainable = sum(trainable)
    declared = _matcher(rules.expect.missing)
    undeclared = set(missing) if not rules.expect.missing else {k for k in missing if not declared(k)}
    skips = rules.shapes.skips
    undeclared |= {k for k in mismatched if skips(k) and not declared(k)}
    totals = Totals(
        target_keys=len(keys),
        loaded=len(loaded),
        missing=len(missing),
        mismatched=len(mismatched),
        param_elements=sum(numel),
        loaded_elements=sum(numel) if everything else sum(compress(numel, map(loaded_keys.__contains__, params))),
        frozen_elements=sum(compress(numel, map(not_, trainable))) if n_trainable < len(trainable) else 0,
        trainable_elements=sum(compress(numel, trainable)) if n_trainable else 0,
        frozen_params=len(trainable) - n_trainable,
        trainable_params=n_trainable,
    )
    order = [k for k in keys if k in undeclared] if undeclared else []
    return _TargetTally(totals, {k for k in missing if k in undeclared}, order)


class _Numel(dict):  # type: ignore[type-arg]
    """shape -> number of elements, each distinct shape computed once."""

    def __missing__(self, shape: tuple[int, ...]) -> int:
        n = self[shape] = math.prod(shape)
        return n


def _matches(patterns: Iterable[str], *keys: str | None) -> bool:
    """Whether any pattern is found in any of the keys."""
    return _matcher(patterns)(*keys)


def _matcher(patterns: Iterable[str]) -> Callable[..., bool]:
    """``_matches(patterns, *keys)`` with the patterns compiled once."""
    compiled = [compile_regex(p) for p in patterns]
    if not compiled:
        return lambda *keys: False
    return lambda *keys: any(c.search(k) for c in compiled for k in keys if k is not None)


def _saved_frozen(rules: Rules, pairing: _Pairing, cols: _Columns, handle: Source | None,
                  description: Mapping[str, Any] | None) -> tuple[set[str], list[Failure]]:  # fmt: skip
    """``freeze.from_source``: the loaded target keys whose source tensors were saved frozen
    (followed through renames: a target key's source keys), or why the source cannot say."""
    if not rules.freeze.from_source:
        return set(), []
    loaded = {t: cols.sources(j) for t, j in pairing.loaded.items()}
    d = description or {"kind": "metadata"}
    named = f"{d.get('path') or 'the source'} is {d.get('format') or d.get('kind')}"
    keys, problem = rules.freeze.saved_frozen(getattr(handle, "requires_grad", None), loaded, named)
    return keys, [Failure("freeze", problem)] if problem else []


def _plan_freeze(rules: Rules, tgt: Mapping[str, TargetMeta], bn: Mapping[str, str],
                 saved: set[str] = frozenset()) -> tuple[set[str], list[str], list[Failure]]:  # fmt: skip
    spec = rules.freeze
    if not spec.active:
        return set(), [], []
    params = [k for k, m in tgt.items() if m.is_param]
    failures = []
    for label, patterns in (("freeze.params", spec.params), ("freeze.except", spec.except_)):
        for p in patterns:
            if not any(compile_regex(p).search(k) for k in params):
                failures.append(Failure("freeze", f"{label}: pattern {quote(p)} matched no parameter of the target"))
    frozen = {k for k in params if (k in saved or _matches(spec.params, k)) and not _matches(spec.except_, k)}
    bn_names = []
    if spec.batchnorm != "keep":
        by_owner: dict[str, list[str]] = defaultdict(list)  # module name -> its own state keys
        for k in tgt:
            by_owner[k.rpartition(".")[0]].append(k)
        region = [n for n in bn if _bn_in_region(by_owner.get(n, []), tgt, frozen, spec)]
        bn_names = region
        if spec.batchnorm == "frozen":
            bad = [f"{n} ({bn[n]})" for n in region if bn[n] not in FROZEN_BN_SUPPORTED]
            if bad:
                failures.append(
                    Failure(
                        "freeze",
                        "freeze.batchnorm: frozen replaces BatchNorm2d with FrozenBatchNorm2d; these are not 2-d: "
                        + ", ".join(bad) + ". Use `batchnorm: eval` for them.",
                        tuple(n for n in region if bn[n] not in FROZEN_BN_SUPPORTED),
                    )
                )
    return frozen, bn_names, failures


def _bn_in_region(own: list[str], tgt: Mapping[str, TargetMeta], frozen: set[str], spec: Any) -> bool:
    """A BatchNorm module follows ``params``: it is frozen when its affine parameters are
    (or, without affine parameters, when its running stats match the patterns); with no
    ``params`` at all, every BatchNorm module is."""
    if not spec.params and not spec.from_source:
        return True
    params = [k for k in own if tgt[k].is_param]
    if params:
        return all(k in frozen for k in params)
    return bool(own) and all(_matches(spec.params, k) and not _matches(spec.except_, k) for k in own)


@collector_paused_in
def _target_records(tgt: Mapping[str, TargetMeta], pairing: _Pairing, cols: _Columns, frozen: set[str],
                    bn_prefixes: tuple[str, ...], rules: Rules, fates: Mapping[str, _Fate]) -> list[TargetRecord]:  # fmt: skip
    labels = _StepLabels(rules)
    declared = _matcher(rules.expect.missing)
    loaded, mismatched = _plain(pairing.loaded), pairing.mismatched
    records: list[TargetRecord] = []
    append = records.append
    for key, meta in tgt.items():
        trainable = _trainable(key, meta, frozen, bn_prefixes)
        if meta.tied_to is not None:  # an alias shares the fate of its first name, reported there
            append(TargetRecord(key, TIED, meta.shape, meta.dtype, meta.kind, meta.numel, tied_to=meta.tied_to, declared=True,
                                trainable=trainable))  # fmt: skip
        elif (j := loaded.get(key)) is not None:
            a = cols.assignment(key, j)
            append(TargetRecord(key, LOADED, meta.shape, meta.dtype, meta.kind, meta.numel, sources=a.sources,
                                steps=labels(cols.hop_steps(j, fates)), ops=a.ops, source_shape=a.meta.shape,
                                source_dtype=a.meta.dtype, trainable=trainable))  # fmt: skip
        elif (j := mismatched.get(key)) is not None:
            m = cols.meta(j)
            append(TargetRecord(key, MISMATCHED, meta.shape, meta.dtype, meta.kind, meta.numel, sources=cols.sources(j),
                                source_shape=m.shape, source_dtype=m.dtype, declared=rules.shapes.skips(key) and declared(key),
                                trainable=trainable))  # fmt: skip
        else:
            append(TargetRecord(key, MISSING, meta.shape, meta.dtype, meta.kind, meta.numel, declared=declared(key), trainable=trainable))
    return records


def _plain(mapping: Mapping[str, int]) -> Mapping[str, int]:
    """The dict behind a :class:`LazyMapping` (built now), so a loop over a million keys
    looks each up directly rather than through the wrapper's methods."""
    return mapping._dict() if isinstance(mapping, LazyMapping) else mapping


class _StepLabels:
    """``("step 1 (strip_prefix)", ...)`` for the steps a loaded key went through (memoised)."""

    def __init__(self, rules: Rules) -> None:
        self.kinds = {s.index: s.kind for s in rules.steps}
        self.memo: dict[tuple[int, ...], tuple[str, ...]] = {}

    def __call__(self, indexes: tuple[int, ...]) -> tuple[str, ...]:
        if indexes not in self.memo:
            self.memo[indexes] = tuple(f"step {i} ({self.kinds[i]})" for i in indexes)
        return self.memo[indexes]


@collector_paused_in
def _source_records(src: Mapping[str, TensorMeta], fates: Mapping[str, _Fate], rules: Rules, *,
                    several: bool = False) -> list[SourceRecord]:  # fmt: skip
    """One record per source key; with ``several`` sources each names its source (``vision:...`` keys)."""
    kinds = {s.index: s.kind for s in rules.steps}
    declared = _matcher(rules.expect.unused)
    records = []
    for key, meta in src.items():
        f = fates.get(key) or _Fate((), UNUSED, None, key)
        records.append(SourceRecord(key, f.fate, meta.shape, meta.dtype, f.targets, f.final, f.step, kinds.get(f.step),
                                    f.fate == UNUSED and declared(key, f.final), f.note,
                                    key.partition(":")[0] if several else None))  # fmt: skip
    return records


def totals_of(targets: list[TargetRecord], sources: list[SourceRecord]) -> Totals:
    own = [t for t in targets if t.status != TIED]
    params = [t for t in own if t.kind == "parameter"]
    count = Counter(t.status for t in own)
    fate = Counter(s.fate for s in sources)
    return Totals(
        target_keys=len(own),
        loaded=count[LOADED],
        missing=count[MISSING],
        mismatched=count[MISMATCHED],
        source_keys=len(sources),
        used=fate[USED] + fate[DUPLICATE],
        dropped=fate[DROPPED],
        unused=fate[UNUSED] + fate[SKIPPED],
        param_elements=sum(t.numel for t in params),
        loaded_elements=sum(t.numel for t in params if t.status == LOADED),
        frozen_elements=sum(t.numel for t in params if t.trainable is False),
        trainable_elements=sum(t.numel for t in params if t.trainable),
        frozen_params=sum(1 for t in params if t.trainable is False),
        trainable_params=sum(1 for t in params if t.trainable),
    )


def _unused_parts(parts: list[Item], rules: Rules) -> list[Failure]:
    """Parts of a split source that reach no target: the source counts as used, but a
    piece of it would be lost, so each part must be dropped or declared like a key."""
    lost = [p for p in parts if not _matches(rules.expect.unused, p.key, *p.sources)]
    if not lost:
        return []
    lines = [f"{p.key!r} (a part of {_names(p.sources)})" for p in lost]
    return [
        Failure(
            "unused",
            f"{len(lost)} part(s) of split source keys reach no target key and are not in expect.unused:\n  " + "\n  ".join(lines),
            tuple(dict.fromkeys(s for p in lost for s in p.sources)),
        )
    ]


def _expectations(missing: list[str], unused: list[str], totals: Totals, rules: Rules) -> list[Failure]:
    """``missing``: target keys not loaded and not declared; ``unused``: source keys reaching
    no target, not dropped and not declared (collisions failed already)."""
    from ..report.grouping import group_keys

    failures = []
    if missing:
        failures.append(
            Failure(
                "missing",
                f"{len(missing)} target key(s) would keep their initial values and are not in expect.missing:\n  "
                + "\n  ".join(group_keys(missing))
                + _counter_hint(missing),
                tuple(missing),
            )
        )
    if unused:
        failures.append(
            Failure(
                "unused",
                f"{len(unused)} source key(s) reach no target key and are not dropped or in expect.unused:\n  "
                + "\n  ".join(group_keys(unused)),
                tuple(unused),
            )
        )
    if rules.expect.min_loaded is not None and totals.loaded_fraction + 1e-12 < rules.expect.min_loaded:
        failures.append(
            Failure(
                "min_loaded",
                f"loaded {totals.loaded_fraction:.1%} of the target's parameter elements "
                f"({totals.loaded_elements} of {totals.param_elements}); expect.min_loaded is {rules.expect.min_loaded:.1%}",
            )
        )
    return failures


def _counter_hint(missing: list[str]) -> str:
    """BatchNorm counters missing from a file saved with frozen BatchNorm by another tool.

    >>> _counter_hint(["fc.weight"])
    ''
    """
    n = sum(1 for k in missing if k.endswith(".num_batches_tracked") or k == "num_batches_tracked")
    if not n:
        return ""
    return (f"\nhint: {n} of these are BatchNorm num_batches_tracked counters, which FrozenBatchNorm2d does not keep: the checkpoint "
            "was probably saved from a model with frozen BatchNorm; declare them with `expect: {missing: ['\\.num_batches_tracked$']}` "
            "(the counters keep their initial values; eval-mode outputs do not depend on them)")


def _nothing_loaded(totals: Totals) -> str:
    """Why a load of no key fails even when every key is declared: a rules file that drops
    every source key and declares every target key missing loads nothing and would pass.

    >>> print(_nothing_loaded(Totals(target_keys=2, missing=2, source_keys=2, dropped=2)))
    nothing loaded: 0 of 2 target key(s) would come from the source (2 missing, 0 mismatched; of 2 source key(s), 2 dropped, 0 unused); a load that loads nothing fails unless the rules say so with `expect: {min_loaded: 0}`
    """
    return (
        f"nothing loaded: 0 of {totals.target_keys} target key(s) would come from the source "
        f"({totals.missing} missing, {totals.mismatched} mismatched; of {totals.source_keys} source key(s), "
        f"{totals.dropped} dropped, {totals.unused} unused); "
        "a load that loads nothing fails unless the rules say so with `expect: {min_loaded: 0}`"
    )


def _hints(unused: list[str], missing: set[str]) -> list[Failure]:
    """When keys go unused (by their final names) and missing side by side, look for a
    prefix that would join them."""
    if not unused or not missing:
        return []
    hint = _prefix_hint(unused, missing)
    return [Failure("hint", hint)] if hint else []


def _prefix_hint(unused: list[str], missing: set[str]) -> str | None:
    for depth in (1, 2):
        common = Counter(".".join(k.split(".")[:depth]) + "." for k in unused if k.count(".") >= depth).most_common(1)
        if common:
            p = common[0][0]
            hits = sum(1 for k in unused if k.startswith(p) and k[len(p):] in missing)
            if hits >= max(1, len(missing) // 2):
                return f"hint: {hits} unused source key(s) start with {p!r} and match missing target keys without it: add `- strip_prefix: {p}` to rules"
        common = Counter(".".join(k.split(".")[:depth]) + "." for k in missing if k.count(".") >= depth).most_common(1)
        if common:
            p = common[0][0]
            hits = sum(1 for k in unused if p + k in missing)
            if hits >= max(1, len(unused) // 2):
                return f"hint: {hits} missing target key(s) are unused source keys with {p!r} in front: add `- add_prefix: {p}` to rules"
    return None


def _merge_hints(failures: list[Failure]) -> list[Failure]:
    """A hint is not a failure of its own: it is appended to the 'unused' failure it explains."""
    hints = [f.message for f in failures if f.kind == "hint"]
    out = [f for f in failures if f.kind != "hint"]
    if hints:
        for n, f in enumerate(out):
            if f.kind == "unused":
                out[n] = Failure(f.kind, f.message + "\n" + "\n".join(hints), f.keys)
    return out


def _warnings(rules: Rules, view: _TargetView, pairing: _Pairing, cols: _Columns) -> list[str]:
    out = []
    keys, tgt = view.keys, view.tgt
    for p in rules.expect.missing:
        if not any(compile_regex(p).search(k) for k in keys):
            out.append(f"expect.missing: pattern {quote(p)} matched no target key")
    casts: Counter[tuple[str, str]] = Counter()
    if len(view.dtypes | cols.dtypes()) > 1:
        for t, j in pairing.loaded.items():
            a, b = cols.meta(j).dtype, tgt[t].dtype
            if a != b:
                casts[a, b] += 1
    for (a, b), n in casts.items():
        out.append(f"{n} tensor(s) will be cast from {a} to {b} by load_state_dict")
    return out
