"""Planning: rules x source metadata x target metadata -> :class:`Plan`, reading no tensor.

:func:`make_plan` is a pure function of names, shapes and dtypes. It runs every step over
the source keys, pairs the survivors with target keys, checks shapes, tied parameters,
expectations and freeze patterns, and returns a :class:`Plan` whose ``report`` is the
dry-run report. Applying the plan to a module is the engine's job (:meth:`Plan.apply`).

>>> from remap.rules import parse_rules
>>> rules = parse_rules({"version": 1, "rules": [{"strip_prefix": "module."}]})
>>> plan = make_plan(rules, {"module.fc.weight": [10, 4]}, {"fc.weight": [10, 4]})
>>> plan.ok, plan.assignments[0].sources
(True, ('module.fc.weight',))
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .meta import TargetMeta, TensorMeta, source_meta, target_meta
from .patterns import compile_regex, quote
from .report import (
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
from .rules import Rules
from .name_cache import leading_name_steps, run_name_steps
from .steps import Item, Recipe, Step, StepContext

if TYPE_CHECKING:
    import torch

    from .sources import Source

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


@dataclass
class Plan:
    """The checked recipe of one load. ``report`` is its dry-run report; ``ok`` says whether
    applying it would load as declared. Nothing in a plan holds tensor data."""

    rules: Rules
    source_meta: dict[str, TensorMeta]
    target_meta: dict[str, TargetMeta]
    assignments: tuple[Assignment, ...]
    duplicates: tuple[Duplicate, ...]
    frozen: frozenset[str]
    batchnorm_modules: tuple[str, ...]
    report: Report
    fates: dict[str, _Fate] = field(repr=False)
    source: Source | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return self.report.ok

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
        """Load the plan into ``module``; ``options`` are :func:`remap.engine.apply_plan`'s
        (device, dtype, batch_bytes, progress)."""
        from .engine import apply_plan

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
) -> Plan:
    """Plan ``rules`` from source metadata (key -> shape | (shape, dtype) | TensorMeta)
    onto target metadata (key -> the same, or TargetMeta). Pure: reads no tensor data.

    ``batchnorm_modules`` maps module names to class names, for ``freeze.batchnorm``.
    """
    src = source_meta(source)
    tgt = target if _all_target_meta(target) else target_meta(target)
    steps, items, failures, fates = _run_steps(rules.steps, src, StepContext(tgt))
    pairing = _pair(items, tgt, rules, fates)
    failures += pairing.failures
    frozen, bn_names, freeze_failures = _plan_freeze(rules, tgt, batchnorm_modules or {})
    failures += freeze_failures
    targets = _target_records(tgt, pairing, frozen, rules, bn_names, fates)
    sources = _source_records(src, fates, rules)
    totals = totals_of(targets, sources)
    failures += _expectations(targets, sources, totals, rules)
    failures += _unused_parts(pairing.unused_parts, rules)
    failures += _hints(failures, targets, sources)
    report = Report(
        dry_run=True,
        source=dict(source_description or {"kind": "metadata"}),
        target=dict(target_description or {"kind": "metadata"}),
        rules=rules.filename,
        steps=tuple(steps),
        targets=tuple(targets),
        sources=tuple(sources),
        failures=tuple(_merge_hints(failures)),
        warnings=tuple(_warnings(rules, tgt, src, pairing)),
        totals=totals,
        freeze=FreezeRecord(rules.freeze.batchnorm, tuple(bn_names)),
    )
    return Plan(rules, src, dict(tgt), tuple(pairing.assignments), tuple(pairing.duplicates), frozenset(frozen),
                tuple(bn_names), report, fates, source_handle)  # fmt: skip


def _all_target_meta(target: Mapping[str, Any]) -> bool:
    return isinstance(target, Mapping) and all(isinstance(v, TargetMeta) for v in target.values())


def _run_steps(steps: Sequence[Step], src: dict[str, TensorMeta], ctx: StepContext) -> tuple[list[StepRecord], list[Item], list[Failure], dict[str, _Fate]]:
    records: list[StepRecord] = []
    failures: list[Failure] = []
    fates: dict[str, _Fate] = {}
    items, rest = _run_leading_name_steps(steps, src, records, fates)
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
    return records, items, failures, fates


def _run_leading_name_steps(steps: Sequence[Step], src: dict[str, TensorMeta], records: list[StepRecord],
                            fates: dict[str, _Fate]) -> tuple[list[Item], Sequence[Step]]:  # fmt: skip
    """The leading name-only steps, run once per key shape when that is exact (see
    :mod:`remap.name_cache`); ``([], steps)`` untouched when they must run key by key."""
    leading = leading_name_steps(steps)
    fast = run_name_steps(leading, src) if leading else None
    if fast is None:
        return [Item.source(k, m) for k, m in src.items()], steps
    items, dropped, counts = fast
    for (step, _), n in zip(leading, counts):
        pairs = tuple(zip(step.labels(), n))  # type: ignore[attr-defined]
        records.append(StepRecord(step.index, step.kind, step.summary(), sum(n), step.optional, pairs, step.where))
    for item, step in dropped:
        fates[item.sources[0]] = _Fate(item.hops, DROPPED, step.index, item.key)
    return items, steps[len(leading):]


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


@dataclass
class _Pairing:
    assignments: list[Assignment] = field(default_factory=list)
    mismatched: dict[str, Item] = field(default_factory=dict)
    duplicates: list[Duplicate] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    unused_parts: list[Item] = field(default_factory=list)  # split parts reaching no target


FATE_RANK = {USED: 0, SKIPPED: 1, DUPLICATE: 2, UNUSED: 3}  # a source split into parts takes its best part's fate


def _settle(outcomes: list[tuple[Item, str, str | None]], fates: dict[str, _Fate], out: _Pairing) -> None:
    """One fate per source key from the fates of the items it reached (several after a split)."""
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
            out.unused_parts.extend(item for item, fate, _ in reached if fate == UNUSED and item not in out.unused_parts)


def _pair(items: list[Item], tgt: Mapping[str, TargetMeta], rules: Rules, fates: dict[str, _Fate]) -> _Pairing:
    out = _Pairing()
    outcomes: list[tuple[Item, str, str | None]] = []
    by_canonical: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        meta = tgt.get(item.key)
        if meta is None:
            outcomes.append((item, UNUSED, None))
            continue
        by_canonical[meta.tied_to or item.key].append(item)
    mismatches = []
    for canonical, group in by_canonical.items():
        if len(group) > 1:
            group.sort(key=lambda i: i.key != canonical)  # the item named like the first name loads
        item, rest = group[0], group[1:]
        want = tgt[canonical]
        for dup in rest:
            out.duplicates.append(Duplicate(dup.sources[0], item.sources[0], canonical))
            outcomes.append((dup, DUPLICATE, canonical))
            if dup.meta.shape != item.meta.shape:
                out.failures.append(
                    Failure(
                        "tied_conflict",
                        f"{canonical!r} is a tied parameter fed by two source tensors of different shapes: "
                        f"{_names(item.sources)} {list(item.meta.shape)} and {_names(dup.sources)} {list(dup.meta.shape)}; drop one of them",
                        (*item.sources, *dup.sources),
                    )
                )
        if item.meta.shape != want.shape:
            out.mismatched[canonical] = item
            outcomes.append((item, SKIPPED, canonical))
            if not rules.shapes.skips(canonical):
                mismatches.append((canonical, item, want))
            continue
        out.assignments.append(Assignment(canonical, item.sources, item.recipe, item.meta))
        outcomes.append((item, USED, canonical))
    _settle(outcomes, fates, out)
    if mismatches:
        lines = [f"{k}: checkpoint {list(i.meta.shape)} (from {_names(i.sources)}) vs model {list(w.shape)}" for k, i, w in mismatches]
        out.failures.append(
            Failure(
                "shape_mismatch",
                f"{len(mismatches)} mapped key(s) differ in shape from the target (shapes: error):\n  "
                + "\n  ".join(lines)
                + "\nFix the rules, or allow skipping them with `shapes: {skip: [pattern]}` and list them in expect.missing.",
                tuple(k for k, _, _ in mismatches),
            )
        )
    return out


def _matches(patterns: Iterable[str], *keys: str | None) -> bool:
    """Whether any pattern is found in any of the keys."""
    patterns = tuple(patterns)
    if not patterns:
        return False
    compiled = [compile_regex(p) for p in patterns]
    return any(c.search(k) for c in compiled for k in keys if k is not None)


def _plan_freeze(rules: Rules, tgt: Mapping[str, TargetMeta], bn: Mapping[str, str]) -> tuple[set[str], list[str], list[Failure]]:
    spec = rules.freeze
    if not spec.active:
        return set(), [], []
    params = [k for k, m in tgt.items() if m.is_param]
    failures = []
    for label, patterns in (("freeze.params", spec.params), ("freeze.except", spec.except_)):
        for p in patterns:
            if not any(compile_regex(p).search(k) for k in params):
                failures.append(Failure("freeze", f"{label}: pattern {quote(p)} matched no parameter of the target"))
    frozen = {k for k in params if _matches(spec.params, k) and not _matches(spec.except_, k)}
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
    if not spec.params:
        return True
    params = [k for k in own if tgt[k].is_param]
    if params:
        return all(k in frozen for k in params)
    return bool(own) and all(_matches(spec.params, k) and not _matches(spec.except_, k) for k in own)


def _target_records(tgt: Mapping[str, TargetMeta], pairing: _Pairing, frozen: set[str], rules: Rules, bn_names: list[str], fates: dict[str, _Fate]) -> list[TargetRecord]:
    assigned = {a.target: a for a in pairing.assignments}
    labels = _StepLabels(rules)
    records = []
    bn_prefixes = tuple(f"{n}." for n in bn_names) if rules.freeze.batchnorm == "frozen" else ()
    for key, meta in tgt.items():
        canonical = meta.tied_to or key
        trainable = None
        if meta.is_param:
            trainable = meta.requires_grad and canonical not in frozen and key not in frozen and not key.startswith(bn_prefixes)
        base = dict(key=key, shape=meta.shape, dtype=meta.dtype, kind=meta.kind, numel=meta.numel, trainable=trainable)
        if meta.tied_to is not None:  # an alias shares the fate of its first name, reported there
            records.append(TargetRecord(status=TIED, tied_to=meta.tied_to, declared=True, **base))
        elif key in assigned:
            a = assigned[key]
            records.append(TargetRecord(status=LOADED, sources=a.sources, steps=labels(a.sources, fates), ops=a.ops,
                                        source_shape=a.meta.shape, source_dtype=a.meta.dtype, **base))  # fmt: skip
        elif key in pairing.mismatched:
            it = pairing.mismatched[key]
            records.append(TargetRecord(status=MISMATCHED, sources=it.sources, source_shape=it.meta.shape, source_dtype=it.meta.dtype,
                                        declared=rules.shapes.skips(key) and _matches(rules.expect.missing, key), **base))  # fmt: skip
        else:
            records.append(TargetRecord(status=MISSING, declared=_matches(rules.expect.missing, key), **base))
    return records


class _StepLabels:
    """``("step 1 (strip_prefix)", ...)`` for the steps a loaded key went through (memoised)."""

    def __init__(self, rules: Rules) -> None:
        self.kinds = {s.index: s.kind for s in rules.steps}
        self.memo: dict[tuple[int, ...], tuple[str, ...]] = {}

    def __call__(self, sources: tuple[str, ...], fates: dict[str, _Fate]) -> tuple[str, ...]:
        indexes = tuple(sorted({i for s in sources for i, _ in fates[s].hops}))
        if indexes not in self.memo:
            self.memo[indexes] = tuple(f"step {i} ({self.kinds[i]})" for i in indexes)
        return self.memo[indexes]


def _source_records(src: Mapping[str, TensorMeta], fates: dict[str, _Fate], rules: Rules) -> list[SourceRecord]:
    kinds = {s.index: s.kind for s in rules.steps}
    records = []
    for key, meta in src.items():
        f = fates.get(key) or _Fate((), UNUSED, None, key)
        declared = f.fate == UNUSED and _matches(rules.expect.unused, key, f.final)
        records.append(SourceRecord(key, f.fate, meta.shape, meta.dtype, f.targets, f.final, f.step, kinds.get(f.step), declared, f.note))
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


def _expectations(targets: list[TargetRecord], sources: list[SourceRecord], totals: Totals, rules: Rules) -> list[Failure]:
    from .grouping import group_keys

    failures = []
    keys = [t.key for t in targets if not t.declared and (t.status == MISSING or (t.status == MISMATCHED and rules.shapes.skips(t.key)))]
    if keys:
        failures.append(
            Failure(
                "missing",
                f"{len(keys)} target key(s) would keep their initial values and are not in expect.missing:\n  "
                + "\n  ".join(group_keys(keys)),
                tuple(keys),
            )
        )
    unused = [s.key for s in sources if s.fate == UNUSED and not s.declared and s.note is None]  # collisions failed already
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


def _hints(failures: list[Failure], targets: list[TargetRecord], sources: list[SourceRecord]) -> list[Failure]:
    """When keys go unused and missing side by side, look for a prefix that would join them."""
    unused = [s.final_key or s.key for s in sources if s.fate == UNUSED and not s.declared]
    missing = {t.key for t in targets if t.status == MISSING and not t.declared}
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


def _warnings(rules: Rules, tgt: Mapping[str, TargetMeta], src: Mapping[str, TensorMeta], pairing: _Pairing) -> list[str]:
    out = []
    keys = list(tgt)
    for p in rules.expect.missing:
        if not any(compile_regex(p).search(k) for k in keys):
            out.append(f"expect.missing: pattern {quote(p)} matched no target key")
    casts = Counter((a.meta.dtype, tgt[a.target].dtype) for a in pairing.assignments if a.meta.dtype != tgt[a.target].dtype)
    for (a, b), n in casts.items():
        out.append(f"{n} tensor(s) will be cast from {a} to {b} by load_state_dict")
    return out
