"""What the planner knows about a tensor: its name, shape and dtype, never its data.

The planner works on mappings of key -> :class:`TensorMeta` (source) and key ->
:class:`TargetMeta` (target). They come from a module, a state_dict, a checkpoint
header, or plain Python:

>>> src = source_meta({"fc.weight": [10, 512], "fc.bias": ([10], "float16")})
>>> src["fc.bias"]
TensorMeta(shape=(10,), dtype='float16')
>>> tgt = target_meta({"fc.weight": (10, 512)})
>>> tgt["fc.weight"].numel
5120

torch is imported only by the functions that look at real modules and tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = [
    "TensorMeta",
    "TargetMeta",
    "dtype_name",
    "source_meta",
    "target_meta",
    "meta_of_tensor",
    "meta_of_state_dict",
    "target_meta_of_module",
]

Shape = tuple[int, ...]

DTYPE_NAMES = (
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
    "complex64", "complex128", "int64", "int32", "int16", "int8", "uint8", "uint16",
    "uint32", "uint64", "bool",
)  # fmt: skip
DTYPE_ALIASES = {"double": "float64", "float": "float32", "half": "float16", "long": "int64", "int": "int32"}


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """Shape and dtype of one tensor (dtype as torch names it, without ``torch.``)."""

    shape: Shape
    dtype: str = "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class TargetMeta:
    """One key of the target's state_dict.

    ``kind`` is ``"parameter"`` or ``"buffer"``; ``tied_to`` names the first key under
    which the same tensor appears when this key is an alias of a tied parameter.
    """

    shape: Shape
    dtype: str = "float32"
    kind: str = "parameter"
    requires_grad: bool = True
    tied_to: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_param(self) -> bool:
        return self.kind == "parameter"


def dtype_name(dtype: Any) -> str:
    """``torch.float16`` -> ``"float16"``; a string is checked and normalised."""
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_NAMES:
        raise UsageError(f"unknown dtype {dtype!r}; expected one of: {', '.join(DTYPE_NAMES)}")
    return name


def _shape(value: Any, key: str) -> Shape:
    if isinstance(value, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        if any(d < 0 for d in value):
            raise UsageError(f"key {key!r}: negative dimension in shape {list(value)}")
        return tuple(value)
    raise UsageError(f"key {key!r}: expected a shape (list of ints), found {value!r}")


def _coerce(key: str, value: Any) -> TensorMeta:
    if type(value) is tuple and all(type(d) is int and d >= 0 for d in value):
        return TensorMeta(value)  # the common case, first
    if isinstance(value, TensorMeta):
        return value
    if isinstance(value, TargetMeta):
        return TensorMeta(value.shape, value.dtype)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor, meta tensor or array
        return TensorMeta(tuple(int(d) for d in value.shape), dtype_name(value.dtype))
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and isinstance(value[0], (list, tuple))
        and not isinstance(value[1], (list, tuple, int))
    ):
        return TensorMeta(_shape(value[0], key), dtype_name(value[1]))
    return TensorMeta(_shape(value, key))


def source_meta(mapping: Mapping[str, Any]) -> dict[str, TensorMeta]:
    """Normalise key -> shape | (shape, dtype) | TensorMeta | tensor into TensorMeta.

    A model repeats a few shapes over many keys, so each distinct tuple is checked once
    and its metadata shared."""
    if not isinstance(mapping, Mapping):
        raise UsageError(f"expected a mapping of key -> shape, found {type(mapping).__name__}")
    if set(map(type, mapping.values())) <= {TensorMeta} and set(map(type, mapping)) <= {str}:
        return dict(mapping)  # already metadata, as sources give it
    cache: dict[tuple[Any, ...], TensorMeta] = {}
    out: dict[str, TensorMeta] = {}
    for k, v in mapping.items():
        key = k if type(k) is str else str(k)
        kind = type(v)
        if kind is TensorMeta:
            out[key] = v
        elif kind is tuple:
            try:
                m = cache.get(v)
            except TypeError:  # (shape list, dtype): not hashable, not cached
                m = _coerce(key, v)
            if m is None:
                m = cache[v] = _coerce(key, v)
            out[key] = m
        else:
            out[key] = _coerce(key, v)
    return out


def target_meta(mapping: Mapping[str, Any]) -> dict[str, TargetMeta]:
    """Like :func:`source_meta`, for a target given without a module (all parameters)."""
    cache: dict[TensorMeta, TargetMeta] = {}
    out: dict[str, TargetMeta] = {}
    for key, value in source_meta(mapping).items():
        raw = mapping[key]
        if isinstance(raw, TargetMeta):
            out[key] = raw
            continue
        m = cache.get(value)
        if m is None:
            m = cache[value] = TargetMeta(value.shape, value.dtype)
        out[key] = m
    return out


def meta_of_tensor(tensor: torch.Tensor) -> TensorMeta:
    return TensorMeta(tuple(tensor.shape), dtype_name(tensor.dtype))


def meta_of_state_dict(state_dict: Mapping[str, Any]) -> dict[str, TensorMeta]:
    """Metadata of the tensors in a state_dict; non-tensor entries are left out."""
    import torch

    return {k: meta_of_tensor(v) for k, v in state_dict.items() if isinstance(v, torch.Tensor)}


def target_meta_of_module(module: torch.nn.Module) -> dict[str, TargetMeta]:
    """Every key of ``module.state_dict()``: non-persistent buffers are not keys, and a
    tensor reachable under several names (tied weights) is marked on its later names.
    """
    import torch

    named = [p for _, p in module.named_parameters(remove_duplicate=False)]
    params = {id(p) for p in named}
    grads = {id(p): p.requires_grad for p in named}
    first_name: dict[tuple[int, int, Shape, Shape], str] = {}
    out: dict[str, TargetMeta] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        if not isinstance(tensor, torch.Tensor):
            continue  # _extra_state objects are not tensors to load
        ident = (id(tensor) if tensor.device.type == "meta" else tensor.untyped_storage().data_ptr(),
                 tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))  # fmt: skip
        if tensor.device.type != "meta" and tensor.numel() == 0:
            ident = (id(tensor), 0, tuple(tensor.shape), ())
        tied_to = first_name.setdefault(ident, key)
        out[key] = TargetMeta(
            shape=tuple(tensor.shape),
            dtype=dtype_name(tensor.dtype),
            kind="parameter" if id(tensor) in params else "buffer",
            requires_grad=grads.get(id(tensor), False),
            tied_to=None if tied_to == key else tied_to,
        )
    return out
