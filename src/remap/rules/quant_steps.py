"""Block-scaled (fine-grained fp8) weights: ``dequant_blocks``, a two-input step.

DeepSeek-V3 and Hugging Face's fine-grained fp8 checkpoints store a linear weight as
``<name>.weight`` (float8_e4m3fn, ``[M, N]``) beside ``<name>.weight_scale_inv`` (float32,
``[ceil(M/128), ceil(N/128)]``): one scale per 128 x 128 block, the last row and column of
blocks cut short where ``M`` or ``N`` is not a multiple of 128. The real weight is
``weight[i, j] * scale_inv[i // 128, j // 128]``, computed in float32 and then cast. The
scale is a key of its own, possibly in another shard of a sharded checkpoint: the step pairs
the two keys by name, consumes the scale (it is a source of the weight's target key, not an
unused key), checks the scale's shape against the weight's at plan time and records one op
of two inputs that the engine runs at apply time (once on meta tensors first)::

    - dequant_blocks: {match: '\\.weight$', dtype: bfloat16}          # scale: <key>_scale_inv, block [128, 128]
    - dequant_blocks: {match: '^(.*)\\.weight$', scale: '\\1.weight_scale_inv', block: [128, 128], dtype: target}

``scale`` replaces what ``match`` found in the weight's name, as ``rename`` does (default
``\\g<0>_scale_inv``: the matched text with ``_scale_inv`` after it). ``dtype`` is what the
weight becomes: a dtype, or ``target`` (the default) for the dtype of the target key of the
same name (put the step after the renames that give the weight its target name). A key that
matches ``match`` and has no scale key is left alone, unless it is a float8 tensor: a float8
weight without its scale is a failure naming the scale key it looked for. The op has no
exact inverse: ``remap export`` keeps the original weight and scale.

>>> from remap.meta import TensorMeta
>>> from remap.rules.steps import Item
>>> step = DequantBlocks.parse({"match": r"\\.weight$", "dtype": "bfloat16"}, index=1, where=None, optional=False)
>>> out = step.run([Item.source("fc.weight", TensorMeta((300, 200), "float8_e4m3fn")),
...                 Item.source("fc.weight_scale_inv", TensorMeta((3, 2), "float32"))])
>>> [(i.key, i.sources, i.meta.dtype) for i in out.items], out.failures
([('fc.weight', ('fc.weight', 'fc.weight_scale_inv'), 'bfloat16')], [])
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import describe_value
from ..meta import DTYPE_ALIASES, DTYPE_NAMES, TensorMeta, dtype_name
from ..report.records import Failure
from .patterns import PatternError, Template, compile_regex, quote, search
from .steps import Inverse, Item, Op, Recipe, Step, StepContext, StepResult, StepSpecError, register

__all__ = ["DequantBlocks", "dequant_blocks", "scale_shape"]

DEFAULT_BLOCK = (128, 128)
DEFAULT_SCALE = r"\g<0>_scale_inv"
FLOAT8 = ("float8_e4m3fn", "float8_e5m2")
FLOATING = ("float64", "float32", "float16", "bfloat16", *FLOAT8)
#: ``dtype: target``: the dtype of the target key the weight is named after at this step.
TARGET = "target"


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The shape of the scale of a ``shape`` weight in ``block`` blocks (a partial block counts).

    >>> scale_shape((300, 200), (128, 128))
    (3, 2)
    """
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def dequant_blocks(weight: Any, scale: Any, *, block: tuple[int, int], dtype: str) -> Any:
    """``weight * scale`` with one scale per ``block`` of the weight, in float32, cast to ``dtype``.

    Runs on meta tensors (shapes only) as on real ones.

    >>> import torch
    >>> w = torch.ones(3, 5, dtype=torch.float8_e4m3fn)
    >>> dequant_blocks(w, torch.tensor([[2.0, 3.0], [4.0, 5.0]]), block=(2, 4), dtype="float32").tolist()[2]
    [4.0, 4.0, 4.0, 4.0, 5.0]
    """
    import torch

    rows, cols = weight.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    w = weight.to(torch.float32)
    if (nr * br, nc * bc) != (rows, cols):  # a partial last block: pad to whole blocks, cut off after
        w = torch.nn.functional.pad(w, (0, nc * bc - cols, 0, nr * br - rows))
    elif w.data_ptr() == weight.data_ptr() and weight.device.type != "meta":
        w = w.clone()  # a float32 weight: never scale the source tensor in place
    s = scale.to(torch.float32).reshape(nr, 1, nc, 1)
    out = w.reshape(nr, br, nc, bc).mul_(s).reshape(nr * br, nc * bc)[:rows, :cols]
    return out.to(getattr(torch, dtype))


def _block(value: Any) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise StepSpecError(f"expected two block sizes >= 1, e.g. [128, 128], found {describe_value(value)}", "block")
    return value[0], value[1]


def _dtype(value: Any) -> str:
    if value == TARGET:
        return TARGET
    name = DTYPE_ALIASES.get(value, value)
    if name not in FLOATING or name not in DTYPE_NAMES:
        raise StepSpecError(f"expected a floating dtype ({', '.join(FLOATING)}) or 'target', found {describe_value(value)}", "dtype")
    return dtype_name(name)


