"""Adapter steps: ``lora`` merges LoRA / DoRA adapters (as PEFT saves them) into their base weights.

A LoRA adapter of a module ``M`` holds two factors, ``lora_A`` (r, in) and ``lora_B`` (out, r);
the merged weight is ``W + s * B @ A`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).
DoRA adds a magnitude ``m`` per output row: ``W' = m / ||W + dW||_row * (W + dW)``. PEFT saves
the factors as ``base_model.model.<M>.lora_A.weight`` (``save_pretrained``: no adapter name) or
``base_model.model.<M>.lora_A.<adapter>.weight`` (a wrapped model's ``state_dict``); the step
reads both, and ``<M>.weight`` or PEFT's ``<M>.base_layer.weight`` as the base weight. The
merged key is ``<M>.weight``, as ``merge_and_unload`` names it.

The step sees keys only, so the base and the adapter may come from one state_dict, one folder
or several sources. Its op loses the factors: no export can give them back, so the op's
inverse is ``refuse`` and ``remap export`` fails naming it.

>>> from remap.meta import TensorMeta
>>> from remap.rules.steps import Item
>>> step = STEPS["lora"].parse({"match": "q\\\\.weight$", "alpha": 8}, index=1, where=None, optional=False)
>>> items = [Item.source("q.weight", TensorMeta((6, 5))), Item.source("base_model.model.q.lora_A.weight", TensorMeta((4, 5))),
...          Item.source("base_model.model.q.lora_B.weight", TensorMeta((6, 4)))]
>>> out = step.run(items)
>>> [(i.key, i.meta.shape, i.ops) for i in out.items]
[('q.weight', (6, 5), ('lora_merge(scale=2, rank=4)',))]
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from ..errors import RulesError, describe_value
from ..files import read_text_capped
from ..meta import TensorMeta
from ..report.records import Failure
from .patterns import PatternError, compile_regex, quote, quotes, search
from .steps import STEPS, Inverse, Item, Op, Recipe, Step, StepContext, StepResult, StepSpecError, register

__all__ = ["Lora", "lora_merge", "lora_bias", "REFUSE", "PEFT_PREFIX", "read_adapter_config"]

#: The inverse kind of an op whose inputs no export can compute back (``remap export`` fails on it).
REFUSE = "refuse"
#: The prefix PEFT gives every key of a wrapped model (``PeftModel.base_model.model``).
PEFT_PREFIX = "base_model.model."
MAX_CONFIG_BYTES = 1 << 20  # an adapter_config.json is a page
_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_MATCH = {"type": ["string", "array"], "items": {"type": "string"}, "minItems": 1}


# --------------------------------------------------------------------------- the ops


def _compute_dtype(*tensors: Any) -> Any:
    import torch

    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) or not dtype.is_floating_point else dtype


def lora_delta(a: Any, b: Any, *, scaling: float, layout: str) -> Any:
    """``scaling * B @ A`` in the base weight's layout: ``linear`` (out, in), ``fifo`` (in, out:
    GPT-2's Conv1D, and every embedding), ``conv`` (out, in, *kernel; ``B`` is 1x1).

    >>> import torch
    >>> lora_delta(torch.ones(2, 3), torch.ones(4, 2), scaling=0.5, layout="fifo").shape
    torch.Size([3, 4])
    """
    if layout == "conv":
        r = a.shape[0]
        return (b.reshape(b.shape[0], r) @ a.reshape(r, -1)).reshape(b.shape[0], *a.shape[1:]) * scaling
    delta = b @ a
    return (delta.T if layout == "fifo" else delta) * scaling


def lora_merge(w: Any, a: Any, b: Any, m: Any = None, *, scaling: float, layout: str) -> Any:
    """The merged weight ``W + scaling * B @ A`` (DoRA, given the magnitude ``m``: rescaled so
    that each output row's norm is ``m``), computed in float32 at least, in ``w``'s dtype.

    >>> import torch
    >>> lora_merge(torch.zeros(2, 2), torch.ones(1, 2), torch.ones(2, 1), scaling=2.0, layout="linear")
    tensor([[2., 2.],
            [2., 2.]])
    """
    dtype = _compute_dtype(w, a, b)
    merged = w.to(dtype) + lora_delta(a.to(dtype), b.to(dtype), scaling=scaling, layout=layout)
    if m is not None:
        out_axis = 1 if layout == "fifo" else 0
        dims = tuple(d for d in range(merged.dim()) if d != out_axis)
        norm = merged.norm(p=2, dim=dims)
        factor = m.to(dtype).reshape(-1) / norm
        view = [1] * merged.dim()
        view[out_axis] = -1
        merged = factor.reshape(view) * merged
    return merged.to(w.dtype)


def lora_bias(bias: Any, b_bias: Any, *, scaling: float) -> Any:
    """The base bias plus ``scaling`` times ``lora_B``'s bias (PEFT's ``lora_bias=True``)."""
    dtype = _compute_dtype(bias, b_bias)
    return (bias.to(dtype) + b_bias.to(dtype) * scaling).to(bias.dtype)


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class _Key:
    """What one key is to the step: a factor (``part`` of ``module``, ``name`` of its adapter,
    ``param`` weight/bias) or a base parameter of ``module``."""

    module: str
    part: str | None  # one of _PARTS, or None for a base parameter
    name: str | None
    param: str  # "weight" | "bias"


def _classify(key: str, prefix: str) -> _Key | None:
    """The adapter factor or base parameter a key is, with PEFT's prefix and adapter name read off.

    >>> _classify("base_model.model.l.0.q.lora_A.default.weight", PEFT_PREFIX)
    _Key(module='l.0.q', part='lora_A', name='default', param='weight')
    >>> _classify("base_model.model.emb.lora_embedding_B", PEFT_PREFIX), _classify("q.base_layer.bias", PEFT_PREFIX)
    (_Key(module='emb', part='lora_embedding_B', name=None, param='weight'), _Key(module='q', part=None, name=None, param='bias'))
    """
    bare = key[len(prefix):] if prefix and key.startswith(prefix) else key
    tokens = bare.split(".")
    at = next((n for n in range(len(tokens) - 1, 0, -1) if tokens[n] in _PARTS), None)
    if at is not None:
        part, tail, module = tokens[at], tokens[at + 1:], ".".join(tokens[:at])
        if part in ("lora_A", "lora_B"):
            if len(tail) in (1, 2) and tail[-1] in ("weight", "bias"):
                return _Key(module, part, tail[0] if len(tail) == 2 else None, tail[-1])
            return None
        if part == "lora_magnitude_vector" and tail and tail[-1] == "weight":
            tail = tail[:-1]  # a wrapped model's `lora_magnitude_vector.default.weight`; saved: `lora_magnitude_vector`
        if len(tail) <= 1:
            return _Key(module, part, tail[0] if tail else None, "weight")
        return None
    if len(tokens) < 2 or tokens[-1] not in ("weight", "bias"):
        return None
    module = ".".join(tokens[:-1])
    return _Key(module.removesuffix(".base_layer") if module.endswith(".base_layer") else module, None, None, tokens[-1])


def _shape(meta: TensorMeta) -> str:
    return str(list(meta.shape))


# --------------------------------------------------------------------------- adapter_config.json


def read_adapter_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The LoRA settings of a PEFT ``adapter_config.json``: ``r``, ``lora_alpha``, ``use_rslora``,
    ``fan_in_fan_out``, ``use_dora``, ``lora_bias``, ``rank_pattern``, ``alpha_pattern``. A
    RulesError names the file and the field that is missing or wrong.
    """
    text = read_text_capped(path, limit=MAX_CONFIG_BYTES, error=RulesError, what="the adapter config")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RulesError(f"the adapter config is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", where=str(path)) from None
    except RecursionError:  # "[[[[...": nested deeper than Python's JSON reader goes
        raise RulesError("the adapter config is nested deeper than JSON can be read here", where=str(path)) from None
    if not isinstance(data, dict):
        raise RulesError(f"expected a JSON object (PEFT's adapter_config.json), found {describe_value(data)}", where=str(path))
    kind = data.get("peft_type", "LORA")
    if kind != "LORA":
        raise RulesError(f"peft_type is {kind!r}: the lora step merges LoRA (and DoRA) adapters only", where=str(path))

    def get(name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if name not in data or data[name] is None:
            if required:
                raise RulesError(f"missing {name!r} (expected {kind.__name__ if isinstance(kind, type) else 'a number'})", where=str(path))
            return default
        value = data[name]
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise RulesError(f"field {name!r}: expected {getattr(kind, '__name__', 'a number')}, found {describe_value(value)}", where=str(path))
        return value

    out = {"r": get("r", int, required=True), "lora_alpha": get("lora_alpha", (int, float), required=True),
           "use_rslora": get("use_rslora", bool, False), "fan_in_fan_out": get("fan_in_fan_out", bool, False),
           "use_dora": get("use_dora", bool, False), "lora_bias": get("lora_bias", bool, False),
           "rank_pattern": get("rank_pattern", dict, {}), "alpha_pattern": get("alpha_pattern", dict, {})}  # fmt: skip
    if out["r"] < 1:
        raise RulesError(f"field 'r': expected a rank >= 1, found {out['r']}", where=str(path))
    for field_name, kind_ in (("rank_pattern", int), ("alpha_pattern", (int, float))):
        for pattern, value in out[field_name].items():
            if isinstance(value, bool) or not isinstance(value, kind_):
                raise RulesError(f"field {field_name!r}, entry {pattern!r}: expected a number, found {describe_value(value)}", where=str(path))
    return out


# --------------------------------------------------------------------------- the step


@register
@dataclass(frozen=True)
class Lora(Step):
    """``lora: {match, alpha: 16, rank: 8}`` or ``lora: {match, config: adapter_config.json}``:
    every module whose merged key ``<M>.weight`` matches a pattern of ``match``, and that has
    ``lora_A``/``lora_B`` factors among the keys, becomes one key ``W + s * B @ A``.

    ``rank`` (optional) is checked against the factors (their rank is used when it is absent);
    ``rslora: true`` scales by ``alpha / sqrt(r)``; ``fan_in_fan_out: true`` is GPT-2's Conv1D
    layout (W is (in, out)); a ``lora_magnitude_vector`` makes it DoRA; ``lora_B``'s bias (PEFT's
    ``lora_bias``) is added to ``<M>.bias``. ``config`` reads all of these (and ``rank_pattern``,
    ``alpha_pattern``) from PEFT's ``adapter_config.json``; a relative path is relative to the
    rules file's folder. ``prefix`` (default ``base_model.model.``) is read off adapter keys;
    ``adapter`` picks one adapter by name where keys carry several.
    """

    patterns: tuple[str, ...] = ()
    alpha: float | None = None
    rank: int | None = None
    rslora: bool = False
    fan_in_fan_out: bool = False
    config: str | None = None
    prefix: str = PEFT_PREFIX
    adapter: str | None = None
    dora: bool | None = None  # from the config's use_dora; None: as the keys say
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    config_path: str | None = None  # the config as read, resolved (None until read)
    config_missing: str | None = None  # the resolved path of a config that was not there when the rules were read
    kind: ClassVar[str] = "lora"
    schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"match": _MATCH, "alpha": {"type": "number", "exclusiveMinimum": 0}, "rank": {"type": "integer", "minimum": 1},
                       "rslora": {"type": "boolean"}, "fan_in_fan_out": {"type": "boolean"}, "config": {"type": "string", "minLength": 1},
                       "prefix": {"type": "string"}, "adapter": {"type": "string", "minLength": 1}},
        "required": ["match"],
        "additionalProperties": False,
    }  # fmt: skip

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        match = (value["match"],) if isinstance(value["match"], str) else tuple(value["match"])
        for n, p in enumerate(match):
            try:
                compile_regex(p)
            except PatternError as exc:
                raise StepSpecError(str(exc), "match" if isinstance(value["match"], str) else ("match", n)) from None
        if "config" in value:
            both = [k for k in ("alpha", "rank", "rslora", "fan_in_fan_out") if k in value]
            if both:
                raise StepSpecError(f"{both[0]!r} is read from the adapter config; give either `config` or alpha/rank/rslora/fan_in_fan_out",
                                    both[0], key=True)  # fmt: skip
        elif "alpha" not in value:
            raise StepSpecError("missing 'alpha' (LoRA's lora_alpha; the scale is alpha / rank), or `config: adapter_config.json` to read it")
        alpha = float(value["alpha"]) if "alpha" in value else None
        return cls(index, where, optional, match, alpha, value.get("rank"), value.get("rslora", False), value.get("fan_in_fan_out", False),
                   value.get("config"), value.get("prefix", PEFT_PREFIX), value.get("adapter"))  # fmt: skip

    def with_base_dir(self, base_dir: str | None) -> Lora:
        """This step with its ``config`` read (relative to ``base_dir``, the rules file's folder;
        the working directory without one); RulesError at the step when it cannot be."""
        if self.config is None:
            return self
        path = Path(self.config)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.exists():  # like source.path: a file the rules name need not exist to validate them; planning says so
            return replace(self, config_missing=str(path))
        try:
            cfg = read_adapter_config(path)
        except RulesError as exc:
            raise RulesError(f"{self.label}: config {str(path)!r}: {exc.message}", where=self.where) from None
        except OSError as exc:
            raise RulesError(f"{self.label}: cannot read the adapter config {str(path)!r}: {exc.strerror or exc}", where=self.where) from None
        for field_name in ("rank_pattern", "alpha_pattern"):
            for pattern in cfg[field_name]:
                try:
                    compile_regex(_pattern_key(pattern))
                except PatternError as exc:
                    raise RulesError(f"{self.label}: config {str(path)!r}: {field_name} {pattern!r}: {exc}", where=self.where) from None
        return replace(self, alpha=float(cfg["lora_alpha"]), rank=cfg["r"], rslora=cfg["use_rslora"], fan_in_fan_out=cfg["fan_in_fan_out"],
                       dora=cfg["use_dora"], rank_pattern=tuple(cfg["rank_pattern"].items()),
                       alpha_pattern=tuple((k, float(v)) for k, v in cfg["alpha_pattern"].items()), config_path=str(path))  # fmt: skip

    def summary(self) -> str:
        if self.config is not None and self.config_path is None:
            how = f"config {quote(self.config)} (not read)"
        else:
            how = f"alpha {self.alpha:g}, rank {self.rank if self.rank is not None else 'from lora_A'}"
            how += ", rslora" if self.rslora else ""
            how += ", fan_in_fan_out" if self.fan_in_fan_out else ""
            how += ", dora" if self.dora else ""
            how += f", from {quote(self.config)}" if self.config else ""
        return f"lora merge ({how}) on {quotes(self.patterns)}"

    # ----------------------------------------------------------------------- planning

    def run(self, items: list[Item], ctx: StepContext | None = None) -> StepResult:
        factors: dict[str, list[tuple[_Key, Item]]] = {}
        bases: dict[tuple[str, str], list[Item]] = {}
        for item in items:
            k = _classify(item.key, self.prefix)
            if k is None:
                continue
            if k.part is None:
                bases.setdefault((k.module, k.param), []).append(item)
            else:
                factors.setdefault(k.module, []).append((k, item))
        compiled = [compile_regex(p) for p in self.patterns]
        counts = [0] * len(compiled)
        consumed: set[int] = set()
        made: list[Item] = []
        failures: list[Failure] = []
        for module, parts in factors.items():
            key = f"{module}.weight"
            n = next((n for n, c in enumerate(compiled) if search(c, key)), None)
            if n is None:
                continue
            counts[n] += 1
            try:
                merged, used = self._merge(module, parts, bases)
            except _Refused as exc:
                failures.append(Failure("op", f"{self.label}: module {module!r}: {exc}", tuple(s for _, i in parts for s in i.sources)))
                continue
            made.extend(merged)
            consumed.update(id(i) for i in used)
        position = {id(i): n for n, i in enumerate(items)}
        here: dict[int, list[Item]] = {}  # each merged key goes where the first of its inputs was
        for m in made:
            here.setdefault(min(position[id(p)] for p in m.parents), []).append(m)
        out = [x for n, i in enumerate(items) for x in (here.get(n, []) + ([i] if id(i) not in consumed else []))]
        pairs = tuple(zip(self.patterns, counts))
        return StepResult(out, counts=pairs, failures=failures + self.unmatched(pairs, items))

    def _merge(self, module: str, parts: list[tuple[_Key, Item]], bases: dict[tuple[str, str], list[Item]]) -> tuple[list[Item], list[Item]]:
        """The merged weight (and bias) of ``module``, and the items they consume."""
        chosen = self._chosen(parts)
        a, b = chosen.get(("A", "weight")), chosen.get(("B", "weight"))
        if a is None or b is None:
            have = ", ".join(repr(i.key) for i in chosen.values())
            raise _Refused(f"expected both lora_A and lora_B, found only {have}")
        w = self._base(module, "weight", bases)
        layout = "fifo" if self.fan_in_fan_out or "embedding" in _part_of(a, self.prefix) else "linear"
        if len(w.meta.shape) >= 3:
            layout = "conv"
        rank = self._check_shapes(module, layout, w, a, b)
        m = chosen.get(("magnitude", "weight"))
        if self.dora is True and m is None:
            raise _Refused("the adapter config says use_dora, but there is no lora_magnitude_vector key")
        if self.dora is False and m is not None:
            raise _Refused(f"{m.key!r} is DoRA's magnitude, but the adapter config says use_dora: false")
        out_size = w.meta.shape[1 if layout == "fifo" else 0]
        if m is not None and math.prod(m.meta.shape) != out_size:
            raise _Refused(f"DoRA's magnitude {m.key!r} {_shape(m.meta)} has {math.prod(m.meta.shape)} entries, "
                           f"but the base weight {w.key!r} {_shape(w.meta)} has {out_size} output rows")  # fmt: skip
        scaling = self._scaling(module, rank)
        words = [f"scale={scaling:g}", f"rank={rank}"] + (["dora"] if m is not None else []) + (["fan_in_fan_out"] if layout == "fifo" else [])
        fn = functools.partial(lora_merge, scaling=scaling, layout=layout)
        why = ("a LoRA merge adds B @ A into W and keeps no factors: the base weight and the adapter cannot be told apart "
               "again; export the merged model under its own names instead, or keep the adapter unmerged")  # fmt: skip
        op = Op("lora_merge", f"lora_merge({', '.join(words)})", fn, Inverse.of(REFUSE, exact=False, why=why))
        inputs = [w, a, b] + ([m] if m is not None else [])
        key = f"{module}.weight"
        made = [_combined(key, inputs, w.meta, op, self.index)]
        used = list(inputs)
        b_bias = chosen.get(("B", "bias"))
        if b_bias is not None:
            bias = self._base(module, "bias", bases)
            if bias.meta.shape != b_bias.meta.shape:
                raise _Refused(f"lora_B's bias {b_bias.key!r} {_shape(b_bias.meta)} does not fit the base bias {bias.key!r} {_shape(bias.meta)}")
            op_b = Op("lora_bias", f"lora_bias(scale={scaling:g})", functools.partial(lora_bias, scaling=scaling),
                      Inverse.of(REFUSE, exact=False, why=why))  # fmt: skip
            made.append(_combined(f"{module}.bias", [bias, b_bias], bias.meta, op_b, self.index))
            used += [bias, b_bias]
        return made, used

    def _chosen(self, parts: list[tuple[_Key, Item]]) -> dict[tuple[str, str], Item]:
        """The factors of one adapter, by (``A`` | ``B`` | ``magnitude``, param)."""
        names = sorted({k.name for k, _ in parts if k.name is not None})
        if self.adapter is not None:
            parts = [(k, i) for k, i in parts if k.name in (None, self.adapter)]
            if not parts:
                raise _Refused(f"no factor of adapter {self.adapter!r}; the keys name: {', '.join(map(repr, names))}")
        elif len(names) > 1:
            raise _Refused(f"the keys hold several adapters ({', '.join(map(repr, names))}); say which with `adapter: NAME`")
        chosen: dict[tuple[str, str], Item] = {}
        for k, item in parts:
            role = "magnitude" if k.part == "lora_magnitude_vector" else k.part[-1]  # type: ignore[index]
            slot = (role, k.param)
            if slot in chosen:
                raise _Refused(f"two keys hold the same factor: {chosen[slot].key!r} and {item.key!r}")
            chosen[slot] = item
        return chosen

    def _base(self, module: str, param: str, bases: dict[tuple[str, str], list[Item]]) -> Item:
        found = bases.get((module, param), [])
        if not found:
            raise _Refused(f"no base {param} for the adapter: expected a key {module + '.' + param!r} (or PEFT's "
                           f"{self.prefix + module + '.base_layer.' + param!r}) among the keys at this step")  # fmt: skip
        if len(found) > 1:
            raise _Refused(f"{len(found)} keys hold the base {param}: {', '.join(repr(i.key) for i in found)}; `drop` all but one "
                           "(an adapter saved with its embedding layers holds a copy of the base's)")  # fmt: skip
        return found[0]

    def _check_shapes(self, module: str, layout: str, w: Item, a: Item, b: Item) -> int:
        """The adapter's rank; _Refused naming the keys and shapes when the factors do not fit W."""
        sa, sb, sw = a.meta.shape, b.meta.shape, w.meta.shape
        if layout == "conv":
            if len(sa) != len(sw) or len(sb) != len(sw) or any(d != 1 for d in sb[2:]):
                raise _Refused(f"a conv LoRA needs lora_A (r, in, *kernel) and a 1x1 lora_B (out, r, 1, ...); found lora_A "
                               f"{a.key!r} {_shape(a.meta)}, lora_B {b.key!r} {_shape(b.meta)}, base {w.key!r} {_shape(w.meta)}")  # fmt: skip
            if sa[1] != sw[1] and sa[2:] == sw[2:] and sb[0] == sw[0]:
                raise _Refused(f"the base {w.key!r} {_shape(w.meta)} is a grouped conv (lora_A {a.key!r} {_shape(a.meta)} sees "
                               f"{sa[1]} input channels): merging a grouped conv's LoRA is not supported")  # fmt: skip
        elif len(sa) != 2 or len(sb) != 2 or len(sw) != 2:
            raise _Refused(f"expected 2-d factors and base weight; found lora_A {a.key!r} {_shape(a.meta)}, lora_B {b.key!r} "
                           f"{_shape(b.meta)}, base {w.key!r} {_shape(w.meta)}")  # fmt: skip
        rank = sa[0]
        if sb[1] != rank:
            raise _Refused(f"lora_B {b.key!r} {_shape(b.meta)} has rank {sb[1]} (dim 1), lora_A {a.key!r} {_shape(a.meta)} rank {rank} (dim 0)")
        declared = self._declared_rank(module)
        if declared is not None and declared != rank:
            raise _Refused(f"lora_A {a.key!r} {_shape(a.meta)} and lora_B {b.key!r} {_shape(b.meta)} have rank {rank}, "
                           f"but {self._rank_source(module)} says rank {declared}")  # fmt: skip
        product = (sb[0], *sa[1:]) if layout != "fifo" else (sa[1], sb[0])
        if tuple(product) != tuple(sw):
            hint = ""
            if layout == "linear" and tuple(reversed(product)) == tuple(sw):
                hint = "; W is (in, out): a Conv1D layer (GPT-2)? say `fan_in_fan_out: true`"
            elif layout == "fifo" and tuple(reversed(product)) == tuple(sw):
                hint = "; W is (out, in): not a Conv1D layer? drop `fan_in_fan_out`"
            raise _Refused(f"lora_B {b.key!r} {_shape(b.meta)} @ lora_A {a.key!r} {_shape(a.meta)} gives {list(product)}"
                           f"{' (transposed: fan_in_fan_out)' if layout == 'fifo' else ''}, but the base weight {w.key!r} is {_shape(w.meta)}{hint}")  # fmt: skip
        return rank

    def _rank_source(self, module: str) -> str:
        if _pattern_value(self.rank_pattern, module) is not None:
            return f"the adapter config's rank_pattern ({self.config})"
        return f"the adapter config {self.config!r} (r)" if self.config else "the step"

    def _declared_rank(self, module: str) -> int | None:
        hit = _pattern_value(self.rank_pattern, module)
        return hit if hit is not None else self.rank

    def _scaling(self, module: str, rank: int) -> float:
        alpha = _pattern_value(self.alpha_pattern, module)
        alpha = self.alpha if alpha is None else alpha
        if alpha is None and self.config_missing is not None:
            raise _Refused(f"the adapter config {self.config_missing!r} does not exist (PEFT writes it beside the adapter: "
                           "copy it there, or give alpha and rank in the step)")  # fmt: skip
        if alpha is None:  # a config not read yet (rules parsed without with_base_dir)
            raise _Refused(f"the adapter config {self.config!r} was not read, so alpha is unknown")
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank


class _Refused(Exception):
    """Why one module's adapter cannot be merged (becomes a Failure naming the module)."""


def _part_of(item: Item, prefix: str) -> str:
    k = _classify(item.key, prefix)
    return k.part or "" if k is not None else ""


def _pattern_key(pattern: str) -> str:
    """PEFT's ``rank_pattern``/``alpha_pattern`` keys match a module name's tail: ``(.*\\.)?(KEY)$``."""
    return rf"^(.*\.)?({pattern})$"


def _pattern_value(table: tuple[tuple[str, Any], ...], module: str) -> Any:
    for pattern, value in table:
        if search(compile_regex(_pattern_key(pattern)), module):
            return value
    return None


def _combined(key: str, inputs: list[Item], meta: TensorMeta, op: Op, step: int) -> Item:
    """One item computed by ``op`` from ``inputs`` (its sources theirs, in order)."""
    sources = tuple(s for i in inputs for s in i.sources)
    return Item(key, sources, TensorMeta(tuple(meta.shape), meta.dtype), ((step, key),), Recipe(op, tuple(i.node for i in inputs)), tuple(inputs))
