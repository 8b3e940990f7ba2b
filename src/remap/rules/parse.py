"""The rules language: YAML text (or a dict) -> frozen :class:`Rules`.

The schema of every section is declarative (JSON Schema fragments checked with
``jsonschema``); errors become one :class:`~remap.errors.RulesError` that names the
file, line and column, the step, and the field, and says what was found and what was
expected::

    rules.yaml:14:7: step 3 (rename): field 'from': bad regex '(': missing ) ...
    rules.yaml:2:1: unknown field 'expcet' (did you mean 'expect'?)

>>> rules = parse_rules({"version": 1, "rules": [{"strip_prefix": "module."}]})
>>> rules.steps[0].summary()
"strip_prefix 'module.'"
"""

from __future__ import annotations

import difflib
import functools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import regex

from ..errors import RulesError, describe_value
from ..files import file_kind, read_text_capped
from .patterns import PatternError, compile_regex
from .shard_spec import SHARD_SCHEMA, ShardSpec, ShardSpecError
from . import tensor_steps  # noqa: F401  (registers the tensor-op steps)
from . import adapter_steps  # noqa: F401  (registers the adapter steps: lora)
from . import quant_steps  # noqa: F401  (registers dequant_blocks)
from .steps import DIM_NAME, STEPS, ConfigVar, Step, StepSpecError
from .verify_spec import VERIFY_SCHEMA, VerifySpec
from .yaml_source import Locations, check_scalar, load_yaml

__all__ = [
    "Rules",
    "SourceSpec",
    "OptimizerSpec",
    "TargetSpec",
    "ShapePolicy",
    "Expect",
    "Freeze",
    "Output",
    "parse_rules",
    "load_rules",
    "SECTIONS",
    "fragments",
    "VARS",
]

MAX_RULES_BYTES = 4 * 2**20  # a rules file is a page or two; nothing longer is read

SECTIONS = ("version", "source", "sources", "target", "rules", "shapes", "expect", "freeze", "output", "verify", "vars")
INCLUDE = "include"  # top-level list of fragment names whose steps go in front of the file's own
FRAGMENT_SECTIONS = ("version", "rules")
STEP_OPTIONS = ("optional", "from")  # from: the named source (`sources:`) a step reads
BATCHNORM_MODES = ("keep", "eval", "frozen")
SHAPE_MODES = ("error", "skip")


#: Suffixes that make a ``source.optimizer`` string a file rather than a key in the checkpoint.
OPTIMIZER_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
OPTIMIZER_HPARAMS = ("new", "checkpoint")


@dataclass(frozen=True)
class OptimizerSpec:
    """Where the saved optimizer state is (``source.optimizer``), for ``remap.load(..., optimizer=opt)``.

    ``key``: an entry of the checkpoint (``"optimizer"``; ``"a.b"`` for nested entries, a
    number picks a list item: ``"optimizer_states.1"``). ``path``: a file of its own
    (Hugging Face Trainer's ``optimizer.pt``), with ``key`` inside it when given.
    ``hparams``: the param groups' hyperparameters from the ``new`` optimizer (default)
    or from the ``checkpoint``. A string is a path when it holds a ``/`` or ends in .pt,
    .pth, .bin or .ckpt (a folder path means its ``optimizer.pt``), else a key:

    >>> OptimizerSpec.parse("optimizer_states.1"), OptimizerSpec.parse("ckpt/optimizer.pt").path
    (OptimizerSpec(key='optimizer_states.1', path=None, hparams=None), 'ckpt/optimizer.pt')
    """

    key: str | None = None
    path: str | None = None
    hparams: str | None = None

    @classmethod
    def parse(cls, value: Any) -> OptimizerSpec:
        """From ``source.optimizer``'s value: a string, or a mapping of key, path and hparams (schema-checked)."""
        if isinstance(value, OptimizerSpec):
            return value
        if isinstance(value, os.PathLike):
            return cls(path=os.fspath(value))
        if isinstance(value, str):
            looks_like_file = "/" in value or os.sep in value or value.lower().endswith(OPTIMIZER_FILE_SUFFIXES)
            return cls(path=value) if looks_like_file else cls(key=value)
        return cls(value.get("key"), value.get("path"), value.get("hparams"))


@dataclass(frozen=True)
class SourceSpec:
    """Where the weights come from: a file ``path`` or a ``model`` factory; ``optimizer``:
    where the saved optimizer state is, for a load given an optimizer."""

    path: str | None = None
    key: str | None = None
    trust_pickle: bool = False
    model: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    trust_links: bool = False  # shards reached through links out of the index's folder (a HF cache is always fine)
    optimizer: OptimizerSpec | None = None


