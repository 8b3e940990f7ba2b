"""Running the leading name-only steps once per *shape* of key instead of once per key.

A model's keys repeat a few shapes: ``model.layers.7.mlp.experts.12.w1.weight`` has the
shape ``model.layers.#.mlp.experts.#.w1.weight``. When no pattern of a step can tell one
numeric component from another, every key of a shape goes through the step the same way.
So each numeric component (digits between dots, as ModuleList and ModuleDict indices are)
becomes one placeholder character (private-use Unicode, one per position), the patterns
are rewritten to match a placeholder wherever they could match such a component, the
steps run once per shape, and each key's names are restored by putting its numbers back.
Digits inside names (``w1``, ``conv2``) stay as they are.

A pattern is rewritten only when that is equivalent (see :func:`abstract_pattern`). A
step whose patterns can tell numbers apart (``downsample\\.0\\.``, ``layers\\.(\\d*[01])\\.``)
runs key by key, but only on the shapes it could act on: every match of a pattern
contains its literal text (:func:`required_literals`), and a shape lacking that text is
skipped whole. Keys a key-by-key step renamed are grouped by their new shape, so the
steps after it run once per shape again.

>>> abstract_pattern(r"^layers\\.(\\d+)\\.") is not None
True
>>> abstract_pattern(r"^layers\\.0\\.") is None   # a literal index tells components apart
True
>>> required_literals(r"^model\\.layers\\.(\\d*[01])\\.mlp\\.experts\\.")
('model.layers.', '.mlp.experts.')
"""

from __future__ import annotations

import re
from operator import itemgetter
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any
from dataclasses import dataclass, field

import regex

from .meta import TensorMeta
from .errors import InternalError
from .patterns import CaptureError, PatternError, compile_regex
from .steps import Item, NameStep, Step

__all__ = ["abstract_pattern", "leading_name_steps", "required_literals", "run_name_steps", "NamePass"]

PH_FIRST, PH_LAST = 0xE000, 0xF8FF
PH_CLASS = "[\\ue000-\\uf8ff]"
RUN = re.compile(r"(?<![^.])([0-9]+)(?![^.])")  # a whole dotted component of digits
NUMBER_IN_LINES = re.compile(r"[.\n]([0-9]+)(?=[.\n])")  # RUN over "\n" + keys joined by newlines + "\n"
SPLIT_IN_LINES = re.compile(r"(?<=[.\n])[0-9]+(?=[.\n])")
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


def _could_act(step: NameStep, literals: tuple[tuple[str, ...], ...] | None, shape: str) -> bool:
    """False when no pattern of ``step`` can be found in any key of ``shape``."""
    if literals is None:
        return True
    return any(all(text in shape for text in lits) for lits in literals)


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
    test recurs across steps: one per kind of key, say)."""

    def __init__(self) -> None:
        self.memo: dict[str, dict[str, bool]] = {}

    def passes(self, test: str, number: str) -> bool:
        memo = self.memo.setdefault(test, {})
        done = memo.get(number)
        if done is None:
            done = memo[number] = compile_regex(test).fullmatch(number) is not None
        return done

    def passing(self, test: str, numbers: Iterable[str]) -> list[str]:
        memo = self.memo.setdefault(test, {})
        compiled = compile_regex(test)
        for number in numbers:
            if number not in memo:
                memo[number] = compiled.fullmatch(number) is not None
        return [number for number in numbers if memo[number]]


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
        return _Views(step, on_shape, None, None)
    regexes = step.regexes()
    views = [component_view(p) for p in regexes] if regexes else [None]
    if None in views or len(set(regexes or ())) != len(views):
        return _Views(step, None, None, _literals_of(step))
    return _Views(step, None, tuple(views), _literals_of(step))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the pass

SKELETON_MARK = "\ue000"


def _distinct(skeleton: str) -> str:
    """The skeleton with its n-th placeholder made the n-th placeholder character."""
    parts = skeleton.split(SKELETON_MARK)
    if len(parts) - 1 > MAX_RUNS:
        raise ValueError("too many numeric components")
    return "".join(p + (chr(PH_FIRST + n) if n < len(parts) - 1 else "") for n, p in enumerate(parts))


def _format_of(text: str) -> str:
    """A str.format template that puts the key's numbers back: placeholder n -> {n}."""
    out = text.replace("{", "{{").replace("}", "}}")
    return HAS_PLACEHOLDER.sub(lambda m: "{%d}" % (ord(m.group()) - PH_FIRST), out)


