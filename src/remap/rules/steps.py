"""The steps of a rules pipeline, and the registry that maps a step name to its class.

A step is a frozen recipe parsed from one item of ``rules:``. Planning runs every step,
in order, over :class:`Item` records (a key as named at that step, the source keys it
came from, its metadata and its trail); a step returns the items that go on, the items
it dropped, how many keys each of its patterns matched, and any failures. Steps never
read tensor data: a tensor op (added by later steps) records an :class:`Op` that the
engine runs at apply time.

>>> step = STEPS["strip_prefix"].parse("module.", index=1, where=None, optional=False)
>>> out = step.run([Item.source("module.fc.weight", TensorMeta((10, 4)))])
>>> [i.key for i in out.items], out.counts
(['fc.weight'], (('module.', 1),))
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import regex

from ..errors import RulesError, describe_value
from ..meta import TensorMeta
from .patterns import CaptureError, PatternError, Template, compile_regex, pattern_budget, quote, quotes, search
from ..report.records import Failure

__all__ = ["Item", "Inverse", "NameStep", "Op", "Recipe", "StepContext", "StepResult", "Step", "STEPS", "register", "StepSpecError",
           "close_keys", "run_recipe"]  # fmt: skip


class StepSpecError(ValueError):
    """A step's configuration is invalid.

    ``field`` names the offending field inside the step's value, for the message (a
    name, a list index that reads "item N", or a tuple of them, as a path; None: the
    message says enough). ``at`` is the path whose position the error points at
    (default: ``field``); ``key`` points at that mapping key rather than its value.
    """

    def __init__(self, message: str, field: Any = None, *, at: tuple[Any, ...] | None = None, key: bool = False) -> None:
        super().__init__(message)
        self.field = field
        self.path = () if field is None else field if isinstance(field, tuple) else (field,)
        self.at = self.path if at is None else at
        self.key = key


@dataclass(frozen=True)
class Inverse:
    """How an :class:`Op` runs backwards, as data beside it (``remap export`` reads it;
    :mod:`remap.exporting.inverse` runs it).

    ``kind`` names the inverse and ``params`` holds its arguments, as ``(name, value)``
    pairs of plain values. ``exact`` is False where the op loses information, so that no
    inverse gives back what went in (``adapt``): the export then keeps the original
    tensor, or computes the approximate inverse that ``kind`` names when asked to.

    >>> inv = Inverse.of("reshape", shape=(768, 768))
    >>> inv.kind, inv["shape"], inv.exact
    ('reshape', (768, 768), True)
    """

    kind: str
    params: tuple[tuple[str, Any], ...] = ()
    exact: bool = True

    @classmethod
    def of(cls, kind: str, *, exact: bool = True, **params: Any) -> Inverse:
        return cls(kind, tuple(sorted(params.items())), exact)

    def __getitem__(self, name: str) -> Any:
        for key, value in self.params:
            if key == name:
                return value
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default


@dataclass(frozen=True)
class Op:
    """A tensor operation recorded at planning time and run at apply time.

    ``fn`` takes the input tensors of its :class:`Recipe` node and returns one tensor.
    ``inverse`` says how to run it backwards (None: no inverse is known; the export then
    treats the op as lossy).
    """

    name: str
    describe: str
    fn: Callable[..., Any] = field(compare=False, repr=False)
    inverse: Inverse | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, eq=False)
class Recipe:
    """How to compute one tensor: ``op`` applied to ``inputs`` (source keys or recipes)."""

    op: Op
    inputs: tuple[Recipe | str, ...]

    def ops(self) -> tuple[str, ...]:
        """Op descriptions in the order they run (inputs first)."""
        inner = tuple(d for i in self.inputs if isinstance(i, Recipe) for d in i.ops())
        return (*inner, self.op.describe)

    def describe(self) -> str:
        """``split(dim=0)[1 of 3] of transpose(0, 1) of 'h.0.attn.c_attn.weight'``"""
        args = ", ".join(i.describe() if isinstance(i, Recipe) else repr(i) for i in self.inputs)
        return f"{self.op.describe} of {args if len(self.inputs) == 1 else '[' + args + ']'}"


def run_recipe(node: Recipe | str, inputs: Mapping[str, Any], memo: dict[int, Any] | None = None) -> Any:
    """The tensor ``node`` computes from ``inputs`` (source key -> tensor; a plain source
    key is looked up as it is). Pass one ``memo`` dict to several calls so that a node
    they share (the parent of a split's parts) is computed once.

    >>> import operator
    >>> double = Recipe(Op("double", "double", lambda t: operator.mul(t, 2)), ("w",))
    >>> run_recipe(double, {"w": 21})
    42
    """
    if isinstance(node, str):
        return inputs[node]
    memo = {} if memo is None else memo
    if id(node) not in memo:
        memo[id(node)] = node.op.fn(*(run_recipe(i, inputs, memo) for i in node.inputs))
    return memo[id(node)]


@dataclass(frozen=True)
class StepContext:
    """What a step may know besides the keys: the target's metadata (for ops that fit a
    tensor to the target, such as ``pad`` and ``adapt``)."""

    target: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Item:
    """A key on its way through the pipeline.

    ``hops`` records ``(step index, key after that step)`` for every step that renamed it
    since it was made; a merged or split item keeps the items it came from in ``parents``.
    ``recipe`` is None while the item is a source tensor untouched by any op.
    """

    key: str
    sources: tuple[str, ...]
    meta: TensorMeta
    hops: tuple[tuple[int, str], ...] = ()
    recipe: Recipe | None = None
    parents: tuple[Item, ...] = ()

    @classmethod
    def source(cls, key: str, meta: TensorMeta) -> Item:
        return cls(key, (key,), meta)

    @property
    def node(self) -> Recipe | str:
        """This item as an input of a further op."""
        return self.recipe if self.recipe is not None else self.sources[0]

    @property
    def ops(self) -> tuple[str, ...]:
        return self.recipe.ops() if self.recipe is not None else ()

    def renamed(self, key: str, step: int) -> Item:
        if key == self.key:
            return self
        return Item(key, self.sources, self.meta, (*self.hops, (step, key)), self.recipe, self.parents)

    def with_op(self, op: Op, meta: TensorMeta, step: int | None = None) -> Item:
        """This item computed by ``op``; the step is recorded in ``hops`` (name unchanged)."""
        hops = self.hops if step is None else (*self.hops, (step, self.key))
        return Item(self.key, self.sources, meta, hops, Recipe(op, (self.node,)), self.parents)

    def hops_for(self, source: str) -> tuple[tuple[int, str], ...]:
        """The renames one source key went through to become this item."""
        for parent in self.parents:
            if source in parent.sources:
                return (*parent.hops_for(source), *self.hops)
        return self.hops


@dataclass(frozen=True)
class StepResult:
    items: list[Item]
    dropped: list[Item] = field(default_factory=list)
    counts: tuple[tuple[str, int], ...] = ()
    failures: list[Failure] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return sum(n for _, n in self.counts)


@dataclass(frozen=True)
class Step:
    """Base of every step: its 1-based position, ``optional`` flag and location;
    ``origin`` names the fragment a step came from (``include:``), None for the file's own."""

    index: int
    where: str | None
    optional: bool
    origin: str | None = field(default=None, kw_only=True)

    kind: ClassVar[str] = ""
    schema: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "run" in cls.__dict__:
            cls.run = _guarded(cls.__dict__["run"])  # type: ignore[method-assign]

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        raise NotImplementedError

    @property
    def label(self) -> str:
        return f"step {self.index} ({self.kind}{', from ' + self.origin if self.origin else ''})"

    def summary(self) -> str:
        raise NotImplementedError

    def run(self, items: list[Item], ctx: StepContext | None = None) -> StepResult:
        raise NotImplementedError

    def unmatched(self, counts: Sequence[tuple[str, int]], items: list[Item]) -> list[Failure]:
        """A failure for every pattern of this step that matched no key (unless optional)."""
        if self.optional:
            return []
        failures = []
        for label, n in counts:
            if n == 0:
                near = close_keys(label, [i.key for i in items])
                hint = f"; closest keys at this step: {', '.join(map(repr, near))}" if near else ""
                where = f" ({self.where})" if self.where else ""
                failures.append(
                    Failure(
                        "unmatched_step",
                        f"{self.label}{where}: {quote(label)} matched no key{hint}. "
                        "Fix the pattern, or add `optional: true` beside the step if that is expected.",
                    )
                )
        return failures


