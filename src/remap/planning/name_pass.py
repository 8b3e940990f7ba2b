"""Running the leading name-only steps once per *shape* of key instead of once per key.

A model's keys repeat a few shapes: ``model.layers.7.mlp.experts.12.w1.weight`` has the
shape ``model.layers.#.mlp.experts.#.w1.weight``. When no pattern of a step can tell one
numeric component from another, every key of a shape goes through the step the same way.
So each numeric component (digits between dots, as ModuleList and ModuleDict indices are)
becomes one placeholder character (private-use Unicode, one per position), the patterns
are rewritten to match a placeholder wherever they could match such a component, the
steps run once per shape, and each key's names are restored by putting its numbers back.
Digits inside names (``w1``, ``conv2``) stay as they are.

The keys of one shape form a table (:class:`_Table`): their source positions, and their
numbers column by column. A node (:class:`_Node`) is a set of rows of a table that went
through the steps alike, named with placeholders that stand for the table's columns;
only at the end is each key's final name formatted from its numbers.

A pattern is rewritten only when that is equivalent (see :func:`abstract_pattern`). A
step whose patterns can tell numbers apart (``downsample\\.0\\.``, ``layers\\.(\\d*[01])\\.``)
splits a node's rows by what it can see of their numbers (a digit test, run once per
distinct number; see :class:`ComponentView`) and runs once per part; it is skipped for
every shape lacking the literal text that every match contains (:func:`required_literals`).
Anything else runs key by key, and the keys it renamed become new tables by the shape of
their new names, so the steps after it run once per shape again.

>>> abstract_pattern(r"^layers\\.(\\d+)\\.") is not None
True
>>> abstract_pattern(r"^layers\\.0\\.") is None   # a literal index tells components apart
True
>>> required_literals(r"^model\\.layers\\.(\\d*[01])\\.mlp\\.experts\\.")
('model.layers.', '.mlp.experts.')
"""

from __future__ import annotations

import re
from functools import lru_cache
from itertools import compress, repeat
from operator import attrgetter, contains, itemgetter, not_
from collections.abc import Sequence
from typing import Any
from dataclasses import dataclass, field

import regex

from ..meta import TensorMeta
from ..errors import InternalError, RulesError
from ..rules.patterns import CaptureError, PatternError, PatternTimeout, compile_regex
from ..rules.steps import Item, NameStep, Step

__all__ = ["abstract_pattern", "leading_name_steps", "required_literals", "run_name_steps", "NamePass"]

PH_FIRST, PH_LAST = 0xE000, 0xF8FF
PH_CLASS = "[\\ue000-\\uf8ff]"
HAS_PLACEHOLDER = re.compile("[\ue000-\uf8ff]")
# A placeholder that no longer stands between dots: a step glued a number to something.
FUSED = re.compile("[^.][\ue000-\uf8ff]|[\ue000-\uf8ff][^.]")
MAX_RUNS = PH_LAST - PH_FIRST

# Tokens of a pattern: an escape, a character class, a group opening, or one character.
TOKEN = re.compile(r"\\.|\[\^?\]?(?:\\.|[^\]])*\]|\(\?P<\w+>|\(\?:|\(\?[=!<]|.", re.DOTALL)
DIGIT_RUN = {"\\d", "[0-9]"}
NEVER_DIGIT_ESCAPES = {"\\.", "\\-", "\\_", "\\/", "\\D", "\\W", "\\s", "^", "$", "\\A", "\\Z"}


def _can_match_digit(tok: str) -> bool:
    if tok in NEVER_DIGIT_ESCAPES:
        return False
    if tok in (".", "\\w", "\\S"):
        return True
    if tok.startswith("["):
        body = tok[2:-1] if tok.startswith("[^") else tok[1:-1]
        has_digit = any(c.isdigit() for c in body) or "\\d" in body or "\\w" in body
        return has_digit if not tok.startswith("[^") else not ("\\d" in body or "0-9" in body)
    if tok.startswith("\\"):
        return tok[1:].isdigit() or tok[1] in "dwS"
    return tok.isdigit()


@lru_cache(maxsize=4096)
def abstract_pattern(pattern: str) -> str | None:
    """The pattern over keys whose numeric components are placeholders, or None when it
    could tell them apart: a literal digit that is not part of a name (``layers\\.0``), a
    counted repeat, a single-character match that could take part of a number, a word
    boundary, a lookaround, a backreference, or two neighbouring atoms that could split one
    number between them."""
    tokens = TOKEN.findall(pattern)
    out: list[str] = []
    prev_name_char = False  # the previous atom is a literal letter, underscore or name digit
    prev_digit_capable = False
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok in ("\\b", "\\B", "{", "\\\\") or tok.startswith(("(?=", "(?!", "(?<")):
            return None
        if tok in ("(", ")", "(?:", "|") or tok.startswith("(?P<"):
            out.append(tok)
            if tok == "|":
                prev_name_char = prev_digit_capable = False
            i += 1
            continue
        if tok in ("*", "+", "?"):
            out.append(tok)
            i += 1
            continue
        if tok.isdigit() and len(tok) == 1:  # a literal digit: only inside a name such as w1
            if not prev_name_char or nxt in ("*", "+", "?"):
                return None
            out.append(tok)
            prev_name_char, prev_digit_capable = True, False
            i += 1
            continue
        digit = _can_match_digit(tok)
        if digit and (nxt not in ("+", "*") or prev_digit_capable or nxt == ""):
            return None  # one character of a number, or two neighbours splitting one
        if tok in DIGIT_RUN:
            out.append(f"(?:{PH_CLASS}|[0-9]{nxt})")
            i += 2
        elif digit:
            out.append(_widen(tok))
            i += 1
        else:
            out.append(tok)
            i += 1
        prev_digit_capable = digit
        prev_name_char = not digit and (tok.isalpha() or tok == "_")
    return "".join(out)