class _Group:
    """Keys of one shape. ``name`` is their current name, a placeholder standing for each
    of their numbers (``runs``); ``origin`` is the step that formed the group by renaming
    its keys onto ``initial`` (None: the source keys), ``hops`` the shape's renames since."""

    __slots__ = ("name", "initial", "origin", "members", "hops", "width", "classes", "_formats")

    def __init__(self, name: str, width: int, origin: int | None = None) -> None:
        self.name = self.initial = name
        self.origin = origin
        self.width = width  # how many numbers each member has
        self.members: list[int] = []
        self.hops: list[tuple[int, str]] = []
        self.classes: tuple[tuple[int, ...], dict[Any, list[int]]] | None = None  # members by some of their numbers
        self._formats: dict[str, str] = {}

    def format(self, name: str) -> str:
        f = self._formats.get(name)
        if f is None:
            f = self._formats[name] = _format_of(name)
        return f

    def concrete(self, runs: tuple[str, ...], name: str | None = None) -> str:
        return self.format(self.name if name is None else name).format(*runs)

    def hops_of(self, runs: tuple[str, ...], upto: int | None = None) -> list[tuple[int, str]]:
        """A member's renames in this group (the first ``upto`` of the shape's)."""
        out = [(self.origin, self.concrete(runs, self.initial))] if self.origin is not None else []
        return out + [(s, self.concrete(runs, h)) for s, h in (self.hops if upto is None else self.hops[:upto])]

    def steps_upto(self, upto: int | None) -> tuple[int, ...]:
        """The indexes of the steps that renamed a member here (the first ``upto`` of the shape's)."""
        own = tuple(s for s, _ in (self.hops if upto is None else self.hops[:upto]))
        return (self.origin, *own) if self.origin is not None else own

    def by_numbers(self, slots: tuple[int, ...], runs: list[tuple[str, ...]]) -> dict[Any, list[int]]:
        """The members grouped by their numbers at ``slots`` (kept for the next step)."""
        if self.classes is not None and self.classes[0] == slots:
            return self.classes[1]
        pick = itemgetter(*slots)
        classes: dict[Any, list[int]] = {}
        for i in self.members:
            value = pick(runs[i])
            members = classes.get(value)
            if members is None:
                classes[value] = [i]
            else:
                members.append(i)
        self.classes = (slots, classes)
        return classes


SLOT = re.compile("(?<![^.])(?:[0-9]+|[\ue000-\uf8ff])(?![^.])")  # a number or a placeholder, as a component


def _reshape(name: str, width: int) -> tuple[str, Any, tuple[str, ...]]:
    """A name holding placeholders for a group's numbers and numbers of its own, as a new
    shape: ``(shape name, picker, constants)``; ``picker(runs + constants)`` gives a member's
    numbers in the new shape."""
    pieces, picks, consts = [], [], []
    last = 0
    for m in SLOT.finditer(name):
        pieces.append(name[last : m.start()])
        text = m.group()
        if text.isdigit():
            picks.append(width + len(consts))
            consts.append(text)
        else:
            picks.append(ord(text) - PH_FIRST)
        last = m.end()
    pieces.append(name[last:])
    return _distinct(SKELETON_MARK.join(pieces)) if picks else name, _picker(picks), tuple(consts)


def _picker(indexes: list[int]) -> Any:
    if not indexes:
        return lambda runs: ()
    if len(indexes) == 1:
        n = indexes[0]
        return lambda runs: (runs[n],)
    return itemgetter(*indexes)


class _Fallback(Exception):
    """The exact key-by-key run is needed (for its messages): a capture error, a collision,
    a step matching nothing, a key that already holds a placeholder character."""


