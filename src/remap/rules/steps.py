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
from .patterns import CaptureError, PatternError, Template, Unmapped, compile_regex, pattern_budget, quote, quotes, search
from ..report.records import Failure

__all__ = ["Item", "Inverse", "NameStep", "Op", "Recipe", "StepContext", "StepResult", "Step", "STEPS", "register", "StepSpecError",
           "close_keys", "run_recipe", "Size", "SizeError", "ConfigVar", "parse_size", "MappedRename"]  # fmt: skip


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
    #: The ``vars:`` this step's size expressions name, as ``(name, value)`` pairs: an
    #: integer, or a :class:`ConfigVar` until :meth:`~remap.rules.parse.Rules.bound_to` reads it.
    vars: tuple[tuple[str, Any], ...] = field(default=(), kw_only=True)
    #: ``from: NAME``: the step sees only the keys of that named source (several sources); None: every key.
    reads: str | None = field(default=None, kw_only=True)

    kind: ClassVar[str] = ""
    schema: ClassVar[dict[str, Any]] = {}

    def size_exprs(self) -> tuple[tuple[tuple[Any, ...], Size], ...]:
        """The size expressions of this step that name ``vars``, each with its field path
        inside the step's value (for the parser's checks and positions)."""
        return ()

    def var_values(self) -> dict[str, Any]:
        return dict(self.vars)

    def vars_text(self) -> str:
        """`` (heads=32, kv_heads from config.num_key_value_heads)`` for a summary; empty without vars."""
        if not self.vars:
            return ""
        words = [f"{n}={v}" if isinstance(v, int) else f"{n} from config.{v.attribute}" for n, v in self.vars]
        return f" ({', '.join(words)})"

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


# --------------------------------------------------------------------------- size expressions


class SizeError(ValueError):
    """A size expression that does not parse; ``column`` (1-based) is where in its text."""

    def __init__(self, message: str, column: int | None = None) -> None:
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class ConfigVar:
    """A ``vars:`` entry read from the target model's config: ``{config: num_attention_heads}``
    (a dotted path reaches a sub-config: ``text_config.num_attention_heads``). ``where`` is
    its place in the rules file, for the error when it cannot be read."""

    name: str
    attribute: str
    where: str | None = field(default=None, compare=False)


_SIZE_TOKEN = regex.compile(r"\s*(?:(?P<int>[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>[*/])|(?P<bad>\S))")
DIM_NAME = regex.compile(r"d([0-9]+)")
MAX_SIZE_TEXT = 200  # a size is a few names and numbers


@dataclass(frozen=True)
class Size:
    """A size computed from the input tensor's dims and the rules' ``vars``.

    The grammar is small and strict: a product and quotient, read left to right, of
    integers, names from ``vars`` and ``dN`` (dim N of the tensor the op is given):
    ``d0/heads``, ``heads*2``, ``d0/heads/2``. No parentheses, no + or -, no float; a
    division must be exact (a remainder fails the plan naming the key and the values).
    ``-1`` (one size inferred) is a whole entry of a shape, never part of an expression.

    >>> size = parse_size("d0 / heads / 2")
    >>> size.names, size.value((4096, 64), {"heads": 32})
    (('heads',), 64)
    """

    text: str
    terms: tuple[tuple[str, str, int | str], ...]  # (operator "" | "*" | "/", "int" | "dim" | "var", value)

    @property
    def names(self) -> tuple[str, ...]:
        """The ``vars`` it names, in order, once each."""
        return tuple(dict.fromkeys(str(v) for _, kind, v in self.terms if kind == "var"))

    def __str__(self) -> str:
        return self.text

    def value(self, dims: Sequence[int], values: Mapping[str, Any]) -> int:
        """The size for a tensor of shape ``dims``; :class:`~remap.rules.ops.OpError` saying
        which term and which values when it cannot be computed."""
        from .ops import SizeValueError as OpError

        total, shown = 0, []
        for op, kind, raw in self.terms:
            if kind == "int":
                v = int(raw)
            elif kind == "dim":
                if int(raw) >= len(dims):
                    raise OpError(f"size '{self.text}': d{raw} is dim {raw}, but the input {list(dims)} has {len(dims)} dim(s)")
                v = dims[int(raw)]
            else:
                v = values.get(str(raw))
                if isinstance(v, ConfigVar):
                    raise OpError(f"size '{self.text}': {raw} is read from the target model's config ({v.attribute}), and this "
                                  "plan was made without the target module: plan with the model (remap.plan(model, ...)), "
                                  f"or write the number in vars (`{raw}: 32`)")  # fmt: skip
                if v is None:
                    raise OpError(f"size '{self.text}': {raw} is not in vars")
            shown.append(f"d{raw}={v}" if kind == "dim" else f"{raw}={v}" if kind == "var" else str(v))
            if op == "":
                total = v
            elif op == "*":
                total *= v
            elif v == 0:
                raise OpError(f"size '{self.text}' divides by zero ({', '.join(shown)})")
            elif total % v:
                raise OpError(f"size '{self.text}' does not divide exactly: {total} / {v} leaves a remainder of {total % v} "
                              f"({', '.join(s for s in shown if '=' in s)})")  # fmt: skip
            else:
                total //= v
        return total