def _widen(tok: str) -> str:
    """A digit-capable atom that must also match placeholders."""
    if tok == "\\w":
        return "[\\w\\ue000-\\uf8ff]"
    if tok == "\\S":
        return "[\\S]"  # placeholders are not whitespace: \S already matches them
    if tok.startswith("[^"):
        return tok  # a negated class matches placeholders unless it names them
    if tok.startswith("["):
        return tok[:-1] + "\\ue000-\\uf8ff]"
    return tok  # '.' matches placeholders


def leading_name_steps(steps: Sequence[Step]) -> list[tuple[NameStep, NameStep | None]]:
    """The leading steps that act on names only, each with its copy for key shapes (None
    when a pattern can tell numeric components apart: that step runs key by key)."""
    out: list[tuple[NameStep, NameStep | None]] = []
    for step in steps:
        if not isinstance(step, NameStep):
            break
        out.append((step, step.with_patterns(abstract_pattern)))
    return out


# --------------------------------------------------------------------------- literal prefilter

LITERAL_PUNCT = set("_-/:,;=<>@#%&'\"~ ")
FLAG_GROUP = re.compile(r"\(\?(?!:|P<|P=|P>|=|!|<=|<!|<\w+>|>|\|)")  # (?i), (?x:...), (?V1)...


@lru_cache(maxsize=4096)
def required_literals(pattern: str) -> tuple[str, ...]:
    r"""Texts that every match of ``pattern`` contains, usable on key shapes: top-level
    literal runs, with any digits that could be a whole numeric component left out.
    Empty when nothing is certain (alternation, flags, classes only).

    >>> required_literals(r"\.w1\.(weight|bias)$")
    ('.w1.',)
    >>> required_literals(r"(a|b)") + required_literals(r"(?i)fc")
    ()
    """
    if FLAG_GROUP.search(pattern):
        return ()
    out: list[str] = []
    run: list[str] = []
    depth = 0
    tokens = TOKEN.findall(pattern)
    for n, tok in enumerate(tokens):
        nxt = tokens[n + 1] if n + 1 < len(tokens) else ""
        if tok.startswith("("):
            depth += 1
        elif tok == ")":
            depth -= 1
        elif tok == "|" and depth == 0:
            return ()
        char = _literal_char(tok) if depth == 0 else None
        if char is not None and nxt not in ("?", "*", "+", "{"):
            run.append(char)
            continue
        out += _name_safe_pieces("".join(run))
        run = []
    out += _name_safe_pieces("".join(run))
    return tuple(out)


def _literal_char(tok: str) -> str | None:
    if len(tok) == 1:
        return tok if tok.isalnum() or tok in LITERAL_PUNCT else None
    if len(tok) == 2 and tok[0] == "\\" and not tok[1].isalnum() and tok[1] not in "\n\r\t":
        return tok[1]
    return None


def _name_safe_pieces(text: str) -> list[str]:
    """``text`` split around digit runs that could be a whole dotted component in a key
    (those are placeholders in a shape); a digit run next to a letter stays (``w1``)."""
    if not text:
        return []
    pieces, last = [], 0
    for m in re.finditer(r"[0-9]+", text):
        a, b = m.span()
        bound = (a > 0 and text[a - 1] != ".") or (b < len(text) and text[b] != ".")
        if not bound:
            pieces.append(text[last:a])
            last = b
    pieces.append(text[last:])
    return [p for p in pieces if p and not HAS_PLACEHOLDER.search(p)]


def _acting(literals: tuple[tuple[str, ...], ...] | None, shapes: list[str]) -> list[bool] | None:
    """For each of ``shapes``, whether a pattern whose required texts are ``literals``
    could be found in any key of it (None: in every one).

    >>> _acting((("model.", ".mlp."), ("lm_head",)), ["model.layers.\ue000.mlp.w", "lm_head.weight", "model.norm.weight"])
    [True, True, False]
    """
    if literals is None:
        return None
    if len(literals) == 1 and len(literals[0]) == 1:  # the common case, without a Python call per shape
        return list(map(contains, shapes, repeat(literals[0][0])))
    return [any(all(map(shape.__contains__, texts)) for texts in literals) for shape in shapes]