def _guarded(run: Callable[..., StepResult]) -> Callable[..., StepResult]:
    """Every step's ``run``: a pattern that times out on a key (catastrophic backtracking),
    or runs out of its time over all keys (:func:`~remap.rules.patterns.pattern_budget`, here
    or around the whole plan), is an error in the rules, reported with the step and its
    position."""

    @functools.wraps(run)
    def guarded(self: Step, items: list[Item], ctx: StepContext | None = None) -> StepResult:
        try:
            with pattern_budget():
                return run(self, items, ctx or StepContext())
        except PatternError as exc:
            raise RulesError(f"{self.label}: {exc}", where=self.where) from None

    return guarded


STEPS: dict[str, type[Step]] = {}


def register(cls: type[Step]) -> type[Step]:
    """Class decorator adding a step to the registry under ``cls.kind``."""
    STEPS[cls.kind] = cls
    return cls


def close_keys(pattern: str, keys: Sequence[str], n: int = 3) -> list[str]:
    """Keys that look most like a pattern's literal text, for "matched no key" hints."""
    literal = regex.sub(r"\\(.)", r"\1", regex.sub(r"[\^\$\(\)\[\]\*\+\?\{\}\|]|\\d|\\w|\\s", "", pattern))
    sample = keys if len(keys) <= 5000 else keys[:5000]
    fragments = {k[: len(literal) + 8] for k in sample} | {k for k in sample if len(k) <= 256}  # difflib is quadratic in length
    near = difflib.get_close_matches(literal, list(fragments), n=n, cutoff=0.5)
    return near


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    if not items:
        raise StepSpecError(f"expected at least one {what}, found an empty list")
    for i, p in enumerate(items):
        try:
            compile_regex(p)
        except PatternError as exc:
            raise StepSpecError(str(exc), field=i if not isinstance(value, str) else None) from None
    return items


