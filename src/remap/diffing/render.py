"""Drawing an :class:`~remap.diffing.alignment.Alignment` for people: plain text, or rich on a terminal.

One document, in this order: a header, what lines up (one row per family of keys, folded
with :mod:`remap.report.grouping`, with its evidence), shape conflicts and the ops that could fix
them, ambiguities (shown as choices), what is left on each side, and a summary line.

>>> from remap.diffing.alignment import align
>>> src = {"module.fc.weight": [2, 4], "module.fc.bias": [2], "x": [3]}
>>> print(format_alignment(align(src, {"fc.weight": [2, 4], "fc.bias": [2], "y": [5]})))
remap diff: a state_dict (3 tensors) -> a mapping (3 keys)
  prefix: strip 'module.' (2 keys)
<BLANKLINE>
Aligned: 2 of 3 source keys -> 2 of 3 target keys
  evidence  keys  source -> target
  prefix       2  module.* -> *  (strip 'module.')
<BLANKLINE>
Source only (1): no target key takes them
  x  [3]
<BLANKLINE>
Target only (1): nothing would load them
  y  [5]
<BLANKLINE>
2 paired (2 prefix); 0 shape conflicts; 0 ambiguous; 1 source only; 1 target only

Colour lives only in :func:`print_alignment`; :func:`format_alignment` never emits ANSI codes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .alignment import Alignment, Pair, tokens as index_tokens
from ..report.grouping import fold_keys, group_keys, printable

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["format_alignment", "print_alignment", "summary_line", "fold", "ROW_CAP"]

ROW_CAP = 40  # rows per section when not verbose

Span = tuple[str, str]
Line = tuple[Span, ...]

STYLES = {"exact": "green", "prefix": "green", "suffix": "green", "offset": "green", "structure": "cyan",
          "module": "cyan", "graph": "cyan", "shape": "yellow"}  # fmt: skip


def format_alignment(alignment: Alignment, *, verbose: bool = False) -> str:
    """The alignment as plain text (no ANSI codes)."""
    return "\n".join("".join(text for text, _ in line).rstrip() for line in _shown(alignment, verbose))


def print_alignment(alignment: Alignment, *, console: Console | None = None, verbose: bool = False) -> None:
    """The content of :func:`format_alignment`, coloured by evidence and status."""
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    for line in _shown(alignment, verbose):
        text = Text()
        for part, style in line:
            text.append(part, style=style or None)
        console.print(text, soft_wrap=True)


def summary_line(alignment: Alignment) -> str:
    """``32 paired (24 order, 2 prefix, ...); 0 shape conflicts; 0 ambiguous; 0 source only; 0 target only``"""
    counts = alignment.counts()
    by = f" ({', '.join(f'{n} {e}' for e, n in counts.items())})" if counts else ""
    n_conf = len(alignment.conflicts)
    amb = sum(len(c.sources) for c in alignment.choices)
    return (f"{len(alignment.pairs)} paired{by}; {n_conf} shape conflict{'' if n_conf == 1 else 's'}; {amb} ambiguous; "
            f"{len(alignment.source_only)} source only; {len(alignment.target_only)} target only")  # fmt: skip


# --------------------------------------------------------------------------- document

_MARK = "\x00"
_UNDERSCORE_INDEX = re.compile(r"(^|\.)([^.]*_)(0|[1-9][0-9]*)(?=\.|$)")


def fold(keys: Iterable[str]) -> list[str]:
    """:func:`~remap.report.grouping.group_keys`, also folding indices that end a name after an
    underscore (torchvision's ``encoder_layer_3``), as :func:`~remap.diffing.alignment.index_tokens` reads them.

    >>> fold(f"encoder.layers.encoder_layer_{i}.ln_1.{p}" for i in range(3) for p in ("weight", "bias"))
    ['encoder.layers.encoder_layer_{0..2}.ln_1.{bias, weight}']
    """
    marked = [_marked(k) for k in keys]
    return [g.text.replace(_MARK + ".", "") for g in fold_keys(marked, escape=False)]


def _marked(key: str) -> str:
    """``key`` as people see it (:func:`~remap.report.grouping.printable`: no control characters,
    so none is mistaken for the marker), with ``_MARK.`` before an index that ends a name
    after an underscore, so that grouping folds it like a dotted index."""
    return _UNDERSCORE_INDEX.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MARK}.{m.group(3)}", printable(key))



def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _skeleton(key: str) -> str:
    return "".join("#" if idx else text for text, idx in index_tokens(key))


def _row_key(p: Pair) -> tuple[Any, ...]:
    if p.evidence == "prefix":  # one row per prefix change: module.* -> *
        return (p.evidence, p.detail, None, None, "prefix")
    s_parent, _, s_leaf = p.source.rpartition(".")
    t_parent, _, t_leaf = p.target.rpartition(".")
    if s_leaf == t_leaf and s_parent and t_parent:
        return (p.evidence, p.detail, _skeleton(s_parent), _skeleton(t_parent), None)
    return (p.evidence, p.detail, _skeleton(p.source), _skeleton(p.target), 0)


def _rows(pairs: Sequence[Pair], changes: Sequence[Any] = (), source: Sequence[str] = ()) -> list[tuple[str, int, str, str]]:
    """(evidence, keys, 'sources -> targets', detail), one per family, in source order; a prefix
    change that pairs most of the keys it could is one row (``module.* -> *``)."""
    groups: dict[tuple[Any, ...], list[Pair]] = {}
    for p in pairs:
        groups.setdefault(_row_key(p), []).append(p)
    out = []
    for (evidence, detail, *_, kind), ps in groups.items():
        change = next((c for c in changes if c.describe() == detail), None) if kind == "prefix" else None
        if change is not None and len(ps) > 1 and 2 * len(ps) >= sum(k.startswith(change.strip) for k in source):
            out.append((evidence, len(ps), f"{change.strip}* -> {change.add}*", detail))
            continue
        src = ", ".join(fold(p.source for p in ps))
        tgt = ", ".join(fold(p.target for p in ps))
        out.append((evidence, len(ps), f"{src} -> {tgt}", detail))
    return out


def _shown(a: Alignment, verbose: bool) -> list[Line]:
    """The document with every span made :func:`~remap.report.grouping.printable`: names come from
    checkpoints, and a name must not reach the terminal with an escape sequence or a line break."""
    return [tuple((printable(text), style) for text, style in line) for line in _document(a, verbose)]


def _document(a: Alignment, verbose: bool) -> list[Line]:
    sd, td = a.source_description, a.target_description
    n_src, n_tgt = len(a.source), len(a.target) - len(a.tied)
    lines: list[Line] = [
        (("remap diff: ", "bold"), (f"{sd.get('text', 'a state_dict')} ({n_src} tensors)", ""), (" -> ", "dim"),
         (f"{td.get('text', 'a mapping')} ({n_tgt} keys)", "")),  # fmt: skip
    ]
    if sd.get("detected_key"):
        lines.append((("  weights found under ", "dim"), (f"'{sd['detected_key']}'", ""), (" in the checkpoint", "dim")))
    for note in td.get("notes") or ():
        lines.append((("  target: ", "dim"), (note, "")))
    if a.prefixes:
        text = ", ".join(f"{p.describe()} ({p.keys} key{'' if p.keys == 1 else 's'})" for p in a.prefixes)
        lines.append((("  prefix: ", "dim"), (text, "")))
    lines += _aligned(a, verbose)
    lines += _conflicts(a, verbose)
    lines += _choices(a, verbose)
    lines += _regroups(a, verbose)
    if a.notes:
        lines += [(), (("Notes", "bold"),)] + [(("  ", ""), (n, "yellow")) for n in a.notes]
    lines += _leftover(a.source_only, a.source, "Source only", "no target key takes them", verbose)
    lines += _leftover(a.target_only, a.target, "Target only", "nothing would load them", verbose)
    lines += [(), ((summary_line(a), "bold"),)]
    return lines


def _capped(rows: list[Line], verbose: bool) -> list[Line]:
    if verbose or len(rows) <= ROW_CAP:
        return rows
    return rows[:ROW_CAP] + [((f"  ... and {len(rows) - ROW_CAP} more rows (-v shows every row)", "dim"),)]


def _aligned(a: Alignment, verbose: bool) -> list[Line]:
    tied = set(a.tied)
    paired_t = sum(p.target not in tied for p in a.pairs)
    n_tgt = len(a.target) - len(a.tied)
    lines: list[Line] = [(), ((f"Aligned: {len(a.pairs)} of {len(a.source)} source keys -> {paired_t} of {n_tgt} target keys", "bold"),)]
    if not a.pairs:
        return lines
    exact = [p for p in a.pairs if p.evidence == "exact"]
    rows: list[tuple[str, int, str, str]] = []
    if exact:
        rows.append(("exact", len(exact), f"{len(exact)} key{'' if len(exact) == 1 else 's'} with the same name on both sides", ""))
    rows += _rows([p for p in a.pairs if p.evidence != "exact"], a.prefixes, list(a.source))
    width = max(len("evidence"), *(len(r[0]) for r in rows))
    count = max(len("keys"), *(len(str(r[1])) for r in rows))
    lines.append(((f"  {'evidence'.ljust(width)}  {'keys'.rjust(count)}  source -> target", "dim"),))
    body: list[Line] = []
    for evidence, n, text, detail in rows:
        spans: list[Span] = [("  ", ""), (evidence.ljust(width), STYLES.get(evidence, "")), (f"  {str(n).rjust(count)}  ", ""), (text, "")]
        if detail and evidence != "exact":
            spans.append((f"  ({detail})", "dim"))
        body.append(tuple(spans))
        if evidence == "exact" and verbose:
            body += [((f"  {' ' * width}  {' ' * count}    {g}", "dim"),) for g in group_keys(p.source for p in exact)]
    return lines + _capped(body, verbose)


def _conflicts(a: Alignment, verbose: bool) -> list[Line]:
    conflicts = a.conflicts
    if not conflicts:
        return []
    groups: dict[tuple[Any, ...], list[Pair]] = {}
    for p in conflicts:
        groups.setdefault((_skeleton(p.source), _skeleton(p.target), p.source_shape, p.target_shape), []).append(p)
    what = "shapes or layouts" if any(p.source_shape == p.target_shape for p in conflicts) else "shapes"  # a square weight stored transposed
    lines: list[Line] = [(), ((f"Shape conflicts ({len(conflicts)}): paired, but the {what} differ", "bold"),)]
    body: list[Line] = []
    for (_, _, ss, ts), ps in groups.items():
        c = ps[0].conflict
        if c is None:  # only pairs with a conflict are grouped here
            continue
        src = ", ".join(fold(p.source for p in ps))
        tgt = ", ".join(fold(p.target for p in ps))
        ops = "; ".join(c.ops) if c.ops else "no single op fixes it"
        note = f"  [--write adds a {c.fix if c.fix != 'permute' else 'transpose'} step]" if c.fix else "  [--write leaves it unloaded]"
        body.append((("  ", ""), (f"{src} {_shape(ss)} -> {tgt} {_shape(ts)}", ""), (f": {ops}", "yellow"), (note, "dim")))
    return lines + _capped(body, verbose)


def _choices(a: Alignment, verbose: bool) -> list[Line]:
    if not a.choices:
        return []
    n = sum(len(c.sources) for c in a.choices)
    lines: list[Line] = [(), ((f"Ambiguous ({n}): never guessed; choose, then write the rename yourself", "bold"),)]
    body: list[Line] = []
    for c in a.choices:
        src = ", ".join(fold(c.sources))
        tgt = ", ".join(fold(c.targets))
        body.append((("  ", ""), (f"{src} {_shape(c.shape)}", ""), (" -> one of: ", "yellow"), (tgt, "")))
    return lines + _capped(body, verbose)


def regroup_rows(a: Alignment, *, named: bool = False) -> list[tuple[str, str, str]]:
    """The merge/split candidates (``named``: the splits and merges whose fused name gives
    the order of the parts, which ``--write`` writes), one row per family: (sources,
    targets, what op)."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    for r in a.regroups:
        if bool(r.detail) == named:
            groups.setdefault((r.kind, r.dim, tuple(_skeleton(k) for k in r.sources), tuple(_skeleton(k) for k in r.targets)), []).append(r)
    return [(", ".join(fold(k for r in rs for k in r.sources)), ", ".join(fold(k for r in rs for k in r.targets)), rs[0].describe())
            for rs in groups.values()]  # fmt: skip


def _regroups(a: Alignment, verbose: bool) -> list[Line]:
    lines: list[Line] = []
    named = [r for r in a.regroups if r.detail]
    if named:
        lines += [(), ((f"Split or merged ({len(named)}): one key is several on the other side, its name lists the parts in order", "bold"),)]
        details: dict[tuple[Any, ...], str] = {}
        for r in named:  # one detail per family (grouped as regroup_rows groups), without the instance
            key = (r.kind, r.dim, tuple(_skeleton(k) for k in r.sources), tuple(_skeleton(k) for k in r.targets))
            details.setdefault(key, r.detail.split(" in '")[0])
        body = [(("  ", ""), (f"{src} -> {tgt}", ""), (f": {op}", "green"), (f"  ({detail})", "dim"))
                for (src, tgt, op), detail in zip(regroup_rows(a, named=True), details.values())]  # fmt: skip
        lines += _capped(body, verbose)
    rest = [r for r in a.regroups if not r.detail]
    if rest:
        lines += [(), ((f"Merge or split candidates ({len(rest)}): left unloaded; one key is several on the other side", "bold"),)]
        body = [(("  ", ""), (f"{src} -> {tgt}", ""), (f": {op}", "yellow"), ("  [the order of the parts is yours to check]", "dim"))
                for src, tgt, op in regroup_rows(a)]  # fmt: skip
        lines += _capped(body, verbose)
    return lines


def _leftover(keys: Sequence[str], meta: Any, title: str, note: str, verbose: bool) -> list[Line]:
    if not keys:
        return []
    lines: list[Line] = [(), ((f"{title} ({len(keys)}): {note}", "bold"),)]
    body: list[Line] = []
    marked: dict[str, list[str]] = {}  # two keys may read the same once escaped: both are counted
    for k in keys:
        marked.setdefault(_marked(k), []).append(k)
    for g in fold_keys(marked, escape=False):
        originals = [k for m in g.keys for k in marked[m]]
        shapes = {tuple(meta[k].shape) for k in originals}
        shape = f"  {_shape(next(iter(shapes)))}" if len(shapes) == 1 else f"  ({len(originals)} keys)"
        body.append((("  ", ""), (g.text.replace(_MARK + ".", ""), ""), (shape, "dim")))
    return lines + _capped(body, verbose)