def _literals_of(step: NameStep) -> tuple[tuple[str, ...], ...] | None:
    patterns = step.regexes()
    if patterns is None:
        return None
    lits = tuple(required_literals(p) for p in patterns)
    return None if any(not x for x in lits) else lits


# --------------------------------------------------------------------------- components

WHOLE_NUMBER = (["\\d", "+"], ["[0-9]", "+"])
ANCHORS = {"^", "$", "\\A", "\\Z", "\\z", "\\b", "\\B", "\\G"}


@dataclass(frozen=True)
class ComponentView:
    r"""A ``^``-anchored pattern cut at its literal dots (``pieces``), so that its n-th piece
    can only ever match inside a key's n-th dotted component. Each piece is one of:

    * ``number``: one whole number (``(\d+)``), matching any numeric component alike;
    * ``test``: a piece that must match a whole numeric component and captures all of it
      or nothing (``0``, ``(\d*[01])``): keys differ only in whether it matches;
    * ``digits``: any other piece that looks at digits: its component's value matters;
    * ``plain``: a piece that cannot match a digit.

    A key's numbers in components of the first two kinds, or past the pattern's last
    piece, cannot change how the pattern acts on it beyond what :meth:`render` encodes.
    """

    pieces: tuple[tuple[str, ...], ...]
    kinds: tuple[str, ...]
    end: str

    @property
    def sensitive(self) -> frozenset[int]:
        return frozenset(n for n, k in enumerate(self.kinds) if k in ("test", "digits"))

    def render(self, tests: dict[int, bool]) -> str:
        """The pattern over names holding placeholders: ``number`` pieces and the ``test``
        pieces in ``tests`` match a placeholder (or never, for a failed test)."""
        out = []
        for n, (piece, kind) in enumerate(zip(self.pieces, self.kinds)):
            if kind == "number" or tests.get(n) is True:
                out.append(_widened(piece))
            elif tests.get(n) is False:
                out.append("(?!)")
            else:
                out.append("".join(piece))
        return "^" + "\\.".join(out) + self.end

    def test(self, n: int) -> str:
        """The regex that test piece ``n`` is, to match a whole number with."""
        return "".join(_number_core(list(self.pieces[n])))


class _Tests:
    """Which numbers each test piece matches whole, memoised by the piece's text (the same
    test recurs across steps: one per kind of key, say): ``(numbers seen, those passing)``."""

    def __init__(self) -> None:
        self.memo: dict[str, tuple[set[str], set[str]]] = {}

    def passes(self, test: str, number: str) -> bool:
        return bool(self.passing(test, {number}))

    def passing(self, test: str, numbers: set[str]) -> set[str]:
        """The numbers that pass ``test``."""
        seen, ok = self.memo.setdefault(test, (set(), set()))
        todo = numbers - seen
        if todo:
            # A test piece cannot match a dot (see component_view): one search over all the
            # numbers joined by dots finds those it matches whole.
            whole = compile_regex(f"(?<![^.])(?:{test})(?![^.])")
            ok.update(m.group() for m in whole.finditer(".".join(todo)))
            seen |= todo
        return numbers & ok


@lru_cache(maxsize=4096)
def component_view(pattern: str) -> ComponentView | None:
    r"""The pattern as pieces per key component, or None when a match could cross a dot
    other than at its literal ``\.`` (a ``.``, a negated class), is not anchored at the
    start, or holds something whose reach is unclear (alternation at the top, lookaround,
    backreference, flags, a quantified or grouped ``\.``).

    >>> component_view(r"^layers\.(\d+)\.experts\.(\d*[01])\.w1").kinds
    ('plain', 'number', 'plain', 'test', 'digits')
    >>> component_view(r"\.0\.") is None   # could match at any component
    True
    """
    if FLAG_GROUP.search(pattern) or "(?P=" in pattern or "\\g<" in pattern:
        return None
    tokens = TOKEN.findall(pattern)
    if not tokens or tokens[0] != "^":
        return None
    tokens, end = (tokens[1:-1], "$") if len(tokens) > 1 and tokens[-1] == "$" else (tokens[1:], "")
    pieces: list[list[str]] = [[]]
    depth = 0
    for n, tok in enumerate(tokens):
        nxt = tokens[n + 1] if n + 1 < len(tokens) else ""
        if tok in ANCHORS or tok.startswith(("(?=", "(?!", "(?<")) or _crosses_dot(tok) or regex.fullmatch(r"\\[1-9]", tok):
            return None
        if tok == "\\.":
            if depth or nxt in ("?", "*", "+", "{"):
                return None
            pieces.append([])
            continue
        depth += tok.startswith("(") - (tok == ")")
        if tok == "|" and depth == 0:
            return None
        pieces[-1].append(tok)
    kinds = tuple(_kind(piece, whole=n < len(pieces) - 1 or end == "$") for n, piece in enumerate(pieces))
    return ComponentView(tuple(tuple(p) for p in pieces), kinds, end)


