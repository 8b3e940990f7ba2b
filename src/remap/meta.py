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
from operator import itemgetter
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
    "itemsize",
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
        raise UsageError(f"unknown dtype {_short(dtype)}; expected one of: {', '.join(DTYPE_NAMES)}")
    return name


MAX_SIZE = 2**63 - 1  # torch holds sizes and element counts in int64


def _shape(value: Any, key: str) -> Shape:
    if isinstance(value, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        if any(d < 0 for d in value):
            raise UsageError(f"key {key!r}: negative dimension in shape {list(value)}")
        if any(d > MAX_SIZE for d in value) or math.prod(value) > MAX_SIZE:
            shown = ", ".join(str(d) if d.bit_length() <= 256 else f"<a {d.bit_length()}-bit integer>" for d in value)
            raise UsageError(f"key {key!r}: shape [{shown}] is larger than any tensor can be (sizes and element counts stop at 2**63 - 1)")
        return tuple(value)
    raise UsageError(f"key {key!r}: expected a shape (list of ints), found {_short(value)}")


def _short(value: Any) -> str:
    """``repr(value)`` for a message, cut short; a value whose repr fails is named by its type."""
    try:
        text = repr(value)
    except Exception:  # a huge int (over 4300 digits), a broken __repr__
        return f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(key: str, value: Any) -> TensorMeta:
    if type(value) is tuple and all(type(d) is int and 0 <= d <= MAX_SIZE for d in value) and math.prod(value) <= MAX_SIZE:
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

    A key whose tensor is not a dense (strided), non-quantized tensor, and two keys whose
    tensors overlap in memory without being one tensor (a buffer that is a view of part
    of a parameter), are a :class:`~remap.errors.TargetError`: loading both would let one
    overwrite the other.
    """
    import torch

    grads = {id(p): p.requires_grad for _, p in module.named_parameters(remove_duplicate=False)}  # parameters only
    first_name: dict[tuple[int, int, Shape, Shape], str] = {}
    out: dict[str, TargetMeta] = {}
    extents: list[tuple[int, int, int, str, tuple[int, int, Shape, Shape]]] = []
    names: dict[Any, str] = {}  # torch dtype -> its name
    shared: dict[tuple[Shape, str, bool, bool], TargetMeta] = {}  # one TargetMeta per distinct untied description
    strided, tensor_type = torch.strided, torch.Tensor
    for key, tensor in module.state_dict(keep_vars=True).items():
        if not isinstance(tensor, tensor_type):
            continue  # _extra_state objects are not tensors to load
        if tensor.layout != strided or tensor.is_quantized:
            _require_dense(key, tensor)
        shape, ident, extent = _identity(tensor)
        tied_to = first_name.setdefault(ident, key)
        if extent is not None:
            extents.append((*extent, key, ident))
        dtype = names.get(tensor.dtype) or names.setdefault(tensor.dtype, dtype_name(tensor.dtype))
        requires_grad = grads.get(id(tensor))
        is_param = requires_grad is not None
        requires_grad = bool(requires_grad)
        if tied_to == key:
            described = (shape, dtype, is_param, requires_grad)
            meta = shared.get(described)
            if meta is None:
                meta = shared[described] = TargetMeta(shape, dtype, "parameter" if is_param else "buffer", requires_grad)
            out[key] = meta
        else:
            out[key] = TargetMeta(shape, dtype, "parameter" if is_param else "buffer", requires_grad, tied_to)
    _refuse_overlaps(extents)
    return out


def _identity(tensor: torch.Tensor) -> tuple[Shape, tuple[int, int, Shape, Shape], tuple[int, int, int] | None]:
    """(shape, identity, byte extent) of a dense tensor: two keys with one identity are one
    tensor (tied); the extent, (storage address, first byte, one past the last byte), is None
    where the tensor holds no memory (meta device, no elements).

    The storage's address is ``data_ptr() - storage_offset() * element_size()`` (what
    ``untyped_storage().data_ptr()`` gives, without building a storage object per tensor).
    """
    shape = tuple(tensor.shape)
    if is_dtensor(tensor):  # FSDP2, tensor parallel: global shape, its memory is this rank's shard
        _, ident, extent = _identity(tensor._local_tensor)  # type: ignore[attr-defined]
        return shape, (*ident[:2], shape, ident[3]), extent
    if tensor.is_meta:
        return shape, (id(tensor), tensor.storage_offset(), shape, tuple(tensor.stride())), None
    if not tensor.numel():
        return shape, (id(tensor), 0, shape, ()), None
    offset, stride, size = tensor.storage_offset(), tuple(tensor.stride()), tensor.element_size()
    ptr = tensor.data_ptr() - offset * size
    last = offset + (sum((d - 1) * abs(st) for d, st in zip(shape, stride)) if len(shape) != 1 else (shape[0] - 1) * abs(stride[0]))
    return shape, (ptr, offset, shape, stride), (ptr, offset * size, (last + 1) * size)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2, tensor parallel), without importing torch.distributed.

    >>> import torch
    >>> is_dtensor(torch.zeros(1)), is_dtensor(None)
    (False, False)
    """
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "placements") and hasattr(tensor, "_local_tensor")


def holds_dtensors(module: torch.nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is a DTensor (FSDP2, tensor parallel).

    >>> import torch
    >>> holds_dtensors(torch.nn.Linear(2, 2))
    False
    """
    return any(map(is_dtensor, module.parameters())) or any(map(is_dtensor, module.buffers()))


def _require_dense(key: str, tensor: torch.Tensor) -> None:
    """A target key remap can load: a dense (strided), non-quantized tensor."""
    import torch

    from .errors import TargetError

    if tensor.layout != torch.strided or tensor.is_quantized:
        what = f"a quantized ({str(tensor.dtype).removeprefix('torch.')})" if tensor.is_quantized else f"a {str(tensor.layout).removeprefix('torch.')}"
        raise TargetError(f"target key {key!r} is {what} tensor: remap loads only dense (strided) tensors; "
                          "make it dense, or a non-persistent buffer", where="target")  # fmt: skip


def _refuse_overlaps(extents: list[tuple[int, int, int, str, tuple[int, int, Shape, Shape]]]) -> None:
    """Two keys whose memory overlaps, unless they are one tensor (tied), are a TargetError."""
    from .errors import TargetError

    reach: tuple[int, int, str, tuple[int, int, Shape, Shape]] | None = None  # (storage, end, key, ident) reaching furthest
    extents.sort(key=itemgetter(0, 1, 2))  # by storage, then first and last byte; ties keep state_dict order
    for ptr, start, end, key, ident in extents:
        if reach is not None and reach[0] == ptr and start < reach[1] and ident != reach[3]:
            raise TargetError(
                f"target keys {reach[2]!r} and {key!r} overlap in memory without being one tensor (one is a view of part of "
                "the other): loading both would let one overwrite the other; make one of them "
                "a non-persistent buffer (register_buffer(..., persistent=False)) or compute it from the other",
                where="target",
            )  # fmt: skip
        if reach is None or reach[0] != ptr or end > reach[1]:
            reach = (ptr, end, key, ident)


_ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e8m0fnu": 1, "complex64": 8, "complex128": 16, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8, "bool": 1,
}  # fmt: skip


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype named as torch names it (0 when unknown).

    >>> itemsize("bfloat16")
    2
    """
    if dtype in _ITEMSIZE:
        return _ITEMSIZE[dtype]
    import torch

    found = getattr(torch, dtype, None)
    return int(found.itemsize) if isinstance(found, torch.dtype) else 0