@dataclass(frozen=True)
class TargetSpec:
    """The module to load into, built from ``model: "package.module:callable"``.

    ``device: meta`` builds it without memory: loading assigns each tensor once (on the
    CPU) and initialises what no source feeds. ``dtype`` casts floating tensors (``auto``: each keeps
    the checkpoint's dtype); ``keep_fp32`` patterns name target keys that stay float32. ``shard``
    says how to shard the built module over a device mesh (:class:`~remap.rules.shard_spec.ShardSpec`).
    """

    model: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None  # a dtype name, or "auto": each loaded tensor keeps the checkpoint's (loading/dtype_policy.py)
    keep_fp32: tuple[str, ...] = ()  # target keys that stay float32 whatever dtype says
    shard: ShardSpec | None = None  # target.shard: FSDP2 / tensor parallel over a device mesh (rules/shard_spec.py)


@dataclass(frozen=True)
class ShapePolicy:
    """What a shape mismatch on a mapped key does: ``error`` (default) or ``skip``;
    ``skip_patterns`` lists target keys that may be skipped while the default is error."""

    default: str = "error"
    skip_patterns: tuple[str, ...] = ()

    def skips(self, key: str) -> bool:
        return self.default == "skip" or any(compile_regex(p).search(key) for p in self.skip_patterns)


@dataclass(frozen=True)
class Expect:
    missing: tuple[str, ...] = ()
    unused: tuple[str, ...] = ()
    min_loaded: float | None = None


@dataclass(frozen=True)
class Freeze:
    """``freeze:``: the target parameters that lose requires_grad after loading, and what BatchNorm does.

    ``from_source: true`` freezes each loaded parameter whose source tensors were all saved
    with ``requires_grad=False`` (a whole-model pickle or a TorchScript archive keeps the
    flag; those saved True keep the target's own flag). ``params`` adds the parameters it
    matches; ``except`` keeps the ones it matches trainable, whichever way they were chosen.
    """

    params: tuple[str, ...] = ()
    except_: tuple[str, ...] = ()
    batchnorm: str = "keep"
    from_source: bool = False

    @property
    def active(self) -> bool:
        return bool(self.params) or self.batchnorm != "keep" or self.from_source

    def saved_frozen(self, flags: Mapping[str, bool] | None, sources: Mapping[str, tuple[str, ...]],
                     source: str) -> tuple[set[str], str | None]:  # fmt: skip
        """``from_source``: the target keys (of ``sources``: target key -> its source keys,
        after renames) whose source keys were all saved with requires_grad=False, and the
        reason it cannot apply when the source (described by ``source``) kept no flags.

        >>> Freeze(from_source=True).saved_frozen({"a": False, "b": True}, {"x": ("a",), "y": ("b",)}, "a.pt")
        ({'x'}, None)
        """
        if not self.from_source:
            return set(), None
        if flags is None:
            return set(), ("freeze.from_source needs a source that saved requires_grad (a whole-model pickle or a "
                           f"TorchScript archive); {source}")  # fmt: skip
        return {t for t, keys in sources.items() if keys and all(flags.get(k) is False for k in keys)}, None


@dataclass(frozen=True)
class Output:
    report: str | None = None
    save: str | None = None
    max_shard_size: int | str | None = None


@dataclass(frozen=True)
class Rules:
    """A parsed rules file. ``base_dir`` is the folder relative paths resolve against."""

    version: int = 1
    source: SourceSpec = field(default_factory=SourceSpec)
    target: TargetSpec = field(default_factory=TargetSpec)
    steps: tuple[Step, ...] = ()
    shapes: ShapePolicy = field(default_factory=ShapePolicy)
    expect: Expect = field(default_factory=Expect)
    freeze: Freeze = field(default_factory=Freeze)
    output: Output = field(default_factory=Output)
    verify: VerifySpec | None = None
    filename: str | None = None
    base_dir: str | None = None
    includes: tuple[str, ...] = ()  # the fragments whose steps lead ``steps``, in order
    vars: Mapping[str, int | ConfigVar] = field(default_factory=dict)  # ``vars:``, name -> a number or the config entry to read
    sources: Mapping[str, SourceSpec] = field(default_factory=dict)  # ``sources:``, name -> where (several sources in one plan)

    def bound_to(self, target: Any) -> Rules:
        """These rules with every ``vars`` entry read from the target model's config
        (``{config: num_attention_heads}``) replaced by its value, read from ``target.config``;
        the rules themselves when no entry reads the config. :class:`~remap.errors.RulesError`
        at the entry when ``target`` has no such config value (a mapping of key -> shape has
        no config at all).

        >>> rules = parse_rules({"version": 1, "vars": {"heads": {"config": "n_head"}},
        ...                      "rules": [{"reshape": {"match": "w", "shape": ["heads", -1]}}]})
        >>> class Model:
        ...     config = {"n_head": 4}
        >>> rules.bound_to(Model()).steps[0].summary()
        "reshape to [heads, -1] (heads=4) on 'w'"
        """
        wanted = {n: v for n, v in self.vars.items() if isinstance(v, ConfigVar)}
        if not wanted:
            return self
        values = {n: _config_value(target, v) for n, v in wanted.items()}
        steps = tuple(replace(s, vars=tuple((n, values.get(n, v)) for n, v in s.vars)) if s.vars else s for s in self.steps)
        return replace(self, steps=steps, vars={**self.vars, **values})


