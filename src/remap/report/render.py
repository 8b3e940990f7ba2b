"""Drawing a :class:`~remap.report.records.Report` for people: plain text, or rich for a terminal.

Both paths draw the same content from one intermediate form (lines of styled spans and
one table), in this order: header, steps, target keys by status, source keys by fate,
freeze (when it froze something), totals, verify, warnings, failures and a verdict line.
Every count is the JSON's (``report.totals``), and the lines of a section add up to its
count. Keys are folded with :mod:`remap.report.grouping`; long lists are cut unless ``verbose``.

>>> from remap.report.records import Report
>>> print(format_report(Report(dry_run=True, source={"path": "a.pt"}, target={"model": "m:f"})))
DRY RUN  a.pt -> m:f
<BLANKLINE>
Steps: none (keys keep their names)
<BLANKLINE>
Target keys: 0
  loaded         0
<BLANKLINE>
Source keys: 0
<BLANKLINE>
Totals
  target  0 keys: 0 loaded, 0 missing, 0 mismatched
  source  0 keys: 0 used, 0 dropped, 0 unused
  params  0 elements, 0 loaded (100%)
<BLANKLINE>
OK: would load as declared (dry run)

Colour lives only in :func:`print_report`; :func:`format_report` never emits ANSI codes.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .grouping import KeyGroup, fold_keys, printable
from .records import (
    DROPPED,
    DUPLICATE,
    LOADED,
    MISMATCHED,
    MISSING,
    OPT_DISCARDED,
    OPT_FAILED,
    OPT_LOADED,
    OPT_RESET,
    OPT_STATELESS,
    SKIPPED,
    TIED,
    UNUSED,
    USED,
    OptimizerReport,
    Report,
    SourceRecord,
    StepRecord,
    TargetRecord,
    Totals,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["format_report", "print_report", "rich_lines", "format_html", "format_count", "format_shape", "verdict"]

LIST_CAP = 20  # groups shown per list when not verbose
QUIET_CAP = 8  # groups shown per list of deliberate, declared keys (dropped) when not verbose

# Styles (rich markup names); the plain-text path ignores them.
OK_STYLE = "green"
DECLARED_STYLE = "yellow"
FAIL_STYLE = "bold red"
MUTED = "dim"
TITLE = "bold"

Span = tuple[str, str]  # (text, rich style; "" for none)
Line = tuple[Span, ...]


@dataclass(frozen=True)
class _Table:
    """A small table: column titles, their justification ("left"/"right"), styled rows."""

    columns: tuple[str, ...]
    justify: tuple[str, ...]
    rows: tuple[tuple[Span, ...], ...]
    indent: int = 2


Block = Line | _Table


# --------------------------------------------------------------------------- public


def format_report(report: Report, *, verbose: bool = False, width: int = 100) -> str:
    """The report as plain text (no ANSI codes), lines kept within ``width`` where possible.

    >>> from remap.report.records import Failure
    >>> r = Report(dry_run=False, failures=(Failure("missing", "1 target key not loaded"),))
    >>> format_report(r).splitlines()[-1]
    'FAILED: 1 check failed (missing)'
    """
    return "\n".join(_plain_lines(_document(report, verbose=verbose, width=width), width))


def print_report(report: Report, *, console: Console | None = None, verbose: bool = False) -> None:
    """Print the report with rich: the content of :func:`format_report`, coloured by status.

    Green is loaded; yellow is missing, mismatched or unused but declared; red is what fails.

    >>> import io
    >>> from rich.console import Console
    >>> out = io.StringIO()
    >>> print_report(Report(dry_run=False), console=Console(file=out, width=80))
    >>> out.getvalue().splitlines()[-1]
    'OK: loaded as declared'
    """
    from rich.console import Console

    console = console or Console()
    for text in rich_lines(report, width=console.width, verbose=verbose):
        console.print(text, soft_wrap=True)


def rich_lines(report: Report, *, width: int = 100, verbose: bool = False) -> list[Any]:
    """The lines of :func:`format_report` as styled ``rich.text.Text``, for a rich console
    or layout (``console.print(report)`` draws these).

    >>> [str(t) for t in rich_lines(Report(dry_run=False))][-1]
    'OK: loaded as declared'
    """
    return [_rich_text(line) for line in _lines(_document(report, verbose=verbose, width=width), width)]


def format_html(report: Report, *, verbose: bool = False, width: int = 100) -> str:
    """The report as an HTML ``<pre>`` block with inline colours (what Jupyter shows).

    >>> format_html(Report(dry_run=False)).startswith("<pre")
    True
    """
    import io

    from rich.console import Console

    console = Console(file=io.StringIO(), record=True, width=width, force_jupyter=False, color_system="truecolor")
    print_report(report, console=console, verbose=verbose)
    style = "white-space: pre; overflow-x: auto; line-height: normal; font-family: Menlo, 'DejaVu Sans Mono', consolas, monospace"
    return console.export_html(inline_styles=True, code_format=f'<pre style="{style}">{{code}}</pre>')


def verdict(report: Report) -> str:
    """The last line of a report: ``OK: ...`` or ``FAILED: N checks failed (kinds)``.

    >>> verdict(Report(dry_run=False))
    'OK: loaded as declared'
    """
    if report.ok:
        return "OK: would load as declared (dry run)" if report.dry_run else "OK: loaded as declared"
    n = len(report.failures)
    kinds = ", ".join(dict.fromkeys(f.kind for f in report.failures))
    return f"FAILED: {n} check{'' if n == 1 else 's'} failed ({kinds})"


def format_count(n: int) -> str:
    """A count for people: ``23_512_000`` -> ``23.5M``, ``5120`` -> ``5.1K``, ``512`` -> ``512``.

    >>> [format_count(n) for n in (0, 999, 1000, 5120, 23_512_000, 999_960, 7_000_000_000)]
    ['0', '999', '1K', '5.1K', '23.5M', '1M', '7B']
    """
    value = float(n)
    for suffix in ("", "K", "M", "B", "T"):
        if abs(value) < 999.95 or suffix == "T":
            text = str(int(value)) if suffix == "" else f"{value:.1f}".removesuffix(".0")
            return text + suffix
        value /= 1000
    return str(n)  # unreachable


def format_shape(shape: Sequence[int] | None) -> str:
    """``(1000, 512)`` -> ``[1000, 512]``; ``None`` -> ``?``.

    >>> format_shape((10, 512)), format_shape(()), format_shape(None)
    ('[10, 512]', '[]', '?')
    """
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def format_percent(fraction: float) -> str:
    """A share as a percentage that never rounds a shortfall up to 100%.

    >>> format_percent(1.0), format_percent(0.99996), format_percent(0.5)
    ('100%', '99.9%', '50.0%')
    """
    if fraction >= 1.0:
        return "100%"
    return f"{min(fraction * 100, 99.9):.1f}%"


# ------------------------------------------------------------------------- document


def _document(report: Report, *, verbose: bool, width: int) -> list[Block]:
    blocks: list[Block] = []
    for section in (
        _header(report),
        _steps(report.steps),
        _targets(report.targets, report.totals, verbose, width),
        _sources(report.sources, report.steps, report.totals, verbose, width),
        _freeze(report, verbose),
        _totals(report),
        _precision(report, verbose, width),
        _verify(report, verbose, width),
        _optimizer(report.optimizer, verbose, width),
        _warnings(report.warnings),
        _failures(report, verbose),
    ):
        if section:
            if blocks:
                blocks.append(())
            blocks.extend(section)
    if blocks:
        blocks.append(())
    blocks.append(((verdict(report), f"bold {OK_STYLE}" if report.ok else FAIL_STYLE),))
    return blocks


def _refused(report: Report) -> bool:
    """Whether the run failed a check before the module was touched (only ``verify`` fails
    after loading: the weights are in, only the outputs disagree)."""
    return not report.ok and not all(f.kind == "verify" for f in report.failures)


def _header(report: Report) -> list[Block]:
    if report.dry_run:
        mode = ("DRY RUN", "bold cyan")
    elif report.ok:
        mode = ("APPLIED", "bold")
    elif not _refused(report):
        mode = ("APPLIED, VERIFY FAILED", FAIL_STYLE)
    else:
        mode = ("NOT LOADED", FAIL_STYLE)
    source = _mapping(report.source)
    target = _mapping(report.target)
    lines: list[Block] = [
        (mode, ("  ", ""), (_describe_source(source), ""), (" -> ", MUTED), (_describe_target(target), ""))
    ]
    if report.rules:
        lines.append((("rules: ", MUTED), (str(report.rules), "")))
    saved = target.get("saved")
    if saved:
        where = saved.get("path", saved) if isinstance(saved, dict) else saved
        lines.append((("saved: ", MUTED), (str(where), "")))
    notes = source.get("notes")
    for note in notes if isinstance(notes, list) else []:
        lines.append((("note: ", MUTED), (str(note), "")))
    return lines


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _describe_source(source: dict[str, Any]) -> str:
    """Where the weights came from: ``ckpt.pth (torch, key "state_dict")``.

    >>> _describe_source({"kind": "file", "path": "a.pth", "format": "torch", "key": "model", "key_detected": True})
    'a.pth (torch, key "model", detected)'
    """
    several = source.get("sources")
    if source.get("kind") == "several" and isinstance(several, dict):
        return ", ".join(f"{n}: {_describe_source(_mapping(d))}" for n, d in several.items())
    what = source.get("path") or _call(source, source.get("factory") or source.get("model")) or source.get("kind") or "source"
    details = [str(source["format"])] if source.get("format") else []
    if source.get("key"):
        details.append(f'key "{source["key"]}"' + (", detected" if source.get("key_detected") else ""))
    files = source.get("files")
    if isinstance(files, int) and files > 1:
        details.append(f"{files} files")
    return f"{what} ({', '.join(details)})" if details else str(what)


def _describe_target(target: dict[str, Any]) -> str:
    """What was loaded into: the factory, else the class, else the kind of target.

    >>> _describe_target({"kind": "metadata", "keys": 320})
    'metadata (320 keys)'
    """
    what = _call(target, target.get("factory") or target.get("model")) or target.get("class")
    if what:
        return str(what)
    kind = str(target.get("kind") or "target")
    return f"{kind} ({target['keys']} keys)" if isinstance(target.get("keys"), int) else kind


def _call(description: dict[str, Any], factory: Any) -> str | None:
    """A factory with the arguments it was called with, when the description has them
    (``args``, ``kwargs``): ``timm:create_model('resnet18', num_classes=10)``.

    >>> _call({"args": ["resnet18"], "kwargs": {"num_classes": 10}}, "timm:create_model")
    "timm:create_model('resnet18', num_classes=10)"
    >>> _call({}, "torchvision.models:resnet18"), _call({}, None)
    ('torchvision.models:resnet18', None)
    """
    if not factory:
        return None
    args, kwargs = description.get("args"), description.get("kwargs")
    if not args and not kwargs:
        return str(factory)
    parts = [repr(a) for a in args or ()] + [f"{k}={v!r}" for k, v in _mapping(kwargs).items()]
    return f"{factory}({', '.join(parts)})"


def _steps(steps: Sequence[StepRecord]) -> list[Block]:
    """One row per step, and per pattern of a step that has several, with its match count:
    a rename of 11 patterns is 11 rows, so that the pattern that matched nothing shows."""
    if not steps:
        return [(("Steps: none (keys keep their names)", TITLE),)]
    rows: list[tuple[Span, ...]] = []
    for step in steps:
        for n, (text, matched, note) in enumerate(_step_rows(step)):
            style = _unmatched_style(step) if matched == 0 else ""
            rows.append(((str(step.index) if n == 0 else "", MUTED), (text, style), (str(matched), style), (note, style)))
    table = _Table(("#", "step", "matched", ""), ("right", "left", "right", "left"), tuple(rows))
    return [(("Steps", TITLE),), table]


def _step_rows(step: StepRecord) -> list[tuple[str, int, str]]:
    """``(text, matched, note)`` per row: the step whole, or its patterns one by one (the
    first row with the step's kind, the others aligned beneath it)."""
    where = f" ({step.where})" if step.where else ""
    parts = _pattern_texts(step)
    if parts is None:
        idle = [p for p, n in step.patterns if n == 0]
        note = "matched nothing: " + ", ".join(idle) + where if idle and step.matched else _idle_note(step, step.matched, where)
        return [(step.summary or step.kind, step.matched, note)]
    head, texts = parts
    return [
        ((head if n == 0 else " " * len(head)) + text, matched, _idle_note(step, matched, where))
        for n, (text, (_, matched)) in enumerate(zip(texts, step.patterns))
    ]


def _idle_note(step: StepRecord, matched: int, where: str) -> str:
    if matched:
        return ""
    return "matched nothing (optional)" if step.optional else "matched nothing" + where


def _unmatched_style(step: StepRecord) -> str:
    return MUTED if step.optional else FAIL_STYLE


def _pattern_texts(step: StepRecord) -> tuple[str, list[str]] | None:
    """A step of several patterns as ``(head, one text per pattern)``, cut from its summary:
    ``rename 'a' -> 'b'; 'c' -> 'd'`` -> ``("rename ", ["'a' -> 'b'", "'c' -> 'd'"])``;
    a list of patterns ends the summary of every other kind (``drop 'a', 'b'``,
    ``transpose(-2, -1) on 'a', 'b'``). None for one pattern, or a summary of another form.

    >>> _pattern_texts(StepRecord(1, "rename", "rename 'a' -> 'b'; 'c' -> 'd' add {1: 1}", 2, patterns=(("a", 1), ("c", 1))))
    ('rename ', ["'a' -> 'b'", "'c' -> 'd' add {1: 1}"])
    >>> _pattern_texts(StepRecord(1, "drop", "drop 'a', 'b'", 2, patterns=(("a", 1), ("b", 1))))
    ('drop ', ["'a'", "'b'"])
    """
    quoted = [f"'{p}'" for p, _ in step.patterns]
    if len(quoted) < 2:
        return None
    summary = step.summary
    if step.kind != "rename":
        tail = ", ".join(quoted)
        return (summary[: -len(tail)], quoted) if summary.endswith(tail) else None
    head = "rename "
    starts = []
    at = len(head)
    for n, q in enumerate(quoted):
        at = summary.find(("; " if n else "") + q + " -> ", at)
        if at < 0 or (n == 0 and at != len(head)):
            return None
        starts.append(at + (2 if n else 0))
        at += len(q)
    ends = [s - 2 for s in starts[1:]] + [len(summary)]
    return head, [summary[a:b] for a, b in zip(starts, ends)]


# ---------------------------------------------------------------------- target keys


def _targets(records: Sequence[TargetRecord], totals: Totals, verbose: bool, width: int) -> list[Block]:
    """Target keys by status. The count is ``totals.target_keys`` (a tied parameter counted
    once, as in the JSON); tied aliases are named beside it and listed after the keys."""
    tied = [r for r in records if r.status == TIED]
    aliases = f" (and {_plural(len(tied), 'tied alias', 'tied aliases')})" if tied else ""
    lines: list[Block] = [(("Target keys: ", TITLE), (str(totals.target_keys), TITLE), (aliases, MUTED))]
    loaded = [r for r in records if r.status == LOADED]
    elements = sum(r.numel for r in loaded if r.kind == "parameter")
    lines.append(_status_line("loaded", len(loaded), f"{format_count(elements)} params" if loaded else "", OK_STYLE))
    lines.extend(_loaded_lines(loaded, verbose, width))
    for declared in (True, False):
        missing = [r for r in records if r.status == MISSING and r.declared == declared]
        if missing:
            lines.append(_status_line("missing", len(missing), _declared_word(declared), _decl_style(declared)))
            groups = [g.text for g in fold_keys(r.key for r in missing)]
            lines.extend(_capped(groups, verbose, LIST_CAP, width))
    for declared in (True, False):
        mismatched = [r for r in records if r.status == MISMATCHED and r.declared == declared]
        if mismatched:
            lines.append(_status_line("mismatched", len(mismatched), _declared_word(declared), _decl_style(declared)))
            lines.extend(_capped(_mismatch_texts(mismatched), verbose, LIST_CAP, width))
    if tied:
        lines.append(_status_line("tied", len(tied), "loaded through the name they are tied to", OK_STYLE))
        pairs = _pair_groups([(r.key, (r.tied_to or "?",), None) for r in tied])
        lines.extend(_capped([_pair_text(p, " = ") for p in pairs], verbose, LIST_CAP, width))
    known = {LOADED, TIED, MISSING, MISMATCHED}
    lines.extend(_other_statuses([(r.key, r.status) for r in records if r.status not in known], verbose, width))
    return lines


def _loaded_lines(loaded: Sequence[TargetRecord], verbose: bool, width: int) -> list[Line]:
    """Loaded keys by how their name changed.

    A rename shared by several groups becomes a heading (``module.* -> *  (318 keys)``)
    over the target groups; a lone rename or a merge is one ``target <- source`` line.
    Keys loaded under their own name are listed only when verbose or when an op changed them.
    """
    pairs = _pair_groups([(r.key, tuple(r.sources), tuple(r.ops)) for r in loaded], rename_classes=True)
    by_class: dict[Hashable, list[_Pair]] = {}
    for p in pairs:
        by_class.setdefault(p.cls, []).append(p)
    entries: list[tuple[int, str, str]] = []  # (indent, text, style)
    for cls, members in by_class.items():
        count = sum(len(p.group) for p in members)
        if cls == "same":
            entries.extend(_same_name_entries(members, count, verbose))
        elif len(members) > 1 and isinstance(cls, tuple):
            entries.append((4, f"{_class_text(cls)}  ({_keys(count)})", MUTED))
            entries.extend((6, p.group.text + _ops_text(p.extra), "") for p in members)
        else:
            entries.extend((4, _pair_text(p, " <- ", " + ") + _ops_text(p.extra), "") for p in members)
    return _capped_entries(entries, verbose, LIST_CAP, width)


def _same_name_entries(members: Sequence[_Pair], count: int, verbose: bool) -> list[tuple[int, str, str]]:
    listed = [p for p in members if verbose or p.extra]
    entries = [(4, f"same name  ({_keys(count)})", MUTED)]
    entries.extend((6, p.group.text + _ops_text(p.extra), "") for p in listed)
    hidden = count - sum(len(p.group) for p in listed)
    if listed and hidden:
        entries.append((6, f"… and {_keys(hidden)} without ops (verbose lists them)", MUTED))
    return entries


def _keys(n: int) -> str:
    return f"{n} key{'' if n == 1 else 's'}"


def _ops_text(ops: Sequence[str]) -> str:
    return f"  [{', '.join(ops)}]" if ops else ""


def _tuple(shape: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if shape is None else tuple(shape)


def _mismatch_texts(records: Sequence[TargetRecord]) -> list[str]:
    rows = [(r.key, tuple(r.sources), (_tuple(r.source_shape), _tuple(r.shape))) for r in records]
    pairs = _pair_groups(rows, rename_classes=True)
    texts = []
    for p in pairs:
        source_shape, shape = p.extra
        name = _arrow_text(p, " <- ", " + ")
        texts.append(f"{name}: checkpoint {format_shape(source_shape)} vs model {format_shape(shape)}")
    return texts


# ---------------------------------------------------------------------- source keys


def _sources(
    records: Sequence[SourceRecord], steps: Sequence[StepRecord], totals: Totals, verbose: bool, width: int
) -> list[Block]:
    """Source keys by fate, counted as the JSON totals count them: ``used`` includes the
    duplicates of a tied parameter (checked equal, loaded once), ``unused`` the keys
    skipped for their shape; each such part is named on its line."""
    lines: list[Block] = [(("Source keys: ", TITLE), (str(totals.source_keys), TITLE))]
    if any(r.source for r in records):
        return lines + _by_source(records, steps, totals, verbose, width)
    used = sum(1 for r in records if r.fate == USED)
    duplicate = [r for r in records if r.fate == DUPLICATE]
    if used or duplicate:
        note = f"incl. {_plural(len(duplicate), 'duplicate')} of a tied parameter, checked equal" if duplicate else ""
        lines.append(_status_line("used", used + len(duplicate), note, OK_STYLE))
        if verbose and duplicate:
            lines.extend(_capped(_target_texts(duplicate), verbose, LIST_CAP, width))
    lines.extend(_dropped_lines([r for r in records if r.fate == DROPPED], steps, verbose, width))
    for declared in (True, False):
        unused = [r for r in records if r.fate == UNUSED and r.declared == declared]
        if unused:
            lines.append(_status_line("unused", len(unused), _declared_word(declared), _decl_style(declared)))
            lines.extend(_capped(_renamed_source_texts(unused), verbose, LIST_CAP, width))
    skipped = [r for r in records if r.fate == SKIPPED]
    if skipped:
        lines.append(_status_line("unused", len(skipped), "skipped: shape differs from the target's", DECLARED_STYLE))
        lines.extend(_capped(_target_texts(skipped), verbose, LIST_CAP, width))
    known = {USED, DROPPED, UNUSED, SKIPPED, DUPLICATE}
    lines.extend(_other_statuses([(r.key, r.fate) for r in records if r.fate not in known], verbose, width))
    return lines


def _by_source(records: Sequence[SourceRecord], steps: Sequence[StepRecord], totals: Totals, verbose: bool, width: int) -> list[Block]:
    """Several named sources: each one's keys by fate under its name, keys as that source names them."""
    groups: dict[str, list[SourceRecord]] = {}
    for r in records:
        groups.setdefault(r.source or "", []).append(replace(r, key=r.key.removeprefix(f"{r.source}:"), source=None))
    lines: list[Block] = []
    for name, group in groups.items():
        lines.append(_indented(2, (f"from {name}: ", TITLE), (f"{len(group)} keys", "")))
        lines.extend(((("  ", ""), *line) for line in _sources(group, steps, totals, verbose, width)[1:]))  # type: ignore[misc]
    return lines


def _dropped_lines(
    dropped: Sequence[SourceRecord], steps: Sequence[StepRecord], verbose: bool, width: int
) -> list[Line]:
    if not dropped:
        return []
    lines: list[Line] = [_status_line("dropped", len(dropped), "", MUTED)]
    by_step: dict[int | None, list[SourceRecord]] = {}
    for r in dropped:
        by_step.setdefault(r.step, []).append(r)
    kinds = {s.index: s.kind for s in steps}
    for step, records in by_step.items():
        kind = records[0].step_kind or kinds.get(step or 0)
        label = "by an unknown step" if step is None else f"by step {step}" + (f" ({kind})" if kind else "")
        groups = [g.text for g in fold_keys(r.key for r in records)]
        if len(groups) == 1:
            lines.append(_indented(4, (f"{label}: ", MUTED), (groups[0], "")))
        else:
            lines.append(_indented(4, (f"{label}: {len(records)} keys", MUTED)))
            lines.extend(_capped(groups, verbose, QUIET_CAP, width, indent=6))
    return lines


def _renamed_source_texts(records: Sequence[SourceRecord]) -> list[str]:
    """``key -> final name`` where the steps renamed it, else the key alone."""
    rows = [(r.key, (r.final_key,) if r.final_key else (), None) for r in records]
    return [_arrow_text(p, " -> ") for p in _pair_groups(rows, rename_classes=True)]


def _target_texts(records: Sequence[SourceRecord]) -> list[str]:
    rows = [(r.key, tuple(r.targets), None) for r in records]
    return [_arrow_text(p, " -> ") for p in _pair_groups(rows, rename_classes=True)]


def _other_statuses(rows: Sequence[tuple[str, str]], verbose: bool, width: int) -> list[Line]:
    """Statuses this renderer does not know yet (a newer report): listed, never hidden."""
    lines: list[Line] = []
    by_status: dict[str, list[str]] = {}
    for key, status in rows:
        by_status.setdefault(status, []).append(key)
    for status, keys in by_status.items():
        lines.append(_status_line(status, len(keys), "", ""))
        lines.extend(_capped([g.text for g in fold_keys(keys)], verbose, LIST_CAP, width))
    return lines


# ------------------------------------------------------------- freeze, totals, end


def _freeze(report: Report, verbose: bool) -> list[Block]:
    """What freezing did, or would do: nothing when it froze nothing and left BatchNorm as
    it was (no ``freeze`` section), nor on a run refused before the module was touched."""
    t = report.totals
    bn = report.freeze.batchnorm
    modules = report.freeze.batchnorm_modules
    if (not t.frozen_params and bn == "keep" and not modules) or _refused(report):
        return []
    text = (
        f"frozen {format_count(t.frozen_elements)} params ({_tensors(t.frozen_params)}), "
        f"trainable {format_count(t.trainable_elements)} ({_tensors(t.trainable_params)})"
    )
    lines: list[Block] = [(("Freeze: ", TITLE), (text, ""))]
    if t.frozen_params and t.trainable_params:  # worth naming what stays trainable
        groups = [g.text for g in fold_keys(r.key for r in report.targets if r.trainable)]
        more = f", … and {len(groups) - 5} more" if len(groups) > 5 else ""
        lines.append(_indented(2, ("trainable: ", MUTED), (", ".join(groups[:5]), ""), (more, MUTED)))
    bn_text = str(bn) + (f" ({len(modules)} module{'' if len(modules) == 1 else 's'})" if modules else "")
    lines.append(_indented(2, ("batchnorm: ", MUTED), (bn_text, "")))
    if verbose and modules:
        lines.extend(_indented(4, (g.text, "")) for g in fold_keys(modules))
    return lines


def _tensors(n: int) -> str:
    return f"{n} tensor{'' if n == 1 else 's'}"


def _totals(report: Report) -> list[Block]:
    """The JSON totals: the keys of each side split into three counts that add up to it,
    the parts those counts include in parentheses, tied aliases and newer statuses after."""
    t = report.totals
    statuses = _counts(r.status for r in report.targets)
    fates = _counts(r.fate for r in report.sources)
    tied = statuses.pop(TIED, 0)
    extra_t = "".join(f"; {n} {s}" for s, n in statuses.items() if s not in (LOADED, MISSING, MISMATCHED))
    extra_t += f"; {_plural(tied, 'tied alias', 'tied aliases')}" if tied else ""
    extra_s = "".join(f"; {n} {f}" for f, n in fates.items() if f not in (USED, DROPPED, UNUSED, DUPLICATE, SKIPPED))
    used = f"{t.used} used" + (f" ({_plural(fates[DUPLICATE], 'duplicate')})" if fates.get(DUPLICATE) else "")
    unused = f"{t.unused} unused" + (f" ({fates[SKIPPED]} skipped)" if fates.get(SKIPPED) else "")
    target = f"{t.target_keys} keys: {t.loaded} loaded, {t.missing} missing, {t.mismatched} mismatched{extra_t}"
    source = f"{t.source_keys} keys: {used}, {t.dropped} dropped, {unused}{extra_s}"
    params = (
        f"{format_count(t.param_elements)} elements, {format_count(t.loaded_elements)} loaded "
        f"({format_percent(t.loaded_fraction)})"
    )
    return [
        (("Totals", TITLE),),
        _indented(2, ("target  ", MUTED), (target, "")),
        _indented(2, ("source  ", MUTED), (source, "")),
        _indented(2, ("params  ", MUTED), (params, "")),
        *_ranks(report),
    ]


def _ranks(report: Report) -> list[Block]:
    """A sharded target's load, one line per rank: ``rank 1  read 1.2 GB (its part of 140 tensors) in 3.1 s``."""
    ranks = report.stats.get("ranks") if isinstance(report.stats, Mapping) else None
    if not ranks:
        return []
    lines: list[Block] = [_indented(2, ("ranks   ", MUTED), (f"{len(ranks)}, each reading its own part", ""))]
    for r in ranks:
        text = (f"rank {r['rank']}: read {format_count(r['bytes_read'])}B in {r['seconds']:.2f} s "
                f"({r.get('box_reads', 0)} tensors as its part only, {r.get('whole_reads', 0)} read whole)")  # fmt: skip
        lines.append(_indented(4, (text, MUTED)))
    return lines


_PRECISION_BY = {"steps": "by the rules' steps", "keep_fp32": "by target.keep_fp32", "dtype": "by the dtype asked for",
                 "target": "by the target's own dtype"}  # fmt: skip


def _precision(report: Report, verbose: bool, width: int) -> list[Block]:
    """Every loaded key whose dtype changes between the checkpoint and the module, one line per
    group (``142 keys  bfloat16 -> float32  widened, by the target's own dtype``), its keys folded."""
    if not report.precision:
        return []
    total = sum(len(p.keys) for p in report.precision)
    lines: list[Block] = [((f"Precision: {_plural(total, 'key')} change dtype", TITLE),)]
    for p in report.precision:
        style = DECLARED_STYLE if p.kind != "widened" else ""
        note = f"{p.kind}, {_PRECISION_BY.get(p.by, p.by)}"
        lines.append(_indented(2, (f"{_plural(len(p.keys), 'key'):>10}  {p.source_dtype} -> {p.dtype}", style), (f"  {note}", MUTED)))
        lines.extend(_capped([g.text for g in fold_keys(p.keys)], verbose, QUIET_CAP, width, indent=6))
    return lines


def _verify(report: Report, verbose: bool = False, width: int = 100) -> list[Block]:
    """The verify section: the verdict (outputs agree, outputs DIFFER, INCONCLUSIVE), the
    numbers, the tolerances and why, the dtypes, the metrics against their thresholds, one line
    per seed when there were several, the reference, the coverage (uncovered tensors folded)
    and the first divergence."""
    v = report.verify
    if not v:
        return []
    outcome = v.get("outcome") or ("agree" if v.get("ok") else "differ")
    verdict_text, style = _VERIFY_VERDICTS.get(outcome, (outcome.upper(), FAIL_STYLE))
    detail = (f"max abs diff {v['max_abs']:.3g}, max rel diff {v['max_rel']:.3g} "
              f"(atol {v['atol']:g}, rtol {v['rtol']:g}) over {v['tensors']} tensor(s)")  # fmt: skip
    if len(v.get("seeds") or ()) > 1:
        detail += f", worst at seed {v.get('worst_seed')}"
    nan, inf, moved = v.get("nan_matched", 0), v.get("inf_matched", 0), v.get("nonfinite_mismatched", 0)
    if nan or inf:
        detail += f"; {nan} NaN and {inf} Inf position(s) matched"
    if moved:
        detail += f"; {moved} NaN/Inf position(s) differ (first at {v.get('first_mismatch')})"
    lines: list[Block] = [(("Verify", TITLE), ("  ", ""), (verdict_text, style)), _indented(2, (detail, ""))]
    lines.extend(_verify_settings(v))
    lines.extend(_verify_metrics(v.get("metrics") or {}))
    lines.extend(_verify_runs(v.get("runs") or ()))
    if v.get("reference"):
        lines.append(_indented(2, ("reference: ", MUTED), (str(v["reference"]), "")))
    lines.extend(_verify_coverage(v.get("coverage") or {}, verbose, width))
    lines.extend(_verify_divergence(v.get("divergence") or {}, verbose, width))
    return lines


_VERIFY_VERDICTS = {
    "agree": ("outputs agree", OK_STYLE),
    "differ": ("outputs DIFFER", FAIL_STYLE),
    "inconclusive": ("INCONCLUSIVE: the outputs agree, but this check does not vouch for every weight", FAIL_STYLE),
}


def _verify_settings(v: dict[str, Any]) -> list[Line]:
    """Tolerances and why, the two runs' dtypes, and what decided the verdict."""
    lines: list[Line] = []
    tolerances = v.get("tolerances") or {}
    if tolerances.get("why"):
        lines.append(_indented(2, ("tolerances: ", MUTED), (tolerances["why"], "")))
    dtypes = v.get("dtypes") or {}
    if dtypes:
        text = f"source {dtypes.get('source')}, target {dtypes.get('target')}; compared in {dtypes.get('compared_in', 'float64')}"
        devices = v.get("devices") or {}
        if devices and (devices.get("source"), devices.get("target")) != ("cpu", "cpu"):
            text += f"; devices: source {devices.get('source')}, target {devices.get('target')}"
        lines.append(_indented(2, ("dtypes: ", MUTED), (text, "")))
    by = v.get("verdict_by")
    if by == "metrics":
        lines.append(_indented(2, ("verdict by: ", MUTED), ("the metrics (atol/rtol measured, not part of the verdict: none in the rules)", "")))
    elif by == "tolerances and metrics":
        lines.append(_indented(2, ("verdict by: ", MUTED), ("atol/rtol (given in the rules) and the metrics", "")))
    return lines


def _verify_metrics(m: dict[str, Any]) -> list[Line]:
    """One line per metric: its value, its threshold, passed or FAILED, and where the threshold came from."""
    want, passed, why = m.get("thresholds") or {}, m.get("passed") or {}, m.get("why") or {}
    if not want:
        return []
    rows: list[tuple[str, str]] = []
    if "kl" in want:
        rows.append(("kl", f"kl divergence {m['kl']:.3g} (the worst of {m.get('positions')} position(s); mean {m['kl_mean']:.3g}), "
                           f"at most {want['kl']:g}"))  # fmt: skip
    if "top1" in want:
        rows.append(("top1", f"top-1 agreement {m['top1_agreement']:.4g}, at least {want['top1']:g}"))
    if "topk" in want:
        k = str(want["topk"]["k"])
        rows.append(("topk", f"top-{k} agreement {m['topk_agreement'][k]:.4g}, at least {want['topk']['min']:g}"))
    if "greedy" in want:
        first = m.get("greedy_first_mismatch")
        at = "" if first is None else f" (first mismatch at new token {first})"
        rows.append(("greedy", f"greedy decoding: {m['greedy_match']} of {m['greedy_tokens']} new tokens agree{at}, at least {want['greedy']['min']}"))
    lines: list[Line] = [_indented(2, ("metrics:", MUTED))]
    for name, text in rows:
        ok = passed.get(name, True)
        lines.append(_indented(4, (text, ""), (": ", ""), ("ok" if ok else "FAILED", OK_STYLE if ok else FAIL_STYLE),
                               (f"  ({why[name]})" if why.get(name) else "", MUTED)))  # fmt: skip
    return lines


def _verify_runs(runs: Sequence[dict[str, Any]]) -> list[Line]:
    """One line per seed when there were several: its outcome and numbers."""
    lines: list[Line] = []
    for r in runs:
        outcome = r.get("outcome", "agree")
        text = f"max abs diff {r['max_abs']:.3g}, max rel diff {r['max_rel']:.3g}"
        metrics = r.get("metrics") or {}
        if "kl" in metrics:
            text += f"; kl {metrics['kl']:.3g}"
        if "top1_agreement" in metrics:
            text += f"; top-1 {metrics['top1_agreement']:.4g}"
        for k, value in (metrics.get("topk_agreement") or {}).items():
            text += f"; top-{k} {value:.4g}"
        if "greedy_match" in metrics:
            text += f"; greedy {metrics['greedy_match']}/{metrics['greedy_tokens']}"
        word, style = ("agree", OK_STYLE) if outcome == "agree" else (outcome.upper(), FAIL_STYLE)
        lines.append(_indented(2, (f"seed {r.get('seed')}: ", MUTED), (word, style), (f", {text}", "")))
    return lines


def _verify_coverage(c: dict[str, Any], verbose: bool, width: int) -> list[Line]:
    """Which loaded tensors the outputs depend on: the uncovered ones folded, the declared
    ones counted, the unmeasurable ones by reason, and a warning when the outputs barely depend
    on the input."""
    if not c:
        return []
    declared = list(c.get("declared") or ())
    uncovered = [k for k in c.get("uncovered") or () if k not in set(declared)]
    unmeasurable = _verify_by_reason(c.get("unmeasurable") or ())
    head = f"{c.get('checked', 0)} tensor(s) checked by {c.get('method', '?')}: {len(uncovered)} uncovered"
    head += f", {len(declared)} declared in verify.uncovered" if declared else ""
    head += f", {sum(len(k) for k in unmeasurable.values())} unmeasurable" if unmeasurable else ""
    lines: list[Line] = [_indented(2, ("coverage: ", MUTED), (head, FAIL_STYLE if uncovered else ""))]
    if uncovered:
        lines.append(_indented(4, ("uncovered (the outputs do not depend on them):", FAIL_STYLE)))
        lines.extend(_capped([g.text for g in fold_keys(uncovered, numbered=True)], verbose, LIST_CAP, width, indent=6))
    if declared:
        groups = [g.text for g in fold_keys(declared, numbered=True)]
        lines.append(_indented(4, ("declared: ", MUTED), (", ".join(groups[:5]), ""), (f", … and {len(groups) - 5} more" if len(groups) > 5 else "", MUTED)))
    for reason, keys in unmeasurable.items():
        label = f"unmeasurable ({reason}): " if reason else "unmeasurable: "
        lines.append(_indented(4, (label, MUTED), (", ".join(g.text for g in fold_keys(keys, numbered=True)), "")))
    if c.get("input_sensitive") is False:
        lines.append(_indented(2, ("warning: ", DECLARED_STYLE), (f"the outputs barely depend on the input (two inputs give outputs "
                                                                  f"within {c.get('input_spread', 0):.3g}): this check proves little", "")))  # fmt: skip
    return lines


def _verify_by_reason(items: Iterable[Any]) -> dict[str, list[str]]:
    """Unmeasurable tensors by reason: each item a key, a [key, reason] pair or {key, reason}."""
    out: dict[str, list[str]] = {}
    for item in items:
        if isinstance(item, dict):
            key, reason = str(item.get("key")), str(item.get("reason") or "")
        elif isinstance(item, (list, tuple)):
            key, reason = str(item[0]), str(item[1]) if len(item) > 1 else ""
        else:
            key, reason = str(item), ""
        out.setdefault(reason, []).append(key)
    return out


def _verify_divergence(d: dict[str, Any], verbose: bool, width: int) -> list[Line]:
    """The first module pair whose outputs diverge (with what fed it), how many pairs were
    compared, and how many modules had no partner."""
    if not d:
        return []
    lines: list[Line] = []
    first = d.get("first")
    if first:
        text = f"target {first['target'] or '(the whole model)'} <- source {first['source'] or '(the whole model)'} (max abs {first['max_abs']:.3g}, max rel {first['max_rel']:.3g})"
        if first.get("ops"):
            text += f"; weights through {', '.join(first['ops'])}"
        lines.append(_indented(2, ("first divergence: ", FAIL_STYLE), (text, "")))
        if first.get("keys"):
            fed = ", ".join(g.text for g in fold_keys(first["keys"]))
            if first.get("sources"):
                fed += " <- " + ", ".join(g.text for g in fold_keys(first["sources"]))
            lines.extend(_capped([fed], verbose, LIST_CAP, width, indent=4))
    unpaired = d.get("unpaired") or {}
    counts = {side: (n if isinstance(n, int) else len(n or ())) for side, n in ((s, unpaired.get(f"{s}_count", unpaired.get(s))) for s in ("target", "source"))}
    text = f"{d.get('compared', 0)} module pair(s) compared in execution order" + ("" if first else ", none diverges")
    if counts["target"] or counts["source"]:
        text += f"; no partner: {counts['target']} target, {counts['source']} source module(s)"
    lines.append(_indented(2, ("divergence: ", MUTED), (text, "")))
    return lines


def _optimizer(section: OptimizerReport | None, verbose: bool, width: int) -> list[Block]:
    """The optimizer's state, grouped as the keys are: the new optimizer's parameters by
    status (loaded ones by how their name changed, reset and failed ones by why), then the
    saved parameters by fate, the param groups, what was passed through, and the notes."""
    if section is None:
        return []
    src = section.source
    where = f'key "{src["key"]}"' if src.get("kind") == "key" else str(src.get("path") or src.get("kind") or "state_dict")
    if src.get("kind") == "file" and src.get("key"):
        where += f' (key "{src["key"]}")'
    names = "saved param_names" if section.names == "param_names" else "source.model's parameter order"
    hparams = "the new optimizer's" if section.hparams == "new" else "the checkpoint's"
    head = f"state from {where}{', detected' if src.get('detected') else ''}; names: {names}; hparams: {hparams}"
    lines: list[Block] = [(("Optimizer: ", TITLE), (section.optimizer, TITLE), ("  ", ""), (head, MUTED))]
    loaded = [t for t in section.targets if t.status == OPT_LOADED]
    entries = ", ".join(dict.fromkeys(k for t in loaded for k in t.state))
    lines.append(_status_line("loaded", len(loaded), entries, OK_STYLE))
    lines.extend(_loaded_lines(loaded, verbose, width))  # type: ignore[arg-type]  # key, sources and ops, as a TargetRecord's
    for status, style in ((OPT_RESET, DECLARED_STYLE), (OPT_FAILED, FAIL_STYLE)):
        these = [t for t in section.targets if t.status == status]
        if these:
            lines.append(_status_line(status, len(these), "", style))
            lines.extend(_capped(_by_reason(these), verbose, LIST_CAP, width))
    fates = _counts(r.fate for r in section.sources)
    summary = ", ".join(f"{fates.get(f, 0)} {f}" for f in (USED, OPT_DISCARDED, OPT_STATELESS, OPT_FAILED) if fates.get(f) or f != OPT_FAILED)
    lines.append(_status_line("saved", len(section.sources), summary, MUTED))
    for fate, style in ((OPT_DISCARDED, DECLARED_STYLE), (OPT_FAILED, FAIL_STYLE)):
        these = [r for r in section.sources if r.fate == fate]
        if these:
            lines.append(_indented(4, (f"{fate} {len(these)}", style)))
            lines.extend(_capped(_by_reason(these), verbose, LIST_CAP, width, indent=6))
    stateless = [r for r in section.sources if r.fate == OPT_STATELESS]
    if stateless and verbose:
        lines.append(_indented(4, (f"stateless {len(stateless)} (never stepped)", MUTED)))
        lines.extend(_capped([g.text for g in fold_keys(r.key for r in stateless)], verbose, LIST_CAP, width, indent=6))
    for g in section.groups:
        text = f"group {g.index}: {g.params} params, hparams from the {'new optimizer' if g.hparams_from == 'new' else 'checkpoint'}"
        if g.differs:
            text += f" (differs from the checkpoint: {', '.join(g.differs)})"
        lines.append(_indented(2, (text, MUTED)))
    for p in section.passthrough:
        name = p.name if p.name == p.role else f"{p.name} ({p.role})"
        text = f"{name}: {p.description} ({'loaded into the scheduler' if p.loaded else 'handed back'})"
        lines.append(_indented(2, ("passed through: ", MUTED), (text, "")))
    lines.extend(_indented(2, ("note: ", MUTED), (note, "")) for note in section.notes)
    return lines


def _by_reason(records: Sequence[Any]) -> list[str]:
    """``reason: folded keys``, one line per reason, in order of first appearance."""
    by: dict[str, list[str]] = {}
    for r in records:
        by.setdefault(r.reason or "", []).append(r.key)
    return [f"{reason}: {', '.join(g.text for g in fold_keys(keys))}" if reason else ", ".join(g.text for g in fold_keys(keys))
            for reason, keys in by.items()]  # fmt: skip


def _counts(values: Iterable[str]) -> dict[str, int]:
    """How often each value occurs, in order of first occurrence."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return counts


def _plural(n: int, word: str, plural: str | None = None) -> str:
    """``1 duplicate``, ``2 duplicates``, ``2 tied aliases``."""
    return f"{n} {word if n == 1 else plural or word + 's'}"


def _warnings(warnings: Sequence[str]) -> list[Block]:
    if not warnings:
        return []
    lines: list[Block] = [((f"Warnings ({len(warnings)})", f"bold {DECLARED_STYLE}"),)]
    for w in warnings:
        lines.extend(_message_lines(w, DECLARED_STYLE))
    return lines


def _failures(report: Report, verbose: bool) -> list[Block]:
    if not report.failures:
        return []
    lines: list[Block] = [((f"Failures ({len(report.failures)})", FAIL_STYLE),)]
    for f in report.failures:
        lines.extend(_message_lines(f.message if verbose else _cap_message(f.message), "", label=f.kind))
        if verbose and f.keys:
            lines.append(_indented(4, ("keys: ", MUTED), (", ".join(g.text for g in fold_keys(f.keys)), "")))
    return lines


def _cap_message(message: str, keep: int = 6) -> str:
    """A long failure message (a list of key groups) cut to ``keep`` lines; hints and advice stay."""
    first, *rest = message.rstrip("\n").split("\n")
    body = [line for line in rest if line.startswith("  ")]
    if len(body) <= keep + 2:
        return message
    tail = [line for line in rest if not line.startswith("  ")]
    more = f"  … and {len(body) - keep} more (-v shows all)"
    return "\n".join([first, *body[:keep], more, *tail])


def _message_lines(message: str, style: str, *, label: str | None = None) -> list[Line]:
    """A message's lines (split at its own ``\\n`` only: a vertical tab or U+2028 in a
    name is escaped, never a line break)."""
    first, *rest = message.rstrip("\n").split("\n")
    head: Line = ((f"{label}: ", FAIL_STYLE),) if label else ()
    lines: list[Line] = [_indented(2, *head, (first, style))]
    lines.extend(_indented(4, (more, style)) for more in rest)
    return lines


# ---------------------------------------------------------------- shared helpers


def _status_line(word: str, count: int, note: str, style: str) -> Line:
    spans: list[Span] = [("  ", ""), (f"{word:<10}", style), (f" {count:>5}", style)]
    if note:
        spans.append((f"  {note}", style if style in (FAIL_STYLE, DECLARED_STYLE) else MUTED))
    return tuple(spans)


def _declared_word(declared: bool) -> str:
    return "declared" if declared else "not declared"


def _decl_style(declared: bool) -> str:
    return DECLARED_STYLE if declared else FAIL_STYLE


def _indented(n: int, *spans: Span) -> Line:
    return ((" " * n, ""), *spans)


def _capped(texts: Sequence[str], verbose: bool, cap: int, width: int, *, indent: int = 4) -> list[Line]:
    """One line per text (too long ones broken before their arrow), cut at ``cap`` unless verbose."""
    return _capped_entries([(indent, t, "") for t in texts], verbose, cap, width)


def _capped_entries(entries: Sequence[tuple[int, str, str]], verbose: bool, cap: int, width: int) -> list[Line]:
    shown = entries if verbose or len(entries) <= cap + 1 else entries[:cap]
    lines: list[Line] = []
    for indent, text, style in shown:
        lines.extend(_indented(indent, (part, style)) for part in _wrap_arrow(text, width - indent))
    if len(shown) < len(entries):
        indent = entries[len(shown)][0]
        lines.append(_indented(indent, (f"… and {len(entries) - len(shown)} more (verbose shows all)", MUTED)))
    return lines


def _wrap_arrow(text: str, width: int) -> list[str]:
    if len(text) <= width:
        return [text]
    for arrow in (" <- ", " -> ", " = "):
        left, found, right = text.partition(arrow)
        if found:
            return [left, "  " + found.strip() + " " + right]
    return [text]


@dataclass(frozen=True)
class _Pair:
    """A group of keys, the folded groups of the keys they pair with, and a shared extra."""

    group: KeyGroup
    others: tuple[KeyGroup, ...]
    extra: Any
    cls: Hashable = None


def _pair_groups(rows: Sequence[tuple[str, tuple[str, ...], Hashable]], *, rename_classes: bool = False) -> list[_Pair]:
    """Fold keys that share ``extra`` (and, with ``rename_classes``, the same rename), then
    fold the keys each group pairs with: ``a.{0..3}.w <- module.a.{0..3}.w``.

    Splitting by rename first keeps ``bn.{bias, weight} <- bn.{beta, gamma}`` from
    hiding which name became which.
    """
    order = {key: i for i, (key, _, _) in enumerate(rows)}
    partitions: dict[Hashable, list[tuple[str, tuple[str, ...]]]] = {}
    for key, others, extra in rows:
        partitions.setdefault((extra, _pair_class(key, others, rename_classes)), []).append((key, others))
    pairs: list[_Pair] = []
    for (extra, cls), members in partitions.items():
        partners = dict(members)
        for group in fold_keys(k for k, _ in members):
            others = [o for k in group.keys for o in partners[k]]
            pairs.append(_Pair(group, tuple(fold_keys(others)), extra, cls))
    pairs.sort(key=lambda p: order[p.group.keys[0]])
    return pairs


def _pair_class(key: str, others: tuple[str, ...], rename_classes: bool) -> Hashable:
    if len(others) != 1:
        return "none" if not others else "many"
    if others[0] == key:
        return "same"
    return _rename_class(others[0], key) if rename_classes else "one"


def _arrow_text(pair: _Pair, arrow: str, joiner: str = ", ") -> str:
    """``group <arrow> partners``, or the group alone when the names did not change."""
    return pair.group.text if pair.cls in ("same", "none") else _pair_text(pair, arrow, joiner)


def _pair_text(pair: _Pair, arrow: str, joiner: str = ", ") -> str:
    return pair.group.text + arrow + joiner.join(g.text for g in pair.others)


def _rename_class(old: str, new: str) -> tuple[str, str, bool, bool]:
    """What changed between two dotted names: the differing middle and whether a common
    prefix / suffix surrounds it (``module.a.w`` -> ``a.w``: ``("module", "", False, True)``).
    An index carried over unchanged (the same number, in the same order among the
    indices) is ``#``, so that the keys of every layer share one class and fold together;
    an index that changes stays as it is, so no fold hides which became which.

    >>> _rename_class("model.layers.7.q_proj.w", "chunks.0.layers.7.wq.w")
    ('model.layers.#.q_proj', 'chunks.0.layers.#.wq', False, True)
    >>> _rename_class("layers.0.w", "layers.1.w")
    ('0', '1', True, True)
    """
    a, b = _carried(old.split("."), new.split("."))
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    q = 0
    while q < min(len(a), len(b)) - p and a[-1 - q] == b[-1 - q]:
        q += 1
    return ".".join(a[p : len(a) - q]), ".".join(b[p : len(b) - q]), p > 0, q > 0


def _carried(a: list[str], b: list[str]) -> tuple[list[str], list[str]]:
    """``a`` and ``b`` with the indices of ``a`` found again, in order, in ``b`` as ``#``:
    of several equal candidates, the one after the same name (``layers.7``) is taken.

    >>> _carried("model.layers.0.w".split("."), "chunks.0.layers.0.w".split("."))
    (['model', 'layers', '#', 'w'], ['chunks', '0', 'layers', '#', 'w'])
    """
    from bisect import bisect_left

    a, b = list(a), list(b)
    by_part: dict[str, list[int]] = {}  # where each index sits in b, ascending (and after which name)
    by_pair: dict[tuple[str, str], list[int]] = {}
    for j, part in enumerate(b):
        if part.isascii() and part.isdigit():
            by_part.setdefault(part, []).append(j)
            if j:
                by_pair.setdefault((b[j - 1], part), []).append(j)
    at, last = 0, -2  # last: where the previous index was found in b (it reads "#" now)
    for i, part in enumerate(a):
        if not (part.isascii() and part.isdigit()):
            continue
        j = _after_same_name(by_pair.get((a[i - 1], part), []), at, last, bisect_left) if i else None
        if i and a[i - 1] == "#" and at == last + 1 and at < len(b) and b[at] == part:
            j = at  # right after the index just carried, which reads "#" as a[i - 1] does
        j = _first_from(by_part.get(part, []), at, bisect_left) if j is None else j
        if j is None:
            continue
        a[i] = b[j] = "#"
        at, last = j + 1, j
    return a, b


def _after_same_name(positions: list[int], at: int, last: int, bisect_left: Any) -> int | None:
    """The first of ``positions`` (ascending, each after the wanted name in the original
    ``b``) at or after ``at``, skipping the one right after ``last``, which now follows a ``#``."""
    k = bisect_left(positions, at)
    if k < len(positions) and positions[k] == last + 1:
        k += 1
    return positions[k] if k < len(positions) else None


def _first_from(positions: list[int], at: int, bisect_left: Any) -> int | None:
    """The first of the ascending ``positions`` at or after ``at`` (a key of thousands of
    components is searched in log time, not by a scan per index)."""
    k = bisect_left(positions, at)
    return positions[k] if k < len(positions) else None


def _class_text(cls: tuple[str, str, bool, bool]) -> str:
    """A rename class as text: ``("module", "", False, True)`` -> ``module.* -> *``.

    >>> _class_text(_rename_class("blocks.0.attn.w", "blocks.0.attention.w"))
    '*.attn.* -> *.attention.*'
    """
    mid_old, mid_new, prefix, suffix = cls

    def side(mid: str) -> str:
        return ".".join((["*"] if prefix else []) + ([mid] if mid else []) + (["*"] if suffix else []))

    return f"{side(mid_old)} -> {side(mid_new)}"


# ------------------------------------------------------------------------ output


def _plain_lines(blocks: Sequence[Block], width: int) -> list[str]:
    return ["".join(text for text, _ in line).rstrip() for line in _lines(blocks, width)]


def _lines(blocks: Sequence[Block], width: int) -> list[Line]:
    """The blocks as lines, every text :func:`~remap.report.grouping.printable` (names, paths,
    patterns and messages come from files: none may reach a terminal with an escape
    sequence or a line break of its own), before tables measure their columns."""
    out: list[Line] = []
    for block in blocks:
        if isinstance(block, _Table):
            rows = tuple(_printable_spans(row) for row in block.rows)
            out.extend(_table_lines(_Table(block.columns, block.justify, rows, block.indent), width))
        else:
            out.append(_printable_spans(block))
    return out


def _printable_spans(line: Sequence[Span]) -> tuple[Span, ...]:
    return tuple((printable(text), style) for text, style in line)


def _table_lines(table: _Table, width: int) -> list[Line]:
    """Aligned columns; the second (free-text) column is cut so the columns before the
    last (a note, never cut) fit in ``width``."""
    header = tuple((title, MUTED) for title in table.columns)
    rows = [header, *table.rows]
    widths = [max(len(row[i][0]) for row in rows) for i in range(len(table.columns))]
    fixed = table.indent + sum(widths[:-1]) - widths[1] + 2 * (len(widths) - 1)
    widths[1] = min(widths[1], max(width - fixed, 12))
    lines: list[Line] = []
    for row in rows:
        spans: list[Span] = [(" " * table.indent, "")]
        for i, (text, style) in enumerate(row):
            if len(text) > widths[i]:
                text = text[: widths[i] - 1] + "…"
            cell = text.rjust(widths[i]) if table.justify[i] == "right" else text.ljust(widths[i])
            spans.extend([("  ", "")] if i else [])
            spans.append((cell, style))
        lines.append(tuple(spans))
    return lines


def _rich_text(line: Line) -> Any:
    from rich.text import Text

    text = Text.assemble(*[(t, style) if style else t for t, style in line]) if line else Text("")
    text.rstrip()
    return text