def _kind(piece: list[str], whole: bool) -> str:
    core = _number_core(piece)
    if core in WHOLE_NUMBER:
        return "number"
    if not any(_can_match_digit(t) or t.startswith("[^") or t in ("\\W", "\\D", "\\S") for t in piece):
        return "plain"
    inner_groups = [t for t in core if t.startswith("(")]
    if whole and core and all(t == "(?:" for t in inner_groups):
        return "test"
    return "digits"


def _crosses_dot(tok: str) -> bool:
    if tok in (".", "\\D", "\\W", "\\S", "\\X", "\\N", "\\p", "\\P", "\\C", "\\O"):
        return True
    if tok.startswith("[^"):
        return "." not in tok[2:-1]
    if tok.startswith("["):
        return "." in tok[1:-1]
    return False


def _number_core(piece: list[str]) -> list[str]:
    """The piece without one capture group around the whole of it."""
    if len(piece) >= 2 and (piece[0] == "(" or piece[0].startswith("(?P<")) and piece[-1] == ")" and _closes_at_end(piece):
        return piece[1:-1]
    return piece


def _closes_at_end(piece: list[str]) -> bool:
    depth = 0
    for n, tok in enumerate(piece):
        depth += tok.startswith("(") - (tok == ")")
        if depth == 0 and n < len(piece) - 1:
            return False
    return True


def _widened(piece: tuple[str, ...]) -> str:
    """A piece matching a placeholder or a whole number, keeping its capture group."""
    tokens = list(piece)
    core = _number_core(tokens)
    wide = f"(?:{PH_CLASS}|[0-9]+)"
    return tokens[0] + wide + tokens[-1] if core is not tokens else wide


@dataclass(frozen=True)
class _Views:
    """A leading name step and its copies: for key shapes (exact on any shape), and the
    component views of its patterns (for shapes with some numbers filled in)."""

    step: NameStep
    on_shape: NameStep | None
    components: tuple[ComponentView, ...] | None
    literals: tuple[tuple[str, ...], ...] | None
    variants: dict[Any, NameStep | None] = field(default_factory=dict, compare=False)

    def variant(self, tests: tuple[tuple[int, int, bool], ...]) -> NameStep | None:
        """The step with its patterns rendered for ``tests`` ((pattern, piece, passes), ...)."""
        if tests not in self.variants:
            regexes = self.step.regexes() or ()
            rendered = {p: view.render({c: ok for i, c, ok in tests if i == n})
                        for n, (p, view) in enumerate(zip(regexes, self.components or ()))}  # fmt: skip
            self.variants[tests] = self.step.with_patterns(lambda p: rendered.get(p))
        return self.variants[tests]


def _views(step: NameStep, on_shape: NameStep | None) -> _Views:
    if on_shape is not None:
        return _Views(step, on_shape, None, _literals_of(step))
    regexes = step.regexes()
    views = [component_view(p) for p in regexes] if regexes else [None]
    if None in views or len(set(regexes or ())) != len(views):
        return _Views(step, None, None, _literals_of(step))
    return _Views(step, None, tuple(views), _literals_of(step))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- key shapes as tables

SKELETON_MARK = "\x00"  # keeps an ASCII key ASCII (one byte a character)
DOT_NUMBER = re.compile(r"\.[0-9]+(?=[.\n])")  # a numeric component after a dot, in keys joined by newlines
LINE_NUMBER = re.compile(r"\n[0-9]+(?=[.\n])")  # ... or at the start of a key
NUMBER_AFTER_DOT = re.compile(r"\.([0-9]+)(?=[.\n])")


def _distinct(skeleton: str) -> str:
    """The skeleton with its n-th placeholder made the n-th placeholder character."""
    parts = skeleton.split(SKELETON_MARK)
    if len(parts) - 1 > MAX_RUNS:
        raise _Fallback  # more numbers in one key than placeholder characters
    return "".join(p + (chr(PH_FIRST + n) if n < len(parts) - 1 else "") for n, p in enumerate(parts))


@lru_cache(maxsize=65536)
def _template_of(name: str) -> tuple[str, tuple[int, ...]]:
    """A %-template that puts a key's numbers back into ``name``, and the column each
    ``%s`` takes, in order.

    >>> _template_of("a.\ue001.b%.\ue000")
    ('a.%s.b%%.%s', (1, 0))
    """
    slots = tuple(ord(c) - PH_FIRST for c in HAS_PLACEHOLDER.findall(name))
    return HAS_PLACEHOLDER.sub("%s", name.replace("%", "%%")), slots


@dataclass(frozen=True)
class _Table:
    """Keys of one shape, column by column: row ``r`` is source key ``index[r]``, its n-th
    numeric component is ``columns[n][r]``. A table made by regrouping renamed keys knows
    each row's row in the table the keys came from (``parent_rows``)."""

    index: list[int]
    columns: tuple[list[str], ...]
    parent_rows: list[int] | None = None
    every: list[int] = field(init=False, compare=False)  # all rows in order: a node's rows before any leave

    def __post_init__(self) -> None:
        object.__setattr__(self, "every", list(range(len(self.index))))

    def column(self, n: int, rows: list[int]) -> list[str]:
        """Column ``n`` at ``rows``."""
        column = self.columns[n]
        return column if rows is self.every else list(map(column.__getitem__, rows))