# --------------------------------------------------------------------------- schema

STRINGS = {"type": ["string", "array"], "items": {"type": "string"}}
PATTERNS = {**STRINGS, "x-regex": True}


def _obj(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "additionalProperties": False, **extra}


SCHEMA: dict[str, dict[str, Any]] = {
    "version": {"const": 1},
    "source": _obj(
        {
            "path": {"type": "string", "minLength": 1},
            "key": {"type": "string", "minLength": 1},
            "trust_pickle": {"type": "boolean"},
            "trust_links": {"type": "boolean"},
            "model": {"type": "string", "minLength": 1},
            "args": {"type": "array"},
            "kwargs": {"type": "object"},
            "optimizer": {"type": ["string", "object"], "minLength": 1,
                          "properties": {"key": {"type": "string", "minLength": 1}, "path": {"type": "string", "minLength": 1},
                                         "hparams": {"enum": list(OPTIMIZER_HPARAMS)}},
                          "additionalProperties": False},
        }
    ),
    "target": _obj({"model": {"type": "string", "minLength": 1}, "args": {"type": "array"}, "kwargs": {"type": "object"},
                    "device": {"type": "string", "minLength": 1}, "dtype": {"enum": ["float32", "float16", "bfloat16", "float64", "auto"]},
                    "keep_fp32": PATTERNS, "shard": SHARD_SCHEMA}),
    "rules": {"type": "array", "items": {"type": "object"}},
    "shapes": {"type": ["string", "object"]},
    "expect": _obj({"missing": PATTERNS, "unused": PATTERNS, "min_loaded": {"type": "number", "minimum": 0, "maximum": 1}}),
    "freeze": _obj({"params": PATTERNS, "except": PATTERNS, "batchnorm": {"enum": list(BATCHNORM_MODES)},
                    "from_source": {"type": "boolean"}}),
    "verify": VERIFY_SCHEMA,
    "vars": {"type": "object", "minProperties": 1},
    "output": _obj({"report": {"type": "string", "minLength": 1}, "save": {"type": "string", "minLength": 1},
                    "max_shard_size": {"type": ["string", "integer"], "pattern": r"^\s*\d+(\.\d+)?\s*([KMGT]i?B|B)?\s*$", "minimum": 1,
                                       "x-expected": "a size such as 5GB, 500MiB or a number of bytes"}}),
}
SOURCE_NAME = r"^[A-Za-z_][A-Za-z0-9_\-]*$"  # as remap.sources.combined.SOURCE_NAME
SCHEMA["sources"] = {"type": "object", "minProperties": 1, "propertyNames": {"pattern": SOURCE_NAME, "x-expected": "a source name (a letter or _, then letters, digits, _ or -)"},
                     "additionalProperties": _obj({k: v for k, v in SCHEMA["source"]["properties"].items() if k != "optimizer"})}
SHAPES_OBJECT = _obj({"default": {"enum": list(SHAPE_MODES)}, "skip": PATTERNS})


