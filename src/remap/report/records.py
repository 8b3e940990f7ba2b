"""The account of one load (or dry run): what happened to every target and source key.

A :class:`Report` is plain data: frozen records, ``to_dict()`` / ``to_json()`` in the
versioned schema documented in ``docs/report.md`` (and ``remap/report/report.schema.json``).
``remap.report.render`` draws it for people: ``print(report)`` prints the summary the command
line shows, ``repr(report)`` is one line, and rich, IPython and Jupyter draw it in colour.

>>> r = Report.empty(dry_run=True)
>>> r.ok, r.to_dict()["schema"]
(True, 1)
>>> r
<Report ok, dry run: 0 of 0 target keys loaded; 0 source keys: 0 used, 0 dropped, 0 unused>
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from operator import attrgetter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

    from rich.console import Console, ConsoleOptions
    from rich.text import Text

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "TargetRecord",
    "SourceRecord",
    "StepRecord",
    "Failure",
    "Totals",
    "FreezeRecord",
    "Report",
    "OPTIMIZER_SCHEMA_VERSION",
    "OptimizerReport",
    "OptimizerTargetRecord",
    "OptimizerSourceRecord",
    "OptimizerGroupRecord",
    "PassthroughRecord",
    "PrecisionRecord",
]

REPORT_SCHEMA_VERSION = 1
#: Version of the report's ``optimizer`` section, on its own: additive changes keep it.
OPTIMIZER_SCHEMA_VERSION = 1

# Target statuses
LOADED = "loaded"  # written from the source
MISSING = "missing"  # no source key reaches it: keeps its initial value
MISMATCHED = "mismatched"  # a source key reaches it with another shape: not written
TIED = "tied"  # an alias of a tied parameter that is loaded under its first name

# Source fates
USED = "used"
DROPPED = "dropped"
UNUSED = "unused"
SKIPPED = "skipped"  # reached a target key with another shape (shapes: skip / error)
DUPLICATE = "duplicate"  # a second copy of a tied parameter, checked equal instead of loaded


@dataclass(frozen=True)
class TargetRecord:
    """One key of the target state_dict.

    ``declared`` is true when a key that is not loaded is allowed by ``expect.missing``.
    ``trainable`` is ``None`` for buffers, else whether the parameter has requires_grad
    after freezing.
    """

    key: str
    status: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    numel: int
    sources: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    source_shape: tuple[int, ...] | None = None
    source_dtype: str | None = None
    declared: bool = False
    trainable: bool | None = None
    tied_to: str | None = None


@dataclass(frozen=True)
class SourceRecord:
    """One tensor of the source: ``fate`` is used, dropped, unused, skipped or duplicate.

    ``final_key`` is its name after the last step (for an unused key: the name that
    found no target); ``step`` is the 1-based step that dropped it; ``note`` says why an
    unused key is unused when another check already failed for it (a collision).
    """

    key: str
    fate: str
    shape: tuple[int, ...]
    dtype: str
    targets: tuple[str, ...] = ()
    final_key: str | None = None
    step: int | None = None
    step_kind: str | None = None
    declared: bool = False
    note: str | None = None
    source: str | None = None  # with several named sources (``sources:``): the one this key comes from


@dataclass(frozen=True)
class StepRecord:
    """One step of the rules pipeline and how many keys it matched."""

    index: int
    kind: str
    summary: str
    matched: int
    optional: bool = False
    patterns: tuple[tuple[str, int], ...] = ()
    where: str | None = None


@dataclass(frozen=True)
class Failure:
    """A check that failed: ``kind`` is one of ``FAILURE_KINDS``; ``keys`` are the keys it names."""

    kind: str
    message: str
    keys: tuple[str, ...] = ()


FAILURE_KINDS = (
    "unmatched_step",  # a step (or one of its patterns) matched no key
    "collision",  # two source keys end on one target key
    "bad_capture",  # rename arithmetic on a group that is not an integer
    "op",  # a tensor op cannot apply to a key's shape
    "shape_mismatch",  # a mapped key's shape differs from the target's (shapes: error)
    "missing",  # target keys not loaded and not in expect.missing
    "unused",  # source keys reaching no target and not in expect.unused
    "min_loaded",  # the loaded share of parameter elements is below expect.min_loaded
    "freeze",  # a freeze pattern matched nothing, or batchnorm cannot apply
    "tied_conflict",  # two source tensors for one tied parameter differ
    "verify",  # the loaded target's outputs differ from the source model's
    "optimizer",  # the saved optimizer state does not fit the plan (a moment's shape, a name no source key has)
    "precision",  # a narrowing cast at load time would turn a finite value infinite
)


@dataclass(frozen=True)
class PrecisionRecord:
    """Loaded keys whose tensors change dtype between the checkpoint and the module, one group
    per (``source_dtype``, ``dtype``, ``by``): ``kind`` is widened (every value kept), narrowed
    (a float cast that loses precision or range; range-checked where the load does it) or
    converted; ``by`` says what chose the dtype: the rules' ``steps`` (cast, dequant_blocks),
    ``keep_fp32``, the ``dtype`` asked for (target.dtype, dtype=) or the ``target``'s own tensor."""

    source_dtype: str
    dtype: str
    kind: str
    by: str
    keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class Totals:
    """Counts in keys and in parameter elements (parameters only, buffers excluded)."""

    target_keys: int = 0
    loaded: int = 0
    missing: int = 0
    mismatched: int = 0
    source_keys: int = 0
    used: int = 0
    dropped: int = 0
    unused: int = 0
    param_elements: int = 0
    loaded_elements: int = 0
    frozen_elements: int = 0
    trainable_elements: int = 0
    frozen_params: int = 0
    trainable_params: int = 0

    @property
    def loaded_fraction(self) -> float:
        return self.loaded_elements / self.param_elements if self.param_elements else 1.0


