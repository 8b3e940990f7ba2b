"""What ``remap inspect CHECKPOINT`` shows: the dotted key hierarchy of a source as a tree.

Leaves show shape, dtype and element count; inner nodes their totals. Runs of numbered
siblings with identical structure collapse into one node (``layers.{0..11} ×12``) and
chains of single children join (``conv1.weight``), so a 300-key model fits a screen.
Only metadata is used: no tensor data is read.

>>> from remap.sources.readers import open_source
>>> src = open_source({"blocks.0.w": [4, 4], "blocks.1.w": [4, 4], "head.bias": [2]})
>>> print(format_tree(inspect_source(src)))  # doctest: +NORMALIZE_WHITESPACE
source   in-memory metadata
tensors  3 · 34 elements · 136 B
         float32  3 tensors  34 elements  136 B
<BLANKLINE>
├── blocks.{0..1}.w ×2  [4, 4]  float32  32
└── head.bias           [2]     float32   2
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..report.grouping import printable
from ..meta import TensorMeta, itemsize

if TYPE_CHECKING:
    from .readers import Source

__all__ = ["Node", "Tree", "inspect_source", "format_tree", "format_flat", "tree_to_dict", "flat_to_dict"]

@dataclass
class Node:
    """One node of the key hierarchy.

    ``name`` is the part of the key this node adds (``"layer1"``, ``"{0..11}"``,
    ``"conv1.weight"`` after joining single children). ``tensors``/``numel``/``nbytes``
    count one copy; a collapsed node stands for ``repeat`` siblings named ``members``.
    """

    name: str
    meta: TensorMeta | None = None
    children: list[Node] = field(default_factory=list)
    repeat: int = 1
    members: tuple[str, ...] = ()
    tensors: int = 0
    numel: int = 0
    nbytes: int = 0

    @property
    def total_tensors(self) -> int:
        return self.tensors * self.repeat

    @property
    def total_numel(self) -> int:
        return self.numel * self.repeat

    @property
    def total_nbytes(self) -> int:
        return self.nbytes * self.repeat


@dataclass
class Tree:
    """A source's tree plus the header: its description and totals by dtype.

    ``keys`` are the source's real, flat keys in its order (folding is for people; JSON
    and ``inspect --flat`` list these).
    """

    description: dict[str, Any]
    nodes: list[Node]
    tensors: int
    numel: int
    nbytes: int
    dtypes: dict[str, dict[str, int]]  # dtype -> {"tensors", "numel", "bytes"}
    keys: dict[str, TensorMeta] = field(default_factory=dict)


# ---------------------------------------------------------------------------- building


MAX_DEPTH = 64  # levels of the tree; the rest of a deeper key is one name (a tree that deep is for no one)


def _insert(root: Node, key: str, meta: TensorMeta, index: dict[tuple[int, str], Node]) -> None:
    """Add ``key`` under ``root``, one level per dotted part, at most :data:`MAX_DEPTH`
    levels (a crafted key of 10,000 parts must not exhaust the stack of the walks below)."""
    node = root
    for part in key.split(".", MAX_DEPTH - 1):
        child = index.get((id(node), part))
        if child is None:
            child = Node(part)
            node.children.append(child)
            index[(id(node), part)] = child
        node = child
    node.meta = meta


def _count(node: Node) -> None:
    for child in node.children:
        _count(child)
    own = node.meta
    node.tensors = (own is not None) + sum(c.total_tensors for c in node.children)
    node.numel = (own.numel if own else 0) + sum(c.total_numel for c in node.children)
    node.nbytes = (own.numel * itemsize(own.dtype) if own else 0) + sum(c.total_nbytes for c in node.children)


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _signature(node: Node, memo: dict[Any, int]) -> int:
    """What makes two siblings the same: everything below them, not their names.

    Hash-consed: a structure seen before gets the same small integer, so comparing two
    siblings costs O(1) however deep they are, and each node's signature is built from
    its children's integers once (``memo`` maps ``id(node)`` and each structure to it).
    """
    sig = memo.get(id(node))
    if sig is None:
        shape = (node.meta, tuple((c.name, c.repeat, _signature(c, memo)) for c in node.children))
        sig = memo.setdefault(("sig", shape), len(memo))
        memo[id(node)] = sig
    return sig


def _members_name(stem: str, members: tuple[str, ...]) -> str:
    """``layers.{0..11}`` for a contiguous numbered run, ``{0,2,4}`` otherwise."""
    numbers = sorted(int(m[len(stem):]) for m in members)
    if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return f"{stem}{{{numbers[0]}..{numbers[-1]}}}"
    return f"{stem}{{{','.join(map(str, numbers))}}}"


def _stem(node: Node) -> str | None:
    found = _NUMBERED.match(node.name)
    return found.group(1) if found and node.repeat == 1 else None


def _merge_runs(children: list[Node], same: Any) -> list[Node]:
    """Merge consecutive siblings for which ``same(last, child)`` holds.

    Linear in the number of siblings: a run's member names are gathered in a list and
    its ``members`` tuple is built once, when the run ends (not copied per member).
    """
    merged: list[Node] = []
    names: list[str] = []  # the members of merged[-1]'s run so far
    for child in children:
        last = merged[-1] if merged else None
        if last is not None and same(last, child):
            names.append(child.name)
            continue
        _close_run(last, names)
        merged.append(child)
        names = [*(child.members or (child.name,))]
    _close_run(merged[-1] if merged else None, names)
    return merged


def _close_run(node: Node | None, names: list[str]) -> None:
    """Give a run's first node all its members (nothing to do for a node that merged none)."""
    if node is not None and len(names) > max(1, len(node.members)):
        node.members = tuple(names)
        node.repeat = len(names)