class _Context:
    """Turns a path in the document into ``file:line:col`` plus a readable breadcrumb."""

    def __init__(self, locs: Locations) -> None:
        self.locs = locs

    def error(
        self,
        message: str,
        path: tuple[Any, ...],
        *,
        key: bool = False,
        step: Step | str | None = None,
        fields: tuple[Any, ...] | None = None,
    ) -> RulesError:
        """A RulesError at ``path``; ``key`` points at a mapping key (unknown field) rather than its value.

        The breadcrumb names the section (or ``step``) and then ``fields``, by default the
        rest of the path: names read ``field 'a.b'``, list indices ``item N``.
        """
        parent = path[:-1] if key else path
        if step is not None:
            crumbs, rest = [step.label if isinstance(step, Step) else step], parent[3:]
        else:
            crumbs, rest = [str(p) for p in parent[:1]], parent[1:]
        names: list[str] = []
        for p in rest if fields is None else fields:
            if isinstance(p, int) and not isinstance(p, bool):
                if names:
                    crumbs.append(f"field '{'.'.join(names)}'")
                    names = []
                crumbs.append(f"item {p + 1}")
            else:
                names.append(str(p))
        if names:
            crumbs.append(f"field '{'.'.join(names)}'")
        text = ": ".join([*crumbs, message])
        return RulesError(text, where=self.locs.at(path, key=key))


def _did_you_mean(word: Any, choices: Any) -> str:
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean '{near[0]}'?)" if near and near[0] != word else ""


def _show(name: Any) -> str:
    """A field name in a message: quoted without doubling backslashes; a number as is."""
    return f"'{name}'" if isinstance(name, str) else str(name)


def _describe_schema_error(err: Any) -> tuple[str, tuple[Any, ...], bool]:
    """One jsonschema error as (message, path, points-at-a-key)."""
    path = tuple(err.absolute_path)
    v, inst, schema = err.validator, err.instance, err.schema
    if v == "additionalProperties":
        allowed = list(schema.get("properties", {}))
        extra = [k for k in inst if k not in allowed]
        key = extra[0]
        return (
            f"unknown field {_show(key)}{_did_you_mean(key, allowed)}; expected one of: {', '.join(allowed)}",
            (*path, key),
            True,
        )
    if "x-expected" in schema and v in ("type", "pattern", "minimum", "anyOf"):
        return f"expected {schema['x-expected']}, found {describe_value(inst)}", path, False
    if v == "type":
        return f"expected {_type_words(err.validator_value)}, found {describe_value(inst)}", path, False
    if v in ("enum", "const"):
        options = err.validator_value if v == "enum" else [err.validator_value]
        hint = _did_you_mean(inst, options) if isinstance(inst, str) else ""
        return f"expected one of: {', '.join(map(str, options))}; found {describe_value(inst)}{hint}", path, False
    if v == "required":
        missing = [k for k in err.validator_value if k not in inst][0]
        return f"missing required field '{missing}'", path, False
    if v in ("minimum", "maximum"):
        op = ">=" if v == "minimum" else "<="
        return f"expected a number {op} {err.validator_value}, found {describe_value(inst)}", path, False
    if v == "minItems" and err.validator_value > 1:
        return f"expected a list of at least {err.validator_value} items, found {describe_value(inst)}", path, False
    if v in ("minLength", "minItems", "minProperties"):
        what = {"minLength": "a non-empty string", "minItems": "a non-empty list", "minProperties": "a non-empty mapping"}
        return f"expected {what[v]}, found {describe_value(inst)}", path, False
    return err.message, path, False


def _type_words(types: Any) -> str:
    words = {"string": "a string", "array": "a list", "object": "a mapping", "integer": "an integer",
             "number": "a number", "boolean": "true or false", "null": "null"}  # fmt: skip
    types = [types] if isinstance(types, str) else types
    return " or ".join(words[t] for t in types)


def _check(value: Any, schema: dict[str, Any], path: tuple[Any, ...], ctx: _Context, step: Step | str | None = None) -> None:
    from jsonschema import Draft202012Validator

    errors = sorted(Draft202012Validator(schema).iter_errors(value), key=lambda e: (list(map(str, e.absolute_path)), e.validator))
    if errors:
        message, rel, key = _describe_schema_error(errors[0])
        raise ctx.error(message, (*path, *rel), key=key, step=step)
    _check_regexes(value, schema, path, ctx, step)


def _check_regexes(value: Any, schema: dict[str, Any], path: tuple[Any, ...], ctx: _Context, step: Any) -> None:
    if schema.get("x-regex"):
        items = [(path, value)] if isinstance(value, str) else [((*path, i), v) for i, v in enumerate(value)]
        for p, pattern in items:
            try:
                compile_regex(pattern)
            except PatternError as exc:
                raise ctx.error(str(exc), p, step=step) from None
    elif isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                _check_regexes(value[name], sub, (*path, name), ctx, step)


# --------------------------------------------------------------------------- sections


