"""Whole-model pickles (``torch.save(model)``) read without running any code from the file.

``torch.load(weights_only=True)`` refuses a pickled module: rebuilding one means importing
its class and calling into it. This module reads such a file with an unpickler that imports
and calls nothing the file names. Only torch's tensor-rebuilding functions, its storage
types and dtypes, and a few plain containers are recognised (:data:`ALLOWED`), and even
those are never called: each is replaced by a recorder of its arguments (shape, stride,
storage, ``requires_grad``). Every other global becomes an inert stand-in that records its
qualified name, the arguments it was called with and the state ``BUILD`` gave it (kept in
a dict, never set on a real object); a ``__reduce__`` of the saved class is never invoked,
since the class is never imported. The class need not exist any more.

The module tree is then walked as ``nn.Module.state_dict()`` walks it: each module's
``_parameters``, then its ``_buffers`` less ``_non_persistent_buffers_set``, then its
``_modules`` in order, keys joined with dots. Each parameter's saved ``requires_grad``
is kept (:attr:`StoredReader.requires_grad`). Planning reads only the pickle; a tensor's
bytes are read from its storage record when its key is (``span`` for zero-copy reads).

What a default ``state_dict()`` would not show cannot be known without running the
class's code either: a class overriding ``_save_to_state_dict``/``state_dict`` or adding
``get_extra_state`` is read as nn.Module's default walk reads it.

>>> import io, pickle
>>> inert_load(io.BytesIO(pickle.dumps(("hello", 3))), Storages()).result
('hello', 3)

:mod:`remap.sources.torchscript_reader` reads TorchScript archives with the same unpickler.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import math
import pickle
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import SourceError
from ..meta import TensorMeta, itemsize
from .readers import (
    CANDIDATE_KEYS,
    _TRUST_HINT,
    Span,
    _check_names,
    _did_you_mean,
    _first_line,
    _Reader,
    _safe_repr,
    _stamp,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALLOWED", "UNREADABLE", "Unsupported", "Inert", "StorageRef", "StoredTensor", "InertUnpickler", "Unpickled",
    "inert_load", "inert_load_record", "Storages", "ModuleView", "Entry", "walk_modules", "pickled_module_view",
    "check_tensor", "Located", "locate", "entries_of", "top_entries", "key_entries", "listed", "Place", "zip_places",
    "open_archive", "archive_prefix", "check_byteorder", "StoredReader", "open_module_pickle",
]  # fmt: skip

#: The largest pickle read this way (a module tree's pickle holds structure, not tensor data:
#: a few MB even for large models; the pure-Python unpickler reads about 10 MB a second).
MAX_PICKLE_BYTES = 256 << 20
#: Deepest module nesting walked (torch's own recursive state_dict stops near 1000 too).
MAX_DEPTH = 1000
#: Most modules visited and tensors named: a module shared many times over cannot blow up.
MAX_MODULES = 1_000_000
MAX_TENSORS = 5_000_000
#: Dtypes whose bytes the engine maps straight from the file (streaming's table, plus bool).
SPAN_DTYPES = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32",
    "uint64", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
}  # fmt: skip


class Unsupported(SourceError):
    """The file cannot be read without running it; ``--trust-pickle`` may read it with torch."""


def _corrupt(what: str) -> SourceError:
    return SourceError(f"corrupt pickle: {what}")


# ---------------------------------------------------------------------------- records


class _Sealed:
    """A record the pickle cannot change after it is made: ``BUILD`` on it is refused."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise _corrupt(f"it sets state on a {type(self).__name__.lstrip('_')}, which nothing in a torch file does")


class StorageRef(_Sealed):
    """One storage a pickle names: its key (record), dtype and length in elements of that dtype."""

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"<storage {self.key!r}>"


class StoredTensor(_Sealed):
    """A tensor as a pickle describes it: a view (shape, stride, offset) of a storage, never its data.

    ``parameter`` is True for an ``nn.Parameter`` (rebuilt by ``_rebuild_parameter``), whose
    ``requires_grad`` is the flag it was saved with.
    """

    __slots__ = ("storage", "offset", "shape", "stride", "dtype", "requires_grad", "parameter")

    def __init__(self, storage: StorageRef, offset: int, shape: tuple[int, ...], stride: tuple[int, ...],
                 dtype: torch.dtype, requires_grad: bool, parameter: bool = False) -> None:  # fmt: skip
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride
        self.dtype, self.requires_grad, self.parameter = dtype, requires_grad, parameter

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def extent(self) -> tuple[int, int]:
        """(first, last + 1) element of the storage this view touches; (offset, offset) when empty."""
        if not self.numel:
            return self.offset, self.offset
        return self.offset, self.offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride)) + 1

    def as_parameter(self, requires_grad: bool) -> StoredTensor:
        return StoredTensor(self.storage, self.offset, self.shape, self.stride, self.dtype, requires_grad, True)

    def __repr__(self) -> str:
        return f"tensor {list(self.shape)} {self.dtype_name}"


class _StorageType(_Sealed):
    """A storage class a pickle names (``torch.FloatStorage``): only its dtype matters."""

    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype


class Inert:
    """A stand-in for an object of a class (or a call of a function) the file names.

    Its type carries the qualified name (``qualname``); calling it, building it (``BUILD``)
    or filling it (``SETITEMS``, ``APPENDS``) only records what the pickle asked for, in
    ``args``, ``kwargs``, ``state`` and ``items``. It has no ``__getitem__``/``__iter__``,
    so nothing can iterate it into a real container.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state, obj.items = args, kwargs, None, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """Nothing: ``__new__`` recorded the arguments."""

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:  # a stand-in object called as a function
        return _stand_in(f"{self.qualname}()")(*args, **kwargs)

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.items is None:
            self.items = {}
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.extend([value])

    def extend(self, values: Any) -> None:
        for value in values:
            self[len(self.items or ())] = value

    def add(self, value: Any) -> None:
        self.append(value)

    def attributes(self) -> dict[str, Any] | None:
        """The instance dict ``BUILD`` gave it (the dict of a ``(dict, slots)`` pair), or None."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        return state if isinstance(state, dict) else None

    def __repr__(self) -> str:
        attrs = self.attributes()
        if attrs is None:
            return f"<{self.qualname}>"
        shown = [f"{k}={_scalar(v)}" for k, v in list(attrs.items())[:6] if isinstance(k, str) and not k.startswith("_")]
        more = ", …" if len(attrs) > 6 else ""
        return f"<{self.qualname}{': ' if shown else ''}{', '.join(shown)}{more}>"


def _scalar(value: Any) -> str:
    """A value as :meth:`Inert.__repr__` shows it: simple values in full (bounded), others by kind."""
    if value is None or isinstance(value, (bool, int, float)):
        return _safe_repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:39] + "…")
    if isinstance(value, (Inert, StoredTensor)):
        return f"<{value.qualname}>" if isinstance(value, Inert) else repr(value)
    return f"<{type(value).__name__}>"


_STAND_INS: dict[str, type[Inert]] = {}


def _stand_in(name: str) -> type[Inert]:
    """The stand-in class for the global ``name`` (one per name, shared by all reads)."""
    found = _STAND_INS.get(name)
    if found is None:
        found = type("Inert", (Inert,), {"qualname": name, "__slots__": ()})
        if len(_STAND_INS) < 100_000:  # the cache is bounded; a hostile file cannot grow it without end
            _STAND_INS[name] = found
    return found


def _stand_in_name(value: Any) -> str | None:
    return value.qualname if isinstance(value, type) and issubclass(value, Inert) else None


# ---------------------------------------------------------------------------- the recorders


class _Recorder(_Sealed):
    """What an allowed rebuild function stands for: a function of remap's that checks and
    records its arguments. torch's own function is never called."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name, self.fn = name, fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise _corrupt(f"{self.name} is called with keyword arguments {sorted(map(str, kwargs))[:5]}")
        try:
            return self.fn(*args)
        except TypeError:
            raise _corrupt(f"{self.name} is called with {len(args)} arguments ({_safe_repr(args)})") from None


def _int(value: Any, what: str) -> int:
    if type(value) is not int or value < 0:
        raise _corrupt(f"{what} is {_safe_repr(value)}, expected a non-negative integer")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise _corrupt(f"{what} is {_safe_repr(value)}, expected a tuple of at most 64 integers")
    return tuple(_int(v, what) for v in value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, dtype: Any = None) -> StoredTensor:
    if not isinstance(storage, StorageRef):
        raise _corrupt(f"a tensor is rebuilt from {_safe_repr(storage)}, expected a storage")
    shape, strides = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if len(shape) != len(strides):
        raise _corrupt(f"a tensor of size {list(shape)} has stride {list(strides)}")
    if any(d > 2**62 for d in shape) or math.prod(shape) > 2**62:
        raise _corrupt(f"a tensor of size {list(shape)} is larger than any tensor can be")
    torch = _torch()
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise _corrupt(f"a tensor's dtype is {_safe_repr(dtype)}")
    if not isinstance(requires_grad, bool):
        raise _corrupt(f"a tensor's requires_grad is {_safe_repr(requires_grad)}")
    return StoredTensor(storage, _int(offset, "a tensor's storage offset"), shape, strides, dtype, requires_grad)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> StoredTensor:
    return _tensor(storage, offset, size, stride, False)


def _rebuild_tensor_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any,
                       metadata: Any = None) -> StoredTensor:  # fmt: skip
    return _tensor(storage, offset, size, stride, requires_grad)


def _rebuild_tensor_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any,
                       metadata: Any = None) -> StoredTensor:  # fmt: skip
    return _tensor(storage, offset, size, stride, requires_grad, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any, hooks: Any, state: Any = None) -> Any:
    if not isinstance(data, StoredTensor):
        return data  # not a tensor from a storage: what it is, is said where it is used
    if not isinstance(requires_grad, bool):
        raise _corrupt(f"a parameter's requires_grad is {_safe_repr(requires_grad)}")
    return data.as_parameter(requires_grad)


def _rebuild_from_type(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    """``_rebuild_from_type_v2(func, type, args, state)``: a tensor (subclass) with extra state."""
    if not isinstance(args, tuple):
        raise _corrupt(f"_rebuild_from_type_v2 is given arguments {_safe_repr(args)}")
    if isinstance(func, _Recorder) or _stand_in_name(func) is not None:
        return func(*args)
    raise _corrupt(f"_rebuild_from_type_v2 is given the function {_safe_repr(func)}")


def _size(dims: Any = ()) -> tuple[int, ...]:
    return _ints(dims, "a torch.Size")


def _reconstructor(cls: Any, base: Any, state: Any) -> Inert:
    """``copyreg._reconstructor`` (protocols 0 and 1): a stand-in of ``cls``, built later by ``BUILD``."""
    if _stand_in_name(cls) is None:
        raise _corrupt(f"copyreg._reconstructor is given {_safe_repr(cls)}, expected a class")
    return cls()


_RECORDERS: dict[str, Callable[..., Any]] = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.Size": _size,
    "copyreg._reconstructor": _reconstructor,
}
#: Real classes a pickle may build: plain containers whose construction runs nothing of the file's.
_CONTAINERS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict, "builtins.set": set, "builtins.frozenset": frozenset,
    "builtins.dict": dict, "builtins.list": list, "builtins.tuple": tuple,
}  # fmt: skip
#: Every global the unpickler recognises (storage types ``torch.*Storage`` and dtypes ``torch.<dtype>`` too).
ALLOWED = (*_RECORDERS, *_CONTAINERS, "torch.<Name>Storage", "torch.storage.UntypedStorage", "torch.<dtype>")


def _torch() -> Any:
    import torch

    return torch


def _torch_global(name: str) -> Any:
    """A storage type or dtype of torch named ``torch.<name>``; None for anything else.

    Looked up in torch's namespace without ``getattr`` (which would import submodules)."""
    torch = _torch()
    if name == "UntypedStorage":
        return _StorageType(name, torch.uint8)
    if name.endswith("Storage"):
        try:
            return _StorageType(name, torch.storage._get_dtype_from_pickle_storage_type(name))
        except (KeyError, AttributeError):
            return None
    value = vars(torch).get(name)
    return value if isinstance(value, torch.dtype) else None