def _shapes(names: list[str]) -> list[tuple[str, list[int], tuple[list[str], ...]]]:
    """``names`` grouped by shape: ``(shape, positions in names, numbers column by column)``,
    with two regex passes over all names joined by newlines and one per shape.

    >>> _shapes(["a.0.w", "a.12.w", "b"]) == [("a.\ue000.w", [0, 1], (["0", "12"],)), ("b", [2], ())]
    True
    """
    joined = "\n" + "\n".join(names) + "\n"
    if joined.count("\n") != len(names) + 1 or SKELETON_MARK in joined or (not joined.isascii() and HAS_PLACEHOLDER.search(joined)):
        raise _Fallback  # a key holding a newline, a NUL or a placeholder character
    marked = DOT_NUMBER.sub("." + SKELETON_MARK, joined)
    if LINE_NUMBER.search(marked):
        marked = LINE_NUMBER.sub("\n" + SKELETON_MARK, marked)
    positions: dict[str, list[int]] = {}
    for p, skeleton in enumerate(marked[1:-1].split("\n")):
        at = positions.get(skeleton)
        if at is None:
            positions[skeleton] = [p]
        else:
            at.append(p)
    out = []
    for skeleton, members in positions.items():
        width = skeleton.count(SKELETON_MARK)
        if not width:
            out.append((skeleton, members, ()))
            continue
        flat = NUMBER_AFTER_DOT.findall("\n." + "\n.".join(map(names.__getitem__, members)) + "\n")
        if len(flat) != width * len(members):
            raise InternalError(f"shape {skeleton!r}: {len(flat)} numbers in {len(members)} keys of {width} each")
        out.append((_distinct(skeleton), members, tuple(flat[n::width] for n in range(width))))
    return out


class _Node:
    """Rows of one table that have gone through the steps alike: ``name`` is their current
    name, placeholder n standing for column n. ``hops`` are the renames done here (the
    first is the one that made the node, for a node split off ``parent`` after ``upto``
    of the parent's hops)."""

    __slots__ = ("table", "rows", "name", "hops", "parent", "upto")

    def __init__(self, table: _Table, rows: list[int], name: str, parent: _Node | None = None, hop: int | None = None) -> None:
        self.table, self.rows, self.name = table, rows, name
        self.parent = parent
        self.upto = len(parent.hops) if parent is not None else 0
        self.hops: list[tuple[int, str]] = [(hop, name)] if hop is not None else []

    def concrete(self, rows: list[int], name: str | None = None) -> list[str]:
        """The names of ``rows`` when the node is named ``name`` (its current name)."""
        template, slots = _template_of(self.name if name is None else name)
        if not slots:
            return [template % ()] * len(rows)
        if len(slots) == 1:
            return list(map(template.__mod__, self.table.column(slots[0], rows)))
        return list(map(template.__mod__, zip(*(self.table.column(n, rows) for n in slots))))

    def at(self, row: int, name: str) -> str:
        template, slots = _template_of(name)
        return template % tuple(self.table.columns[n][row] for n in slots)

    def rename(self, step: int, name: str) -> None:
        self.hops.append((step, name))
        self.name = name

    def values(self, column: int) -> list[str]:
        """Column ``column`` of the node's rows."""
        return self.table.column(column, self.rows)


def _hops(node: _Node, row: int, upto: int | None, named: bool) -> list[Any]:
    """The renames of one row ending in ``node`` (its first ``upto`` hops), oldest first:
    ``(step, name)`` when ``named``, else step indexes."""
    parts = []
    while node is not None:
        own = node.hops if upto is None else node.hops[:upto]
        if own:
            parts.append([(s, node.at(row, h)) for s, h in own] if named else [s for s, _ in own])
        parent = node.parent
        if parent is not None and parent.table is not node.table:
            row = node.table.parent_rows[row]  # type: ignore[index]
        upto = node.upto
        node = parent  # type: ignore[assignment]
    return [h for part in reversed(parts) for h in part]


class _Fallback(Exception):
    """The exact key-by-key run is needed (for its messages): a capture error, a collision,
    a step matching nothing, a key that already holds a placeholder character."""


# --------------------------------------------------------------------------- the pass