Trail = tuple  # (group, runs, hops done there, earlier trail) for each group a key left


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
    group_of: list[_Group] = field(repr=False)
    runs: list[tuple[str, ...]] = field(repr=False)
    trail: dict[int, Trail] = field(repr=False)
    upto: dict[int, int] = field(repr=False)

    def hops(self, i: int) -> tuple[tuple[int, str], ...]:
        """``(step index, name after it)`` for every step that renamed key ``i``."""
        chain = []
        t = self.trail.get(i)
        while t is not None:
            chain.append(t)
            t = t[3]
        out: list[tuple[int, str]] = []
        for group, runs, done, _ in reversed(chain):
            out += group.hops_of(runs, done)
        out += self.group_of[i].hops_of(self.runs[i], self.upto.get(i))
        return tuple(out)

    def hop_steps(self, i: int) -> tuple[int, ...]:
        """The indexes of the steps that renamed key ``i`` (what :meth:`hops` has, without names)."""
        out: tuple[int, ...] = ()
        t = self.trail.get(i)
        while t is not None:
            out = t[0].steps_upto(t[2]) + out
            t = t[3]
        return out + self.group_of[i].steps_upto(self.upto.get(i))

    def items(self, source: dict[str, TensorMeta]) -> list[Item]:
        keys = self.keys
        return [Item(name, (keys[i],), source[keys[i]], self.hops(i)) for i, name in zip(self.survivors, self.names)]

    def dropped_items(self, source: dict[str, TensorMeta]) -> list[tuple[Item, Step]]:
        return [(Item(name, (self.keys[i],), source[self.keys[i]], self.hops(i)), step) for i, step, name in self.dropped]


def run_name_steps(steps: list[tuple[NameStep, NameStep | None]], source: dict[str, TensorMeta]) -> NamePass | None:
    """Run ``steps`` (from :func:`leading_name_steps`) over every source key, once per key
    shape where that is exact and key by key where it is not. None when the exact per-key
    run is needed for its messages (a step matched nothing, two keys collided, a capture
    error), so the caller runs the steps on items."""
    try:
        return _Pass(steps, source).run()
    except _Fallback:
        return None