def _compile(pattern: str, field: Any = None, **where: Any) -> regex.Pattern[str]:
    try:
        return compile_regex(pattern)
    except PatternError as exc:
        raise StepSpecError(str(exc), field, **where) from None


def _template(text: str, compiled: regex.Pattern[str], add: dict[Any, int] | None, field: Any = None, **where: Any) -> Template:
    try:
        return Template.parse(text, compiled, add)
    except PatternError as exc:
        raise StepSpecError(str(exc), field, **where) from None


STRINGS = {"type": ["string", "array"], "items": {"type": "string"}, "minItems": 1}


# --------------------------------------------------------------------------- name steps


@dataclass(frozen=True)
class NameStep(Step):
    """A step that acts on key names alone: ``name_map`` says what one key becomes.

    Because the result depends on the name only, planning can run these steps once per
    *shape* of key (digits abstracted, see :mod:`remap.planning.name_pass`) instead of once per key.
    """

    #: What a key in which none of :meth:`regexes` is found becomes: kept as it is, or
    #: (for ``keep``) dropped.
    drops_unmatched: ClassVar[bool] = False

    def labels(self) -> tuple[str, ...]:
        """What each entry of ``counts`` counts (patterns or prefixes)."""
        raise NotImplementedError

    def name_map(self, key: str) -> tuple[str | None, tuple[int, ...]]:
        """``(new key, or None when the key leaves; indexes of the labels that matched)``.

        Raises :class:`CaptureError` for index arithmetic on a non-integer capture.
        """
        raise NotImplementedError

    def with_patterns(self, rewrite: Callable[[str], str | None]) -> NameStep | None:
        """A copy whose regexes are ``rewrite(pattern)``; None when a pattern cannot be rewritten."""
        raise NotImplementedError

    def regexes(self) -> tuple[str, ...] | None:
        """The regexes this step looks for in a key. Every key in which none of them is
        found goes through the step alike (kept, or for ``keep`` dropped); None when the
        step acts on keys without looking for anything (``add_prefix`` on every key)."""
        raise NotImplementedError

    def run(self, items: list[Item], ctx: StepContext | None = None) -> StepResult:
        labels = self.labels()
        counts = [0] * len(labels)
        out, dropped, failures = [], [], []
        for item in items:
            try:
                key, hits = self.name_map(item.key)
            except CaptureError as exc:
                if hasattr(exc, "label_index"):
                    counts[exc.label_index] += 1
                failures.append(Failure("bad_capture", f"{self.label}: key {item.key!r}: {exc}", item.sources))
                out.append(item)
                continue
            for n in hits:
                counts[n] += 1
            if key is None:
                dropped.append(item)
            else:
                out.append(item.renamed(key, self.index))
        pairs = tuple(zip(labels, counts))
        return StepResult(out, dropped, pairs, failures + self.unmatched(pairs, items))


# --------------------------------------------------------------------------- prefixes