@dataclass
class NamePass:
    """The name steps run over every source key. ``survivors`` index ``keys`` in source
    order, ``names`` are their final names; ``dropped`` holds (key index, dropping step,
    name when dropped); ``counts`` each step's matches per label."""

    keys: list[str]
    survivors: list[int]
    names: list[str]
    dropped: list[tuple[int, Step, str]]
    counts: list[list[int]]
    ends: list[tuple[_Node, list[int], int | None]] = field(repr=False)  # (node, rows, hops done): where keys ended
    _where: tuple[list[int], list[int]] | None = field(default=None, repr=False)  # per key: its end, its row there
    _steps: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)  # per end: the steps its keys went through

    def _locate(self, i: int) -> tuple[int, int]:
        if self._where is None:
            end_of, row_of = [0] * len(self.keys), [0] * len(self.keys)
            for e, (node, rows, _) in enumerate(self.ends):
                for at, r in zip(map(node.table.index.__getitem__, rows), rows):
                    end_of[at], row_of[at] = e, r
            self._where = end_of, row_of
        return self._where[0][i], self._where[1][i]

    def hops(self, i: int) -> tuple[tuple[int, str], ...]:
        """``(step index, name after it)`` for every step that renamed key ``i``."""
        e, row = self._locate(i)
        node, _, upto = self.ends[e]
        return tuple(_hops(node, row, upto, named=True))

    def hop_steps(self, i: int) -> tuple[int, ...]:
        """The indexes of the steps that renamed key ``i`` (what :meth:`hops` has, without
        names: the same for every key that ended alike)."""
        e, row = self._locate(i)
        steps = self._steps.get(e)
        if steps is None:
            node, _, upto = self.ends[e]
            steps = self._steps[e] = tuple(_hops(node, row, upto, named=False))
        return steps

    def items(self, source: dict[str, TensorMeta]) -> list[Item]:
        keys = self.keys
        return [Item(name, (keys[i],), source[keys[i]], self.hops(i)) for i, name in zip(self.survivors, self.names)]

    def dropped_items(self, source: dict[str, TensorMeta]) -> list[tuple[Item, Step]]:
        return [(Item(name, (self.keys[i],), source[self.keys[i]], self.hops(i)), step) for i, step, name in self.dropped]


def run_name_steps(steps: list[tuple[NameStep, NameStep | None]], source: dict[str, TensorMeta]) -> NamePass | None:
    """Run ``steps`` (from :func:`leading_name_steps`) over every source key, once per key
    shape where that is exact and key by key where it is not. None when the exact per-key
    run is needed for its messages (a step matched nothing, two keys collided, a capture
    error), so the caller runs the steps on items. No step: the source as it is, at the
    cost of a list of its keys (no shapes to find)."""
    if not steps:
        return _as_is(list(source))
    try:
        return _Pass(steps, source).run()
    except _Fallback:
        return None


def _as_is(keys: list[str]) -> NamePass:
    """The pass of no step: every key survives under its own name, renamed by nothing."""
    table = _Table(list(range(len(keys))), ())
    node = _Node(table, table.every, "")
    return NamePass(keys, table.every, keys, [], [], [(node, table.every, None)])