@dataclass(frozen=True)
class FreezeRecord:
    """What ``freeze`` did: BatchNorm mode and the BatchNorm modules it applied to."""

    batchnorm: str = "keep"
    batchnorm_modules: tuple[str, ...] = ()


# Optimizer state: what happened to each parameter of the new optimizer, and to each saved one
OPT_LOADED = "loaded"  # its saved state followed it through the plan
OPT_RESET = "reset"  # it starts with no state (``reason`` says why)
OPT_FAILED = "failed"  # its state cannot be mapped: a failure names it, nothing was written
OPT_DISCARDED = "discarded"  # a saved parameter's state that reaches no parameter of the new optimizer
OPT_STATELESS = "stateless"  # a saved parameter without state (never stepped)


@dataclass(frozen=True)
class OptimizerTargetRecord:
    """One parameter of the new optimizer, by its name in the target module.

    ``status`` is loaded, reset or failed; ``sources`` are the saved parameters its state
    came from, ``ops`` the plan's ops it went through, ``state`` the state entries it
    holds now (``exp_avg``, ``step``, ...); ``group`` is its param group in the new optimizer.
    """

    key: str
    status: str
    group: int
    sources: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    reason: str | None = None


@dataclass(frozen=True)
class OptimizerSourceRecord:
    """One parameter of the saved optimizer: ``index`` is its position in the saved state,
    ``key`` the name it had (a source key); ``fate`` is used, discarded, stateless or failed;
    ``targets`` the target keys it reached (took its state, when used)."""

    key: str
    index: int
    fate: str
    group: int
    targets: tuple[str, ...] = ()
    state: tuple[str, ...] = ()
    reason: str | None = None


@dataclass(frozen=True)
class OptimizerGroupRecord:
    """One param group of the new optimizer: where its hyperparameters come from (``new``
    or ``checkpoint``), the saved groups whose parameters it took, and the
    hyperparameters whose values differ between the two."""

    index: int
    params: int
    hparams_from: str
    checkpoint_groups: tuple[int, ...] = ()
    differs: tuple[str, ...] = ()