@register
@dataclass(frozen=True)
class StripPrefix(NameStep):
    """``strip_prefix: module.`` or a list: every listed prefix at the start of a key is
    removed, repeatedly, so ``module._orig_mod.fc.weight`` loses both."""

    prefixes: tuple[str, ...] = ()
    kind: ClassVar[str] = "strip_prefix"
    schema: ClassVar[dict[str, Any]] = STRINGS

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        prefixes = (value,) if isinstance(value, str) else tuple(value)
        if any(p == "" for p in prefixes):
            raise StepSpecError("expected a non-empty prefix, found ''")
        return cls(index, where, optional, prefixes)

    def summary(self) -> str:
        return f"strip_prefix {quotes(self.prefixes)}"

    def labels(self) -> tuple[str, ...]:
        return self.prefixes

    def name_map(self, key: str) -> tuple[str | None, tuple[int, ...]]:
        seen: list[int] = []
        while True:
            hit = next((n for n, p in enumerate(self.prefixes) if key.startswith(p) and len(key) > len(p)), None)
            if hit is None:
                return key, tuple(dict.fromkeys(seen))
            key = key[len(self.prefixes[hit]) :]
            seen.append(hit)

    def with_patterns(self, rewrite: Callable[[str], str | None]) -> NameStep | None:
        return None if any(_has_digit(p) for p in self.prefixes) else self

    def regexes(self) -> tuple[str, ...] | None:
        return tuple(regex.escape(p) for p in self.prefixes)


@register
@dataclass(frozen=True)
class AddPrefix(NameStep):
    """``add_prefix: backbone.`` on every key, or ``{prefix: backbone., match: [regex]}``
    on the keys matching any of the patterns."""

    prefix: str = ""
    match: tuple[str, ...] = ()
    kind: ClassVar[str] = "add_prefix"
    schema: ClassVar[dict[str, Any]] = {
        "type": ["string", "object"],
        "properties": {"prefix": {"type": "string"}, "match": STRINGS},
        "required": ["prefix"],
        "additionalProperties": False,
    }

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        if isinstance(value, str):
            if not value:
                raise StepSpecError("expected a non-empty prefix, found ''")
            return cls(index, where, optional, value)
        if not value["prefix"]:
            raise StepSpecError("expected a non-empty prefix, found ''", "prefix")
        try:
            match = _patterns(value["match"], "pattern") if "match" in value else ()
        except StepSpecError as exc:
            raise StepSpecError(str(exc), ("match", *exc.path)) from None
        return cls(index, where, optional, value["prefix"], match)

    def summary(self) -> str:
        scope = f" on {quotes(self.match)}" if self.match else ""
        return f"add_prefix {quote(self.prefix)}{scope}"

    def labels(self) -> tuple[str, ...]:
        return self.match or (self.prefix,)

    def name_map(self, key: str) -> tuple[str | None, tuple[int, ...]]:
        if not self.match:
            return self.prefix + key, (0,)
        hit = next((n for n, p in enumerate(self.match) if search(compile_regex(p), key)), None)
        return (key, ()) if hit is None else (self.prefix + key, (hit,))

    def with_patterns(self, rewrite: Callable[[str], str | None]) -> NameStep | None:
        match = tuple(rewrite(p) for p in self.match)
        if _has_digit(self.prefix) or None in match:
            return None
        return replace(self, match=match)  # type: ignore[arg-type]

    def regexes(self) -> tuple[str, ...] | None:
        return self.match or None


# --------------------------------------------------------------------------- rename


@dataclass(frozen=True)
class _Rule:
    pattern: str
    template: Template