def parse_size(value: Any) -> int | Size:
    """One entry of a shape: an integer (``-1`` allowed) as it is, an expression as a
    :class:`Size`; :class:`SizeError` says what is wrong and at which column.

    >>> parse_size(-1), parse_size("-1"), parse_size("d1").terms
    (-1, -1, (('', 'dim', 1),))
    >>> parse_size("d0//2")
    Traceback (most recent call last):
    ...
    remap.rules.steps.SizeError: bad size 'd0//2' at column 4: expected an integer, a name from vars or dN, found '/'
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SizeError(f"expected a size (an integer, a name from vars, dN, or an expression of them with * and /), "
                        f"found {describe_value(value)}")  # fmt: skip
    if isinstance(value, int):
        if value < -1:
            raise SizeError(f"expected a size >= 0 or -1 (inferred), found {value}")
        return value
    text = value.strip()
    if text == "-1":
        return -1
    if len(value) > MAX_SIZE_TEXT:
        raise SizeError(f"a size expression of {len(value)} characters; at most {MAX_SIZE_TEXT}")
    if not text:
        raise SizeError("expected a size, found an empty string")
    terms: list[tuple[str, str, int | str]] = []
    op: str | None = ""
    at = 0
    for m in _SIZE_TOKEN.finditer(value):
        column = m.start(m.lastgroup) + 1 if m.lastgroup else m.start() + 1
        at = m.end()
        if m["bad"] is not None or (m["op"] is not None) == (op is not None):
            found = m[m.lastgroup] if m.lastgroup else value[m.start():]
            expected = "* or / between sizes" if op is None else "an integer, a name from vars or dN"
            hint = ""
            if found in "()":
                hint = " (no parentheses: write d0/heads/2, read left to right)"
            elif found in "+-":
                hint = " (sizes are products and exact quotients: + and - are not part of them; -1 is a whole entry)"
            raise SizeError(f"bad size '{value}' at column {column}: expected {expected}, found '{found}'{hint}", column)
        if m["op"] is not None:
            op = m["op"]
            continue
        if m["int"] is not None:
            terms.append((op, "int", int(m["int"])))
        elif DIM_NAME.fullmatch(m["name"]):
            terms.append((op, "dim", int(m["name"][1:])))
        else:
            terms.append((op, "var", m["name"]))
        op = None
    if value[at:].strip() or op is not None:
        raise SizeError(f"bad size '{value}' at column {len(value.rstrip())}: it ends with '{op}', expected a size after it",
                        len(value.rstrip()))  # fmt: skip
    if len(terms) == 1 and terms[0][1] == "int":
        return int(terms[0][2])
    return Size(text, tuple(terms))


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
        return self.run_names(items, self.name_map)

    def run_names(self, items: list[Item], name_map: Callable[[str], tuple[str | None, tuple[int, ...]]],
                  more: Callable[[list[Item]], list[Failure]] = lambda items: []) -> StepResult:  # fmt: skip
        """Rename (or drop, on None) every item by ``name_map``, counting each label's hits;
        ``more`` adds failures of the step's own once every item was seen."""
        labels = self.labels()
        counts = [0] * len(labels)
        out, dropped, failures = [], [], []
        for item in items:
            try:
                key, hits = name_map(item.key)
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
        return StepResult(out, dropped, pairs, failures + self.unmatched(pairs, items) + more(items))


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
    select: tuple[Any, tuple[int, ...]] | None = None  # (group, keep) as written, for the summary

    def text(self) -> str:
        add = f" add {dict(self.template.add)}" if self.template.add else ""
        if self.select is not None:
            extra = f" select group {_show_group(self.select[0])} keep {list(self.select[1])}"
        else:
            extra = f" {self.template.map_text()}" if self.template.maps else ""
        return f"{quote(self.pattern)} -> {quote(self.template.text)}{add}{extra}"


