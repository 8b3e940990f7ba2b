"""Folding long lists of dotted keys so that a person can read them.

Two folds, the way fvcore prints ``backbone.conv1.{bias, weight}`` and transformers
prints ``layers.{0...31}``:

1. keys that differ only in their last component fold into ``prefix.{a, b}``;
2. keys (or groups) that differ only in one integer component fold into
   ``layers.{0..11}.attn.qkv.{bias, weight}``, but only when everything else is the
   same for every index, so a folded line never claims a key that does not exist.

>>> group_keys(["conv1.weight", "bn1.weight", "bn1.bias"])
['conv1.weight', 'bn1.{bias, weight}']
>>> group_keys(f"layers.{i}.attn.qkv.{p}" for i in range(12) for p in ("weight", "bias"))
['layers.{0..11}.attn.qkv.{bias, weight}']

Groups come out in the order their first key came in. Nothing here imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["KeyGroup", "fold_keys", "group_keys", "group_counts", "format_indices", "printable", "printable_lines"]

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    r"""``text`` safe to show on a terminal: every character that is not printable (ESC,
    NUL, newline, other control and format characters, lone surrogates, line separators)
    written the way ``repr`` writes it (``\x1b``, ``\n``, ``\u202e``), so a key name
    cannot retitle or clear a terminal, forge a line of a report, or fail to encode. Rich
    markup (``[bold]``) is left as text: remap hands rich ``Text``, never markup. JSON
    output uses the exact names, never this. Printable text comes back as it is, and
    ``printable(printable(t)) == printable(t)``.

    >>> printable("blocks.0.w"), printable("a\x1b]0;pwned\x07b"), printable("x\ny"), printable("\ud800")
    ('blocks.0.w', 'a\\x1b]0;pwned\\x07b', 'x\\ny', '\\ud800')
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _ESCAPES.get(c) or ascii(c)[1:-1] for c in text)


def printable_lines(text: str) -> str:
    r"""A multi-line message safe for a terminal: its own line breaks kept, every line
    passed through :func:`printable`.

    >>> printable_lines("missing:\n  a\x1bb")
    'missing:\n  a\\x1bb'
    """
    return "\n".join(printable(line) for line in text.split("\n"))


# A component of a folded key: a literal name, or the sorted names it stands for.
Segment = str | tuple[str, ...]


@dataclass(frozen=True)
class KeyGroup:
    """One folded line: its ``text`` and the ``keys`` it stands for, in input order.

    >>> fold_keys(["a.x", "a.y"])[0]
    KeyGroup(text='a.{x, y}', keys=('a.x', 'a.y'))
    """

    text: str
    keys: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class _Group:
    segments: tuple[Segment, ...]
    members: list[int]  # indices into the de-duplicated input, ascending
    indexed: frozenset[int] = frozenset()  # positions of integer components; none for a key without dots


def fold_keys(keys: Iterable[str], *, escape: bool = True, numbered: bool = False) -> list[KeyGroup]:
    r"""Fold ``keys`` into groups, each with its text and the keys behind it.

    A group's ``text`` is for people: with ``escape`` (the default) it passes through
    :func:`printable`; its ``keys`` are always the exact names. With ``numbered``, groups
    that differ only in the number ending one component fold too (``layer1``..``layer4``
    into ``layer{1..4}``), under the same rule: every folded line stands for keys that exist.

    >>> [(g.text, len(g)) for g in fold_keys(["stem.0.weight", "stem.1.weight", "head"])]
    [('stem.{0, 1}.weight', 2), ('head', 1)]
    >>> fold_keys(["a\nb"])
    [KeyGroup(text='a\\nb', keys=('a\nb',))]
    >>> [g.text for g in fold_keys([f"layer{i}.{b}.conv1.weight" for i in range(1, 5) for b in (0, 1)], numbered=True)]
    ['layer{1..4}.{0, 1}.conv1.weight']
    """
    unique = list(dict.fromkeys(keys))
    show = printable if escape else str
    if len(unique) <= 1:  # nothing to fold (a plan of distinct renames asks this once per key)
        return [KeyGroup(show(k), (k,)) for k in unique]
    groups = _fold_integers(_fold_leaves(unique))
    groups.sort(key=lambda g: g.members[0])
    if numbered:
        return _fold_numbered(groups, unique, show)
    return [_key_group(g, unique, show) for g in groups]