class _Pass:
    def __init__(self, steps: list[tuple[NameStep, NameStep | None]], source: dict[str, TensorMeta]) -> None:
        self.views = [_views(step, on_shape) for step, on_shape in steps]
        self.keys = list(source)
        self.counts = [[0] * len(step.labels()) for step, _ in steps]
        self.runs: list[tuple[str, ...]] = []
        self.group_of: list[_Group] = []
        self.trail: dict[int, Trail] = {}
        self.upto: dict[int, int] = {}
        self.dropped: list[tuple[int, Step, str]] = []
        self.tests = _Tests()

    def run(self) -> NamePass:
        groups = self._group_all(self.keys)
        for n, views in enumerate(self.views):
            step = views.step
            formed: dict[str, _Group] = {}  # groups of keys this step renamed key by key or by numbers
            for group in groups:
                if views.on_shape is not None and self._on_shape(n, step, views.on_shape, group):
                    continue
                if views.on_shape is None and not _could_act(step, views.literals, group.name):
                    self._untouched(step, group)
                    continue
                if views.components is not None and self._by_numbers(n, views, group, formed):
                    continue
                self._key_by_key(n, step, group, formed)
            groups = [g for g in groups if g.members] + [g for g in formed.values() if g.members]
        if any(c == 0 for v, counts in zip(self.views, self.counts) if not v.step.optional for c in counts):
            raise _Fallback
        return self._result(groups)

    def _group_all(self, keys: list[str]) -> list[_Group]:
        """Every source key grouped by shape: one regex pass over all keys joined by newlines."""
        joined = "\n" + "\n".join(keys) + "\n"
        if joined.count("\n") != len(keys) + 1 or HAS_PLACEHOLDER.search(joined):
            raise _Fallback  # a key with a newline or a placeholder character
        numbers = NUMBER_IN_LINES.findall(joined)
        skeletons = SKELETON_MARK.join(SPLIT_IN_LINES.split(joined))[1:-1].split("\n")
        groups: dict[str, _Group] = {}
        runs, group_of = self.runs, self.group_of
        at = 0
        for i, skeleton in enumerate(skeletons):
            group = groups.get(skeleton)
            if group is None:
                width = skeleton.count(SKELETON_MARK)
                group = groups[skeleton] = _Group(_distinct(skeleton) if width else skeleton, width)
            group.members.append(i)
            group_of.append(group)
            if group.width:
                runs.append(tuple(numbers[at : at + group.width]))
                at += group.width
            else:
                runs.append(())
        return list(groups.values())

    def _move(self, i: int, into: _Group, runs: tuple[str, ...]) -> None:
        """Key ``i`` leaves its group for ``into`` (formed by a rename), with new numbers."""
        old = self.group_of[i]
        self.trail[i] = (old, self.runs[i], len(old.hops), self.trail.get(i))
        self.group_of[i], self.runs[i] = into, runs
        into.members.append(i)

    def _formed(self, formed: dict[str, _Group], name: str, width: int, step: Step) -> _Group:
        group = formed.get(name)
        if group is None:
            group = formed[name] = _Group(name, width, step.index)
        return group

    def _drop(self, step: Step, group: _Group, members: Sequence[int]) -> None:
        for i in members:
            self.dropped.append((i, step, group.concrete(self.runs[i])))
            self.upto[i] = len(group.hops)

    def _on_shape(self, n: int, step: NameStep, abstract: NameStep, group: _Group) -> bool:
        """Run the step once for the whole group; False when its result glues a number to a name."""
        try:
            new, hits = abstract.name_map(group.name)
        except (CaptureError, PatternError):
            raise _Fallback from None
        if new is not None and new != group.name and FUSED.search(new):
            return False
        for h in hits:
            self.counts[n][h] += len(group.members)
        if new is None:
            self._drop(step, group, group.members)
            group.members = []
        elif new != group.name:
            group.hops.append((step.index, new))
            group.name = new
        return True

    def _untouched(self, step: NameStep, group: _Group) -> None:
        """No pattern of the step can be found in this shape: one key shows what all get."""
        probe = group.concrete(self.runs[group.members[0]])
        new, hits = step.name_map(probe)
        if hits or new not in (None, probe):
            raise InternalError(f"{step.label}: acted on {probe!r} although its literal text is not in the key")
        if new is None:
            self._drop(step, group, group.members)
            group.members = []

    def _by_numbers(self, n: int, views: _Views, group: _Group, formed: dict[str, _Group]) -> bool:
        """Run the step once per class of keys that its patterns cannot tell apart (see
        :class:`ComponentView`); False when a result glues a number to a name."""
        parts = group.name.split(".")
        slot_at = {c: ord(t) - PH_FIRST for c, t in enumerate(parts) if len(t) == 1 and PH_FIRST <= ord(t) <= PH_LAST}
        valued: set[int] = set()
        tested: list[tuple[int, int, int]] = []  # (pattern, piece, slot)
        for i, view in enumerate(views.components or ()):
            for c in view.sensitive:
                if c in slot_at:
                    (tested.append((i, c, slot_at[c])) if view.kinds[c] == "test" else valued.add(slot_at[c]))
        tested = [t for t in tested if t[2] not in valued]  # a slot filled in is seen as it is
        if not tested and not valued:  # it looks at no number of this shape: once for the whole group
            on_shape = views.variant(())
            return on_shape is not None and self._on_shape(n, views.step, on_shape, group)
        slots = tuple(sorted(valued | {s for _, _, s in tested}))
        by_value = group.by_numbers(slots, self.runs)
        classes = self._classes(views, slots, valued, tested, by_value, self.tests)
        results = []
        for (tests, filled), values in classes.items():
            step = views.variant(tests)
            if step is None:
                return False
            name = group.name.translate({PH_FIRST + s: v for s, v in zip(sorted(valued), filled)})
            try:
                new, hits = step.name_map(name)
            except (CaptureError, PatternError):
                raise _Fallback from None
            if new is not None and new != name and FUSED.search(new):
                return False
            results.append((values, name, new, hits))
        moved = False
        for values, name, new, hits in results:
            if hits:
                size = sum(len(by_value[v]) for v in values)
                for h in hits:
                    self.counts[n][h] += size
            if new == name:
                continue
            moved = True
            members = [i for v in values for i in by_value.pop(v)]
            if new is None:
                self._drop(views.step, group, members)
                continue
            shape, pick, consts = _reshape(new, group.width)
            into = self._formed(formed, shape, len(HAS_PLACEHOLDER.findall(shape)), views.step)
            for i in members:
                self._move(i, into, pick(self.runs[i] + consts))
        if moved:
            group.members = [i for m in by_value.values() for i in m]
        return True

    @staticmethod
    def _classes(views: _Views, slots: tuple[int, ...], valued: set[int], tested: list[tuple[int, int, int]],
                 by_value: dict[Any, list[int]], tests: _Tests) -> dict[Any, list[Any]]:  # fmt: skip
        """The group's numbers (values at ``slots``) by what the step can see of them:
        ``(test outcomes, numbers filled in) -> [values]``."""
        components = views.components or ()
        if len(tested) == 1 and not valued:  # the common case: one digit test on one number
            i, c, _ = tested[0]
            ok = tests.passing(components[i].test(c), by_value)
            if not ok or len(ok) == len(by_value):
                return {(((i, c, bool(ok)),), ()): list(by_value)}
            good = set(ok)
            return {(((i, c, True),), ()): ok, (((i, c, False),), ()): [v for v in by_value if v not in good]}
        position = {s: n for n, s in enumerate(slots)}
        checks = [(i, c, components[i].test(c), position[s]) for i, c, s in tested]
        filled = [position[s] for s in sorted(valued)]
        classes: dict[Any, list[Any]] = {}
        for value in by_value:
            values = value if len(slots) > 1 else (value,)
            cls = (tuple((i, c, tests.passes(test, values[at])) for i, c, test, at in checks), tuple(values[at] for at in filled))
            classes.setdefault(cls, []).append(value)
        return classes

    def _key_by_key(self, n: int, step: NameStep, group: _Group, formed: dict[str, _Group]) -> None:
        counts = self.counts[n]
        fmt = group.format(group.name)
        stay: list[int] = []
        moved: list[tuple[int, str]] = []
        for i in group.members:
            key = fmt.format(*self.runs[i])
            try:
                new, hits = step.name_map(key)
            except (CaptureError, PatternError):
                raise _Fallback from None
            for h in hits:
                counts[h] += 1
            if new is None:
                self.dropped.append((i, step, key))
                self.upto[i] = len(group.hops)
            elif new == key:
                stay.append(i)
            else:
                moved.append((i, new))
        if len(stay) != len(group.members):
            group.members = stay
            group.classes = None
        for i, new in moved:
            if HAS_PLACEHOLDER.search(new):
                raise _Fallback
            shape, pick, numbers = _reshape(new, 0)
            self._move(i, self._formed(formed, shape, len(numbers), step), pick(numbers))

    def _result(self, groups: list[_Group]) -> NamePass:
        final: list[str | None] = [None] * len(self.keys)
        runs = self.runs
        for group in groups:
            if not HAS_PLACEHOLDER.search(group.name):
                for i in group.members:
                    final[i] = group.name
                continue
            fmt = group.format(group.name)
            for i in group.members:
                final[i] = fmt.format(*runs[i])
        survivors = [i for i, name in enumerate(final) if name is not None]
        names: list[str] = [final[i] for i in survivors]  # type: ignore[misc]
        if len(set(names)) != len(names):
            raise _Fallback  # two keys end on one name: the per-step run names the step
        if len({(s.index, name) for _, s, name in self.dropped}) != len(self.dropped):
            raise _Fallback  # two keys shared a name before both were dropped
        self.dropped.sort(key=lambda d: d[0])
        return NamePass(self.keys, survivors, names, self.dropped, self.counts, self.group_of, runs, self.trail, self.upto)
