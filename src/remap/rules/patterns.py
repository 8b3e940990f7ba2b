"""Key patterns (regexes from the ``regex`` package) and rename templates.

Patterns are compiled once and cached; a rename replacement is parsed once into a
:class:`Template` that can add integers to captured indices.

>>> t = Template.parse(r"conv\\1.", compile_regex(r"^encoder\\.(\\d+)\\."), add={1: 1})
>>> t.sub(compile_regex(r"^encoder\\.(\\d+)\\."), "encoder.0.weight")
'conv1.weight'
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import regex

from ..errors import RulesError

__all__ = ["quote", "compile_regex", "PatternError", "PatternTimeout", "TimedPattern", "Template", "CaptureError", "Unmapped",
           "REGEX_TIMEOUT", "REGEX_BUDGET", "pattern_budget"]  # fmt: skip

MAX_INDEX_DIGITS = 100  # a captured index that `add` changes: far past any layer count, far below int()'s limit
REGEX_TIMEOUT = 1.0  # seconds one match may take before the pattern is called catastrophic
REGEX_BUDGET = 3.0  # seconds one pattern may take in all, over every key of one plan, beyond...
REGEX_PER_KEY = 20e-6  # ...this much per key it is tried on: a pattern fast on most keys never runs out

# Inside pattern_budget(): pattern -> [seconds left, keys tried, key it ran out on or None].
_BUDGETS: ContextVar[dict[str, list[Any]] | None] = ContextVar("remap_regex_budgets", default=None)


@contextmanager
def pattern_budget() -> Iterator[None]:
    """Add up the time each pattern takes over all the keys it is tried on, here and in
    any call below: 120 keys that each take a pattern 0.5s stay under :data:`REGEX_TIMEOUT`
    one by one, but not under :data:`REGEX_BUDGET` together. A pattern that ran out fails
    at once on every later key, naming the key it ran out on. Nested scopes share the
    outermost one (a plan is one scope, whatever step runs inside it).
    """
    if _BUDGETS.get() is not None:
        yield
        return
    token = _BUDGETS.set({})
    try:
        yield
    finally:
        _BUDGETS.reset(token)


def _timed(pattern: str, key: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``call(*args, timeout=..., **kwargs)`` under the per-key timeout and, inside
    :func:`pattern_budget`, the pattern's budget; a :class:`PatternTimeout` names the
    pattern and the key."""
    budgets = _BUDGETS.get()
    if budgets is None:
        try:
            return call(*args, timeout=REGEX_TIMEOUT, **kwargs)
        except TimeoutError:
            raise PatternTimeout(pattern, key) from None
    account = budgets.get(pattern)
    if account is None:
        account = budgets[pattern] = [REGEX_BUDGET, 0, None]
    elif account[2] is not None:
        raise PatternTimeout(pattern, account[2], tried=account[1])
    left = account[0] + REGEX_PER_KEY
    limit = REGEX_TIMEOUT if left > REGEX_TIMEOUT else left
    account[1] += 1
    if limit <= 0:  # spent to the last microsecond by the keys before: this key gets no time
        account[2] = key
        raise PatternTimeout(pattern, key, tried=account[1])
    start = perf_counter()
    try:
        return call(*args, timeout=limit, **kwargs)
    except TimeoutError:
        if limit == REGEX_TIMEOUT:
            raise PatternTimeout(pattern, key) from None
        account[2] = key
        raise PatternTimeout(pattern, key, tried=account[1]) from None
    finally:
        account[0] = left - (perf_counter() - start)


def quote(text: str) -> str:
    """Quote a pattern for a message without doubling its backslashes: ``'^fc\\.'``."""
    return f"'{text}'"


def quotes(texts: Any) -> str:
    return ", ".join(quote(t) for t in texts)


class PatternError(ValueError):
    """A pattern or template is invalid; the caller adds file/step context."""


class CaptureError(ValueError):
    """A captured group cannot take part in index arithmetic (not an integer)."""


class Unmapped(Exception):
    """A captured index that a rename's index map does not list: the key leaves (dropped).

    ``ref`` is the group, ``index`` the captured integer."""

    def __init__(self, ref: Any, index: int) -> None:
        super().__init__(f"group {_show(ref)} captured {index}, which the map does not list")
        self.ref, self.index = ref, index