def _fold_numbered(groups: list[_Group], unique: Sequence[str], show: Callable[[str], str]) -> list[KeyGroup]:
    """Fold the folded groups once more where they differ only in one component's trailing
    number (``layer1``, ``layer2``), innermost component first, until nothing changes."""
    items = [(list(map(_render_segment, g.segments)) if len(g.members) > 1 else unique[g.members[0]].split("."), list(g.members))
             for g in groups]  # fmt: skip
    changed = True
    while changed:
        changed = False
        for pos in sorted({p for parts, _ in items for p in range(len(parts))}, reverse=True):
            items, folded = _fold_numbered_at(items, pos)
            changed = changed or folded
    items.sort(key=lambda item: item[1][0])
    return [KeyGroup(show(unique[m[0]] if len(m) == 1 else ".".join(parts)), tuple(unique[i] for i in m)) for parts, m in items]


def _fold_numbered_at(items: list[tuple[list[str], list[int]]], pos: int) -> tuple[list[tuple[list[str], list[int]]], bool]:
    buckets: dict[tuple[Any, ...], list[tuple[list[str], list[int], int]]] = {}
    out: list[tuple[list[str], list[int]]] = []
    for parts, members in items:
        found = _NUMBERED.fullmatch(parts[pos]) if pos < len(parts) else None
        if found is None or not _is_index(found[2]):
            out.append((parts, members))
            continue
        bucket = buckets.setdefault((len(parts), tuple(parts[:pos]), found[1], tuple(parts[pos + 1 :])), [])
        if not bucket:
            out.append((parts, members))  # placeholder for the bucket's fold
        bucket.append((parts, members, int(found[2])))
    folded = False
    for bucket in buckets.values():
        if len(bucket) > 1:
            parts, members, _ = bucket[0]
            numbers = {n for _, _, n in bucket}
            parts[pos] = f"{_NUMBERED.fullmatch(parts[pos])[1]}{{{format_indices(numbers)}}}"  # type: ignore[index]
            members[:] = sorted(i for _, m, _ in bucket for i in m)
            folded = True
    return out, folded


_NUMBERED = re.compile(r"([A-Za-z_][A-Za-z_]*?)(\d+)")


def _key_group(group: _Group, unique: Sequence[str], show: Callable[[str], str]) -> KeyGroup:
    keys = tuple(unique[i] for i in group.members)
    return KeyGroup(show(keys[0] if len(keys) == 1 else _render(group.segments)), keys)


def group_keys(keys: Iterable[str]) -> list[str]:
    """Fold dotted keys into readable groups (see the module docstring).

    >>> group_keys(["layers.0.x", "layers.1.y"])   # not the same structure: no fold
    ['layers.0.x', 'layers.1.y']
    >>> group_keys(["blocks.0.w", "blocks.2.w", "blocks.5.w", "fc"])
    ['blocks.{0, 2, 5}.w', 'fc']
    """
    return [g.text for g in fold_keys(keys)]


def group_counts(keys: Iterable[str]) -> list[tuple[str, int]]:
    """Each group's text with the number of keys it stands for.

    >>> group_counts(["a.b", "a.c", "d"])
    [('a.{b, c}', 2), ('d', 1)]
    """
    return [(g.text, len(g)) for g in fold_keys(keys)]


def format_indices(indices: Iterable[int]) -> str:
    """Integers as sorted runs: three or more in a row become ``first..last``.

    >>> format_indices([7, 0, 1, 2, 3])
    '0..3, 7'
    >>> format_indices([0, 1, 4])
    '0, 1, 4'
    """
    values = sorted(set(indices))
    parts: list[str] = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[i - 1] + 1:
            run = values[start:i]
            if len(run) >= 3:
                parts.append(f"{run[0]}..{run[-1]}")
            else:
                parts.extend(str(v) for v in run)
            start = i
    return ", ".join(parts)