def _show_group(ref: Any) -> str:
    return str(ref) if isinstance(ref, int) else f"'{ref}'"


class _Renaming:
    """What both kinds of rename share: the forms, the summary and what one key becomes.

    Mapping form ``{pattern: replacement, ...}``: for each key the first pattern that is
    found anywhere in it (anchor with ^ $) replaces every occurrence; a replacement may be
    a mapping ``{to, add, map, select}`` instead of a string. Long form ``{from, to, add,
    map, select}``. ``add: {1: 1}`` adds to captured integer indices; ``map: {1: {0: 0, 2: 1}}``
    sends group 1's captured index through a table and ``select: {group: 1, keep: [0, 2, 5]}``
    renumbers the kept indices 0, 1, 2: a key whose index the table does not list is
    dropped (reported as dropped by the step).
    """

    rules: tuple[_Rule, ...]
    LONG: ClassVar[frozenset[str]] = frozenset({"from", "to", "add", "map", "select"})
    VALUE: ClassVar[tuple[str, ...]] = ("to", "add", "map", "select")

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        if "from" in value or "to" in value:
            rules = (cls._long(value),)
        else:
            rules = tuple(cls._entry(pattern, replacement) for pattern, replacement in value.items())
        kind = MappedRename if any(r.template.maps for r in rules) else Rename
        return kind(index, where, optional, rules)

    @classmethod
    def _entry(cls, pattern: Any, replacement: Any) -> _Rule:
        """One ``pattern: replacement`` of the mapping form; the message names the pattern,
        so no field breadcrumb; a bad pattern points at its key."""
        if not isinstance(pattern, str):
            raise StepSpecError(f"expected a regex string as pattern, found {describe_value(pattern)}", at=(pattern,), key=True)
        compiled = _compile(pattern, at=(pattern,), key=True)
        if isinstance(replacement, dict):
            extra = [k for k in replacement if k not in cls.VALUE]
            if extra:
                near = difflib.get_close_matches(str(extra[0]), cls.VALUE, n=1, cutoff=0.6)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise StepSpecError(f"pattern {quote(pattern)}: unknown field {quote(str(extra[0]))}{hint}; a replacement mapping "
                                    f"takes: {', '.join(cls.VALUE)}", at=(pattern, extra[0]), key=True)  # fmt: skip
            if "to" not in replacement:
                raise StepSpecError(f"pattern {quote(pattern)}: missing required field 'to' (the replacement)", at=(pattern,))
            if not isinstance(replacement["to"], str):
                raise StepSpecError(f"pattern {quote(pattern)}: expected a replacement string, found "
                                    f"{describe_value(replacement['to'])}", at=(pattern, "to"))  # fmt: skip
            return cls._rule(pattern, compiled, replacement, (pattern,))
        if not isinstance(replacement, str):
            hint = "; to remove keys, use `drop`" if replacement is None else ""
            raise StepSpecError(
                f"pattern {quote(pattern)}: expected a replacement string or a mapping {{to, add, map, select}}, "
                f"found {describe_value(replacement)}{hint}",
                at=(pattern,),
            )
        return _Rule(pattern, _template(replacement, compiled, None, at=(pattern,)))

    @classmethod
    def _long(cls, value: dict[str, Any]) -> _Rule:
        extra = [k for k in value if k not in cls.LONG]
        if extra:
            near = difflib.get_close_matches(str(extra[0]), sorted(cls.LONG), n=1, cutoff=0.6)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise StepSpecError(
                f"unknown field {quote(str(extra[0]))}{hint}; the from/to form takes: from, to, add, map, select",
                at=(extra[0],), key=True,
            )
        for name in ("from", "to"):
            if name not in value:
                raise StepSpecError(f"missing required field '{name}': the from/to form needs both 'from' and 'to'")
            if not isinstance(value[name], str):
                raise StepSpecError(f"expected a string, found {describe_value(value[name])}", name)
        compiled = _compile(value["from"], field="from")
        _template(value["to"], compiled, None, field="to")  # the replacement's own errors name field 'to'
        return cls._rule(value["from"], compiled, value, ())

    @classmethod
    def _rule(cls, pattern: str, compiled: Any, value: dict[str, Any], at: tuple[Any, ...]) -> _Rule:
        """A rule from ``{to, add, map, select}`` (``at``: where that mapping is in the step's value)."""
        fields = (lambda name: (*at, name)) if at else (lambda name: name)
        try:
            add = _adds(value, fields)
            maps, select = _maps(value, compiled, fields, at)
        except StepSpecError as exc:
            if not at:
                raise
            # the mapping form: the message names the pattern, and the place is where the error is
            raise StepSpecError(f"pattern {quote(pattern)}: {exc}", at=exc.at, key=exc.key) from None
        try:
            template = Template.parse(value["to"], compiled, add, maps)
        except PatternError as exc:
            name = "map" if "map" in str(exc).split(" ", 1)[0] or str(exc).startswith("group") else "add"
            if select is not None and name == "map":
                name = "select"
            where = (*at, name) if name in value else (*at, "to")
            raise StepSpecError(str(exc), at=where) from None
        return _Rule(pattern, template, select)

    def summary(self) -> str:
        return "rename " + "; ".join(r.text() for r in self.rules)

    def labels(self) -> tuple[str, ...]:
        return tuple(r.pattern for r in self.rules)

    def map_key(self, key: str, seen: list[tuple[Any, int]] | None = None) -> tuple[str | None, tuple[int, ...]]:
        """``(new key, or None when an index map drops it; the rule that matched)``; ``seen``
        collects the map entries used, as ``(rule, group, index)``."""
        for n, rule in enumerate(self.rules):
            used: list[tuple[Any, int]] | None = [] if seen is not None and rule.template.maps else None
            try:
                new, hits = rule.template.subn(compile_regex(rule.pattern), key, used)  # one pass: no search, then sub
            except CaptureError as exc:  # raised only on a match: that pattern counts as matched
                exc.label_index = n  # type: ignore[attr-defined]
                raise
            except Unmapped:
                return None, (n,)
            if hits:
                if used and seen is not None:
                    seen.extend((n, ref, index) for ref, index in used)
                return new, (n,)
        return key, ()

    def name_map(self, key: str) -> tuple[str | None, tuple[int, ...]]:
        return self.map_key(key)

    def regexes(self) -> tuple[str, ...] | None:
        return tuple(r.pattern for r in self.rules)