def _collapse(node: Node, memo: dict[Any, int]) -> None:
    """Bottom-up: merge runs of numbered siblings with identical structure
    (``layers.{0..11}``), then runs of leaves with one shape and dtype (``{weight,bias}``).
    """
    for child in node.children:
        _collapse(child, memo)
    if node.children and all(c.name.isascii() and c.name.isdigit() for c in node.children):
        node.children.sort(key=lambda c: int(c.name))
    stems = {id(c): _stem(c) for c in node.children}
    numbered = _merge_runs(
        node.children,
        lambda a, b: stems[id(b)] is not None
        and stems[id(a)] == stems[id(b)]
        and _signature(a, memo) == _signature(b, memo),
    )
    runs = {id(c) for c in numbered if c.repeat > 1}
    for child in numbered:
        if id(child) in runs:
            child.name = _members_name(stems[id(child)] or "", child.members)

    def same_leaf(a: Node, b: Node) -> bool:
        return not (a.children or b.children or id(a) in runs or id(b) in runs) and a.meta == b.meta

    node.children = _merge_runs(numbered, same_leaf)
    for child in node.children:
        if child.repeat > 1 and id(child) not in runs:
            child.name = "{" + ",".join(child.members) + "}"


def _join_chains(node: Node) -> None:
    """``conv1`` -> ``weight`` becomes ``conv1.weight`` (a node with one child and no tensor)."""
    for child in node.children:
        _join_chains(child)
        while child.meta is None and len(child.children) == 1 and 1 in (child.repeat, child.children[0].repeat):
            only = child.children[0]
            child.name = f"{child.name}.{only.name}"
            child.meta, child.children = only.meta, only.children
            if only.repeat > 1:
                child.repeat, child.members = only.repeat, only.members
            child.tensors, child.numel, child.nbytes = only.tensors, only.numel, only.nbytes


def inspect_source(source: Source) -> Tree:
    """The tree of ``source.meta`` with totals; reads no tensor data.

    >>> from remap.sources.readers import open_source
    >>> inspect_source(open_source({"a.w": [2, 3]})).numel
    6
    """
    root = Node("")
    index: dict[tuple[int, str], Node] = {}
    dtypes: dict[str, dict[str, int]] = {}
    for key, meta in source.meta.items():
        _insert(root, key, meta, index)
        row = dtypes.setdefault(meta.dtype, {"tensors": 0, "numel": 0, "bytes": 0})
        row["tensors"] += 1
        row["numel"] += meta.numel
        row["bytes"] += meta.numel * itemsize(meta.dtype)
    _count(root)
    _collapse(root, {})
    _join_chains(root)
    return Tree(dict(source.description), root.children, root.tensors, root.numel, root.nbytes, dtypes, dict(source.meta))


# ---------------------------------------------------------------------------- text


def human_bytes(n: int) -> str:
    """``46.8 MiB``-style sizes.

    >>> human_bytes(1536)
    '1.5 KiB'
    """
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable


def _plural(n: int, word: str, width: int = 0) -> str:
    """``_plural(1, "tensor")`` -> ``"1 tensor"``; ``width`` right-aligns the number."""
    return f"{n:>{width},} {word}{'' if n == 1 else 's'}"


ENTRY_LINES = 12  # more entries than this are folded by their text


def _entry_lines(entries: Mapping[str, str]) -> list[str]:
    """One line per entry, or, past :data:`ENTRY_LINES`, one per distinct text with its count
    and first key (a 320-key whole-model pickle describes each key; ``--json`` keeps them all).

    >>> _entry_lines({"a.weight": "parameter of Linear", "b": "x"})
    ['a.weight: parameter of Linear', 'b: x']
    >>> _entry_lines({f"l{i}.weight": "parameter of Linear" for i in range(20)})
    ['20 keys: parameter of Linear (l0.weight, …)']
    """
    if len(entries) <= ENTRY_LINES:
        return [f"{name}: {text}" for name, text in entries.items()]
    groups: dict[str, list[str]] = {}
    for name, text in entries.items():
        groups.setdefault(text, []).append(name)
    lines = [f"{_plural(len(names), 'key')}: {text} ({names[0]}{', …' if len(names) > 1 else ''})" for text, names in groups.items()]
    if len(lines) > ENTRY_LINES:
        rest = sum(len(names) for names in list(groups.values())[ENTRY_LINES:])
        lines = [*lines[:ENTRY_LINES], f"… {len(lines) - ENTRY_LINES} more descriptions of {_plural(rest, 'key')} (--json lists every entry)"]
    return lines


def _header(tree: Tree) -> list[str]:
    d = tree.description
    kind = d.get("kind")
    if kind == "factory":
        where = f"factory {d.get('factory')}"
    elif d.get("path"):
        files = d.get("files") or 1
        where = f"{d['path']}  ({d.get('format')}{f', {files} files' if files > 1 else ''})"
    else:
        where = "in-memory state_dict" if kind == "state_dict" else "in-memory metadata"
    lines = [f"source   {where}"]
    if d.get("folder"):
        lines.append(f"folder   {d['folder']}")
    if d.get("key"):
        lines.append(f"key      {d['key']}{' (auto-detected)' if d.get('key_detected') else ''}")
    for i, line in enumerate(_entry_lines(d.get("entries") or {})):
        lines.append(f"{'entries' if i == 0 else '':<8} {line}")
    for i, note in enumerate(d.get("notes") or []):
        lines.append(f"{'note' if i == 0 else '':<8} {note}")
    lines.append(f"tensors  {tree.tensors:,} · {_plural(tree.numel, 'element')} · {human_bytes(tree.nbytes)}")
    tw = max((len(f"{r['tensors']:,}") for r in tree.dtypes.values()), default=0)
    nw = max((len(f"{r['numel']:,}") for r in tree.dtypes.values()), default=0)
    rows = [(d, _plural(r["tensors"], "tensor", tw), _plural(r["numel"], "element", nw), human_bytes(r["bytes"]))
            for d, r in tree.dtypes.items()]  # fmt: skip
    widths = [max((len(row[c]) for row in rows), default=0) for c in range(4)]
    for dtype, tensors, numel, size in rows:
        lines.append(
            f"         {dtype:<{widths[0]}}  {tensors:<{widths[1]}}  {numel:<{widths[2]}}  {size:>{widths[3]}}".rstrip()
        )
    return [printable(line) for line in lines]  # paths, keys, entries and notes come from files


def _rows(nodes: list[Node], prefix: str, depth: int, max_depth: int | None) -> Iterator[tuple[str, Node, bool]]:
    """(label, node, shows its children) for every visible node, depth first."""
    for i, node in enumerate(nodes):
        last = i == len(nodes) - 1
        times = f" ×{node.repeat}" if node.repeat > 1 else ""
        label = f"{prefix}{'└── ' if last else '├── '}{printable(node.name)}{times}"
        open_ = max_depth is None or depth < max_depth
        yield label, node, open_
        if node.children and open_:
            yield from _rows(node.children, prefix + ("    " if last else "│   "), depth + 1, max_depth)