def _patterns(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _source(d: dict[str, Any], ctx: _Context) -> SourceSpec:
    # With both, `path` holds the weights and `model` builds the source architecture (for verify).
    optimizer = OptimizerSpec.parse(d["optimizer"]) if "optimizer" in d else None
    return SourceSpec(d.get("path"), d.get("key"), d.get("trust_pickle", False), d.get("model"),
                      tuple(d.get("args", ())), dict(d.get("kwargs", {})), d.get("trust_links", False), optimizer)  # fmt: skip


def _target(d: dict[str, Any], ctx: _Context) -> TargetSpec:
    if ("args" in d or "kwargs" in d) and "model" not in d:
        raise ctx.error("'args' and 'kwargs' need 'model'", ("target",))
    try:
        shard = ShardSpec.parse(d["shard"]) if "shard" in d else None
    except ShardSpecError as exc:
        raise ctx.error(str(exc), ("target", "shard", *exc.at), key=exc.key, fields=("shard", *exc.field)) from None
    return TargetSpec(d.get("model"), tuple(d.get("args", ())), dict(d.get("kwargs", {})), d.get("device"), d.get("dtype"),
                      _patterns(d.get("keep_fp32")), shard)


def _shapes(value: Any, ctx: _Context) -> ShapePolicy:
    if not isinstance(value, (str, dict)):
        modes = ", ".join(SHAPE_MODES)
        raise ctx.error(f"expected one of: {modes}, or a mapping with 'default' and 'skip'; found {describe_value(value)}", ("shapes",))
    if isinstance(value, str):
        _check(value, {"enum": list(SHAPE_MODES)}, ("shapes",), ctx)
        return ShapePolicy(value)
    _check(value, SHAPES_OBJECT, ("shapes",), ctx)
    return ShapePolicy(value.get("default", "error"), _patterns(value.get("skip")))


VARS = "vars"
VAR_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def _config_value(target: Any, var: ConfigVar) -> int:
    """``target.config``'s entry ``var.attribute`` (dotted: a sub-config), a positive integer."""
    config = getattr(target, "config", None) if not isinstance(target, Mapping) else None
    what = f"vars: '{var.name}' reads config.{var.attribute} of the target model"
    if config is None:
        found = "a mapping of key -> shape (no model)" if isinstance(target, Mapping) else f"a {type(target).__name__} without .config"
        raise RulesError(f"{what}, but the target is {found}: plan with the model itself, or write the number "
                         f"(`{var.name}: 32`)", where=var.where)  # fmt: skip
    value: Any = config
    for part in var.attribute.split("."):
        value = value.get(part) if isinstance(value, Mapping) else getattr(value, part, None)
        if value is None:
            cls = type(config).__name__
            raise RulesError(f"{what}, but its config ({cls}) has no {var.attribute!r}", where=var.where)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RulesError(f"{what}: expected a positive integer, found {describe_value(value)}", where=var.where)
    return value


def _vars(value: Any, ctx: _Context) -> dict[str, int | ConfigVar]:
    """``vars: {heads: 32, kv_heads: {config: num_key_value_heads}}``: name -> a positive
    integer, or the entry of the target model's config to read it from."""
    _check(value, SCHEMA[VARS], (VARS,), ctx)
    out: dict[str, int | ConfigVar] = {}
    for name, given in value.items():
        at = (VARS, name)
        if not isinstance(name, str) or not regex.fullmatch(VAR_NAME, name):
            raise ctx.error(f"a var name is a letter or _ then letters, digits or _, found {describe_value(name)}", at, key=True)
        if DIM_NAME.fullmatch(name):
            raise ctx.error(f"the name {name!r} means dim {name[1:]} of the input in a size: call the var something else", at, key=True)
        if isinstance(given, int) and not isinstance(given, bool):
            if given < 1:
                raise ctx.error(f"expected a positive integer, found {given}", at)
            out[name] = given
        elif isinstance(given, dict) and list(given) == ["config"] and isinstance(given["config"], str) \
                and regex.fullmatch(rf"{VAR_NAME}(\.{VAR_NAME})*", given["config"]):
            out[name] = ConfigVar(name, given["config"], ctx.locs.at((*at, "config")) if ctx.locs.values else ctx.locs.at(at))
        else:
            raise ctx.error(f"expected a positive integer or {{config: name}} (an entry of the target model's config), "
                            f"found {describe_value(given)}", at)  # fmt: skip
    return out


def _steps(items: list[Any], ctx: _Context, offset: int = 0, origin: str | None = None,
           variables: Mapping[str, Any] | None = None) -> tuple[Step, ...]:  # fmt: skip
    return tuple(_step(item, n, ctx, offset, origin, variables or {}) for n, item in enumerate(items))


def _with_vars(step: Step, variables: Mapping[str, Any], path: tuple[Any, ...], kind: str, ctx: _Context, label: str) -> Step:
    """The step with the ``vars`` its sizes name; a name not in ``vars`` is an error at its size."""
    names: list[str] = []
    for field_path, size in step.size_exprs():
        for name in size.names:
            if name not in variables:
                defined = ", ".join(variables) or "none"
                hint = _did_you_mean(name, variables)
                raise ctx.error(f"size '{size}': {name!r} is not in vars{hint} (defined: {defined}); dims of the input are d0, d1, ...",
                                (*path, kind, *field_path), step=label, fields=field_path)  # fmt: skip
            names.append(name)
    if not names:
        return step
    return replace(step, vars=tuple((n, variables[n]) for n in dict.fromkeys(names)))


def _step(item: dict[str, Any], n: int, ctx: _Context, offset: int = 0, origin: str | None = None,
          variables: Mapping[str, Any] | None = None) -> Step:  # fmt: skip
    """Item ``n`` of a ``rules:`` list; ``offset`` steps (from included fragments) come before
    it, and ``origin`` names the fragment it belongs to."""
    path = ("rules", n)
    label = f"step {offset + n + 1}"
    kinds = [k for k in item if k in STEPS]
    unknown = [k for k in item if k not in STEPS and k not in STEP_OPTIONS]
    if unknown:
        names = list(STEPS) + list(STEP_OPTIONS)
        raise ctx.error(
            f"unknown field {_show(unknown[0])}{_did_you_mean(unknown[0], names)}; a step is one of: {', '.join(STEPS)}",
            (*path, unknown[0]),
            key=True,
            step=label,
        )
    if len(kinds) != 1:
        found = f"{len(kinds)}: {', '.join(kinds)}" if kinds else "none"
        raise ctx.error(f"expected exactly one step name ({', '.join(STEPS)}), found {found}", path, step=label)
    kind = kinds[0]
    cls = STEPS[kind]
    label = f"step {offset + n + 1} ({kind}{', from ' + origin if origin else ''})"
    optional = item.get("optional", False)
    if not isinstance(optional, bool):
        raise ctx.error(
            f"expected true or false, found {describe_value(optional)}", (*path, "optional"), step=label, fields=("optional",)
        )
    reads = item.get("from")
    if reads is not None and (not isinstance(reads, str) or not regex.fullmatch(SOURCE_NAME, reads)):
        raise ctx.error(f"expected the name of a source in `sources:`, found {describe_value(reads)}", (*path, "from"),
                        step=label, fields=("from",))  # fmt: skip
    _check(item[kind], cls.schema, (*path, kind), ctx, step=label)
    where = ctx.locs.at((*path, kind), key=True) if ctx.locs.values else None  # a dict has no positions
    try:
        step = cls.parse(item[kind], index=offset + n + 1, where=where, optional=optional)
    except StepSpecError as exc:
        raise ctx.error(str(exc), (*path, kind, *exc.at), key=exc.key, step=label, fields=exc.path) from None
    step = _with_vars(step, variables or {}, path, kind, ctx, label)
    step = replace(step, reads=reads) if reads is not None else step
    return replace(step, origin=origin) if origin else step


# --------------------------------------------------------------------------- fragments


def fragments() -> dict[str, Any]:
    """The rule fragments shipped with remap (``src/remap/rules/fragments/NAME.yaml``), by name.

    >>> "keras-layout" in fragments()
    True
    """
    folder = resources.files(__package__).joinpath("fragments")
    if not folder.is_dir():
        return {}
    found = {f.name.removesuffix(".yaml"): f for f in folder.iterdir() if f.name.endswith(".yaml") and f.is_file()}
    return dict(sorted(found.items()))


def _includes(value: Any, ctx: _Context) -> tuple[tuple[str, ...], tuple[Step, ...]]:
    """``include: [name, ...]``: the names, and their fragments' steps in order."""
    _check(value, {"type": ["string", "array"], "items": {"type": "string", "minLength": 1}, "minItems": 1, "minLength": 1},
           (INCLUDE,), ctx)  # fmt: skip
    names = (value,) if isinstance(value, str) else tuple(value)
    available = fragments()
    steps: list[Step] = []
    for n, name in enumerate(names):
        at = (INCLUDE,) if isinstance(value, str) else (INCLUDE, n)
        if name in names[:n]:
            raise ctx.error(f"the fragment {_show(name)} is listed twice", at)
        if name not in available:
            shown = ", ".join(available) or "none"
            raise ctx.error(f"unknown fragment {_show(name)}{_did_you_mean(name, available)}; available fragments: {shown}", at)
        steps += _fragment(name, available[name], len(steps))
    return names, tuple(steps)


def _fragment(name: str, resource: Any, offset: int) -> tuple[Step, ...]:
    """The steps of one fragment, numbered after ``offset`` steps; errors name the fragment's file."""
    data, locs = load_yaml(resource.read_text(encoding="utf-8"), str(resource))
    ctx = _Context(locs)
    if not isinstance(data, dict):
        raise ctx.error(f"a fragment is a mapping with `rules:`, found {describe_value(data)}", ())
    for key in data:
        if key not in FRAGMENT_SECTIONS:
            raise ctx.error(f"unknown field {_show(key)}; a fragment holds only: {', '.join(FRAGMENT_SECTIONS)}", (key,), key=True)
    if "version" in data and (type(data["version"]) is not int or data["version"] != 1):
        raise ctx.error(f"expected 1, found {describe_value(data['version'])}", ("version",))
    if "rules" not in data:
        raise ctx.error("missing required field 'rules'", ())
    _check(data["rules"], SCHEMA["rules"], ("rules",), ctx)
    return _steps(data["rules"], ctx, offset, origin=name)


def _build(data: Any, ctx: _Context, filename: str | None, base_dir: str | None) -> Rules:
    if data is None:
        raise ctx.error("the rules file is empty; expected a mapping with at least `version: 1`", ())
    if not isinstance(data, dict):
        hint = ""
        if isinstance(data, str) and data.endswith((".yaml", ".yml")):
            hint = " (a path? read a rules file with load_rules)"
        raise ctx.error(f"expected a mapping with `version: 1` at the top, found {describe_value(data)}{hint}", ())
    for key in data:
        if key not in SECTIONS and key != INCLUDE:
            raise ctx.error(
                f"unknown field {_show(key)}{_did_you_mean(key, (*SECTIONS, INCLUDE))}; expected one of: {', '.join(SECTIONS)}",
                (key,),
                key=True,
            )
    if "version" not in data:
        raise ctx.error("missing required field 'version' (write `version: 1` at the top)", ())
    version = data["version"]
    if type(version) is not int or version != 1:  # 1.0 and true compare equal to 1
        hint = ""
        if isinstance(version, str) and version.strip() == "1":
            hint = " (write it without quotes)"
        elif type(version) is int:
            hint = " (this remap reads version 1 of the rules language)"
        raise ctx.error(f"expected 1, found {describe_value(version)}{hint}", ("version",))
    for name in SECTIONS:
        if name in data and name not in ("shapes", VARS):
            _check(data[name], SCHEMA[name], (name,), ctx)
    min_loaded = data.get("expect", {}).get("min_loaded")
    if isinstance(min_loaded, float) and math.isnan(min_loaded):  # passes both bounds of the schema
        raise ctx.error("expected a number from 0 to 1, found a number nan", ("expect", "min_loaded"))
    freeze = data.get("freeze", {})
    includes, included = _includes(data[INCLUDE], ctx) if INCLUDE in data else ((), ())
    variables = _vars(data[VARS], ctx) if VARS in data else {}
    own = _steps(data.get("rules", []), ctx, len(included), variables=variables)
    own = tuple(s.with_base_dir(base_dir) if hasattr(s, "with_base_dir") else s for s in own)  # files a step reads (lora's config)
    _check_from(data, own, len(included), ctx)
    used = {name for step in own for name, _ in step.vars}
    idle = [name for name in variables if name not in used]
    if idle:
        raise ctx.error(f"{idle[0]!r} is defined but no step's size names it; remove it, or use it", (VARS, idle[0]), key=True)
    return Rules(
        version=data["version"],
        source=_source(data.get("source", {}), ctx),
        target=_target(data.get("target", {}), ctx),
        steps=included + own,
        shapes=_shapes(data["shapes"], ctx) if "shapes" in data else ShapePolicy(),
        expect=Expect(_patterns(data.get("expect", {}).get("missing")), _patterns(data.get("expect", {}).get("unused")),
                      data.get("expect", {}).get("min_loaded")),  # fmt: skip
        freeze=Freeze(_patterns(freeze.get("params")), _patterns(freeze.get("except")), freeze.get("batchnorm", "keep"),
                      freeze.get("from_source", False)),
        verify=VerifySpec.parse(data["verify"]) if "verify" in data else None,
        output=Output(data.get("output", {}).get("report"), data.get("output", {}).get("save"), data.get("output", {}).get("max_shard_size")),
        filename=filename,
        base_dir=base_dir,
        includes=includes,
        vars=variables,
        sources={n: _source(d, ctx) for n, d in data.get("sources", {}).items()},
    )


def _check_from(data: dict[str, Any], steps: tuple[Step, ...], offset: int, ctx: _Context) -> None:
    """``source`` and ``sources`` exclude each other; a step's ``from`` names one of ``sources``
    (checked when planning where the sources come from the command line or the API)."""
    if "source" in data and "sources" in data:
        raise ctx.error("`source` and `sources` exclude each other: one source goes in `source`, several named ones in "
                        "`sources: {name: {path: ...}}`", ("sources",), key=True)  # fmt: skip
    names = list(data.get("sources", {}))
    for step in steps:
        if step.reads is None:
            continue
        at = ("rules", step.index - offset - 1, "from")
        if "source" in data:
            raise ctx.error(f"`from: {step.reads}` needs several named sources (`sources:`), but the rules give one `source`",
                            at, step=step.label, fields=("from",))  # fmt: skip
        if names and step.reads not in names:
            raise ctx.error(f"no source {step.reads!r}{_did_you_mean(step.reads, names)}; the sources are: {', '.join(names)}",
                            at, step=step.label, fields=("from",))  # fmt: skip


@functools.lru_cache(maxsize=64)
def _parse_text(text: str, filename: str, base_dir: str | None) -> Rules:
    data, locs = load_yaml(text, filename)
    return _build(data, _Context(locs), filename, base_dir)


def parse_rules(rules: str | Mapping[str, Any] | Rules, *, filename: str = "<rules>", base_dir: str | None = None) -> Rules:
    """Parse rules given as YAML text, a dict, or (returned as is) :class:`Rules`.

    >>> parse_rules("version: 1\\nshapes: skip\\n").shapes.default
    'skip'
    """
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, str):
        return _parse_text(rules, filename, base_dir)
    if isinstance(rules, Mapping):
        ctx = _Context(Locations(filename))
        try:
            plain = _plain(rules, ctx, ())
        except RecursionError:
            raise RulesError("the rules are nested too deeply", where=filename) from None
        return _build(plain, ctx, None, base_dir)
    if isinstance(rules, os.PathLike):
        raise RulesError(f"parse_rules takes YAML text or a dict; read the file {str(rules)!r} with load_rules(path)")
    raise RulesError(f"expected rules as YAML text, a dict or Rules, found {describe_value(rules)}")