def _adds(value: dict[str, Any], fields: Callable[[str], Any]) -> dict[Any, int] | None:
    if "add" not in value:
        return None
    add = value["add"]
    if not isinstance(add, dict) or not add:
        raise StepSpecError(f"expected a mapping of group -> integer, found {describe_value(add)}", fields("add"))
    for group, delta in add.items():
        if not isinstance(delta, int) or isinstance(delta, bool):
            raise StepSpecError(f"group {group}: expected an integer to add, found {describe_value(delta)}", fields("add"),
                                at=_path(fields("add"), group))  # fmt: skip
    return add


def _path(base: Any, *more: Any) -> tuple[Any, ...]:
    return (*(base if isinstance(base, tuple) else (base,)), *more)


def _index(value: Any) -> int | None:
    """A non-negative integer index (an ASCII-digit string from Python too), else None."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _maps(value: dict[str, Any], compiled: Any, fields: Callable[[str], Any], at: tuple[Any, ...]
          ) -> tuple[dict[Any, dict[int, int]] | None, tuple[Any, tuple[int, ...]] | None]:  # fmt: skip
    """``map`` and ``select`` as one table per group, and ``select`` as written (for the summary)."""
    tables: dict[Any, dict[int, int]] = {}
    if "map" in value:
        given = value["map"]
        if not isinstance(given, dict) or not given:
            raise StepSpecError(f"expected a mapping of group -> {{index: new index}}, found {describe_value(given)}", fields("map"))
        for group, table in given.items():
            where = _path(fields("map"), group)
            if not isinstance(table, dict) or not table:
                raise StepSpecError(f"group {group}: expected a mapping of index -> new index, found {describe_value(table)}",
                                    fields("map"), at=where)  # fmt: skip
            tables[group] = _table(table, f"group {group}", fields("map"), where)
    select = None
    if "select" in value:
        given = value["select"]
        where = _path(fields("select"))
        if not isinstance(given, dict) or "keep" not in given or any(k not in ("group", "keep") for k in given):
            raise StepSpecError(f"expected {{group: N, keep: [index, ...]}}, found {describe_value(given)}", fields("select"))
        group = given.get("group")
        if group is None:
            if compiled.groups != 1:
                raise StepSpecError(f"the pattern has {compiled.groups} groups: say which one select renumbers (group: N)",
                                    fields("select"))  # fmt: skip
            group = 1
        keep = given["keep"]
        if not isinstance(keep, list) or not keep:
            raise StepSpecError(f"expected a non-empty list of indices to keep, found {describe_value(keep)}",
                                fields("select"), at=(*where, "keep"))  # fmt: skip
        indices = []
        for n, item in enumerate(keep):
            i = _index(item)
            if i is None:
                raise StepSpecError(f"keep: item {n + 1}: expected a non-negative integer index, found {describe_value(item)}",
                                    fields("select"), at=(*where, "keep", n))  # fmt: skip
            if i in indices:
                raise StepSpecError(f"keep lists index {i} twice (items {indices.index(i) + 1} and {n + 1})",
                                    fields("select"), at=(*where, "keep", n))  # fmt: skip
            indices.append(i)
        same = next((g for g in tables if _same_group(g, group, compiled)), None)
        if same is not None:
            raise StepSpecError(f"group {group} is in both map and select; give it one of them", fields("select"))
        tables[group] = {i: n for n, i in enumerate(indices)}
        select = (group, tuple(indices))
    return (tables or None), select


def _same_group(a: Any, b: Any, compiled: Any) -> bool:
    def number(g: Any) -> Any:
        g = int(g) if isinstance(g, str) and g.isascii() and g.isdigit() else g
        return compiled.groupindex.get(g, g) if isinstance(g, str) else g

    return number(a) == number(b)


def _table(table: dict[Any, Any], what: str, field_: Any, where: tuple[Any, ...]) -> dict[int, int]:
    """An index map ``{index: new index}``: non-negative integers, no two indices sent to one."""
    out: dict[int, int] = {}
    back: dict[int, int] = {}
    for k, v in table.items():
        i, j = _index(k), _index(v)
        if i is None:
            raise StepSpecError(f"{what}: expected a non-negative integer index, found {describe_value(k)}", field_,
                                at=(*where, k), key=True)  # fmt: skip
        if j is None or isinstance(v, str):
            raise StepSpecError(f"{what}: index {i}: expected a non-negative integer as its new index, found {describe_value(v)}",
                                field_, at=(*where, k))  # fmt: skip
        if i in out:
            raise StepSpecError(f"{what}: index {i} is listed twice", field_, at=(*where, k), key=True)
        if j in back:
            raise StepSpecError(f"{what}: indices {back[j]} and {i} both become {j}; an index map sends each index to its own "
                                "new index", field_, at=(*where, k))  # fmt: skip
        out[i], back[j] = j, i
    return out


@register
@dataclass(frozen=True)
class Rename(_Renaming, NameStep):
    """Regex renames (see :class:`_Renaming` for the forms). A rename with an index map
    parses as a :class:`MappedRename`."""

    rules: tuple[_Rule, ...] = ()
    kind: ClassVar[str] = "rename"
    schema: ClassVar[dict[str, Any]] = {"type": "object", "minProperties": 1}

    def with_patterns(self, rewrite: Callable[[str], str | None]) -> NameStep | None:
        rules = []
        for r in self.rules:
            pattern = rewrite(r.pattern)
            if pattern is None or r.template.add or r.template.maps:  # index arithmetic needs the numbers themselves
                return None
            rules.append(replace(r, pattern=pattern))
        return replace(self, rules=tuple(rules))


@dataclass(frozen=True)
class MappedRename(_Renaming, Step):
    """A rename with an index map (``map`` or ``select``). It runs key by key, not as a
    name-only step planned once per key shape: it counts every entry of its maps, and a map
    entry that no key used fails the plan as a pattern that matched nothing does."""

    rules: tuple[_Rule, ...] = ()
    kind: ClassVar[str] = "rename"
    schema: ClassVar[dict[str, Any]] = Rename.schema

    def run(self, items: list[Item], ctx: StepContext | None = None) -> StepResult:
        seen: list[tuple[int, Any, int]] = []
        return NameStep.run_names(self, items, lambda key: self.map_key(key, seen), lambda items: self._unused_entries(seen, items))  # type: ignore[arg-type]

    def _unused_entries(self, seen: list[tuple[int, Any, int]], items: list[Item]) -> list[Failure]:
        """A failure per map entry that no key used (unless optional), naming the indices found."""
        if self.optional:
            return []
        used = set(seen)
        failures = []
        where = f" ({self.where})" if self.where else ""
        for n, rule in enumerate(self.rules):
            for ref, table in rule.template.maps:
                idle = [i for i, _ in table if (n, ref, i) not in used]
                if not idle:
                    continue
                found = _found_indices(rule, ref, items)
                have = f"; indices found at this step: {found}" if found else ""
                what = f"select group {_show_group(ref)} keep" if rule.select is not None else f"map group {_show_group(ref)}"
                failures.append(Failure(
                    "unmatched_step",
                    f"{self.label}{where}: {quote(rule.pattern)} {what}: no key has index {', '.join(map(str, idle))}{have}. "
                    "Fix the map, or add `optional: true` beside the step if that is expected.",
                ))  # fmt: skip
        return failures


def _found_indices(rule: _Rule, ref: Any, items: list[Item], limit: int = 20) -> str:
    """The indices group ``ref`` of ``rule`` captures in the keys, as ``0, 1, 2`` (at most ``limit``)."""
    compiled = compile_regex(rule.pattern)
    found: set[int] = set()
    for item in items:
        for m in compiled.finditer(item.key):
            text = m.group(ref)
            if text is not None and text.isascii() and text.isdigit() and len(text) < 20:
                found.add(int(text))
    shown = sorted(found)
    return ", ".join(map(str, shown[:limit])) + (f" and {len(shown) - limit} more" if len(shown) > limit else "")


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