def format_tree(tree: Tree, *, max_depth: int | None = None) -> str:
    """The header and the tree as plain text; ``max_depth`` limits the levels shown.

    A leaf line reads ``name  shape  dtype  elements``; an inner line ``name  elements
    tensors``, and for a collapsed node also what one copy holds.
    """
    rows = list(_rows(tree.nodes, "", 1, max_depth))
    label_w = min(max((len(r[0]) for r in rows), default=0), 72)
    shape_w = max((len(str(list(n.meta.shape))) for _, n, _ in rows if n.meta), default=0)
    dtype_w = max((len(printable(n.meta.dtype)) for _, n, _ in rows if n.meta), default=0)
    count_w = max((len(f"{n.total_numel:,}") for _, n, _ in rows), default=0)
    lines = [*_header(tree), ""]
    for label, node, open_ in rows:
        shape = str(list(node.meta.shape)) if node.meta else ""
        dtype = printable(node.meta.dtype) if node.meta else ""
        line = f"{label:<{label_w}}  {shape:<{shape_w}}  {dtype:<{dtype_w}}  {node.total_numel:>{count_w},}"
        if node.children:
            line += f"  {_plural(node.total_tensors, 'tensor')}"
            if node.repeat > 1:
                line += f"  (each: {node.numel:,} in {_plural(node.tensors, 'tensor')})"
            if not open_:
                line += "  …"
        lines.append(line.rstrip())
    if not rows:
        lines.append("(no tensors)")
    return "\n".join(lines)


def format_flat(tree: Tree) -> str:
    """One line per real key, in the source's order: ``key  shape  dtype``, no header, no
    folding (for ``grep``, ``diff`` and ``wc -l``).

    >>> from remap.sources.readers import open_source
    >>> print(format_flat(inspect_source(open_source({"blocks.0.w": [4, 4], "head.bias": [2]}))))
    blocks.0.w  [4, 4]  float32
    head.bias   [2]     float32
    """
    if not tree.keys:
        return "(no tensors)"
    shown = {key: printable(key) for key in tree.keys}  # one line per key, whatever its characters
    shapes = {key: str(list(meta.shape)) for key, meta in tree.keys.items()}
    key_w = max(map(len, shown.values()))
    shape_w = max(map(len, shapes.values()))
    return "\n".join(f"{shown[key]:<{key_w}}  {shapes[key]:<{shape_w}}  {meta.dtype}" for key, meta in tree.keys.items())


def _node_dict(node: Node, path: str) -> dict[str, Any]:
    key = f"{path}.{node.name}" if path else node.name
    out: dict[str, Any] = {"name": node.name, "key": key, "repeat": node.repeat}
    if node.repeat > 1:
        out["members"] = list(node.members)
    out.update(tensors=node.total_tensors, numel=node.total_numel, bytes=node.total_nbytes)
    if node.meta is not None:
        out.update(shape=list(node.meta.shape), dtype=node.meta.dtype)
    if node.children:
        out["each"] = {"tensors": node.tensors, "numel": node.numel, "bytes": node.nbytes}
        out["children"] = [_node_dict(c, key) for c in node.children]
    return out


def tree_to_dict(tree: Tree) -> dict[str, Any]:
    """JSON-able form of the tree for ``remap inspect --json``.

    >>> from remap.sources.readers import open_source
    >>> tree_to_dict(inspect_source(open_source({"w": [2]})))["nodes"][0]["shape"]
    [2]
    """
    return {
        "source": tree.description,
        "totals": {"tensors": tree.tensors, "numel": tree.numel, "bytes": tree.nbytes},
        "dtypes": tree.dtypes,
        "nodes": [_node_dict(n, "") for n in tree.nodes],
    }


def flat_to_dict(tree: Tree) -> dict[str, Any]:
    """JSON-able form for ``remap inspect --json``: the header, totals and every real key
    (``key -> {shape, dtype, numel}``, in the source's order); no folded names.

    >>> from remap.sources.readers import open_source
    >>> flat_to_dict(inspect_source(open_source({"a.0.w": [2, 3]})))["keys"]
    {'a.0.w': {'shape': [2, 3], 'dtype': 'float32', 'numel': 6}}
    """
    return {
        "source": tree.description,
        "totals": {"tensors": tree.tensors, "numel": tree.numel, "bytes": tree.nbytes},
        "dtypes": tree.dtypes,
        "keys": {key: {"shape": list(meta.shape), "dtype": meta.dtype, "numel": meta.numel} for key, meta in tree.keys.items()},
    }