@register
@dataclass(frozen=True)
class Rename(NameStep):
    """Regex renames. Mapping form ``{pattern: replacement, ...}``: for each key the first
    pattern that is found anywhere in it (anchor with ^ $) replaces every occurrence.
    Long form ``{from, to, add}``: ``add: {1: 1}`` adds to captured integer indices."""

    rules: tuple[_Rule, ...] = ()
    kind: ClassVar[str] = "rename"
    schema: ClassVar[dict[str, Any]] = {"type": "object", "minProperties": 1}
    LONG: ClassVar[frozenset[str]] = frozenset({"from", "to", "add"})

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        if "from" in value or "to" in value:
            return cls(index, where, optional, (cls._long(value),))
        rules = []
        for pattern, replacement in value.items():
            # the message names the pattern, so no field breadcrumb; a bad pattern points at its key
            if not isinstance(pattern, str):
                raise StepSpecError(f"expected a regex string as pattern, found {describe_value(pattern)}", at=(pattern,), key=True)
            compiled = _compile(pattern, at=(pattern,), key=True)
            if not isinstance(replacement, str):
                hint = "; to remove keys, use `drop`" if replacement is None else ""
                raise StepSpecError(
                    f"pattern {quote(pattern)}: expected a replacement string, found {describe_value(replacement)}{hint}",
                    at=(pattern,),
                )
            rules.append(_Rule(pattern, _template(replacement, compiled, None, at=(pattern,))))
        return cls(index, where, optional, tuple(rules))

    @classmethod
    def _long(cls, value: dict[str, Any]) -> _Rule:
        extra = [k for k in value if k not in cls.LONG]
        if extra:
            near = difflib.get_close_matches(str(extra[0]), sorted(cls.LONG), n=1, cutoff=0.6)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise StepSpecError(
                f"unknown field {quote(str(extra[0]))}{hint}; the from/to form takes: from, to, add", at=(extra[0],), key=True
            )
        for name in ("from", "to"):
            if name not in value:
                raise StepSpecError(f"missing required field '{name}': the from/to form needs both 'from' and 'to'")
            if not isinstance(value[name], str):
                raise StepSpecError(f"expected a string, found {describe_value(value[name])}", name)
        add = value.get("add")
        if "add" in value and (not isinstance(add, dict) or not add):
            raise StepSpecError(f"expected a mapping of group -> integer, found {describe_value(add)}", "add")
        for group, delta in (add or {}).items():
            if not isinstance(delta, int) or isinstance(delta, bool):
                raise StepSpecError(
                    f"group {group}: expected an integer to add, found {describe_value(delta)}", "add", at=("add", group)
                )
        compiled = _compile(value["from"], field="from")
        template = _template(value["to"], compiled, None, field="to")
        if add:
            template = _template(value["to"], compiled, add, at=("add",))  # the message starts with "add"
        return _Rule(value["from"], template)

    def summary(self) -> str:
        parts = []
        for r in self.rules:
            add = f" add {dict(r.template.add)}" if r.template.add else ""
            parts.append(f"{quote(r.pattern)} -> {quote(r.template.text)}{add}")
        return "rename " + "; ".join(parts)

    def labels(self) -> tuple[str, ...]:
        return tuple(r.pattern for r in self.rules)

    def name_map(self, key: str) -> tuple[str | None, tuple[int, ...]]:
        for n, rule in enumerate(self.rules):
            try:
                new, hits = rule.template.subn(compile_regex(rule.pattern), key)  # one pass: no search, then sub
            except CaptureError as exc:  # raised only on a match: that pattern counts as matched
                exc.label_index = n  # type: ignore[attr-defined]
                raise
            if hits:
                return new, (n,)
        return key, ()

    def with_patterns(self, rewrite: Callable[[str], str | None]) -> NameStep | None:
        rules = []
        for r in self.rules:
            pattern = rewrite(r.pattern)
            if pattern is None or r.template.add:  # index arithmetic needs the numbers themselves
                return None
            rules.append(_Rule(pattern, r.template))
        return replace(self, rules=tuple(rules))

    def regexes(self) -> tuple[str, ...] | None:
        return tuple(r.pattern for r in self.rules)


# --------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class _Filter(NameStep):
    patterns: tuple[str, ...] = ()
    schema: ClassVar[dict[str, Any]] = STRINGS
    keep_matching: ClassVar[bool] = False

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        return cls(index, where, optional, _patterns(value, "pattern"))

    def summary(self) -> str:
        return f"{self.kind} {quotes(self.patterns)}"

    def labels(self) -> tuple[str, ...]:
        return self.patterns

    def name_map(self, key: str) -> tuple[str | None, tuple[int, ...]]:
        hit = next((n for n, p in enumerate(self.patterns) if search(compile_regex(p), key)), None)
        stays = (hit is not None) == self.keep_matching
        return (key if stays else None), (() if hit is None else (hit,))

    def with_patterns(self, rewrite: Callable[[str], str | None]) -> NameStep | None:
        patterns = tuple(rewrite(p) for p in self.patterns)
        return None if None in patterns else replace(self, patterns=patterns)  # type: ignore[arg-type]

    def regexes(self) -> tuple[str, ...] | None:
        return self.patterns


@register
@dataclass(frozen=True)
class Drop(_Filter):
    """``drop: [regex, ...]``: keys matching any pattern leave (reported as dropped here)."""

    kind: ClassVar[str] = "drop"


@register
@dataclass(frozen=True)
class Keep(_Filter):
    """``keep: [regex, ...]``: every key matching none of the patterns leaves."""

    kind: ClassVar[str] = "keep"
    keep_matching: ClassVar[bool] = True
    drops_unmatched: ClassVar[bool] = True


def _has_digit(text: str) -> bool:
    return any(c.isdigit() for c in text)
