"""Tensor-op steps: transpose, reshape, slice, pad, cast, merge, split, adapt and permute_heads.

Each step matches keys by regex (as they are named at that step), computes the output
shape from the input shape at planning time (so a dry run catches an impossible op),
and records an :class:`~remap.rules.steps.Op` that the engine runs at apply time. ``pad`` and
``adapt`` fit a tensor to the target's shape, so they look the key up among the target's
keys: put them after the renames that give a key its target name.

>>> from remap.meta import TensorMeta
>>> from remap.rules.steps import Item
>>> step = STEPS["transpose"].parse(r"\\.c_attn\\.weight$", index=1, where=None, optional=False)
>>> [i.meta.shape for i in step.run([Item.source("h.0.attn.c_attn.weight", TensorMeta((768, 2304)))]).items]
[(2304, 768)]
"""

from __future__ import annotations

import difflib
import functools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from . import ops
from ..errors import describe_value
from ..meta import DTYPE_ALIASES, DTYPE_NAMES, TensorMeta, dtype_name
from .ops import OpError
from .patterns import PatternError, Template, compile_regex, quote, quotes, search
from ..report.records import Failure
from .steps import STEPS, Inverse, Item, Op, Recipe, Size, SizeError, Step, StepContext, StepResult, StepSpecError, parse_size, register

__all__ = ["Transpose", "Reshape", "Slice", "Pad", "Cast", "Merge", "Split", "Adapt", "PermuteHeads"]

MATCH = {"type": ["string", "array"], "items": {"type": "string"}, "minItems": 1}
INT = {"type": "integer"}
INTS = {"type": "array", "items": INT}
#: The selectors every tensor step takes beside ``match``: a key is acted on only when its
#: name matches and its tensor has one of these ranks and dtypes.
SELECTORS = {
    "rank": {"type": ["integer", "array"], "items": {"type": "integer", "minimum": 0}, "minimum": 0, "minItems": 1},
    "dtype": {"type": ["string", "array"], "items": {"type": "string"}, "minItems": 1},
}


def _object(properties: dict[str, Any], required: tuple[str, ...] = ("match",)) -> dict[str, Any]:
    selectors = {k: v for k, v in SELECTORS.items() if k not in properties}  # cast's own `dtype` is what it casts to
    return {"type": "object", "properties": {"match": MATCH, **properties, **selectors}, "required": list(required),
            "additionalProperties": False}  # fmt: skip


def _selectors(value: Any, dtype_field: str = "dtype") -> dict[str, Any]:
    """``ranks`` and ``dtypes`` from a step's mapping (absent: None, any rank or dtype)."""
    out: dict[str, Any] = {}
    if not isinstance(value, dict):
        return out
    if "rank" in value:
        rank = value["rank"]
        out["ranks"] = tuple(dict.fromkeys((rank,) if isinstance(rank, int) else rank))
    if dtype_field in value:
        given = value[dtype_field]
        names = (given,) if isinstance(given, str) else tuple(given)
        dtypes = []
        for n, name in enumerate(names):
            if name not in DTYPE_NAMES and name not in DTYPE_ALIASES:
                near = difflib.get_close_matches(name, DTYPE_NAMES, n=1, cutoff=0.6)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise StepSpecError(f"expected a dtype, one of: {', '.join(DTYPE_NAMES)}; found {describe_value(name)}{hint}",
                                    dtype_field if isinstance(given, str) else (dtype_field, n))  # fmt: skip
            dtypes.append(dtype_name(name))
        out["dtypes"] = tuple(dict.fromkeys(dtypes))
    return out