@register
@dataclass(frozen=True)
class DequantBlocks(Step):
    """``dequant_blocks: {match, scale: '\\g<0>_scale_inv', block: [128, 128], dtype: target}``:
    a block-scaled weight and its scale key, into one dequantized tensor (see the module)."""

    pattern: str = ""
    scale: Template | None = None
    block: tuple[int, int] = DEFAULT_BLOCK
    dtype: str = TARGET
    kind: ClassVar[str] = "dequant_blocks"
    schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {"match": {"type": "string"}, "scale": {"type": "string", "minLength": 1},
                       "block": {"type": "array", "items": {"type": "integer"}}, "dtype": {"type": "string"}},
        "required": ["match"],
        "additionalProperties": False,
    }  # fmt: skip

    @classmethod
    def parse(cls, value: Any, *, index: int, where: str | None, optional: bool) -> Step:
        try:
            compiled = compile_regex(value["match"])
        except PatternError as exc:
            raise StepSpecError(str(exc), "match") from None
        try:
            scale = Template.parse(value.get("scale", DEFAULT_SCALE), compiled)
        except PatternError as exc:
            raise StepSpecError(str(exc), "scale") from None
        block = _block(value["block"]) if "block" in value else DEFAULT_BLOCK
        return cls(index, where, optional, value["match"], scale, block, _dtype(value.get("dtype", TARGET)))

    def summary(self) -> str:
        scale = self.scale.text if self.scale is not None else DEFAULT_SCALE
        return (f"dequant_blocks {quote(self.pattern)} with scale {quote(scale)} "
                f"(block {self.block[0]}x{self.block[1]}, to {self.dtype})")  # fmt: skip

    def scale_key(self, compiled: Any, key: str) -> str:
        """The name of ``key``'s scale: ``scale`` in place of what ``match`` found."""
        scale = self.scale if self.scale is not None else Template.parse(DEFAULT_SCALE, compiled)
        return scale.sub(compiled, key)

    def run(self, items: list[Item], ctx: StepContext | None = None) -> StepResult:
        ctx = ctx or StepContext()
        compiled = compile_regex(self.pattern)
        by_key = {i.key: i for i in items}
        pairs: dict[str, str] = {}  # weight key -> its scale key
        failures: list[Failure] = []
        for item in items:
            if search(compiled, item.key) is None:
                continue
            scale = self.scale_key(compiled, item.key)
            if scale in by_key and scale != item.key:
                pairs[item.key] = scale
            elif item.meta.dtype in FLOAT8:
                where = f" ({self.where})" if self.where else ""
                failures.append(Failure("op", f"{self.label}{where}: key {item.key!r} is {item.meta.dtype} but its scale "
                                        f"{scale!r} is not a key at this step; fix `scale`, or `drop` the weight", item.sources))  # fmt: skip
        scales = set(pairs.values())
        pairs = {w: s for w, s in pairs.items() if w not in scales}  # a scale is never a weight of its own
        users: dict[str, list[str]] = {}
        for w, s in pairs.items():
            users.setdefault(s, []).append(w)
        out: list[Item] = []
        done: dict[str, Item] = {}
        for w, s in pairs.items():
            if len(users[s]) > 1:
                failures.append(Failure("op", f"{self.label}: {', '.join(map(repr, users[s]))} all name the scale {s!r}",
                                        tuple(k for u in users[s] for k in by_key[u].sources)))  # fmt: skip
                continue
            try:
                done[w] = self._pair(by_key[w], by_key[s], ctx)
            except _PairError as exc:
                failures.append(Failure("op", f"{self.label}: {exc}", (*by_key[w].sources, *by_key[s].sources)))
        consumed = {pairs[w] for w in done}
        for item in items:
            if item.key in done:
                out.append(done[item.key])
            elif item.key not in consumed:
                out.append(item)
        counts = ((self.pattern, len(done)),)
        return StepResult(out, counts=counts, failures=failures + self.unmatched(counts if not failures else (), items))

    def _pair(self, weight: Item, scale: Item, ctx: StepContext) -> Item:
        """The dequantized weight, checked at plan time: ranks, the scale's shape, the dtypes."""
        w, s = weight.meta, scale.meta
        what = f"{weight.key!r} {list(w.shape)} {w.dtype} with scale {scale.key!r} {list(s.shape)} {s.dtype}"
        if len(w.shape) != 2:
            raise _PairError(f"{what}: a block-scaled weight is 2-d [rows, cols]")
        if w.dtype not in FLOATING or s.dtype not in FLOATING:
            raise _PairError(f"{what}: weight and scale must be floating-point tensors")
        want = scale_shape(w.shape, self.block)
        if tuple(s.shape) != want:
            raise _PairError(f"{what}: blocks of {self.block[0]}x{self.block[1]} need a scale of shape {list(want)}")
        dtype = self.dtype
        if dtype == TARGET:
            target = ctx.target.get(weight.key)
            if target is None:
                raise _PairError(f"{what}: dtype 'target' takes the dtype of the target key {weight.key!r}, and there is none; "
                                 "put dequant_blocks after the renames that give the weight its target name, or give `dtype`")  # fmt: skip
            dtype = target.dtype
            if dtype not in FLOATING:
                raise _PairError(f"{what}: the target key is {dtype}, not a floating dtype; give `dtype`")
        op = Op("dequant_blocks", f"dequant_blocks({self.block[0]}x{self.block[1]}, {w.dtype}*{s.dtype}->{dtype})",
                functools.partial(dequant_blocks, block=self.block, dtype=dtype),
                Inverse.of("quantize_blocks", exact=False, block=self.block, dtype=w.dtype, scale_dtype=s.dtype))
        recipe = Recipe(op, (weight.node, scale.node))
        return Item(weight.key, (*weight.sources, *scale.sources), TensorMeta(tuple(w.shape), dtype),
                    ((self.index, weight.key),), recipe, (weight, scale))  # fmt: skip


class _PairError(ValueError):
    """A weight and its scale that cannot be dequantized together (the message names both)."""

