"""``target.shard``: how the rules say to shard the target over a device mesh (FSDP2, tensor parallel, both).

Part of the rules language, so that parsing a rules file needs nothing from ``loading``;
sharding the module is :func:`remap.loading.sharding.shard_module`. Every field::

    target:
      model: mypkg.models:build
      shard:
        mesh: {dp: 2, tp: 2}         # named dims, outermost first; or [4]: one dim, named by what uses it
                                     # (dp for fsdp, tp for tp); left out: one dim over every rank
        tp:                          # module pattern -> colwise | rowwise (torch's ColwiseParallel / RowwiseParallel)
          'layers\\.\\d+\\.attn\\.q': colwise
          'layers\\.\\d+\\.attn\\.o': rowwise
        fsdp: ['layers\\.\\d+', '']  # modules given to fully_shard; '' is the root. `fsdp: true`: every item of
                                     # each outermost nn.ModuleList (a transformer's blocks), then the root

Module patterns are regexes in the dialect of every other pattern of the rules (the
``regex`` package), matched against a module's **whole** dotted name as ``named_modules()``
gives it, not searched in it: ``layers\\.\\d+`` names each block and nothing inside one,
``''`` names the root. Tensor parallelism runs first, on the ``tp`` dim, then FSDP on the
``dp`` dim, children before their parents whatever order the patterns come in (the
torchtitan order).

>>> spec = ShardSpec.parse({"mesh": {"dp": 2, "tp": 2}, "tp": {"q": "colwise"}, "fsdp": [""]})
>>> spec.mesh_shape(4), spec.tp, spec.fsdp_modules
((('dp', 2), ('tp', 2)), (('q', 'colwise'),), ('',))
>>> ShardSpec.parse({"mesh": [2], "fsdp": True}).describe()
'{dp: 2}, fsdp: each block of a ModuleList and the root'
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import describe_value
from .patterns import PatternError, compile_regex

__all__ = ["ShardSpec", "ShardSpecError", "SHARD_SCHEMA", "TP_STYLES", "MESH_DIMS"]

TP_STYLES = ("colwise", "rowwise")
MESH_DIMS = ("dp", "tp")  # dp: the dim fsdp shards over; tp: the dim tensor parallelism shards over
MAX_MESH_SIZE = 2**20  # far past any cluster; a bigger number is a typo

#: The JSON schema of ``target.shard``: the fields and their types; :meth:`ShardSpec.parse` checks the rest.
SHARD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "mesh": {"type": ["array", "object"], "x-expected": "a mesh such as [4] or {dp: 2, tp: 2}"},
        "tp": {"type": "object", "x-expected": "a mapping of module patterns to colwise or rowwise"},
        "fsdp": {"type": ["boolean", "string", "array"], "items": {"type": "string"}, "minItems": 1,
                 "x-expected": "true, or a list of module patterns such as ['layers\\.\\d+', '']"},
    },
    "additionalProperties": False,
}  # fmt: skip


class ShardSpecError(ValueError):
    """``target.shard`` is invalid. ``at``: the path inside ``shard`` the error points at;
    ``key``: it points at that mapping key rather than its value; ``field``: the path the
    message's breadcrumb names (default: ``at``, less the key when ``key``)."""

    def __init__(self, message: str, at: tuple[Any, ...] = (), *, key: bool = False, field: tuple[Any, ...] | None = None) -> None:
        super().__init__(message)
        self.at, self.key = at, key
        self.field = (at[:-1] if key else at) if field is None else field