class _Pass:
    def __init__(self, steps: list[tuple[NameStep, NameStep | None]], source: dict[str, TensorMeta]) -> None:
        self.views = [_views(step, on_shape) for step, on_shape in steps]
        self.keys = list(source)
        self.counts = [[0] * len(step.labels()) for step, _ in steps]
        self.drops: list[tuple[_Node, list[int], Step, str, int]] = []  # (node, rows, step, name then, hops done)
        self.tests = _Tests()

    def run(self) -> NamePass:
        nodes = []
        for shape, members, columns in _shapes(self.keys):
            table = _Table(members, columns)
            nodes.append(_Node(table, table.every, shape))
        for n, views in enumerate(self.views):
            acting = _acting(views.literals, list(map(attrgetter("name"), nodes)))
            busy = nodes if acting is None else list(compress(nodes, acting))
            if acting is not None and views.step.drops_unmatched:  # keep: the shapes it cannot match leave
                for node in compress(nodes, map(not_, acting)):
                    self._drop(views.step, node, node.rows, node.name)
                    node.rows = []
            born: list[_Node] = []
            for node in busy:
                born += self._step(n, views, node)
            nodes = list(compress(nodes, map(attrgetter("rows"), nodes))) + [b for b in born if b.rows]
        if any(c == 0 for v, counts in zip(self.views, self.counts) if not v.step.optional for c in counts):
            raise _Fallback
        return self._result(nodes)

    def _step(self, n: int, views: _Views, node: _Node) -> list[_Node]:
        """Step ``n`` over the node's rows (a pattern of it could be found in the node's
        shape); returns the nodes of rows it renamed apart."""
        step = views.step
        if views.on_shape is not None:
            if self._whole(n, step, views.on_shape, node):
                return []
        elif views.components is not None:
            born = self._by_numbers(n, views, node)
            if born is not None:
                return born
        return self._key_by_key(n, step, node)

    def _drop(self, step: Step, node: _Node, rows: list[int], name: str) -> None:
        if rows:
            self.drops.append((node, rows, step, name, len(node.hops)))

    def _whole(self, n: int, step: NameStep, abstract: NameStep, node: _Node) -> bool:
        """Run the step once for all rows; False when its result glues a number to a name."""
        new, hits = _name_map(abstract, node.name, step, node, node.rows)
        if new is not None and new != node.name and FUSED.search(new):
            return False
        for h in hits:
            self.counts[n][h] += len(node.rows)
        self._settle(step, node, node.name, new)
        return True

    def _by_numbers(self, n: int, views: _Views, node: _Node) -> list[_Node] | None:
        """Run the step once per class of rows that its patterns cannot tell apart (see
        :class:`ComponentView`); None when a result glues a number to a name."""
        parts = node.name.split(".")
        slot_at = {c: ord(t) - PH_FIRST for c, t in enumerate(parts) if _is_placeholder(t)}
        valued: set[int] = set()
        tested: list[tuple[int, int, int]] = []  # (pattern, piece, column)
        for i, view in enumerate(views.components or ()):
            for c in view.sensitive:
                if c in slot_at:
                    (tested.append((i, c, slot_at[c])) if view.kinds[c] == "test" else valued.add(slot_at[c]))
        tested = [t for t in tested if t[2] not in valued]  # a column filled in is seen as it is
        if not tested and not valued:  # it looks at no number of this shape: once for all rows
            on_shape = views.variant(())
            return [] if on_shape is not None and self._whole(n, views.step, on_shape, node) else None
        results = []
        for tests, filled, rows in self._classes(views, node, sorted(valued), tested):
            step = views.variant(tests)
            if step is None:
                return None
            name = node.name.translate({PH_FIRST + s: v for s, v in zip(sorted(valued), filled)})
            new, hits = _name_map(step, name, views.step, node, rows)
            if new is not None and new != name and FUSED.search(new):
                return None
            results.append((rows, name, new, hits))
        if len(results) == 1 and not valued:
            (rows, name, new, hits), = results
            for h in hits:
                self.counts[n][h] += len(rows)
            self._settle(views.step, node, name, new)
            return []
        return self._split(n, views.step, node, results)

    def _settle(self, step: NameStep, node: _Node, name: str, new: str | None) -> None:
        """All rows of the node went through the step alike."""
        if new is None:
            self._drop(step, node, node.rows, name)
            node.rows = []
        elif new != node.name:
            node.rename(step.index, new)

    def _split(self, n: int, step: NameStep, node: _Node, results: list[tuple[list[int], str, str | None, tuple[int, ...]]]) -> list[_Node]:
        """Rows apart by class: those left as they were stay, the rest are dropped or leave
        as new nodes (on the same table, or regrouped when numbers were filled in)."""
        stay: list[int] = []
        born: list[_Node] = []
        for rows, name, new, hits in results:
            for h in hits:
                self.counts[n][h] += len(rows)
            if new == name:
                stay += rows
            elif new is None:
                self._drop(step, node, rows, node.name)
            elif name == node.name:  # no number filled in: a node of the same table
                born.append(_Node(node.table, rows, new, node, step.index))
            else:  # numbers filled in: the names as they come out, grouped by shape
                born += self._regroup(step, node, rows, _Node(node.table, rows, new).concrete(rows))
        node.rows = stay
        return born

    def _classes(self, views: _Views, node: _Node, valued: list[int], tested: list[tuple[int, int, int]]) -> list[tuple[Any, tuple[str, ...], list[int]]]:
        """The node's rows by what the step can see of their numbers:
        ``(test outcomes, numbers filled in, rows)``."""
        components = views.components or ()
        rows = node.rows
        if len(tested) == 1 and not valued:  # the common case: one digit test on one number
            i, c, column = tested[0]
            values = node.values(column)
            distinct = set(values)
            ok = self.tests.passing(components[i].test(c), distinct)
            if not ok or len(ok) == len(distinct):
                return [(((i, c, bool(ok)),), (), rows)]
            bad = distinct - ok
            return [(((i, c, True),), (), list(compress(rows, map(ok.__contains__, values)))),
                    (((i, c, False),), (), list(compress(rows, map(bad.__contains__, values))))]  # fmt: skip
        checks = [(i, c, components[i].test(c)) for i, c, _ in tested]
        columns = [node.values(s) for _, _, s in tested] + [node.values(s) for s in valued]
        by_value: dict[tuple[str, ...], list[int]] = {}
        for r, value in zip(rows, zip(*columns)):
            at = by_value.get(value)
            if at is None:
                by_value[value] = [r]
            else:
                at.append(r)
        classes: dict[Any, list[int]] = {}
        for value, members in by_value.items():
            outcome = tuple((i, c, self.tests.passes(test, v)) for (i, c, test), v in zip(checks, value))
            classes.setdefault((outcome, value[len(checks):]), []).extend(members)
        return [(tests, filled, members) for (tests, filled), members in classes.items()]

    def _key_by_key(self, n: int, step: NameStep, node: _Node) -> list[_Node]:
        counts = self.counts[n]
        stay: list[int] = []
        gone: list[int] = []
        moved: list[int] = []
        new_names: list[str] = []
        for r, key in zip(node.rows, node.concrete(node.rows)):
            new, hits = _name_map(step, key, step, None, ())
            for h in hits:
                counts[h] += 1
            if new is None:
                gone.append(r)
            elif new == key:
                stay.append(r)
            else:
                moved.append(r)
                new_names.append(new)
        self._drop(step, node, gone, node.name)
        node.rows = stay
        return self._regroup(step, node, moved, new_names) if moved else []

    def _regroup(self, step: NameStep, node: _Node, rows: list[int], names: list[str]) -> list[_Node]:
        """Rows renamed one by one, as nodes of new tables by the shape of their new names."""
        born = []
        index = node.table.index
        for shape, members, columns in _shapes(names):
            from_rows = [rows[p] for p in members]
            table = _Table([index[r] for r in from_rows], columns, from_rows)
            born.append(_Node(table, table.every, shape, node, step.index))
        return born

    def _result(self, nodes: list[_Node]) -> NamePass:
        at: list[int] = []
        final: list[str] = []
        suspects: list[str] = []  # names of rows that could share a name with another row
        may_collide = _may_collide(nodes)
        for node in nodes:
            names_here = node.concrete(node.rows)
            at += node.table.index if node.rows is node.table.every else map(node.table.index.__getitem__, node.rows)
            final += names_here
            if node in may_collide:
                suspects += names_here
        if len(set(suspects)) != len(suspects):
            raise _Fallback  # two keys end on one name: the per-step run names the step
        order = sorted(range(len(at)), key=at.__getitem__)  # back to source order
        survivors = list(map(at.__getitem__, order))
        names = list(map(final.__getitem__, order))
        dropped: list[tuple[int, Step, str]] = []
        for node, rows, step, name, _ in self.drops:
            index = node.table.index
            dropped += ((index[r], step, key) for r, key in zip(rows, node.concrete(rows, name)))
        if len({(s.index, name) for _, s, name in dropped}) != len(dropped):
            raise _Fallback  # two keys shared a name before both were dropped
        dropped.sort(key=itemgetter(0))
        ends = [(node, node.rows, None) for node in nodes]
        ends += [(node, rows, upto) for node, rows, _, _, upto in self.drops]
        return NamePass(self.keys, survivors, names, dropped, self.counts, ends)  # type: ignore[arg-type]