def _plain(value: Any, ctx: _Context, path: tuple[Any, ...]) -> Any:
    """A dict given from Python may hold tuples; the schema speaks of lists. Scalars are
    checked as a YAML file's are (:func:`~remap.rules.yaml_source.check_scalar`)."""
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            problem = check_scalar(k)
            if problem is not None:
                raise ctx.error(f"a key: {problem}", path)
            out[k] = _plain(v, ctx, (*path, k))
        return out
    if isinstance(value, (tuple, list)):
        return [_plain(v, ctx, (*path, n)) for n, v in enumerate(value)]
    problem = check_scalar(value)
    if problem is not None:
        raise ctx.error(problem, path)
    return value


def load_rules(path: str | os.PathLike[str]) -> Rules:
    """Read and parse a rules file; relative paths in it resolve against its folder.

    Only a regular file of at most :data:`MAX_RULES_BYTES` is read: a FIFO would block,
    ``/dev/zero`` never ends and ``/dev/urandom`` never parses."""
    p = Path(path)
    kind = file_kind(p)
    if kind == "missing":
        raise RulesError("no such rules file", where=str(path))
    if kind == "a folder":
        raise RulesError("expected a rules file, found a directory", where=str(path))
    try:
        text = read_text_capped(p, limit=MAX_RULES_BYTES, error=RulesError, what="it")
    except RulesError as exc:  # a FIFO, a device, too long, not UTF-8
        raise RulesError(f"cannot read the rules file: {exc.message}", where=str(path)) from None
    except FileNotFoundError:  # gone since we looked
        raise RulesError("no such rules file", where=str(path)) from None
    except OSError as exc:
        raise RulesError(f"cannot read the rules file: {exc.strerror or exc}", where=str(path)) from None
    return _parse_text(text, str(path), str(p.resolve().parent))