# ---------------------------------------------------------------------------- the unpickler


def _refuse_extension(self: Any) -> None:
    raise _corrupt("it uses the pickle extension registry (EXT opcodes), which belongs to the reading process")


class InertUnpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """The pure-Python unpickler with :meth:`find_class` limited to :data:`ALLOWED`
    (recorders) and stand-ins, and storages resolved by ``storage`` (a function of the
    persistent id). Its memo is a dict, so a huge memo index costs nothing (the C
    unpickler allocates and zeroes a list that long).

    ``names`` lists every global the pickle names, in order; ``stand_ins`` those it stands in for.
    """

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _refuse_extension

    def __init__(self, file: IO[bytes], storage: Callable[[Any], Any]) -> None:
        super().__init__(file, encoding="latin1")
        self._storage = storage
        self.names: dict[str, None] = {}
        self.stand_ins: dict[str, None] = {}

    def find_class(self, module: str, name: str) -> Any:
        if not isinstance(module, str) or not isinstance(name, str):
            raise _corrupt("a global's name is not text")
        if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names, as pickle itself maps them
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        self.names[full] = None
        if full in _RECORDERS:
            return _Recorder(full, _RECORDERS[full])
        if full in _CONTAINERS:
            return _CONTAINERS[full]
        if module in ("torch", "torch.storage") and name.isidentifier():
            found = _torch_global(name)
            if found is not None:
                return found
        self.stand_ins[full] = None
        return _stand_in(full)

    def persistent_load(self, pid: Any) -> Any:
        return self._storage(pid)


@dataclass
class Unpickled:
    result: Any
    names: list[str]  # every global named, in order
    stand_ins: list[str]  # those never imported (all but the allowed ones)
    end: int  # the file position after the pickle


def inert_load(file: IO[bytes], storage: Callable[[Any], Any]) -> Unpickled:
    """Read one pickle from ``file`` with :class:`InertUnpickler`; every failure is a SourceError.

    >>> inert_load(io.BytesIO(pickle.dumps({"a": 1})), lambda pid: None).result
    {'a': 1}
    """
    unpickler = InertUnpickler(file, storage)
    try:
        result = unpickler.load()
    except SourceError:
        raise
    except RecursionError:
        raise _corrupt("it is nested too deeply") from None
    except MemoryError:
        raise _corrupt("it needs more memory than its size can explain") from None
    except Exception as exc:  # noqa: BLE001 - the pure-Python unpickler on hostile bytes raises many types
        raise _corrupt(_problem(exc)) from None
    return Unpickled(result, list(unpickler.names), list(unpickler.stand_ins), file.tell())


def _problem(exc: BaseException) -> str:
    """An unpickling error in words, without echoing the file's bytes."""
    text = _first_line(exc)
    if isinstance(exc, (KeyError, pickle.UnpicklingError)) and ("opcode" in text or "load key" in text or isinstance(exc, KeyError)):
        return f"it cannot be unpickled ({type(exc).__name__}: an unknown opcode or a memo entry it never stored)"
    if isinstance(exc, EOFError):
        return "it ends before its last opcode (the file is truncated)"
    return f"it cannot be unpickled ({type(exc).__name__}: {text[:200]})"