@dataclass(frozen=True)
class ShardSpec:
    """A parsed ``target.shard``.

    ``mesh``: (dim name, size) outermost first, every dim named (``dp``, ``tp``); None: one
    dim over every rank. ``tp``: (module pattern, style) in the order given. ``fsdp``: whether
    FSDP2 shards the model; ``fsdp_modules``: its module patterns (empty with ``fsdp``: each
    block of a ModuleList, then the root).

    >>> ShardSpec.parse({"tp": {"fc1": "colwise", "fc2": "rowwise"}}).mesh_shape(2)
    (('tp', 2),)
    """

    mesh: tuple[tuple[str, int], ...] | None = None
    tp: tuple[tuple[str, str], ...] = ()
    fsdp: bool = False
    fsdp_modules: tuple[str, ...] = ()

    @property
    def one_dim(self) -> str:
        """The name of a 1-D mesh's dim: ``dp`` for fsdp alone, ``tp`` for tensor parallelism alone."""
        return "tp" if self.tp else "dp"

    def mesh_shape(self, world: int) -> tuple[tuple[str, int], ...]:
        """The mesh's (dim, size) pairs; without a ``mesh``, one dim of ``world`` ranks.

        >>> ShardSpec(fsdp=True).mesh_shape(8)
        (('dp', 8),)
        """
        return self.mesh if self.mesh is not None else ((self.one_dim, world),)

    def describe(self) -> str:
        """One line: the mesh, the tp plan, the fsdp modules.

        >>> ShardSpec(tp=(("q", "colwise"),)).describe()
        "{tp: every rank}, tp: 'q' colwise"
        """
        mesh = ", ".join(f"{n}: {s}" for n, s in self.mesh) if self.mesh else f"{self.one_dim}: every rank"
        parts = ["{" + mesh + "}"]
        if self.tp:
            parts.append("tp: " + ", ".join(f"'{p}' {s}" for p, s in self.tp))
        if self.fsdp:
            parts.append("fsdp: " + (", ".join(map(repr, self.fsdp_modules)) or "each block of a ModuleList and the root"))
        return ", ".join(parts)

    @classmethod
    def parse(cls, value: Any) -> ShardSpec:
        """From ``target.shard``'s value (a mapping that :data:`SHARD_SCHEMA` accepts; checked here
        again, so a dict from Python gets the same errors). Raises :class:`ShardSpecError`."""
        if isinstance(value, ShardSpec):
            return value
        if not isinstance(value, Mapping):
            raise ShardSpecError(f"expected a mapping with fsdp, tp and mesh, found {describe_value(value)}")
        unknown = [k for k in value if k not in SHARD_SCHEMA["properties"]]
        if unknown:
            near = difflib.get_close_matches(str(unknown[0]), list(SHARD_SCHEMA["properties"]), n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ShardSpecError(f"unknown field '{unknown[0]}'{hint}; expected one of: mesh, tp, fsdp", (unknown[0],), key=True)
        tp = _tp(value["tp"]) if "tp" in value else ()
        fsdp, fsdp_modules = _fsdp(value["fsdp"]) if "fsdp" in value else (False, ())
        if not tp and not fsdp:
            raise ShardSpecError("say how to shard: fsdp (module patterns, or true), tp (module pattern -> colwise | rowwise), "
                                 "or both")  # fmt: skip
        mesh = _mesh(value["mesh"], tp=bool(tp), fsdp=fsdp) if "mesh" in value else None
        if mesh is None and tp and fsdp:
            raise ShardSpecError("fsdp and tp together need a 2-D mesh that names its dims, such as mesh: {dp: 2, tp: 2}")
        return cls(mesh, tp, fsdp, fsdp_modules)


def _pattern(pattern: Any, at: tuple[Any, ...], *, key: bool = False, field: tuple[Any, ...] | None = None) -> str:
    """A module pattern: a string that compiles as a regex."""
    if not isinstance(pattern, str):
        raise ShardSpecError(f"a module pattern is a string, found {describe_value(pattern)}", at, key=key, field=field)
    try:
        compile_regex(pattern)
    except PatternError as exc:
        raise ShardSpecError(str(exc), at, key=key, field=field) from None
    return pattern


def _tp(value: Any) -> tuple[tuple[str, str], ...]:
    """``tp:``: module pattern -> colwise | rowwise."""
    if not isinstance(value, Mapping) or not value:
        raise ShardSpecError(f"expected a mapping of module patterns to colwise or rowwise, found {describe_value(value)}", ("tp",))
    plan = []
    for pattern, style in value.items():
        at = ("tp", pattern)
        _pattern(pattern, at, key=True, field=("tp",))  # a pattern in the breadcrumb would read as field names
        if style not in TP_STYLES:
            near = difflib.get_close_matches(str(style), TP_STYLES, n=1) if isinstance(style, str) else []
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ShardSpecError(f"module '{pattern}': expected one of: colwise, rowwise; found {describe_value(style)}{hint}",
                                 at, field=("tp",))  # fmt: skip
        plan.append((pattern, style))
    return tuple(plan)


def _fsdp(value: Any) -> tuple[bool, tuple[str, ...]]:
    """``fsdp:``: true, false, one pattern or a list of them."""
    if isinstance(value, bool):
        return value, ()
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not patterns:
        raise ShardSpecError(f"expected true, or a list of module patterns such as ['layers\\.\\d+', ''], found "
                             f"{describe_value(value)}", ("fsdp",))  # fmt: skip
    seen: list[str] = []
    for n, pattern in enumerate(patterns):
        at = ("fsdp",) if isinstance(value, str) else ("fsdp", n)
        _pattern(pattern, at)
        if pattern in seen:
            raise ShardSpecError(f"the module pattern '{pattern}' is listed twice", at)
        seen.append(pattern)
    return True, tuple(seen)


def _mesh(value: Any, *, tp: bool, fsdp: bool) -> tuple[tuple[str, int], ...]:
    """``mesh:``: [n] (one dim, named by its use) or {dp: n, tp: m} (named dims, outermost first)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ShardSpecError(f"a list gives one unnamed dim, such as [4]; found {describe_value(value)}: name the dims "
                                 "of a 2-D mesh, such as {dp: 2, tp: 2}", ("mesh",))  # fmt: skip
        if tp and fsdp:
            raise ShardSpecError("fsdp and tp together need a 2-D mesh that names its dims, such as mesh: {dp: 2, tp: 2}", ("mesh",))
        dims = [("tp" if tp else "dp", _size(value[0], ("mesh", 0)))]
    elif isinstance(value, Mapping) and value:
        dims = []
        for name, size in value.items():
            if name not in MESH_DIMS:
                near = difflib.get_close_matches(str(name), MESH_DIMS, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                shown = repr(name) if isinstance(name, str) else describe_value(name)
                raise ShardSpecError(f"unknown mesh dim {shown}{hint}; expected dp (the dim fsdp shards over) "
                                     "or tp (the dim tensor parallelism shards over)", ("mesh", name), key=True)  # fmt: skip
            dims.append((name, _size(size, ("mesh", name))))
    else:
        raise ShardSpecError(f"expected a mesh such as [4] or {{dp: 2, tp: 2}}, found {describe_value(value)}", ("mesh",))
    names = [n for n, _ in dims]
    for dim, used, what in (("tp", tp, "tp"), ("dp", fsdp, "fsdp")):
        if used and dim not in names:
            raise ShardSpecError(f"{what} needs a '{dim}' dim in the mesh; found dims: {', '.join(names)}", ("mesh",))
        if dim in names and not used:
            raise ShardSpecError(f"the mesh has a '{dim}' dim but no {what} uses it: add {what}, or remove the dim",
                                 ("mesh", dim), key=True)  # fmt: skip
    if math.prod(s for _, s in dims) > MAX_MESH_SIZE:
        raise ShardSpecError(f"the mesh holds {math.prod(s for _, s in dims)} ranks; expected at most {MAX_MESH_SIZE}", ("mesh",))
    return tuple(dims)


def _size(value: Any, at: tuple[Any, ...]) -> int:
    """A mesh dim's size: a positive integer (not true, not 2.0)."""
    if type(value) is not int or value < 1:
        raise ShardSpecError(f"expected a positive number of ranks, found {describe_value(value)}", at)
    return value