class PatternTimeout(PatternError, RulesError):
    """A user pattern ran longer than :data:`REGEX_TIMEOUT` on one key (catastrophic backtracking).

    A :class:`PatternError`, so a step reports it with its label and position, and a
    :class:`~remap.errors.RulesError` (exit code 2), so wherever else it surfaces (an
    ``expect``, ``freeze`` or ``shapes`` pattern) it is a clean error naming the pattern.
    """

    def __init__(self, pattern: str, key: str, *, tried: int | None = None) -> None:
        self.pattern, self.key, self.tried = pattern, key, tried
        shown = key if len(key) <= 200 else key[:197] + "..."
        if tried is None:
            text = f"regex '{pattern}' took more than {REGEX_TIMEOUT}s on key '{shown}' (catastrophic backtracking?)"
        else:
            text = (f"regex '{pattern}' ran out of time on key '{shown}': more than {REGEX_BUDGET:g}s over the {tried} key(s) "
                    "it was tried on (catastrophic backtracking?); remap tries it on no further key")  # fmt: skip
        RulesError.__init__(self, text)

    def naming(self, pattern: str, key: str) -> PatternTimeout:
        """The same timeout told of ``pattern`` and ``key`` (a step's own pattern and a real
        key, when it happened on a rewritten pattern over a key shape)."""
        return PatternTimeout(pattern, key, tried=self.tried)