class Storages:
    """The storages a pickle names, by the persistent ids torch writes.

    ``('storage', type, key, location, numel)`` in a zip archive; legacy files add a sixth
    field (a view of another storage, which is refused) and name module classes as
    ``('module', cls, source_file, source)``.
    """

    def __init__(self, legacy: bool = False) -> None:
        self.legacy = legacy
        self.by_key: dict[str, StorageRef] = {}

    def __call__(self, pid: Any) -> Any:
        if self.legacy and isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            if _stand_in_name(pid[1]) is None:
                raise _corrupt(f"a module persistent id names {_safe_repr(pid[1])}, expected a class")
            return pid[1]
        size = 6 if self.legacy else 5
        if not (isinstance(pid, tuple) and len(pid) == size and pid[0] in ("storage", b"storage")):
            raise _corrupt(f"a persistent id {_safe_repr(pid)}, expected ('storage', type, key, location, size)")
        kind, key, numel = pid[1], pid[2], pid[4]
        if self.legacy and pid[5] is not None:
            raise Unsupported(f"storage {_safe_repr(key)} is a view of another storage (a torch<0.4 layout)")
        if not isinstance(kind, _StorageType):
            raise _corrupt(f"storage {_safe_repr(key)} has the type {_safe_repr(kind)}, expected a torch storage type")
        if not isinstance(key, str) or len(key) > 1000:
            raise _corrupt(f"a storage key {_safe_repr(key)}, expected text")
        ref = StorageRef(key, kind.dtype, _int(numel, f"the size of storage {key!r}"))
        seen = self.by_key.setdefault(key, ref)
        if (seen.dtype, seen.numel) != (ref.dtype, ref.numel):
            raise _corrupt(f"storage {key!r} is named twice, as {seen.numel} {seen.dtype} and as {ref.numel} {ref.dtype}")
        return seen


# ---------------------------------------------------------------------------- the module tree