def _with_selectors(parse: Callable[..., Step]) -> Callable[..., Step]:
    """A tensor step's ``parse``, followed by the ``rank``/``dtype`` selectors of its mapping."""

    @functools.wraps(parse)
    def parsed(cls: type[Step], value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        step = parse(cls, value, index=index, where=where, optional=optional)
        selectors = _selectors(value, cls.dtype_selector)  # type: ignore[attr-defined]
        return replace(step, **selectors) if selectors else step

    return parsed


def _patterns(value: Any, field: tuple[str, ...] = ("match",)) -> tuple[str, ...]:
    """The patterns of ``match`` (``field=()``: of a short form, the step's whole value)."""
    items = (value,) if isinstance(value, str) else tuple(value)
    for n, p in enumerate(items):
        try:
            compile_regex(p)
        except PatternError as exc:
            raise StepSpecError(str(exc), field=field if isinstance(value, str) else (*field, n)) from None
    return items


def _inverse_dims(dims: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """The dims that undo ``transpose(dims)``: the same two for a swap, the inverse
    permutation for a permutation of every dim.

    >>> _inverse_dims((2, 0, 1), 3)
    (1, 2, 0)
    """
    if len(dims) == 2:
        return dims
    perm = [d % ndim for d in dims]
    inverse = [0] * ndim
    for position, d in enumerate(perm):
        inverse[d] = position
    return tuple(inverse)


def _shape(meta: TensorMeta) -> str:
    return f"{list(meta.shape)}"


def _target(item: Item, ctx: StepContext, kind: str) -> TensorMeta:
    meta = ctx.target.get(item.key)
    if meta is None:
        raise OpError(f"no target key has this name, so there is no target shape to fit; "
                      f"put {kind} after the steps that give the key its target name")  # fmt: skip
    return TensorMeta(tuple(meta.shape), meta.dtype)


@dataclass(frozen=True)
class _TensorStep(Step):
    """A step that changes each matching key's tensor: subclasses give ``transform``.

    A key is acted on when one of ``patterns`` is found in its name and, where the step
    says ``rank`` or ``dtype``, its tensor has one of ``ranks`` and one of ``dtypes``
    (every subclass's schema and ``parse`` take them, through :func:`_object` and
    :func:`_with_selectors`). A pattern whose keys the selectors all turn away counts as
    matching nothing.
    """

    patterns: tuple[str, ...] = ()
    ranks: tuple[int, ...] | None = field(default=None, kw_only=True)
    dtypes: tuple[str, ...] | None = field(default=None, kw_only=True)
    #: The field that selects by dtype (``cast``, whose ``dtype`` is the dtype it casts to, says ``from_dtype``).
    dtype_selector: ClassVar[str] = "dtype"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "parse" in cls.__dict__:
            cls.parse = classmethod(_with_selectors(cls.__dict__["parse"].__func__))  # type: ignore[method-assign]

    def transform(self, item: Item, ctx: StepContext) -> Item:
        raise NotImplementedError

    def refuses(self, meta: TensorMeta) -> str | None:
        """Which selector turns a tensor away (``"rank"``, ``"dtype"``), or None when it is selected."""
        if self.ranks is not None and len(meta.shape) not in self.ranks:
            return "rank"
        if self.dtypes is not None and meta.dtype not in self.dtypes:
            return "dtype"
        return None

    def matching(self, items: list[Item]) -> tuple[list[tuple[Item, int | None]], list[int], list[list[tuple[Item, str]]]]:
        """Each item with the index of the pattern that selects it (None: left alone), the
        count per pattern, and per pattern the items its name matched but a selector refused."""
        compiled = [compile_regex(p) for p in self.patterns]
        counts = [0] * len(compiled)
        refused: list[list[tuple[Item, str]]] = [[] for _ in compiled]
        hits: list[tuple[Item, int | None]] = []
        for item in items:
            n = next((n for n, c in enumerate(compiled) if search(c, item.key)), None)
            if n is not None:
                why = self.refuses(item.meta)
                if why is not None:
                    refused[n].append((item, why))
                    n = None
                else:
                    counts[n] += 1
            hits.append((item, n))
        return hits, counts, refused

    def run(self, items: list[Item], ctx: StepContext | None = None) -> StepResult:
        ctx = ctx or StepContext()
        hits, counts, refused = self.matching(items)
        out, failures = [], []
        for item, n in hits:
            if n is None:
                out.append(item)
                continue
            try:
                out.append(self.transform(item, ctx))
            except OpError as exc:
                failures.append(self.op_failure(item, exc))
                out.append(item)
        pairs = tuple(zip(self.patterns, counts))
        plain = [(p, n) for (p, n), turned in zip(pairs, refused) if not turned]  # patterns no selector explains
        return StepResult(out, counts=pairs, failures=failures + self.unmatched(plain, items) + self.all_refused(pairs, refused))

    def all_refused(self, pairs: tuple[tuple[str, int], ...], refused: list[list[tuple[Item, str]]]) -> list[Failure]:
        """A pattern whose name matches the selectors all turned away matched no key: say which
        selector did it, and to which keys (unless the step is optional)."""
        if self.optional:
            return []
        failures = []
        for (pattern, n), turned in zip(pairs, refused):
            if n or not turned:
                continue
            whys = sorted({why for _, why in turned})
            which = " and ".join(whys) + (" filters" if len(whys) > 1 else " filter")
            shown = ", ".join(f"{i.key!r} (rank {len(i.meta.shape)}, {i.meta.dtype})" for i, _ in turned[:3])
            more = f" and {len(turned) - 3} more" if len(turned) > 3 else ""
            where = f" ({self.where})" if self.where else ""
            failures.append(Failure(
                "unmatched_step",
                f"{self.label}{where}: {quote(pattern)} matched {len(turned)} key(s), but the {which} ({self.selection()}) "
                f"removed them all: {shown}{more}. Fix the pattern or the filter, or add `optional: true` beside the step "
                "if that is expected.",
            ))  # fmt: skip
        return failures

    def op_failure(self, item: Item, exc: Exception) -> Failure:
        where = f" ({self.where})" if isinstance(exc, ops.SizeValueError) and self.where else ""  # a size of the rules: where it is
        return Failure("op", f"{self.label}{where}: key {item.key!r} {_shape(item.meta)} {item.meta.dtype}: {exc}", item.sources)

    def selection(self) -> str:
        """The selectors as words: ``rank 4``, ``rank 2 or 4, dtype float32``; empty without any."""
        parts = []
        if self.ranks is not None:
            parts.append("rank " + " or ".join(map(str, self.ranks)))
        if self.dtypes is not None:
            parts.append("dtype " + " or ".join(self.dtypes))
        return ", ".join(parts)

    def scope(self) -> str:
        """``on 'regex'``, or with selectors ``on rank-4 float32 keys matching 'regex'`` (the
        patterns last: the report cuts a step of several patterns into rows by them)."""
        if self.ranks is None and self.dtypes is None:
            return f"on {quotes(self.patterns)}"
        words = []
        if self.ranks is not None:
            words.append("rank-" + "/".join(map(str, self.ranks)))
        if self.dtypes is not None:
            words.append("/".join(self.dtypes))
        return f"on {' '.join(words)} keys matching {quotes(self.patterns)}"


# --------------------------------------------------------------------------- one tensor in, one out


@register
@dataclass(frozen=True)
class Transpose(_TensorStep):
    """``transpose: 'regex'`` swaps the last two dims; ``{match, dims: [0, 2]}`` swaps two
    given dims, or ``dims: [0, 2, 3, 1]`` permutes all of them."""

    dims: tuple[int, ...] = (-2, -1)
    kind: ClassVar[str] = "transpose"
    schema: ClassVar[dict[str, Any]] = {**_object({"dims": INTS}), "type": ["string", "array", "object"],
                                        "items": {"type": "string"}, "minItems": 1}  # fmt: skip

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        if isinstance(value, dict):
            dims = tuple(value.get("dims", (-2, -1)))
            if len(dims) < 2:
                raise StepSpecError(f"expected two dims to swap, or every dim in a new order; found {list(dims)}", "dims")
            return cls(index, where, optional, _patterns(value["match"]), dims)
        return cls(index, where, optional, _patterns(value, field=()))

    def summary(self) -> str:
        return f"transpose{self.dims} {self.scope()}"

    def transform(self, item: Item, ctx: StepContext) -> Item:
        shape = ops.transpose_shape(item.meta.shape, self.dims)
        name = "transpose" if len(self.dims) == 2 else "permute"
        op = Op(name, f"{name}({', '.join(map(str, self.dims))})", functools.partial(ops.transpose, dims=self.dims),
                Inverse.of("transpose", dims=_inverse_dims(self.dims, len(item.meta.shape))))
        return item.with_op(op, replace(item.meta, shape=shape), self.index)


def _size(value: Any, field: tuple[Any, ...]) -> int | Size:
    """One size as the rules write it, or the StepSpecError that points at it."""
    try:
        return parse_size(value)
    except SizeError as exc:
        raise StepSpecError(str(exc), field) from None


def _sizes_text(shape: tuple[int | Size, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


@register
@dataclass(frozen=True)
class Reshape(_TensorStep):
    """``reshape: {match, shape: [768, 768, 1, 1]}`` (one -1 allowed), or ``shape: target``
    to take the target key's shape. A size may be an expression of the input's dims and the
    rules' ``vars`` (:class:`~remap.rules.steps.Size`): ``shape: [heads, -1, d1]``,
    ``[d0/heads, 2, -1]``; it is computed per key, at plan time."""

    shape: tuple[int | Size, ...] | None = None
    kind: ClassVar[str] = "reshape"
    schema: ClassVar[dict[str, Any]] = _object({"shape": {"type": ["array", "string"], "items": {"type": ["integer", "string"]}}},
                                               ("match", "shape"))  # fmt: skip

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        if isinstance(value["shape"], str) and value["shape"] != "target":
            raise StepSpecError(f"expected a list of sizes or 'target', found {describe_value(value['shape'])}", "shape")
        shape = None if value["shape"] == "target" else tuple(_size(v, ("shape", n)) for n, v in enumerate(value["shape"]))
        return cls(index, where, optional, _patterns(value["match"]), shape)

    def size_exprs(self) -> tuple[tuple[tuple[Any, ...], Size], ...]:
        return tuple((("shape", n), s) for n, s in enumerate(self.shape or ()) if isinstance(s, Size) and s.names)

    def summary(self) -> str:
        shown = _sizes_text(self.shape) if self.shape is not None else "the target shape"
        return f"reshape to {shown}{self.vars_text()} {self.scope()}"

    def transform(self, item: Item, ctx: StepContext) -> Item:
        if self.shape is None:
            new = _target(item, ctx, "reshape").shape
        else:
            values = self.var_values()
            new = tuple(s.value(item.meta.shape, values) if isinstance(s, Size) else s for s in self.shape)
        shape = ops.reshape_shape(item.meta.shape, new)
        op = Op("reshape", f"reshape({list(shape)})", functools.partial(ops.reshape, new=shape),
                Inverse.of("reshape", shape=item.meta.shape))
        return item.with_op(op, replace(item.meta, shape=shape), self.index)


@register
@dataclass(frozen=True)
class Slice(_TensorStep):
    """``slice: {match, dim: 0, index: [0, 5, 9]}`` keeps the listed entries in that order;
    or ``start``/``stop``/``step`` as in Python."""

    dim: int = 0
    indices: tuple[int, ...] | None = None
    start: int | None = None
    stop: int | None = None
    step: int | None = None
    kind: ClassVar[str] = "slice"
    schema: ClassVar[dict[str, Any]] = _object(
        {"dim": INT, "index": {**INTS, "minItems": 1}, "start": INT, "stop": INT, "step": INT}
    )

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        ranged = [k for k in ("start", "stop", "step") if k in value]
        if "index" in value and ranged:
            raise StepSpecError(f"give either 'index' or start/stop/step, not both (found 'index' and {ranged[0]!r})", ranged[0])
        if "index" not in value and not ranged:
            raise StepSpecError("expected 'index: [list]' or start/stop/step to say what to keep")
        if value.get("step") == 0:
            raise StepSpecError("expected a non-zero step, found 0", "step")
        idx = tuple(value["index"]) if "index" in value else None
        return cls(index, where, optional, _patterns(value["match"]), value.get("dim", 0), idx, value.get("start"), value.get("stop"), value.get("step"))

    def _what(self) -> str:
        if self.indices is not None:
            return f"index={list(self.indices)}"
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}" + ("" if self.step is None else f":{self.step}")

    def summary(self) -> str:
        return f"slice dim {self.dim} [{self._what()}] {self.scope()}"

    def transform(self, item: Item, ctx: StepContext) -> Item:
        args = (self.dim, self.indices, self.start, self.stop, self.step)
        shape = ops.slice_shape(item.meta.shape, *args)
        size = item.meta.shape[self.dim % len(item.meta.shape)]
        repeats = self.indices is not None and len({i % size for i in self.indices}) < len(self.indices)
        inverse = Inverse.of("scatter", exact=not repeats, dim=self.dim, index=self.indices, start=self.start, stop=self.stop,
                             step=self.step, shape=item.meta.shape)  # an entry kept twice cannot be written back twice
        op = Op("slice", f"slice(dim={self.dim}, {self._what()})", functools.partial(_slice, args=args), inverse)
        return item.with_op(op, replace(item.meta, shape=shape), self.index)


def _slice(t: Any, args: tuple[Any, ...]) -> Any:
    return ops.slice_(t, *args)


@register
@dataclass(frozen=True)
class Pad(_TensorStep):
    """``pad: {match, fill: zeros | mean | <number>}`` grows a tensor at the end of each
    dim to the target key's shape (``to: [shape]`` to give it). ``mean`` starts new rows
    at the mean of the existing ones, as resizing token embeddings does."""

    fill: Any = "zeros"
    to: tuple[int, ...] | None = None
    kind: ClassVar[str] = "pad"
    schema: ClassVar[dict[str, Any]] = _object({"fill": {"type": ["string", "number"]}, "to": INTS})

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        fill = value.get("fill", "zeros")
        if isinstance(fill, str) and fill not in ("zeros", "mean"):
            raise StepSpecError(f"expected zeros, mean or a number, found {describe_value(fill)}", "fill")
        to = tuple(value["to"]) if "to" in value else None
        return cls(index, where, optional, _patterns(value["match"]), value.get("fill", "zeros"), to)

    def summary(self) -> str:
        to = list(self.to) if self.to is not None else "the target shape"
        return f"pad to {to} with {self.fill} {self.scope()}"

    def transform(self, item: Item, ctx: StepContext) -> Item:
        target = self.to if self.to is not None else _target(item, ctx, "pad").shape
        shape = ops.pad_shape(item.meta.shape, target)
        if shape == item.meta.shape:
            return item  # nothing to pad: no op, no copy
        if not isinstance(self.fill, str):
            ops.check_fill(self.fill, item.meta.dtype)
        op = Op("pad", f"pad(to={list(shape)}, fill={self.fill})", functools.partial(ops.pad, target=shape, fill=self.fill),
                Inverse.of("crop", shape=item.meta.shape))
        return item.with_op(op, replace(item.meta, shape=shape), self.index)


@register
@dataclass(frozen=True)
class Cast(_TensorStep):
    """``cast: {match, dtype: float16}``; ``from_dtype: float32`` (or a list) casts only the
    tensors of that dtype (``dtype`` names what to cast to, so the selector is ``from_dtype``)."""

    dtype: str = "float32"
    kind: ClassVar[str] = "cast"
    dtype_selector: ClassVar[str] = "from_dtype"
    schema: ClassVar[dict[str, Any]] = _object({"dtype": {"enum": list(DTYPE_NAMES)}, "from_dtype": SELECTORS["dtype"]}, ("match", "dtype"))

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        return cls(index, where, optional, _patterns(value["match"]), dtype_name(value["dtype"]))

    def summary(self) -> str:
        return f"cast to {self.dtype} {self.scope()}"

    def transform(self, item: Item, ctx: StepContext) -> Item:
        if item.meta.dtype == self.dtype:
            return item
        op = Op("cast", f"cast({self.dtype})", functools.partial(_cast, dtype=self.dtype), Inverse.of("cast", dtype=item.meta.dtype))
        return item.with_op(op, replace(item.meta, dtype=self.dtype), self.index)


def _cast(t: Any, dtype: str) -> Any:
    return ops.cast(t, dtype)


ADAPT_OPS = ("in_channels", "interpolate")


@register
@dataclass(frozen=True)
class Adapt(_TensorStep):
    """Fit a tensor to the target key's shape.

    ``op: in_channels`` — RGB stem filters to 1 channel (summed) or N (repeated, scaled by
    3/N), as timm's ``adapt_input_conv``. ``op: interpolate`` — a grid of position
    embeddings ``[1, prefix + H*W, C]`` resized (``mode: bicubic``) to the target's token
    count, the first ``prefix_tokens`` (default 1, a class token) kept aside; the grid must
    be square. ``grid: 1d`` for a sequence: ``mode: linear`` or ``nearest`` resize it
    directly, ``bicubic`` (default) and ``bilinear`` as a 1 x L grid. ``linear`` is for 1d
    only; the check is at parse time.
    """

    op: str = "in_channels"
    prefix_tokens: int = 1
    mode: str = "bicubic"
    grid: str = "2d"
    kind: ClassVar[str] = "adapt"
    schema: ClassVar[dict[str, Any]] = _object(
        {"op": {"enum": list(ADAPT_OPS)}, "prefix_tokens": {"type": "integer", "minimum": 0},
         "mode": {"enum": ["bicubic", "bilinear", "nearest", "linear"]}, "grid": {"enum": ["2d", "1d"]}},
        ("match", "op"),
    )  # fmt: skip

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        if value["op"] == "in_channels":
            extra = [k for k in ("prefix_tokens", "mode", "grid") if k in value]
            if extra:
                raise StepSpecError(f"{extra[0]!r} applies to op: interpolate, not in_channels", extra[0], key=True)
        grid, mode = value.get("grid", "2d"), value.get("mode", "bicubic")
        if mode not in ops.INTERPOLATE_MODES[grid]:
            raise StepSpecError(f"mode {mode!r} does not apply to a {grid} grid; expected one of: {', '.join(ops.INTERPOLATE_MODES[grid])}", "mode")
        return cls(index, where, optional, _patterns(value["match"]), value["op"], value.get("prefix_tokens", 1),
                   value.get("mode", "bicubic"), value.get("grid", "2d"))  # fmt: skip

    def summary(self) -> str:
        if self.op == "interpolate":
            return f"adapt interpolate ({self.grid}, {self.mode}, {self.prefix_tokens} prefix token(s)) {self.scope()}"
        return f"adapt in_channels {self.scope()}"

    def transform(self, item: Item, ctx: StepContext) -> Item:
        target = _target(item, ctx, f"adapt {self.op}")
        if self.op == "in_channels":
            shape = ops.in_channels_shape(item.meta.shape, target.shape)
            op = Op("in_channels", f"in_channels({item.meta.shape[1]}->{shape[1]})", functools.partial(ops.adapt_in_channels, in_chans=shape[1]),
                    Inverse.of("in_channels", exact=False, channels=item.meta.shape[1]))
        else:
            shape = ops.interpolate_shape(item.meta.shape, target.shape, self.prefix_tokens, self.grid)
            tokens = shape[-2]
            op = Op("interpolate", f"interpolate({item.meta.shape[-2]}->{tokens} tokens, {self.grid}, {self.mode})",
                    functools.partial(ops.interpolate_grid, target_tokens=tokens, prefix_tokens=self.prefix_tokens, mode=self.mode, grid=self.grid),
                    Inverse.of("interpolate", exact=False, tokens=item.meta.shape[-2], prefix_tokens=self.prefix_tokens, mode=self.mode,
                               grid=self.grid))  # fmt: skip
        if shape == item.meta.shape:
            return item
        return item.with_op(op, replace(item.meta, shape=shape), self.index)


# --------------------------------------------------------------------------- many in, one out


@register
@dataclass(frozen=True)
class Merge(Step):
    """Many keys into one: ``merge: {match: '^(.*)\\.(q|k|v)_proj\\.weight$', into: '\\1.in_proj_weight',
    order: [q, k, v], dim: 0}``. Keys whose ``into`` is the same are merged; each one's
    part is the text of ``group`` (default: the last group), and ``order`` lists the parts.
    ``stack: true`` stacks along a new dim instead of concatenating."""

    pattern: str = ""
    into: Template | None = None
    order: tuple[str, ...] = ()
    group: Any = None
    dim: int = 0
    stack: bool = False
    kind: ClassVar[str] = "merge"
    schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"match": {"type": "string"}, "into": {"type": "string"}, "order": {"type": "array", "items": {"type": ["string", "integer"]}},
                       "group": {"type": ["string", "integer"]}, "dim": INT, "stack": {"type": "boolean"}},
        "required": ["match", "into", "order"],
        "additionalProperties": False,
    }  # fmt: skip

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        compiled = _compile(value["match"], "match")
        group = value.get("group", compiled.groups)
        if compiled.groups == 0:
            raise StepSpecError(f"pattern {quote(value['match'])} has no group to tell the parts apart; capture the part, e.g. '(q|k|v)'", "match")
        if not (1 <= group <= compiled.groups if isinstance(group, int) else group in compiled.groupindex):
            raise StepSpecError(f"group {group!r} does not exist in pattern {quote(value['match'])}", "group")
        try:
            into = Template.parse(value["into"], compiled)
        except PatternError as exc:
            raise StepSpecError(str(exc), "into") from None
        order = tuple(str(o) for o in value["order"])
        if len(order) < 2:
            raise StepSpecError(f"expected at least 2 parts to merge, found {len(order)}: {list(order)}", "order")
        if len(set(order)) != len(order):
            raise StepSpecError(f"order lists a part twice: {list(order)}", "order")
        return cls(index, where, optional, value["match"], into, order, group, value.get("dim", 0), value.get("stack", False))

    def summary(self) -> str:
        how = "stack" if self.stack else "cat"
        return f"merge {quote(self.pattern)} into {quote(self.into.text)} ({how} dim {self.dim}, order {', '.join(self.order)})"

    def run(self, items: list[Item], ctx: StepContext | None = None) -> StepResult:
        compiled = compile_regex(self.pattern)
        groups: dict[str, list[tuple[str, Item]]] = defaultdict(list)
        out: list[Item] = []
        matched = 0
        for item in items:
            m = search(compiled, item.key)
            if m is None:
                out.append(item)
                continue
            matched += 1
            groups[self.into.expand(m)].append((m.group(self.group) or "", item))
        failures: list[Failure] = []
        for key, parts in groups.items():
            merged, failure = self._merge(key, parts)
            if failure is not None:
                failures.append(failure)
                out.extend(item for _, item in parts)
            else:
                out.append(merged)
        pairs = ((self.pattern, matched),)
        return StepResult(out, counts=pairs, failures=failures + self.unmatched(pairs, items))

    def _merge(self, key: str, parts: list[tuple[str, Item]]) -> tuple[Item | None, Failure | None]:
        by_part: dict[str, Item] = {}
        for part, item in parts:
            if part not in self.order:
                return None, self._fail(key, parts, f"key {item.key!r} is part {part!r}, which order {list(self.order)} does not list")
            if part in by_part:
                return None, self._fail(key, parts, f"part {part!r} appears twice: {by_part[part].key!r} and {item.key!r}")
            by_part[part] = item
        missing = [p for p in self.order if p not in by_part]
        if missing:
            have = ", ".join(f"{p} from {i.key!r}" for p, i in by_part.items())
            what = f"part {missing[0]!r} is" if len(missing) == 1 else f"parts {', '.join(map(repr, missing))} are"
            return None, self._fail(key, parts, f"{what} missing (have {have})")
        chosen = [by_part[p] for p in self.order]
        if len({i.meta.dtype for i in chosen}) > 1:
            dtypes = ", ".join(f"{p} {by_part[p].meta.dtype}" for p in self.order)
            return None, self._fail(key, parts, f"the parts have different dtypes: {dtypes}; cast them first")
        try:
            shape = ops.concat_shape([i.meta.shape for i in chosen], self.dim, self.stack)
        except OpError as exc:
            return None, self._fail(key, parts, str(exc))
        how = "stack" if self.stack else "cat"
        sizes = () if self.stack else tuple(i.meta.shape[self.dim % len(i.meta.shape)] for i in chosen)
        op = Op(how, f"{how}(dim={self.dim})[{', '.join(self.order)}]", functools.partial(_concat, dim=self.dim, stack=self.stack),
                Inverse.of("unmerge", dim=self.dim, stack=self.stack, sizes=sizes))
        sources = tuple(s for i in chosen for s in i.sources)
        recipe = Recipe(op, tuple(i.node for i in chosen))
        return Item(key, sources, TensorMeta(shape, chosen[0].meta.dtype), ((self.index, key),), recipe, tuple(chosen)), None

    def _fail(self, key: str, parts: list[tuple[str, Item]], why: str) -> Failure:
        sources = tuple(s for _, i in parts for s in i.sources)
        return Failure("op", f"{self.label}: cannot merge into {key!r}: {why}", sources)


def _concat(*tensors: Any, dim: int, stack: bool) -> Any:
    return ops.concat(tensors, dim, stack)


def _compile(pattern: str, field: str) -> Any:
    try:
        return compile_regex(pattern)
    except PatternError as exc:
        raise StepSpecError(str(exc), field) from None


# --------------------------------------------------------------------------- one in, many out


@register
@dataclass(frozen=True)
class Split(Step):
    """One key into many: ``split: {match: '^(.*)\\.qkv\\.weight$', into: ['\\1.q.weight',
    '\\1.k.weight', '\\1.v.weight'], dim: 0}`` in equal chunks, or ``sizes: [...]``."""

    pattern: str = ""
    into: tuple[Template, ...] = ()
    dim: int = 0
    sizes: tuple[int, ...] | None = None
    kind: ClassVar[str] = "split"
    schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"match": {"type": "string"}, "into": {"type": "array", "items": {"type": "string"}},
                       "dim": INT, "sizes": {"type": "array", "items": {"type": "integer", "minimum": 1}}},
        "required": ["match", "into"],
        "additionalProperties": False,
    }  # fmt: skip

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        compiled = _compile(value["match"], "match")
        if len(value["into"]) < 2:
            raise StepSpecError(f"expected at least 2 keys to split into, found {len(value['into'])}", "into")
        into = []
        for n, text in enumerate(value["into"]):
            try:
                into.append(Template.parse(text, compiled))
            except PatternError as exc:
                raise StepSpecError(str(exc), ("into", n)) from None
        sizes = tuple(value["sizes"]) if "sizes" in value else None
        if sizes is not None and len(sizes) != len(into):
            raise StepSpecError(f"expected one size per part: {len(into)} parts in 'into', {len(sizes)} sizes", "sizes")
        return cls(index, where, optional, value["match"], tuple(into), value.get("dim", 0), sizes)

    def summary(self) -> str:
        how = f"sizes {list(self.sizes)}" if self.sizes else f"{len(self.into)} equal parts"
        return f"split {quote(self.pattern)} into {quotes(t.text for t in self.into)} (dim {self.dim}, {how})"

    def run(self, items: list[Item], ctx: StepContext | None = None) -> StepResult:
        compiled = compile_regex(self.pattern)
        out: list[Item] = []
        failures: list[Failure] = []
        matched = 0
        for item in items:
            m = search(compiled, item.key)
            if m is None:
                out.append(item)
                continue
            matched += 1
            try:
                shapes = ops.split_shapes(item.meta.shape, self.dim, len(self.into), self.sizes)
            except OpError as exc:
                failures.append(Failure("op", f"{self.label}: key {item.key!r} {_shape(item.meta)} {item.meta.dtype}: {exc}", item.sources))
                out.append(item)
                continue
            n = len(self.into)
            d = self.dim % len(item.meta.shape)
            for part, (template, shape) in enumerate(zip(self.into, shapes)):
                key = template.expand(m)
                op = Op("split", f"split(dim={self.dim})[{part} of {n}]", functools.partial(ops.split, dim=self.dim, parts=n, sizes=self.sizes, part=part),
                        Inverse.of("part", dim=self.dim, part=part, sizes=tuple(s[d] for s in shapes)))
                out.append(Item(key, item.sources, replace(item.meta, shape=shape), ((self.index, key),), Recipe(op, (item.node,)), (item,)))
        pairs = ((self.pattern, matched),)
        return StepResult(out, counts=pairs, failures=failures + self.unmatched(pairs, items))