@lru_cache(maxsize=65536)
def _is_index(name: str) -> bool:
    """A component that is a canonical non-negative integer (``"07"`` is a name, not 7)."""
    return name.isascii() and name.isdigit() and (name == "0" or name[0] != "0")


def _name_order(name: str) -> tuple[int, int, str]:
    return (0, int(name), "") if _is_index(name) else (1, 0, name)


def _alternatives(names: Iterable[str]) -> Segment:
    unique = sorted(set(names), key=_name_order)
    return unique[0] if len(unique) == 1 else tuple(unique)


def _fold_leaves(keys: Sequence[str]) -> list[_Group]:
    """Fold keys that share everything but their last component."""
    groups: list[_Group] = []
    by_prefix: dict[str, tuple[_Group, list[str]]] = {}
    for index, key in enumerate(keys):
        prefix, dot, leaf = key.rpartition(".")
        if not dot:
            groups.append(_Group((key,), [index]))
            continue
        if prefix not in by_prefix:
            by_prefix[prefix] = (_Group((), []), [])
            groups.append(by_prefix[prefix][0])
        group, leaves = by_prefix[prefix]
        group.members.append(index)
        leaves.append(leaf)
    for prefix, (group, leaves) in by_prefix.items():
        parts = prefix.split(".")
        last = leaves[0] if len(leaves) == 1 else _alternatives(leaves)
        group.segments = (*parts, last)
        indexed = [i for i, part in enumerate(parts) if _is_index(part)]
        if _index_segment(last):
            indexed.append(len(parts))
        group.indexed = frozenset(indexed)
    return groups


def _index_segment(segment: Segment) -> bool:
    if isinstance(segment, str):
        return _is_index(segment)
    return all(_is_index(s) for s in segment)


def _fold_integers(groups: list[_Group]) -> list[_Group]:
    """Fold groups that differ in one integer component only, innermost first, until stable."""
    changed = True
    while changed:
        changed = False
        positions = set().union(*(g.indexed for g in groups))
        for pos in sorted(positions, reverse=True):
            groups, folded = _fold_at(groups, pos)
            changed = changed or folded
    return groups


def _fold_at(groups: list[_Group], pos: int) -> tuple[list[_Group], bool]:
    """Fold the groups that have an integer at ``pos`` and are the same everywhere else."""
    buckets: dict[tuple[int, tuple[Segment, ...], tuple[Segment, ...]], list[_Group]] = {}
    out: list[_Group] = []
    for group in groups:
        segs = group.segments
        if pos not in group.indexed:
            out.append(group)
            continue
        signature = (len(segs), segs[:pos], segs[pos + 1 :])
        bucket = buckets.setdefault(signature, [])
        if not bucket:
            out.append(group)  # placeholder: the bucket's first group stands for the fold
        bucket.append(group)
    folded = False
    for bucket in buckets.values():
        if len(bucket) > 1:
            _merge_into_first(bucket, pos)
            folded = True
    return out, folded


def _merge_into_first(bucket: list[_Group], pos: int) -> None:
    first = bucket[0]
    names: list[str] = []
    members: list[int] = []
    for group in bucket:
        seg = group.segments[pos]
        names.extend((seg,) if isinstance(seg, str) else seg)
        members.extend(group.members)
    segs = list(first.segments)
    segs[pos] = _alternatives(names)
    first.segments = tuple(segs)
    first.members = sorted(members)


def _render_segment(segment: Segment) -> str:
    if isinstance(segment, str):
        return segment
    if all(_is_index(s) for s in segment):
        return "{" + format_indices(int(s) for s in segment) + "}"
    return "{" + ", ".join(segment) + "}"


def _render(segments: tuple[Segment, ...]) -> str:
    return ".".join(_render_segment(s) for s in segments)