class TimedPattern:
    """A compiled pattern whose every match runs under :data:`REGEX_TIMEOUT`.

    :func:`compile_regex` returns these, so no caller can run a user pattern without a
    timeout: ``search``, ``match``, ``fullmatch``, ``sub``, ``subn``, ``findall``,
    ``finditer`` and ``split`` raise :class:`PatternTimeout` instead of hanging. Every
    other attribute (``pattern``, ``groups``, ``groupindex``...) is the compiled pattern's.
    """

    __slots__ = ("_re", "pattern", "groups", "groupindex")

    def __init__(self, compiled: regex.Pattern[str]) -> None:
        self._re = compiled
        self.pattern, self.groups, self.groupindex = compiled.pattern, compiled.groups, compiled.groupindex

    def _run(self, name: str, string: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        kwargs.pop("timeout", None)  # the budget decides
        return _timed(self.pattern, str(string), getattr(self._re, name), string, *args, **kwargs)

    def search(self, string: str, *args: Any, **kwargs: Any) -> regex.Match[str] | None:
        return self._run("search", string, args, kwargs)

    def match(self, string: str, *args: Any, **kwargs: Any) -> regex.Match[str] | None:
        return self._run("match", string, args, kwargs)

    def fullmatch(self, string: str, *args: Any, **kwargs: Any) -> regex.Match[str] | None:
        return self._run("fullmatch", string, args, kwargs)

    def findall(self, string: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self._run("findall", string, args, kwargs)

    def finditer(self, string: str, *args: Any, **kwargs: Any) -> list[regex.Match[str]]:
        return list(self._run("finditer", string, args, kwargs))  # consumed here, under the timeout

    def split(self, string: str, *args: Any, **kwargs: Any) -> list[str]:
        return self._run("split", string, args, kwargs)

    def sub(self, repl: Any, string: str, *args: Any, **kwargs: Any) -> str:
        kwargs.pop("timeout", None)
        return _timed(self.pattern, str(string), self._re.sub, repl, string, *args, **kwargs)

    def subn(self, repl: Any, string: str, *args: Any, **kwargs: Any) -> tuple[str, int]:
        kwargs.pop("timeout", None)
        return _timed(self.pattern, str(string), self._re.subn, repl, string, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._re, name)

    def __repr__(self) -> str:
        return f"TimedPattern({self.pattern!r})"


@functools.lru_cache(maxsize=4096)
def compile_regex(pattern: str) -> TimedPattern:
    """Compile ``pattern`` (cached) into a :class:`TimedPattern`. Raises :class:`PatternError`
    saying what is wrong and where."""
    try:
        return TimedPattern(regex.compile(pattern))
    except regex.error as exc:
        pos = f" at position {exc.pos}" if getattr(exc, "pos", None) is not None else ""
        raise PatternError(f"bad regex '{pattern}': {exc.msg}{pos}") from None


def search(compiled: TimedPattern | regex.Pattern[str], key: str) -> regex.Match[str] | None:
    """``compiled.search(key)`` with a timeout, so a catastrophic pattern fails instead of hanging."""
    raw = compiled._re if isinstance(compiled, TimedPattern) else compiled
    return _timed(compiled.pattern, key, raw.search, key)


# A template is a tuple of parts: str literals and int/str group references.
Part = str | int


@dataclass(frozen=True)
class Template:
    """A parsed replacement: literals and group references, plus integers to add to groups
    and tables that map a group's captured index to a new one (``maps``: a captured index
    missing from its table raises :class:`Unmapped`: the rename drops that key).

    >>> pattern = compile_regex(r"^layers\\.(\\d+)\\.")
    >>> t = Template.parse(r"layers.\\1.", pattern, maps={1: {0: 0, 2: 1, 5: 2}})
    >>> t.sub(pattern, "layers.5.w"), t.map_text()
    ('layers.2.w', 'map {1: {0: 0, 2: 1, 5: 2}}')
    """

    text: str
    parts: tuple[tuple[str, Any], ...]
    add: tuple[tuple[Any, int], ...] = ()
    maps: tuple[tuple[Any, tuple[tuple[int, int], ...]], ...] = ()

    @classmethod
    def parse(cls, text: str, compiled: regex.Pattern[str], add: Mapping[Any, int] | None = None,
              maps: Mapping[Any, Mapping[int, int]] | None = None) -> Template:  # fmt: skip
        """Parse ``\\1``, ``\\g<1>`` and ``\\g<name>`` references; check them against the pattern.
        A group that ``add`` or ``maps`` changes must be used by the replacement, and no group
        may be in both (a map gives the new index whole: put an offset in its values)."""
        parts = _parse_parts(text)
        used = set()
        for kind, ref in parts:
            if kind == "group":
                used.add(_check_group(ref, compiled, f"replacement '{text}'"))
        shifts, tables, changed = [], [], {}
        for ref, delta in (add or {}).items():
            ref = int(ref) if isinstance(ref, str) and _is_number(ref) else ref
            index = _check_group(ref, compiled, "add")
            if index not in used:
                raise PatternError(f"add changes group {_show(ref)}, which replacement '{text}' does not use")
            shifts.append((ref, delta))
            changed[index] = "add"
        for ref, table in (maps or {}).items():
            ref = int(ref) if isinstance(ref, str) and _is_number(ref) else ref
            index = _check_group(ref, compiled, "map")
            if index not in used:
                raise PatternError(f"map changes group {_show(ref)}, which replacement '{text}' does not use")
            if index in changed:
                raise PatternError(f"group {_show(ref)} is in both {changed[index]} and the map: the map gives its new index "
                                   "whole (put an offset in the map's values)")  # fmt: skip
            changed[index] = "map"
            tables.append((ref, tuple(sorted(table.items()))))
        return cls(text, tuple(parts), tuple(shifts), tuple(tables))

    def map_text(self) -> str:
        """The maps as the rules write them: ``map {1: {0: 0, 2: 1}}``; empty without one."""
        if not self.maps:
            return ""
        inner = ", ".join(f"{_show(ref)}: {{{', '.join(f'{a}: {b}' for a, b in table)}}}" for ref, table in self.maps)
        return f"map {{{inner}}}"

    def expand(self, match: regex.Match[str], seen: list[tuple[Any, int]] | None = None) -> str:
        """The replacement for one match; raises :class:`CaptureError` for arithmetic on a
        non-integer, :class:`Unmapped` for an index a map does not list. ``seen`` collects
        ``(group, captured index)`` for every map entry used."""
        shifted: dict[Any, str] = {}
        for ref, delta in self.add:
            value = _captured_index(match, ref, f"add {delta} to") + delta
            if value < 0:
                raise CaptureError(f"group {_show(ref)} captured {match.group(ref)}; adding {delta} gives {value} < 0")
            shifted[ref] = str(value)
            shifted[_other_name(ref, match)] = str(value)
        for ref, table in self.maps:
            index = _captured_index(match, ref, "look up in the map")
            new = next((b for a, b in table if a == index), None)
            if new is None:
                raise Unmapped(ref, index)
            if seen is not None:
                seen.append((ref, index))
            shifted[ref] = str(new)
            shifted[_other_name(ref, match)] = str(new)
        out = []
        for kind, value in self.parts:
            if kind == "text":
                out.append(value)
            else:
                out.append(shifted[value] if value in shifted else (match.group(value) or ""))
        return "".join(out)

    def sub(self, compiled: regex.Pattern[str], key: str) -> str:
        """Replace every match of ``compiled`` in ``key``."""
        return self.subn(compiled, key)[0]

    def subn(self, compiled: regex.Pattern[str], key: str, seen: list[tuple[Any, int]] | None = None) -> tuple[str, int]:
        """Replace every match of ``compiled`` in ``key``; also say how many there were (0: no match)."""
        raw = compiled._re if isinstance(compiled, TimedPattern) else compiled
        expand = self.expand if seen is None else (lambda m: self.expand(m, seen))
        return _timed(compiled.pattern, key, raw.subn, expand, key)


def _captured_index(match: regex.Match[str], ref: Any, what: str) -> int:
    """The integer group ``ref`` captured; :class:`CaptureError` when it is none."""
    captured = match.group(ref)
    if captured is None:
        raise CaptureError(f"group {_show(ref)} took no part in the match, so there is no integer to {what}")
    if not _is_number(captured):
        raise CaptureError(f"group {_show(ref)} captured '{captured}', which is not a non-negative integer")
    if len(captured) > MAX_INDEX_DIGITS:  # a key is the checkpoint's: int() refuses 4300 digits
        raise CaptureError(f"group {_show(ref)} captured a number of {len(captured)} digits; "
                           f"index arithmetic takes at most {MAX_INDEX_DIGITS}")  # fmt: skip
    return int(captured)


def _other_name(ref: Any, match: regex.Match[str]) -> Any:
    """The index of a named group or the name of an indexed one, so either reference sees an addition."""
    index = match.re.groupindex
    if isinstance(ref, str):
        return index.get(ref, ref)
    return next((name for name, i in index.items() if i == ref), ref)


def _is_number(text: str) -> bool:
    """Only ASCII digits: ``str.isdigit`` also accepts '²', which ``int`` refuses."""
    return text.isascii() and text.isdigit()


def _show(ref: Any) -> str:
    return str(ref) if isinstance(ref, int) else f"'{ref}'"


def _check_group(ref: Any, compiled: regex.Pattern[str], what: str) -> int:
    """The index of group ``ref`` (a number or a name) in ``compiled``; ``what`` refers to it in the error."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        if not 0 <= ref <= compiled.groups:
            raise PatternError(
                f"{what} refers to group {ref}, but pattern '{compiled.pattern}' has {compiled.groups} group(s)"
            )
        return ref
    if isinstance(ref, str) and _is_number(ref):
        return _check_group(int(ref), compiled, what)
    if ref not in compiled.groupindex:
        names = ", ".join(compiled.groupindex) or "none"
        raise PatternError(
            f"{what} refers to group {_show(ref)}, but pattern '{compiled.pattern}' has no such group (named groups: {names})"
        )
    return compiled.groupindex[ref]


def _parse_parts(text: str) -> list[tuple[str, Any]]:
    parts: list[tuple[str, Any]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            literal.append(ch)
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt == "\\":
            literal.append("\\")
            i += 2
        elif nxt and nxt in "0123456789":
            j = i + 1
            while j < len(text) and j < i + 3 and text[j] in "0123456789":
                j += 1
            _flush(parts, literal)
            parts.append(("group", int(text[i + 1 : j])))
            i = j
        elif nxt == "g" and text[i + 2 : i + 3] == "<":
            end = text.find(">", i + 3)
            if end < 0:
                raise PatternError(f"replacement '{text}': unterminated \\g<...> at position {i}")
            name = text[i + 3 : end]
            _flush(parts, literal)
            parts.append(("group", int(name) if _is_number(name) else name))
            i = end + 1
        elif not nxt:
            raise PatternError(
                f"replacement '{text}' ends with a lone backslash: write \\\\ for a backslash, "
                f"\\1 or \\g<name> for a group"
            )
        else:
            raise PatternError(
                f"replacement '{text}' has the escape '{ch + nxt}' at position {i}: "
                f"replacements are plain text with \\1 or \\g<name> references (write '{nxt}', not '{ch + nxt}')"
            )
    _flush(parts, literal)
    return parts


def _flush(parts: list[tuple[str, Any]], literal: list[str]) -> None:
    if literal:
        parts.append(("text", "".join(literal)))
        literal.clear()