@dataclass
class ModuleView:
    """One module of a tree as ``state_dict`` sees it: its class, then its named
    parameters, persistent buffers and children, each in order (values as unpickled)."""

    cls: str
    params: list[tuple[str, Any]] = field(default_factory=list)
    buffers: list[tuple[str, Any]] = field(default_factory=list)
    children: list[tuple[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Entry:
    """One state_dict key: its tensor (as unpickled), the class of the module owning it, and its kind."""

    key: str
    value: Any
    owner: str
    kind: str  # "parameter" | "buffer"


def _named(value: Any, what: str) -> list[tuple[str, Any]]:
    if type(value) not in (dict, OrderedDict):
        raise _corrupt(f"{what} is a {_kind(value)}, expected a dict of names")
    items = list(value.items())
    for name, _ in items:
        if not isinstance(name, str) or not name or "." in name:
            raise _corrupt(f"{what} names an entry {_safe_repr(name)}; names are non-empty text without dots")
    return items


def pickled_module_view(obj: Any) -> ModuleView | None:
    """The view of an ``nn.Module`` as pickled (its instance dict holds ``_parameters``,
    ``_buffers`` and ``_modules``), or None when ``obj`` is not one."""
    if not isinstance(obj, Inert):
        return None
    attrs = obj.attributes()
    if attrs is None or not all(k in attrs for k in ("_parameters", "_buffers", "_modules")):
        return None
    cls = obj.qualname
    skip = attrs.get("_non_persistent_buffers_set", ())
    if not isinstance(skip, (set, frozenset, list, tuple)):
        raise _corrupt(f"{cls}._non_persistent_buffers_set is a {_kind(skip)}, expected a set of names")
    buffers = [(n, v) for n, v in _named(attrs["_buffers"], f"{cls}._buffers") if n not in skip]
    return ModuleView(cls, _named(attrs["_parameters"], f"{cls}._parameters"), buffers,
                      _named(attrs["_modules"], f"{cls}._modules"))  # fmt: skip


def walk_modules(root: Any, view_of: Callable[[Any], ModuleView | None]) -> tuple[list[Entry], list[str]]:
    """Every state_dict entry of the module tree at ``root``, in ``state_dict`` order, and
    the classes of the modules met (in order, once each). Iterative: depth, module count
    and key count are bounded, and a module that contains itself is an error.

    A module reachable under two names yields its keys under both, as ``state_dict`` does.
    """
    views: dict[int, ModuleView] = {}

    def view(obj: Any) -> ModuleView | None:
        if id(obj) not in views:
            found = view_of(obj)
            if found is None:
                return None
            views[id(obj)] = found
        return views[id(obj)]

    if view(root) is None:
        raise _corrupt(f"the object read as a module tree is a {_kind(root)}, not a module")

    entries: list[Entry] = []
    classes: dict[str, None] = {}
    stack: list[tuple[str, Any, tuple[int, ...]]] = [("", root, ())]
    visited = 0
    while stack:
        prefix, obj, ancestors = stack.pop()
        here = views[id(obj)]  # pushed only once view() accepted it
        visited += 1
        if visited > MAX_MODULES:
            raise SourceError(f"its module tree has more than {MAX_MODULES:,} modules (a module shared many times over?)")
        classes[here.cls] = None
        for kind, named in (("parameter", here.params), ("buffer", here.buffers)):
            entries += [Entry(prefix + n, v, here.cls, kind) for n, v in named if v is not None]
        if len(entries) > MAX_TENSORS:
            raise SourceError(f"its module tree names more than {MAX_TENSORS:,} tensors (a module shared many times over?)")
        inner = (*ancestors, id(obj))
        if len(inner) > MAX_DEPTH:
            raise SourceError(f"its modules are nested more than {MAX_DEPTH} deep (at {prefix.rstrip('.')!r})")
        children = []
        for name, child in here.children:
            if child is None:
                continue
            if view(child) is None:
                raise _corrupt(f"module {prefix + name!r} (a child of {here.cls}) is a {_kind(child)}, not a module")
            if id(child) in inner:
                raise SourceError(f"module {prefix + name!r} contains itself (a cycle in the module tree): it has no "
                                  "state_dict (torch's own state_dict() would never return)")  # fmt: skip
            children.append((f"{prefix}{name}.", child, inner))
        stack += reversed(children)
    return entries, list(classes)


def _kind(value: Any) -> str:
    """What a value is, for messages: ``mymodels.Config object``, ``int``, ``tensor [2, 3] float32``."""
    if isinstance(value, Inert):
        return f"{value.qualname} object"
    if isinstance(value, StoredTensor):
        return repr(value)
    return type(value).__name__


#: Rebuild functions whose tensors remap cannot load (as the torch reader words it).
UNREADABLE = {
    "torch._utils._rebuild_meta_tensor_no_storage": "has no data in the file (it was saved from the meta device)",
    "torch._utils._rebuild_wrapper_subclass": "has no data in the file (a tensor subclass saved without storage)",
    "torch._utils._rebuild_qtensor": "is a quantized tensor, which remap cannot load; dequantize it before saving",
    "torch._utils._rebuild_sparse_tensor": "is a sparse tensor, which remap cannot load; save it dense",
    "torch._utils._rebuild_sparse_csr_tensor": "is a sparse tensor, which remap cannot load; save it dense",
    "torch._utils._rebuild_nested_tensor": "is a nested tensor, which remap cannot load",
    "torch._utils._rebuild_device_tensor_from_numpy": "is a tensor saved through numpy, which remap cannot read without numpy's pickle",
}


def check_tensor(entry: Entry) -> StoredTensor:
    """The entry's tensor, or the SourceError saying why it is none remap can load."""
    value = entry.value
    if isinstance(value, StoredTensor):
        if itemsize(value.dtype_name) == 0:
            raise SourceError(f"tensor {entry.key!r} has dtype {value.dtype_name}, which remap cannot read")
        first, end = value.extent()
        need = end * value.dtype.itemsize
        if need > value.storage.nbytes:
            raise SourceError(
                f"corrupt checkpoint: tensor {entry.key!r} ({list(value.shape)}, stride {list(value.stride)}, offset "
                f"{value.offset}) needs {need} bytes of storage {value.storage.key!r}, which holds {value.storage.nbytes}"
            )
        return value
    if isinstance(value, Inert) and value.qualname in UNREADABLE:
        raise SourceError(f"tensor {entry.key!r} {UNREADABLE[value.qualname]} ({value.qualname})")
    raise Unsupported(f"the {entry.kind} {entry.key!r} of {entry.owner} is a {_kind(value)}, not a tensor remap can read")


# ---------------------------------------------------------------------------- finding the module


def _children_of(value: Any, view_of: Callable[[Any], ModuleView | None]) -> Mapping[Any, Any] | None:
    """What a path may step into: a dict's entries, a module's children (and its own tensors),
    an object's attributes."""
    view = view_of(value)
    if view is not None:
        return dict([*view.params, *view.buffers, *view.children])
    if type(value) in (dict, OrderedDict):
        return value
    if isinstance(value, Inert):
        return value.attributes()
    return None


def _is_tensor_dict(value: Any) -> bool:
    return type(value) in (dict, OrderedDict) and bool(value) and all(
        isinstance(v, StoredTensor) or (isinstance(k, str) and k.endswith("_extra_state")) for k, v in value.items()
    ) and any(isinstance(v, StoredTensor) for v in value.values())  # fmt: skip


def _follow(top: Any, key: str, view_of: Callable[[Any], ModuleView | None]) -> tuple[Any, list[str]]:
    """The value ``key`` ("a.b", an entry may itself hold dots) names, and the parts taken."""
    parts, taken, cur, i = key.split("."), [], top, 0
    while i < len(parts):
        inner = _children_of(cur, view_of)
        if inner is None:
            raise SourceError(f"source.key {key!r}: {'.'.join(taken)!r} holds a {_kind(cur)}, so it has no entry {parts[i]!r}")
        for j in range(len(parts), i, -1):
            name = ".".join(parts[i:j])
            if name in inner:
                break
        else:
            at = f"under {'.'.join(taken)!r}" if taken else "at the top level"
            listed = ", ".join(f"{k!r} ({_kind(v)})" for k, v in list(inner.items())[:12])
            raise SourceError(
                f"source.key {key!r}: no entry {parts[i]!r} {at}; found {listed or 'nothing'}"
                f"{_did_you_mean(parts[i], [k for k in inner if isinstance(k, str)])}"
            )
        taken.append(name)
        cur, i = inner[name], j
    return cur, taken


def _candidates(top: Any, view_of: Callable[[Any], ModuleView | None]) -> list[tuple[list[str], Any]]:
    """Modules (under any name) and dicts of tensors (under the usual names), one or two
    levels below ``top``; a module reachable twice is listed once."""
    found: list[tuple[list[str], Any]] = []
    seen: set[int] = set()

    def consider(path: list[str], value: Any) -> bool:
        module = view_of(value) is not None
        if not module and not (path[-1] in CANDIDATE_KEYS and _is_tensor_dict(value)):
            return False
        if id(value) not in seen:
            seen.add(id(value))
            found.append((path, value))
        return True

    level = _children_of(top, view_of) or {}
    for k, v in level.items():
        if not isinstance(k, str) or consider([k], v):
            continue
        inner = _children_of(v, view_of) if view_of(v) is None else None
        for k2, v2 in (inner or {}).items():
            if isinstance(k2, str):
                consider([k, k2], v2)
    return found


@dataclass
class Located:
    """Where the weights sit: a module (``module``) or a dict of tensors (``tensors``)."""

    value: Any
    parts: list[str]
    detected: bool
    top: Any


def locate(top: Any, key: str | None, view_of: Callable[[Any], ModuleView | None]) -> Located | None:
    """The module (or dict of tensors) to read: the one ``key`` names, else ``top`` when it
    is a module, else the one module found one or two levels down. None when ``key`` is not
    given and no module is found; a SourceError when several are."""
    if key is not None:
        value, parts = _follow(top, key, view_of)
        if view_of(value) is None and not _is_tensor_dict(value):
            raise SourceError(f"source.key {key!r} holds a {_kind(value)}, expected a module or a dict of tensors")
        return Located(value, parts, False, top)
    if view_of(top) is not None:
        return Located(top, [], False, top)
    found = _candidates(top, view_of)
    if not any(view_of(v) is not None for _, v in found):
        return None
    if len(found) > 1:
        names = [f"{'.'.join(p)!r} ({_kind(v).removesuffix(' object')})" for p, v in found]
        raise SourceError(
            f"the checkpoint holds several sets of weights: {', '.join(names[:-1])} and {names[-1]}; say which to "
            f"load with `source.key` (e.g. `key: {'.'.join(found[0][0])}`)"
        )
    return Located(found[0][1], found[0][0], True, top)


def entries_of(located: Located, view_of: Callable[[Any], ModuleView | None]) -> tuple[list[Entry], list[str]]:
    """The state_dict entries of what :func:`locate` found, and the module classes met."""
    if view_of(located.value) is not None:
        return walk_modules(located.value, view_of)
    return [Entry(str(k), v, "", "parameter" if v.parameter else "buffer")
            for k, v in located.value.items() if isinstance(v, StoredTensor)], []  # fmt: skip


def top_entries(located: Located, view_of: Callable[[Any], ModuleView | None]) -> dict[str, str]:
    """Short descriptions of the top-level entries that are not the weights (``epoch: 3``)."""
    if not located.parts or view_of(located.top) is not None:
        return {}
    inner = _children_of(located.top, view_of) or {}
    return {str(k): _describe(v, view_of) for k, v in inner.items() if k != located.parts[0]}


def _describe(value: Any, view_of: Callable[[Any], ModuleView | None]) -> str:
    if view_of(value) is not None:
        return f"{value.qualname} module"
    text = _safe_repr(value)
    return text if len(text) <= 80 else text[:79] + "…"


def key_entries(entries: Iterable[Entry], display: Callable[[str], str] = str) -> dict[str, str]:
    """``{"fc.weight": "parameter of torch.nn.modules.linear.Linear, requires_grad=False"}``."""
    out = {}
    for e in entries:
        if not e.owner:  # a dict of tensors: no module owns them
            continue
        frozen = ", requires_grad=False" if e.kind == "parameter" and isinstance(e.value, StoredTensor) and not e.value.requires_grad else ""
        out[e.key] = f"{e.kind} of {display(e.owner)}{frozen}"
    return out


def listed(names: Iterable[str], limit: int = 30) -> str:
    """``"a, b, c and 4 more"``."""
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ---------------------------------------------------------------------------- where the bytes are


@dataclass(frozen=True)
class Place:
    """Where one storage's bytes sit: from ``offset`` in the file, ``size`` bytes, stored
    uncompressed (``stored``) or only readable through ``record`` of the zip archive."""

    offset: int
    size: int
    stored: bool = True
    record: str | None = None


def zip_places(path: Path, z: zipfile.ZipFile, folder: str) -> dict[str, Place]:
    """Each record under ``folder`` (``archive/data/``) by its name there, with where its data starts."""
    places: dict[str, Place] = {}
    with open(path, "rb") as f:
        for info in z.infolist():
            if not info.filename.startswith(folder) or info.filename.endswith("/"):
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise SourceError(f"corrupt zip archive: no local header for {info.filename!r} at byte {info.header_offset}")
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            stored = info.compress_type == zipfile.ZIP_STORED
            places[info.filename[len(folder) :]] = Place(start, info.file_size, stored, info.filename)
    return places


def check_byteorder(z: zipfile.ZipFile, prefix: str) -> None:
    """Refuse an archive written in the other byte order (its tensors would read byte-swapped)."""
    try:
        info = z.getinfo(f"{prefix}byteorder")
    except KeyError:
        return
    raw = z.read(info) if info.file_size <= 16 else b"?"
    order = raw.decode("ascii", "replace").strip()
    if order != sys.byteorder:
        said = f"says {order!r}" if order in ("little", "big") else "is neither 'little' nor 'big'"
        raise SourceError(f"the record {prefix}byteorder {said}, but this machine is {sys.byteorder}-endian: remap "
                          "reads archives written in its own byte order only")  # fmt: skip


# ---------------------------------------------------------------------------- the reader


class StoredReader(_Reader):
    """Tensors described by a pickle, read from their storages' places in the file.

    ``requires_grad`` maps every key that was a saved ``nn.Parameter`` to the flag it was
    saved with. ``meta`` comes from the pickle alone; no tensor byte is read before ``read``.
    """

    def __init__(self, path: Path, fmt: str, tensors: dict[str, StoredTensor], places: Mapping[str, Place], *,
                 entries: dict[str, str], notes: list[str], parts: list[str], detected: bool,
                 requires_grad: dict[str, bool]) -> None:  # fmt: skip
        self.path, self.format, self._stamp = path, fmt, _stamp(path)
        self.entries, self.notes, self.parts, self.detected = entries, notes, parts, detected
        self.requires_grad = requires_grad
        self._tensors, self._places = tensors, dict(places)
        self.meta: dict[str, TensorMeta] = {}
        _check_names(tensors, "the checkpoint", str(path))
        for key, t in tensors.items():
            place = self._places.get(t.storage.key)
            if place is None:
                raise SourceError(f"corrupt checkpoint: tensor {key!r} names storage {t.storage.key!r}, which the file does "
                                  "not hold", where=str(path))  # fmt: skip
            if t.storage.nbytes > place.size:
                raise SourceError(f"corrupt checkpoint: storage {t.storage.key!r} of tensor {key!r} needs {t.storage.nbytes} "
                                  f"bytes but its record holds {place.size}", where=str(path))  # fmt: skip
            self.meta[key] = TensorMeta(t.shape, t.dtype_name)
        self._file: Any = None

    def span(self, key: str) -> Span | None:
        t = self._tensors[key]
        place = self._places[t.storage.key]
        if not place.stored or t.dtype_name not in SPAN_DTYPES:
            return None
        return Span(str(self.path), place.offset, t.storage.nbytes, t.dtype_name, t.shape, t.stride, t.offset)

    def read(self, key: str) -> torch.Tensor:
        import torch

        self._check_unchanged()
        t = self._tensors[key]
        first, end = t.extent()
        size = t.dtype.itemsize
        if not t.numel:
            return torch.empty(t.shape, dtype=t.dtype)
        raw = self._bytes(key, t.storage.key, first * size, (end - first) * size)
        return raw.view(t.dtype).as_strided(t.shape, t.stride, 0)

    def _bytes(self, key: str, storage: str, start: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` of a storage from byte ``start`` into a fresh uint8 tensor."""
        import torch

        place = self._places[storage]
        buffer = bytearray(nbytes)
        view = memoryview(buffer)
        try:
            if place.stored:
                if self._file is None:
                    self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed by release()
                got = _read_into(self._file, place.offset + start, view)
            else:
                with zipfile.ZipFile(self.path) as z, z.open(place.record or "") as f:
                    f.seek(start)
                    got = _read_into(f, None, view)
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise self._fail_read(key, exc) from None
        if got != nbytes:
            raise SourceError(f"cannot read tensor {key!r}: its storage ends after {got} of {nbytes} bytes",
                              where=str(self.path))  # fmt: skip
        return torch.frombuffer(buffer, dtype=torch.uint8)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _read_into(f: Any, offset: int | None, view: memoryview) -> int:
    if offset is not None:
        f.seek(offset)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            break
        got += n
    return got


# ---------------------------------------------------------------------------- whole-model pickles


def open_module_pickle(path: Path, fmt: str, *, key: str | None, trust_pickle: bool, refused: SourceError) -> StoredReader | None:
    """Read a pickle that ``torch.load(weights_only=True)`` refused, when it holds a module tree.

    Returns None when ``trust_pickle`` is set and the file holds no module tree, or one
    that cannot be read this way (torch.load then reads it). Without ``trust_pickle`` the
    first raises ``refused`` (the old refusal stands), the second an :class:`Unsupported`
    naming what was met.
    """
    where = str(path)
    try:
        return _open_module_pickle(path, fmt, key, refused)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"corrupt zip archive: {_first_line(exc)}", where=where) from None
    except Unsupported as exc:
        if trust_pickle:
            return None
        raise Unsupported(f"{exc.message}. remap reads such a file only by unpickling it with torch.load, which can run "
                          f"code from the file: opt in with {_TRUST_HINT} if you trust it", where=where) from None  # fmt: skip
    except SourceError as exc:
        if exc is refused:
            if trust_pickle:
                return None
            raise
        raise SourceError(exc.message, where=where) from None
    except OSError as exc:
        raise SourceError(f"cannot read it: {exc.strerror or exc}", where=where) from None


def _open_module_pickle(path: Path, fmt: str, key: str | None, refused: SourceError) -> StoredReader:
    if fmt == "torch-zip":
        with open_archive(path) as z:
            prefix = archive_prefix(z)
            loaded = inert_load_record(z, f"{prefix}data.pkl", Storages())
            places = zip_places(path, z, f"{prefix}data/")
        out_format = "torch-module"
    else:
        found = _legacy(path)
        if found is None:
            raise refused
        loaded, places = found
        out_format = "torch-module-legacy"
    located = locate(loaded.result, key, pickled_module_view)
    if located is None:
        raise refused
    entries, classes = entries_of(located, pickled_module_view)
    tensors = {e.key: check_tensor(e) for e in entries}
    flags = {e.key: tensors[e.key].requires_grad for e in entries if e.kind == "parameter" and tensors[e.key].parameter}
    notes = [f"whole-model pickle read without running it: saved classes: {listed(classes)}" if classes else
             "whole-model pickle read without running it"]  # fmt: skip
    others = [n for n in loaded.stand_ins if n not in classes]
    if others:
        notes.append(f"also named in the file, never imported or called: {listed(others, 12)}")
    described = {**top_entries(located, pickled_module_view), **key_entries(entries)}
    return StoredReader(path, out_format, tensors, places, entries=described, notes=notes, parts=located.parts,
                        detected=located.detected, requires_grad=flags)  # fmt: skip


@contextlib.contextmanager
def open_archive(path: Path) -> Iterator[zipfile.ZipFile]:
    """A zip archive, its failures (of zipfile, on hostile bytes: many types) turned into SourceError."""
    try:
        z = zipfile.ZipFile(path)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - BadZipFile, NotImplementedError, UnicodeDecodeError, ValueError...
        raise SourceError(f"corrupt zip archive: {_first_line(exc)}") from None
    with z:
        try:
            yield z
        except (SourceError, OSError):
            raise
        except Exception as exc:  # noqa: BLE001 - a record that cannot be read (bad CRC, compression method...)
            raise SourceError(f"corrupt zip archive: {type(exc).__name__}: {_first_line(exc)}") from None


def archive_prefix(z: zipfile.ZipFile) -> str:
    """``"archive/"``: the folder torch puts every record of an archive in; its byte order checked."""
    infos = z.infolist()
    if not infos or "/" not in infos[0].filename:
        raise SourceError("corrupt checkpoint: the zip archive holds no records in a folder, as torch writes them")
    prefix = infos[0].filename.split("/", 1)[0] + "/"
    check_byteorder(z, prefix)
    return prefix


def inert_load_record(z: zipfile.ZipFile, name: str, storages: Storages) -> Unpickled:
    """The pickle in record ``name`` of ``z``, read with :func:`inert_load`."""
    try:
        info = z.getinfo(name)
    except KeyError:
        raise SourceError(f"corrupt archive: no record {name}") from None
    _check_pickle_size(info.file_size)
    return inert_load(io.BytesIO(z.read(info)), storages)  # whole (CRC checked): read(1) per opcode from zip is slow


def _check_pickle_size(size: int) -> None:
    if size > MAX_PICKLE_BYTES:
        raise Unsupported(f"its pickle is {size:,} bytes, more than the {MAX_PICKLE_BYTES:,} remap reads without running it")


#: torch's legacy format starts with this number, pickled.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _legacy(path: Path) -> tuple[Unpickled, dict[str, Place]] | None:
    """A legacy (torch < 1.6) file: magic, protocol, system info, the object, the storage
    keys, then each storage as an 8-byte element count and its bytes. None when the file
    is not laid out so (a tar archive of torch < 0.4, a plain pickle)."""
    size = path.stat().st_size
    with open(path, "rb") as raw:
        f = io.BufferedReader(raw)
        if f.peek(512)[257:262] == b"ustar":
            return None
        if inert_load(f, Storages(legacy=True)).result != LEGACY_MAGIC:
            return None
        header = [None, *(inert_load(f, Storages(legacy=True)).result for _ in range(2))]
        info = header[2]
        if not isinstance(info, dict) or info.get("little_endian") is not (sys.byteorder == "little"):
            raise SourceError(f"corrupt checkpoint: its system info {_safe_repr(info)} does not say this machine's byte order")
        storages = Storages(legacy=True)
        start = f.tell()
        loaded = inert_load(f, storages)
        _check_pickle_size(loaded.end - start)
        keys = inert_load(f, Storages(legacy=True)).result
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or set(keys) != set(storages.by_key):
            raise _corrupt(f"its list of storages {_safe_repr(keys)} does not match the storages its object names")
        places, at = {}, f.tell()
        for k in keys:
            ref = storages.by_key[k]
            f.seek(at)
            head = f.read(8)
            count = int.from_bytes(head, "little") if len(head) == 8 else -1
            if count != ref.numel:
                raise _corrupt(f"storage {k!r} is written with {count} elements, but its tensors say {ref.numel}")
            places[k] = Place(at + 8, ref.nbytes)
            at += 8 + ref.nbytes
            if at > size:
                raise SourceError(f"truncated: storage {k!r} ends at byte {at} but the file has {size} bytes")
    return loaded, places