@dataclass(frozen=True)
class PassthroughRecord:
    """A piece of training state found beside the optimizer state (``role``: lr_scheduler,
    grad_scaler or rng_state), handed back unchanged in ``value`` (not in the JSON);
    ``loaded`` says whether remap loaded it into an object the caller passed."""

    name: str
    role: str
    where: str
    description: str
    loaded: bool = False
    value: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class OptimizerReport:
    """What a load with ``optimizer=`` did to the optimizer: the report's ``optimizer``
    section (its own ``schema`` version, :data:`OPTIMIZER_SCHEMA_VERSION`).

    ``source`` says where the saved state was (``kind``: key, file or state_dict; ``path``,
    ``key``, ``detected``), ``names`` how saved positions got names (``param_names`` saved
    by torch, or ``source.model``'s parameter order), ``hparams`` where the groups'
    hyperparameters come from. ``passthrough_values`` hands back the scheduler, scaler and
    RNG states found beside the optimizer state.
    """

    optimizer: str
    source: dict[str, Any]
    names: str
    hparams: str
    groups: tuple[OptimizerGroupRecord, ...] = ()
    targets: tuple[OptimizerTargetRecord, ...] = ()
    sources: tuple[OptimizerSourceRecord, ...] = ()
    passthrough: tuple[PassthroughRecord, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def passthrough_values(self) -> dict[str, Any]:
        """``{name: value}`` of what was passed through (``{"lr_scheduler": {...}, "scaler.pt": {...}}``)."""
        return {p.name: p.value for p in self.passthrough}

    def totals(self) -> dict[str, int]:
        """Counts of the two sides: ``params`` (new optimizer) by status, ``saved`` by fate."""
        def count(values: Sequence[str], words: tuple[str, ...]) -> dict[str, int]:
            return {w: sum(1 for v in values if v == w) for w in words}

        return {"params": len(self.targets), **count([t.status for t in self.targets], (OPT_LOADED, OPT_RESET, OPT_FAILED)),
                "saved": len(self.sources), **{f"saved_{k}": v for k, v in count([s.fate for s in self.sources],
                                                (USED, OPT_DISCARDED, OPT_STATELESS, OPT_FAILED)).items()}}  # fmt: skip

    def target_record(self, key: str) -> OptimizerTargetRecord:
        """The record of one parameter of the new optimizer (KeyError when it has none)."""
        for rec in self.targets:
            if rec.key == key:
                return rec
        raise KeyError(key)

    def source_record(self, key: str) -> OptimizerSourceRecord:
        """The record of one saved parameter, by name (KeyError when there is none)."""
        for rec in self.sources:
            if rec.key == key:
                return rec
        raise KeyError(key)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the section; per-parameter records by name, as the report's own."""
        return _lists({
            "schema": OPTIMIZER_SCHEMA_VERSION,
            "optimizer": self.optimizer,
            "source": self.source,
            "names": self.names,
            "hparams": self.hparams,
            "totals": self.totals(),
            "groups": [asdict(g) for g in self.groups],
            "passthrough": {p.name: {"role": p.role, "where": p.where, "description": p.description, "loaded": p.loaded}
                            for p in self.passthrough},
            "notes": list(self.notes),
            "targets": _by_key(self.targets),
            "sources": _by_key(self.sources),
        })  # fmt: skip


@dataclass(frozen=True, repr=False)
class Report:
    """The full account of one apply or dry run. ``ok`` is true iff ``failures`` is empty.

    ``str(report)`` (and ``print(report)``) is :func:`remap.report.render.format_report`'s text,
    ``repr(report)`` one line of counts.
    """

    dry_run: bool
    source: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    rules: str | None = None
    steps: tuple[StepRecord, ...] = ()
    targets: Sequence[TargetRecord] = ()  # a planned report builds these on first read
    sources: Sequence[SourceRecord] = ()
    failures: tuple[Failure, ...] = ()
    warnings: tuple[str, ...] = ()
    totals: Totals = field(default_factory=Totals)
    freeze: FreezeRecord = field(default_factory=FreezeRecord)
    stats: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    optimizer: OptimizerReport | None = None  # set by a load given an optimizer
    precision: tuple[PrecisionRecord, ...] = ()  # set by apply (and its dry run): dtype changes, grouped

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        """The summary ``remap apply`` prints: :func:`remap.report.render.format_report`."""
        from .render import format_report

        return format_report(self)

    def __repr__(self) -> str:
        """One line: the verdict and the totals (``print(report)`` shows the whole summary)."""
        t = self.totals
        state = "ok" if self.ok else f"FAILED ({', '.join(dict.fromkeys(f.kind for f in self.failures))})"
        mode = ", dry run" if self.dry_run else ""
        return (f"<Report {state}{mode}: {t.loaded} of {t.target_keys} target keys loaded; "
                f"{t.source_keys} source keys: {t.used} used, {t.dropped} dropped, {t.unused} unused>")  # fmt: skip

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        """rich draws the report as :func:`remap.report.render.print_report` does, in the space it has."""
        from .render import rich_lines

        yield from rich_lines(self, width=options.max_width)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """IPython shows the summary."""
        printer.text(repr(self) if cycle else str(self))

    def _repr_html_(self) -> str:
        """Jupyter shows the summary in colour."""
        from .render import format_html

        return format_html(self)

    @classmethod
    def empty(cls, *, dry_run: bool) -> Report:
        return cls(dry_run=dry_run)

    def target_record(self, key: str) -> TargetRecord:
        """The record of one target key (KeyError when it is not a target key)."""
        for rec in self.targets:
            if rec.key == key:
                return rec
        raise KeyError(key)

    def source_record(self, key: str) -> SourceRecord:
        """The record of one source key (KeyError when it is not a source key)."""
        for rec in self.sources:
            if rec.key == key:
                return rec
        raise KeyError(key)

    def keys_with(self, status: str) -> list[str]:
        """Target keys with the given status, in target order."""
        return [r.key for r in self.targets if r.status == status]

    def replace(self, **changes: Any) -> Report:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (schema version ``REPORT_SCHEMA_VERSION``, see docs/report.md)."""
        totals = asdict(self.totals)
        totals["loaded_fraction"] = self.totals.loaded_fraction
        return {**self._head(totals), "targets": _by_key(self.targets), "sources": _by_key(self.sources)}

    def _head(self, totals: dict[str, Any]) -> dict[str, Any]:
        """Everything but the per-key records."""
        return _lists({
            "schema": REPORT_SCHEMA_VERSION,
            "ok": self.ok,
            "dry_run": self.dry_run,
            "rules": self.rules,
            "source": self.source,
            "target": self.target,
            "totals": totals,
            "failures": [asdict(f) for f in self.failures],
            "warnings": list(self.warnings),
            "steps": [_step_dict(s) for s in self.steps],
            "freeze": asdict(self.freeze),
            "stats": self.stats,
            "verify": self.verify,
            "optimizer": self.optimizer.to_dict() if self.optimizer is not None else {},
            "precision": [{"source_dtype": p.source_dtype, "dtype": p.dtype, "kind": p.kind, "by": p.by, "count": len(p.keys),
                           "keys": p.keys} for p in self.precision],
        })

    def to_json(self, *, indent: int | None = 2) -> str:
        """The JSON text of :meth:`to_dict`; with ``indent``, each key's record on one line
        (a report of 100,000 keys stays readable with grep and is written in about a
        second, where indenting every field took several).

        >>> text = Report(dry_run=True, targets=(TargetRecord("w", "loaded", (2,), "float32", "parameter", 2),)).to_json()
        >>> print(text[text.index('  "targets"'):])
          "targets": {
            "w": {"status": "loaded", "shape": [2], "dtype": "float32", "kind": "parameter", "numel": 2, "sources": [], "steps": [], "ops": [], "source_shape": null, "source_dtype": null, "declared": false, "trainable": null, "tied_to": null}
          },
          "sources": {}
        }
        """
        d = self.to_dict()
        if indent is None:
            return json.dumps(d, default=_jsonable)
        optimizer = d.pop("optimizer")  # its records one per line too, in its place before the report's own
        text = _records_block(d, indent, 0)
        pad = " " * indent
        at = text.index(f',\n{pad}"targets": ')  # JSON strings hold no raw newline: this is the top-level field
        section = _records_block(optimizer, indent, 1) if optimizer else "{}"
        return f'{text[:at]},\n{pad}"optimizer": {section}{text[at:]}'


def _records_block(d: dict[str, Any], indent: int, depth: int) -> str:
    """``d`` as indented JSON at nesting ``depth``, its ``targets`` and ``sources`` (which
    it must have) with one line per key's record."""
    records = {name: d.pop(name) for name in ("targets", "sources")}
    line = json.JSONEncoder(default=_jsonable).encode
    outer = " " * (indent * depth)
    pad, pad2 = outer + " " * indent, outer + " " * (2 * indent)
    parts = []
    for name, by_key in records.items():
        rows = ",\n".join(f"{pad2}{line(k)}: {line(v)}" for k, v in by_key.items())
        parts.append(f'{pad}"{name}": ' + (f"{{\n{rows}\n{pad}}}" if rows else "{}"))
    head = json.dumps(d, indent=indent, default=_jsonable).replace("\n", "\n" + outer)
    return head[: head.rindex("\n" + outer + "}")] + ",\n" + ",\n".join(parts) + "\n" + outer + "}"


def _lists(value: Any) -> Any:
    """Tuples become lists all the way down, so the dict is exactly what JSON holds."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _by_key(records: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Flat records (scalars and tuples of scalars) as ``{key: {field: value}}``, tuples
    as lists, without ``dataclasses.asdict``'s deep copies."""
    if not records:
        return {}
    names = tuple(f.name for f in fields(records[0]) if f.name != "key")
    get = attrgetter(*names)
    return {r.key: {n: list(v) if type(v) is tuple else v for n, v in zip(names, get(r))} for r in records}


def _step_dict(step: StepRecord) -> dict[str, Any]:
    d = asdict(step)
    d["patterns"] = [{"pattern": p, "matched": n} for p, n in step.patterns]
    return d


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return str(value)