def _may_collide(nodes: list[_Node]) -> set[_Node]:
    """The nodes whose rows' names must be compared, the others' being distinct by their
    form. Placeholders stand for whole components, so a node whose name shows every
    number of its keys (on a table of distinct source keys) gives each row its own
    name; two nodes can only meet when their names have the same components, numeric
    ones included, and no numeric component tells them apart by its literal value.

    >>> a = _Node(_Table([0, 1], (["0", "1"],)), [0, 1], "chunks.0.\ue000.w")
    >>> b = _Node(_Table([2, 3], (["0", "1"],)), [0, 1], "chunks.1.\ue000.w")
    >>> c = _Node(_Table([4, 5], (["0", "1"],)), [0, 1], "chunks.\ue000.0.w")
    >>> _may_collide([a, b]) == set(), _may_collide([a, b, c]) == {a, b, c}
    (True, True)
    """
    suspect: set[_Node] = set()
    by_form: dict[tuple[str, ...], list[tuple[_Node, list[str]]]] = {}
    for node in nodes:
        if not NUMERIC_PART.search(node.name):
            suspect.add(node)  # one name for all its rows: the set check compares them; no number could meet it
            continue
        parts = node.name.split(".")
        width = len(node.table.columns)
        shown = {ord(p) - PH_FIRST for p in parts if _is_placeholder(p)}
        if node.table.parent_rows is not None or len(shown) != width:
            suspect.add(node)  # its rows could share a name among themselves
        form = tuple("" if _is_placeholder(p) or (p.isascii() and p.isdigit()) else p for p in parts)
        by_form.setdefault(form, []).append((node, parts))
    for group in by_form.values():
        if len(group) > 64:
            suspect.update(node for node, _ in group)
            continue
        for n, (a, pa) in enumerate(group):
            for b, pb in group[n + 1 :]:
                if not any(x != y and x.isdigit() and y.isdigit() for x, y in zip(pa, pb)):
                    suspect.update((a, b))
    return suspect


NUMERIC_PART = re.compile("(?<![^.])(?:[0-9]+|[\ue000-\uf8ff])(?![^.])")  # a component that is or stands for a number


def _is_placeholder(part: str) -> bool:
    return len(part) == 1 and PH_FIRST <= ord(part) <= PH_LAST


def _name_map(step: NameStep, name: str, original: NameStep, node: _Node | None, rows: list[int]) -> tuple[str | None, tuple[int, ...]]:
    """``step.name_map(name)``, ``step`` being ``original`` or its copy for the rows ``rows``
    of ``node`` (``name`` their name with placeholders). A pattern that took too long is
    the rules' error at once, told of the step's own pattern and a real key: the run key
    by key would only take as long again."""
    try:
        return step.name_map(name)
    except PatternTimeout as exc:
        key = node.concrete(rows[:1], name)[0] if node is not None and rows else name
        raise RulesError(f"{original.label}: {exc.naming(_own_pattern(original, step, exc.pattern), key)}", where=original.where) from None
    except (CaptureError, PatternError):
        raise _Fallback from None


def _own_pattern(original: NameStep, copy: NameStep, pattern: str) -> str:
    """The pattern of ``original`` that ``copy`` rewrote into ``pattern``."""
    ours, theirs = copy.regexes() or (), original.regexes() or ()
    return theirs[ours.index(pattern)] if pattern in ours and len(ours) == len(theirs) else pattern