# --------------------------------------------------------------------------- rotary heads


@register
@dataclass(frozen=True)
class PermuteHeads(_TensorStep):
    """The Llama rotary (RoPE) row permutation of q/k projections, both ways:
    ``permute_heads: {match, heads: kv_heads, to: half_split}``.

    ``interleaved`` is Meta's and GGUF's layout (the two halves of each rotary pair on
    neighbouring rows), ``half_split`` Hugging Face's (the first half of each head's rows,
    then the second). ``heads`` (an integer, a name from ``vars`` or an expression) is the
    number of heads of *this* tensor: ``num_attention_heads`` for q, ``num_key_value_heads``
    for k under grouped-query attention; head_dim is the rows / heads. ``dim`` (default 0)
    holds the rows. The inverse is the other direction with the same heads (exact).
    """

    heads: int | Size = 1
    to: str = "half_split"
    dim: int = 0
    kind: ClassVar[str] = "permute_heads"
    schema: ClassVar[dict[str, Any]] = _object(
        {"heads": {"type": ["integer", "string"]}, "to": {"enum": list(ops.HEAD_LAYOUTS)}, "dim": INT}, ("match", "heads", "to"))

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        heads = _size(value["heads"], ("heads",))
        if heads == -1 or (isinstance(heads, int) and heads < 1):
            raise StepSpecError(f"expected a number of heads >= 1 (or a name from vars), found {describe_value(value['heads'])}", "heads")
        return cls(index, where, optional, _patterns(value["match"]), heads, value["to"], value.get("dim", 0))

    def size_exprs(self) -> tuple[tuple[tuple[Any, ...], Size], ...]:
        return ((("heads",), self.heads),) if isinstance(self.heads, Size) and self.heads.names else ()

    def summary(self) -> str:
        on = "" if self.dim == 0 else f", dim {self.dim}"
        return f"permute_heads to {self.to}, heads {self.heads}{on}{self.vars_text()} {self.scope()}"

    def transform(self, item: Item, ctx: StepContext) -> Item:
        heads = self.heads.value(item.meta.shape, self.var_values()) if isinstance(self.heads, Size) else self.heads
        ops.permute_heads_shape(item.meta.shape, heads, self.dim)
        back = ops.other_layout(self.to)
        op = Op("permute_heads", f"permute_heads(to={self.to}, heads={heads})",
                functools.partial(ops.permute_heads, heads=heads, to=self.to, dim=self.dim),
                Inverse.of("permute_heads", heads=heads, to=back, dim=self.dim))
        return item.with_op(op, item.meta, self.index)
