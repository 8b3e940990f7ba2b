"""torch.save files (zip archives and the legacy pickle layout), read without running their code.

Before ``torch.load`` sees a file, its pickle is read through once with stand-ins for
every global (:class:`_ScanUnpickler`), which imports and calls nothing the file names:
the archive's records and each storage's size are checked against the file, and tensors
that have no data or are not dense are found by name. Metadata then comes from the scan
itself when the pickle is a plain one (:func:`_meta_from_scan`: only ordered dicts, tensors,
parameters and typed storages, which torch's weights_only unpickler would build the same way),
else from ``torch.load(weights_only=True)`` on the meta device, with :data:`PICKLE_ALLOW_LIST`
allowed on top of torch's own list; data from a memory-mapped load on the first read.
A TorchScript archive is told apart here (:func:`_zip_kind`) and read by
:mod:`remap.sources.torchscript_reader`, or with ``torch.jit.load`` when trusted
(:class:`_TorchScriptReader`).

>>> _storage_itemsize(_Named())
>>> _numel((2, 3)), _numel((2, -1))
(6, None)
"""

from __future__ import annotations

import collections
import contextlib
import io
import math
import pickle
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..collector import collector_paused
from ..errors import SourceError
from .readers import (
    ACCEPTED_FORMATS,
    _TRUST_HINT,
    Span,
    _check_names,
    _entries,
    _first_line,
    _is_int,
    _locate,
    _Reader,
    _safe_repr,
    _stamp,
    _tensors_meta,
    _walk,
)

if TYPE_CHECKING:
    import torch
else:
    from .readers import _Torch

    torch = _Torch(globals())

__all__ = ["PICKLE_ALLOW_LIST"]

#: Globals that a checkpoint's harmless metadata needs, allowed (on top of torch's own
#: weights_only list) while remap unpickles with ``weights_only=True``: argparse
#: namespaces, paths, ordered dicts, numpy scalars, dtypes and arrays. None of them can
#: run code: each builds plain data from plain data. numpy ones under both the numpy 1
#: (``numpy.core``) and numpy 2 (``numpy._core``) names, so checkpoints written by either load.
PICKLE_ALLOW_LIST = (
    "argparse.Namespace",
    "collections.OrderedDict",
    "pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath",
    "numpy.dtype", "numpy.ndarray",
    "numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar",
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    *(f"numpy.dtypes.{n}DType" for n in (
        "Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float16", "Float32",
        "Float64", "LongDouble", "Complex64", "Complex128", "CLongDouble", "Str", "Bytes", "Long", "ULong",
        "LongLong", "ULongLong", "Object",  # an object array's items are unpickled under these same rules
    )),
)  # fmt: skip
# Where each name's object lives when the name itself is not importable (numpy 1 vs 2, Python 3.13's pathlib._local).
_ALIASES = {"numpy.core.multiarray": "numpy._core.multiarray", "numpy._core.multiarray": "numpy.core.multiarray"}


def _resolve_global(name: str) -> Any:
    """The object a pickle's GLOBAL ``name`` stands for, or None where it does not exist here."""
    import importlib

    module, _, attr = name.rpartition(".")
    for mod in (_ALIASES.get(module, module), module):
        if mod.split(".")[0] == "numpy" and "numpy" not in sys.modules:
            try:
                import numpy  # noqa: F401
            except ImportError:
                return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # numpy 2 warns on numpy.core
                return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    return None


_allowed: list[Any] | None = None


def _allowed_globals() -> list[Any]:
    """:data:`PICKLE_ALLOW_LIST` as ``torch.serialization.safe_globals`` takes it: (object, name) pairs."""
    global _allowed
    if _allowed is None:
        found = [(obj, name) for name in PICKLE_ALLOW_LIST if (obj := _resolve_global(name)) is not None]
        # the object's own name too, which is what a pickle written by this Python and numpy holds
        own = [(obj, f"{obj.__module__}.{obj.__qualname__}") for obj, _ in found if hasattr(obj, "__qualname__")]
        pairs = list(dict.fromkeys([*found, *own]))
        # numpy's _reconstruct makes an array of any shape, uninitialised: only the empty one numpy writes is allowed
        checked = {id(obj): _checked_reconstruct(obj) for obj, name in pairs if name.endswith("multiarray._reconstruct")}
        _allowed = [(checked.get(id(obj), obj), name) for obj, name in pairs]
    return _allowed


@contextlib.contextmanager
def _metadata_globals() -> Iterator[None]:
    """Allow :data:`PICKLE_ALLOW_LIST` for one ``torch.load``, leaving the caller's own additions in place."""
    present = torch.serialization.get_safe_globals()
    extra = [g for g in _allowed_globals() if g not in present]
    with torch.serialization.safe_globals(extra):
        yield


class _PickleRefused(SourceError):
    """torch.load(weights_only=True) refused the pickle; trust_pickle may override."""


def _refused(path: Path, exc: BaseException) -> SourceError:
    """The error for a pickle that ``torch.load(weights_only=True)`` refuses."""
    text = str(exc)
    found = (
        re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        or re.search(r"unsupported GLOBAL ([\w.]+) whose module", text)  # os, sys, posix, nt: blocked outright
        or re.search(r"allowlisted via `add_safe_globals`, but got <class '([\w.]+)'>", text)  # BUILD of a class
    )
    if found:
        name = found.group(1) if "." in found.group(1) else f"builtins.{found.group(1)}"  # torch drops "builtins."
        what = f"it needs the global {name!r}, which loading with weights_only=True does not allow"
    else:
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        what = f"weights_only loading failed: {detail.group(1) if detail else _first_line(exc)}"
    return _PickleRefused(
        f"torch.load refused this pickle: {what}. Unpickling it could run arbitrary code. "
        f"Only if you trust this file, opt in with {_TRUST_HINT}",
        where=str(path),
    )


def _torch_load(path: Path, *, meta: bool, weights_only: bool, mmap: bool) -> Any:
    """``torch.load`` with its failures turned into SourceError."""
    options: dict[str, Any] = {"map_location": "meta"} if meta else {"map_location": "cpu", "mmap": mmap}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a corrupt file; the error says more
            if not weights_only:
                return torch.load(path, weights_only=False, **options)
            with _metadata_globals():
                return torch.load(path, weights_only=True, **options)
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ModuleNotFoundError (trusted pickles)...
        if isinstance(exc, _ArrayFromNothing) or _EMPTY_ARRAY[:40] in str(exc):
            raise SourceError(str(exc).split("\n")[0] if isinstance(exc, _ArrayFromNothing) else _EMPTY_ARRAY.format(shape="?"),
                              where=str(path)) from None
        if weights_only and "Weights only load failed" in str(exc):
            raise _refused(path, exc) from None
        message = f"torch.load cannot read it: {type(exc).__name__}: {_first_line(exc)}"
        raise SourceError(message, where=str(path)) from None


# ---------------------------------------------------------------------------- what torch would trust

#: Rebuild functions whose tensor has no bytes in the file: nothing to load into a module.
_NO_DATA = {
    "torch._utils._rebuild_meta_tensor_no_storage": "has no data in the file (it was saved from the meta device)",
    "torch._utils._rebuild_wrapper_subclass": "has no data in the file (a tensor subclass saved without storage)",
}
#: Rebuild functions of tensors remap cannot load, anywhere in a checkpoint (torch cannot even describe them on the meta device).
_UNREADABLE = {"torch._utils._rebuild_qtensor": "is a quantized tensor, which remap cannot load; dequantize it (`t.dequantize()`) before saving"}
#: ... and of tensors remap cannot load as weights.
_NOT_DENSE = {
    "torch._utils._rebuild_sparse_tensor": "is a sparse tensor, which remap cannot load; save it dense (`t.to_dense()`)",
    "torch._utils._rebuild_nested_tensor": "is a nested tensor, which remap cannot load",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _Named:
    """What a pickled global stands for during :func:`_scan_pickle`: its name, never the object.

    Calling it, building it or filling it only records what the pickle asked for, so a
    pickle is read through without importing or running anything it names.
    """

    name = "?"
    args: tuple[Any, ...] = ()
    state: Any = None
    items: Any = None
    builds = 0  # how many BUILD opcodes filled it
    listy = False  # appended to, as a list is
    via_call = False  # made by calling another stand-in, not its global

    def __new__(cls, *args: Any, **kwargs: Any) -> _Named:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state
        self.builds += 1

    def __call__(self, *args: Any, **kwargs: Any) -> _Named:  # e.g. a method fetched with getattr
        made = type(self)(*args)
        made.via_call = True
        return made

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.items is None:
            self.items = {}
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.extend([value])

    def extend(self, values: Any) -> None:
        self.listy = True
        if self.items is None:
            self.items = {}
        for value in values:
            self.items[len(self.items)] = value


class _Stored(_Named):
    """What a persistent id (a storage) stands for during the scan; ``pid`` is the id."""

    pid: Any = None


class _Reframed(Exception):
    """Raised by :meth:`_ScanUnpickler.load_frame`: from here on reads go through pickle's unframer."""


class _ScanUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """An unpickler whose globals are :class:`_Named` stand-ins and whose storages are recorded.

    The pure-Python unpickler, whose memo is a dict: CPython's C unpickler zero-fills a memo
    list as long as the largest LONG_BINPUT index, so one flipped bit in a pickle of a few
    KB asked for up to 32 GB. Its loop reads straight from the (buffered) file, one C call
    per opcode, until a FRAME opcode (protocol 4+; torch.save writes 2) asks for pickle's
    unframer. ``exotic`` is set by any opcode that torch's weights_only unpickler does not
    read as this one does (:data:`_PLAIN_OPCODES`): such a pickle is left to ``torch.load``.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="latin1")
        self.storages: list[Any] = []
        self.calls: list[_Named] = []
        self._types: dict[str, type[_Named]] = {}
        self.exotic = False

    def load(self) -> Any:
        """pickle's own load loop (``pickle._Unpickler.load``) with ``read`` bound to the file's."""
        self._unframer = pickle._Unframer(self._file_read, self._file_readline)  # type: ignore[attr-defined]
        self.read, self.readline, self.readinto = self._file_read, self._file_readline, self._unframer.readinto
        self.metastack, self.stack = [], []
        self.append = self.stack.append
        self.proto = 0
        dispatch = self.dispatch
        while True:
            read = self.read
            try:
                while True:
                    key = read(1)
                    if not key:
                        raise EOFError
                    dispatch[key[0]](self)
            except _Reframed:
                continue
            except pickle._Stop as stop:  # type: ignore[attr-defined]
                return stop.value

    def load_frame(self) -> None:
        """A FRAME opcode: switch to pickle's unframer (once), then read the frame."""
        if self.read is self._unframer.read:
            pickle._Unpickler.load_frame(self)  # type: ignore[attr-defined]
            return
        self.read, self.readline = self._unframer.read, self._unframer.readline
        pickle._Unpickler.load_frame(self)  # type: ignore[attr-defined]
        raise _Reframed

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in self._types:
            scan = self

            calls = self.calls

            class Stand(_Named):
                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    self.args = args  # _Named.__init__, inlined: one call fewer per tensor
                    calls.append(self)

            Stand.name = full
            self._types[full] = Stand
        return self._types[full]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module" and isinstance(pid[1], type):
            return pid[1]  # a legacy file names a pickled module's class so: ('module', cls, source file, source)
        self.storages.append(pid)
        stored = _Stored()
        stored.pid = pid
        return stored


#: The opcodes that torch's weights_only unpickler (torch/_weights_only_unpickler.py) reads as
#: pickle's own does; SETITEM(S) only into a dict or a stand-in (torch: a dict or OrderedDict).
_PLAIN_OPCODES = frozenset(op[0] for op in (
    pickle.PROTO, pickle.STOP, pickle.GLOBAL, pickle.REDUCE, pickle.BUILD, pickle.MARK, pickle.BINPERSID,
    pickle.APPEND, pickle.APPENDS, pickle.SETITEM, pickle.SETITEMS, pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2,
    pickle.TUPLE3, pickle.EMPTY_TUPLE, pickle.EMPTY_LIST, pickle.EMPTY_DICT, pickle.EMPTY_SET, pickle.NONE,
    pickle.NEWFALSE, pickle.NEWTRUE, pickle.BININT, pickle.BININT1, pickle.BININT2, pickle.LONG1, pickle.BINFLOAT,
    pickle.BINUNICODE, pickle.BINGET, pickle.LONG_BINGET, pickle.BINPUT, pickle.LONG_BINPUT,
))  # fmt: skip


def _exotic(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    def handle(scan: _ScanUnpickler) -> None:
        scan.exotic = True
        handler(scan)

    return handle


def _into_dict(handler: Callable[[Any], None]) -> Callable[[Any], None]:
    def handle(scan: _ScanUnpickler) -> None:
        handler(scan)
        target = scan.stack[-1]
        if type(target) is not dict and not isinstance(target, _Named):
            scan.exotic = True  # e.g. a list: pickle assigns its items, torch refuses

    return handle


_ScanUnpickler.dispatch = {
    op: handler if op in _PLAIN_OPCODES else _exotic(handler) for op, handler in pickle._Unpickler.dispatch.items()  # type: ignore[attr-defined]
}
_ScanUnpickler.dispatch[pickle.FRAME[0]] = _exotic(_ScanUnpickler.load_frame)
for _op in (pickle.SETITEM, pickle.SETITEMS):
    _ScanUnpickler.dispatch[_op[0]] = _into_dict(pickle._Unpickler.dispatch[_op[0]])  # type: ignore[attr-defined]


def _scan_pickle(data: Any) -> _ScanUnpickler:
    """Read one pickle from the file object ``data`` with stand-ins for every global."""
    scan = _ScanUnpickler(data)
    with collector_paused():
        scan.result = scan.load()  # type: ignore[attr-defined]
    return scan


def _storage_itemsize(kind: Any) -> int | None:
    """Bytes per element of a pickled storage class (``torch.FloatStorage`` -> 4), None if unknown."""
    name = getattr(kind, "name", "")
    if name.startswith("torch.") and name.rpartition(".")[2] == "UntypedStorage":  # torch.UntypedStorage, torch.storage.UntypedStorage
        return 1
    dtype = _storage_dtype(kind)
    return dtype.itemsize if dtype is not None else None


def _storage_dtype(kind: Any) -> torch.dtype | None:
    """The dtype of a pickled typed storage class (``torch.FloatStorage`` -> float32), None if unknown."""
    name = getattr(kind, "name", "")
    attr = name.rpartition(".")[2]
    if not (name.startswith("torch.") and attr.endswith("Storage")):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        dtype = getattr(getattr(torch, attr, None), "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _numel(shape: Any) -> int | None:
    """The element count of a pickled shape, None when it is not a tuple of non-negative ints."""
    if isinstance(shape, (tuple, list)) and all(_is_int(d) and d >= 0 for d in shape):
        return math.prod(shape)
    return None


def _check_arrays(scan: _ScanUnpickler, where: str) -> None:
    """numpy arrays get memory only from bytes the pickle holds (see :func:`_checked_reconstruct`)."""
    for call in scan.calls:
        if not call.name.endswith("multiarray._reconstruct"):
            continue
        if len(call.args) != 3 or _numel(call.args[1]) != 0:
            raise SourceError(_EMPTY_ARRAY.format(shape=_safe_repr(call.args[1] if len(call.args) > 1 else None)), where=where)
        state = call.state
        if isinstance(state, tuple) and len(state) == 5 and isinstance(state[4], (list, tuple)):  # an object array
            count = _numel(state[1])
            if count != len(state[4]):
                raise SourceError(
                    f"corrupt pickle: a numpy object array of shape {_safe_repr(state[1])} is given "
                    f"{len(state[4])} items; it needs exactly one per element",
                    where=where,
                )


def _flagged(root: Any, limit: int = 1_000_000) -> dict[tuple[Any, ...], str]:
    """Path -> rebuild function of every tensor in ``root`` that has no data or is not dense.

    Walked without recursion (a checkpoint may nest 10,000 dicts deep); a tensor's path is
    the keys of the dicts (and indexes of the lists) that lead to it.
    """
    found: dict[tuple[Any, ...], str] = {}
    stack: list[tuple[tuple[Any, ...], Any]] = [((), root)]
    seen: set[int] = set()
    while stack and len(seen) < limit:
        path, value = stack.pop()
        if id(value) in seen or isinstance(value, (str, bytes, int, float, type)) or value is None:
            continue
        seen.add(id(value))
        if isinstance(value, _Named):
            if value.name in _NO_DATA or value.name in _UNREADABLE or value.name in _NOT_DENSE:
                found.setdefault(path, value.name)
            stack += [(path, a) for a in value.args if isinstance(a, (_Named, tuple, list))]
            if value.items is not None:
                stack += [((*path, k), v) for k, v in value.items.items()]
            if isinstance(value.state, (dict, _Named)):
                stack.append((path, value.state))
        elif isinstance(value, dict):
            stack += [((*path, k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [((*path, i), v) for i, v in enumerate(value)]
    return found


def _dotted(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path)


def _refuse_unreadable(found: Mapping[tuple[Any, ...], str], where: str) -> None:
    for path, name in found.items():
        if name in _UNREADABLE:
            raise SourceError(f"the tensor at {_dotted(path)!r} {_UNREADABLE[name]} ({name})", where=where)


def _refuse_in_weights(found: Mapping[tuple[Any, ...], str], parts: Sequence[str], keys: Any, where: str) -> None:
    """A weight that apply could not read is an error now, at planning, naming its key."""
    for key in keys:
        name = found.get((*parts, key))
        if name is not None:
            reason = _NO_DATA.get(name) or _NOT_DENSE[name]
            raise SourceError(f"tensor {key!r} {reason} ({name}); remap loads only tensors stored in the file", where=where)


def _record_text(z: zipfile.ZipFile, name: str, limit: int = 64) -> str | None:
    """A small text record of a torch archive, None when absent; an error when oversized or not ASCII."""
    try:
        info = z.getinfo(name)
    except KeyError:
        return None
    if info.file_size > limit:
        raise SourceError(f"corrupt checkpoint: the record {name} holds {info.file_size} bytes, expected at most {limit}")
    raw = z.read(info)
    if not raw.isascii():
        raise SourceError(f"corrupt checkpoint: the record {name} is not ASCII text")
    return raw.decode("ascii").strip()


def _check_zip_records(z: zipfile.ZipFile, prefix: str) -> None:
    """The records torch.load trusts without checking; a wrong one crashes the process."""
    order = _record_text(z, f"{prefix}/byteorder")
    if order is not None and order != sys.byteorder:
        said = f"says {order!r}" if order in ("little", "big") else "is neither 'little' nor 'big'"
        raise SourceError(
            f"the record {prefix}/byteorder {said}, but this machine is {sys.byteorder}-endian: remap reads "
            f"checkpoints written in its own byte order only (torch.load on the meta device crashes on any other)"
        )
    for name, low, high in ((".storage_alignment", 1, 1 << 20), (".format_version", 0, 1 << 16),
                            ("version", 0, 1 << 16), (".data/version", 0, 1 << 16)):  # fmt: skip
        text = _record_text(z, f"{prefix}/{name}")
        if text is not None and not (text.isdigit() and low <= int(text) <= high):
            raise SourceError(
                f"corrupt checkpoint: the record {prefix}/{name} must be an integer from {low} to {high}, "
                f"found {_safe_repr(text)}"
            )


def _check_zip_storages(scan: _ScanUnpickler, sizes: Mapping[str, int], prefix: str) -> None:
    """Every storage the pickle names has its record, and fits in it."""
    itemsizes: dict[type, int | None] = {}  # per storage class: a 100,000-tensor file names a few
    for pid in scan.storages:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise SourceError(f"corrupt checkpoint: data.pkl names a persistent object {_safe_repr(pid)}, expected a storage")
        _, kind, key, _location, numel = pid
        if isinstance(kind, type):
            if kind not in itemsizes:
                itemsizes[kind] = _storage_itemsize(kind)
            itemsize = itemsizes[kind]
        else:
            itemsize = _storage_itemsize(kind)
        if itemsize is None:
            raise SourceError(f"corrupt checkpoint: data.pkl names a storage of unknown type {getattr(kind, 'name', _safe_repr(kind))!r}")
        if not (isinstance(key, str) and _is_int(numel) and numel >= 0):
            raise SourceError(f"corrupt checkpoint: data.pkl names a storage {_safe_repr(key)} of {_safe_repr(numel)} elements")
        record = f"{prefix}/data/{key}"
        if record not in sizes:
            raise SourceError(f"corrupt checkpoint: data.pkl names storage {key!r}, but the archive has no record {record}")
        if numel * itemsize > sizes[record]:
            raise SourceError(
                f"corrupt checkpoint: data.pkl gives storage {key!r} {numel * itemsize} bytes, "
                f"but its record {record} holds {sizes[record]}"
            )


class _ZipScan(NamedTuple):
    """What :func:`_prescan_zip` learnt of a torch zip archive."""

    found: dict[tuple[Any, ...], str]  # path -> rebuild function of tensors without data or not dense
    scan: _ScanUnpickler  # data.pkl read with stand-ins
    prefix: str  # the archive's folder ("archive" in "archive/data.pkl")
    layout: _ZipLayout  # where each record's data sits


def _prescan_zip(path: Path) -> _ZipScan:
    """Check a torch zip archive before torch.load sees it: its records, its pickle, its storages."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            prefix = infos[0].filename.split("/", 1)[0] if infos else ""
            sizes = {i.filename: i.file_size for i in infos}
            _check_zip_records(z, prefix)
            if f"{prefix}/data.pkl" not in sizes:
                raise SourceError(f"corrupt checkpoint: no record {prefix}/data.pkl")
            with z.open(f"{prefix}/data.pkl") as f:
                scan = _scan_pickle(io.BufferedReader(f, 1 << 16))  # a C read per opcode, not zipfile's Python one
            layout = _layout_or_error(z, path)
    except SourceError as exc:
        raise SourceError(exc.message, where=str(path)) from None
    except Exception as exc:  # noqa: BLE001 - zipfile and pickle on hostile bytes raise many types
        raise SourceError(f"corrupt checkpoint: data.pkl cannot be read: {_pickle_problem(exc)}", where=str(path)) from None
    _check_storages_named(scan, sizes, prefix, path)
    return _ZipScan(_scanned(scan, str(path)), scan, prefix, layout)


def _check_storages_named(scan: _ScanUnpickler, sizes: Mapping[str, int], prefix: str, path: Path) -> None:
    try:
        _check_zip_storages(scan, sizes, prefix)
    except SourceError as exc:
        raise SourceError(exc.message, where=str(path)) from None


def _scanned(scan: _ScanUnpickler, where: str) -> dict[tuple[Any, ...], str]:
    _check_arrays(scan, where)
    flaggable = any(n in _NO_DATA or n in _UNREADABLE or n in _NOT_DENSE for n in scan._types)
    found = _flagged(scan.result) if flaggable else {}  # type: ignore[attr-defined]
    _refuse_unreadable(found, where)
    return found


# ---------------------------------------------------------------------------- metadata from the scan

_ORDERED_DICT, _TENSOR_V2, _PARAMETER = "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter"
#: The typed storages torch.save names (torch's weights_only list allows each; ``torch.XStorage.dtype``).
_PLAIN_STORAGES = frozenset(f"torch.{kind}Storage" for kind in (
    "Bool", "Byte", "Char", "Short", "Int", "Long", "Half", "BFloat16", "Float", "Double", "ComplexFloat", "ComplexDouble",
))  # fmt: skip
#: The globals a plain state_dict's pickle names; :func:`_meta_from_scan` builds what they make
#: as torch's weights_only unpickler would. A pickle that names any other is left to torch.load.
_PLAIN_GLOBALS = frozenset({_ORDERED_DICT, _TENSOR_V2, _PARAMETER, *_PLAIN_STORAGES})
_LEAVES = frozenset({str, int, float, bool, type(None), set})  # a set is an empty one: ADDITEMS is exotic


class _NotPlain(Exception):
    """The scanned pickle holds something :class:`_MetaBuilder` does not model: torch.load reads it instead."""


class _BadTensor(Exception):
    """A tensor whose shape, strides or offset no storage can hold: a corrupt file."""

    def __init__(self, call: _Named, problem: str) -> None:
        super().__init__(problem)
        self.call, self.problem = call, problem


def _meta_from_scan(scan: _ScanUnpickler, data: Mapping[str, int], prefix: str, where: str) -> Any | None:
    """What ``torch.load(weights_only=True, map_location="meta")`` returns for this pickle, built from
    the scan's stand-ins; None when the pickle is not plain enough to be sure (then torch.load reads it).

    Plain: this machine is little-endian (the prescan refused another byte order), every opcode is
    one torch's weights_only unpickler reads the same way, and every global is in
    :data:`_PLAIN_GLOBALS`. Tensors sit on meta storages, one per persistent id as torch's meta
    load makes them, whose ``_checkpoint_offset`` is where the record's data starts (``data``:
    record name -> offset). A tensor that its storage cannot hold is a SourceError naming it.

    >>> _meta_from_scan(_scan_pickle(io.BytesIO(pickle.dumps({"epoch": (1, [2.5])}, protocol=2))), {}, "a", "f")
    {'epoch': (1, [2.5])}
    """
    if sys.byteorder != "little" or scan.exotic or not scan._types.keys() <= _PLAIN_GLOBALS:
        return None
    try:
        with collector_paused():
            return _MetaBuilder(data, prefix).build(scan.result)  # type: ignore[attr-defined]
    except _NotPlain:
        return None
    except _BadTensor as bad:
        at = _path_to(scan.result, bad.call)  # type: ignore[attr-defined]
        raise SourceError(f"corrupt checkpoint: the tensor at {at!r} {bad.problem}", where=where) from None
    except Exception:  # noqa: BLE001 - torch refused a tensor (e.g. an integer one that requires grad): its own load says why
        return None


def _hookless(value: Any) -> bool:
    """``value`` is the empty ``OrderedDict()`` torch.save writes for a tensor's backward hooks."""
    return (isinstance(value, _Named) and type(value).name == _ORDERED_DICT and value.args == ()
            and value.items is None and not value.builds and not value.via_call)  # fmt: skip


def _plain_key(key: Any) -> bool:
    """A dict key that needs no converting: a scalar, or a tuple of them."""
    return type(key) in _LEAVES or (type(key) is tuple and all(type(k) in _LEAVES for k in key))


class _MetaBuilder:
    """Turns a scanned tree into torch.load's meta objects, without recursion (checkpoints nest
    10,000 deep) and keeping identity: one stand-in or tuple, one converted object. dicts and lists
    are the scan's own, updated in place; tuples are rebuilt only when an item changed."""

    def __init__(self, data: Mapping[str, int], prefix: str) -> None:
        self.data, self.prefix = data, prefix
        self.done: dict[int, Any] = {}  # id of a stand-in or tuple -> what torch.load makes of it
        self.storages: dict[int, tuple[Any, Any, int]] = {}  # id of a _Stored -> (meta storage, dtype, elements)
        self.dtypes: dict[type, Any] = {}

    def build(self, root: Any) -> Any:
        done, seen, pending = self.done, set(), set()
        dicts: list[dict[Any, Any]] = []
        lists: list[list[Any]] = []
        ordered: list[_Named] = []
        stack: list[tuple[Any, bool]] = [(root, False)]
        while stack:
            value, leaving = stack.pop()
            if leaving:
                self._leave_tuple(value, pending)
                continue
            kind = type(value)
            if kind in _LEAVES or id(value) in seen or id(value) in done:
                continue
            seen.add(id(value))
            if kind is dict:
                if not all(map(_plain_key, value)):
                    raise _NotPlain
                dicts.append(value)
                stack += [(v, False) for v in value.values()]
            elif kind is list:
                lists.append(value)
                stack += [(v, False) for v in value]
            elif kind is tuple:
                pending.add(id(value))
                stack.append((value, True))
                stack += [(v, False) for v in value]
            elif isinstance(value, _Named) and kind is not _Stored:  # a storage outside a rebuild call is not plain
                if kind.name == _TENSOR_V2:
                    self._tensor(value)
                elif kind.name == _PARAMETER:
                    done[id(value)] = self._parameter(value)
                else:
                    stack += self._ordered_dict(value)
                    ordered.append(value)
            else:
                raise _NotPlain  # a class itself (a global that was not called), a pickled module's class...
        self._fill(dicts, lists, ordered)
        return done.get(id(root), root)

    def _leave_tuple(self, value: tuple[Any, ...], pending: set[int]) -> None:
        pending.discard(id(value))
        if any(id(v) in pending for v in value):
            raise _NotPlain  # a tuple in a cycle with one of its own items: not worth modelling
        done = self.done
        if any(id(v) in done for v in value):
            done[id(value)] = tuple(done.get(id(v), v) for v in value)

    def _ordered_dict(self, value: _Named) -> list[tuple[Any, bool]]:
        """An empty OrderedDict for the stand-in; the items to convert before :meth:`_fill` fills it."""
        if type(value).name != _ORDERED_DICT or value.args != () or value.via_call or value.listy or value.builds > 1:
            raise _NotPlain  # OrderedDict(pairs), appended to, called, built twice...
        state = value.state if value.builds else {}
        items = value.items or {}
        if type(state) is not dict or not all(map(_plain_key, state)) or not all(map(_plain_key, items)):
            raise _NotPlain
        self.done[id(value)] = collections.OrderedDict()
        return [(v, False) for v in (*items.values(), *state.values())]

    def _fill(self, dicts: list[dict[Any, Any]], lists: list[list[Any]], ordered: list[_Named]) -> None:
        done = self.done
        for d in dicts:
            for k, v in d.items():  # values only: the dict keeps its size
                if id(v) in done:
                    d[k] = done[id(v)]
        for items in lists:
            for i, v in enumerate(items):
                if id(v) in done:
                    items[i] = done[id(v)]
        for value in ordered:
            made = done[id(value)]
            if value.items:
                made.update((k, done.get(id(v), v)) for k, v in value.items.items())
            if value.builds:  # torch: inst.__dict__.update(state), e.g. a state_dict's _metadata
                made.__dict__.update((k, done.get(id(v), v)) for k, v in value.state.items())

    def _tensor(self, call: _Named) -> Any:
        """``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])`` on meta."""
        made = self.done.get(id(call))
        if made is not None:
            return made
        args = call.args
        if call.items is not None or call.builds or call.via_call or call.listy or len(args) not in (6, 7):
            raise _NotPlain
        stored, offset, size, stride, requires_grad, hooks = args[:6]
        if len(args) == 7 and not (args[6] is None or args[6] == {}):
            raise _NotPlain  # tensor metadata (torch._utils.set_tensor_metadata)
        if type(requires_grad) is not bool or not _hookless(hooks) or type(size) is not tuple or type(stride) is not tuple:
            raise _NotPlain
        storage, dtype, capacity = self._storage(stored)
        if _fits(offset, size, stride) > capacity:  # infinity when malformed
            raise _BadTensor(call, _layout_problem(offset, size, stride, capacity) or "does not fit its storage")
        made = torch.empty((0,), dtype=dtype, device="meta").set_(storage, offset, size, stride)
        if requires_grad:
            made.requires_grad = True
        self.done[id(call)] = made
        return made

    def _parameter(self, call: _Named) -> Any:
        """``_rebuild_parameter(data, requires_grad, hooks)``: ``nn.Parameter(data, requires_grad)``."""
        args = call.args
        if call.items is not None or call.builds or call.via_call or call.listy or len(args) != 3:
            raise _NotPlain
        data, requires_grad, hooks = args
        if not (isinstance(data, _Named) and type(data).name == _TENSOR_V2) or type(requires_grad) is not bool or not _hookless(hooks):
            raise _NotPlain
        return torch.nn.Parameter(self._tensor(data), requires_grad)

    def _storage(self, stored: Any) -> tuple[Any, Any, int]:
        """(meta storage, dtype, elements) of one persistent id (checked by :func:`_check_zip_storages`)."""
        if type(stored) is not _Stored or stored.items is not None or stored.builds or stored.via_call:
            raise _NotPlain
        made = self.storages.get(id(stored))
        if made is None:
            _, kind, key, _location, numel = stored.pid
            offset = self.data.get(self.prefix + "/data/" + key)
            if offset is None:
                raise _NotPlain
            dtype = self._dtype(kind)
            storage = torch.UntypedStorage(numel * dtype.itemsize, device="meta")
            storage._checkpoint_offset = offset
            made = self.storages[id(stored)] = (storage, dtype, numel)
        return made

    def _dtype(self, kind: Any) -> Any:
        dtype = self.dtypes.get(kind) if isinstance(kind, type) else None
        if dtype is None:
            if not (isinstance(kind, type) and issubclass(kind, _Named) and kind.name in _PLAIN_STORAGES):
                raise _NotPlain
            dtype = self.dtypes[kind] = _storage_dtype(kind)
        return dtype


def _fits(offset: Any, size: Any, stride: Any) -> float:
    """The storage elements a tensor reaches (0 when it has none); infinity when its layout is malformed.

    >>> _fits(2, (4, 4), (4, 1)), _fits(0, (0, 4), (4, 1)), _fits(0, (-1,), (1,))
    (18, 0, inf)
    """
    if type(offset) is not int or type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride) or offset < 0:
        return math.inf
    end = offset + 1
    for d, s in zip(size, stride):
        if type(d) is not int or type(s) is not int or d < 0 or s < 0:
            return math.inf
        if d == 0:
            end = 0
        elif end:
            end += (d - 1) * s
    return end


def _layout_problem(offset: Any, size: Any, stride: Any, capacity: int) -> str | None:
    """What is wrong with a tensor of ``size`` and ``stride`` at ``offset`` in a storage of
    ``capacity`` elements, None if it fits.

    >>> _layout_problem(0, (4, 4), (4, 1), 16), _layout_problem(1, (4, 4), (4, 1), 16)
    (None, 'of shape (4, 4) with strides (4, 1) at storage offset 1 reaches element 17 of its storage, which holds 16')
    """
    if not (type(size) is tuple and all(_is_int(d) and d >= 0 for d in size)):
        return f"has shape {_safe_repr(size)}, expected a tuple of non-negative integers"
    if not (type(stride) is tuple and len(stride) == len(size) and all(_is_int(d) and d >= 0 for d in stride)):
        return f"of shape {_safe_repr(size)} has strides {_safe_repr(stride)}, expected one non-negative integer per dimension"
    if not (_is_int(offset) and offset >= 0):
        return f"has storage offset {_safe_repr(offset)}, expected a non-negative integer"
    if 0 in size:
        return None
    end = offset + 1 + sum((d - 1) * s for d, s in zip(size, stride))
    if end > capacity:
        return (f"of shape {_safe_repr(size)} with strides {_safe_repr(stride)} at storage offset {offset} "
                f"reaches element {end} of its storage, which holds {capacity}")  # fmt: skip
    return None


def _path_to(root: Any, target: Any) -> str:
    """The dotted path of ``target`` in the scanned tree (dict keys, list indexes), "?" if not found."""
    stack: list[tuple[tuple[Any, ...], Any]] = [((), root)]
    seen: set[int] = set()
    while stack:
        path, value = stack.pop()
        if value is target:
            return _dotted(path) or "(the whole file)"
        if id(value) in seen or type(value) in _LEAVES:
            continue
        seen.add(id(value))
        if isinstance(value, _Named):
            stack += [(path, a) for a in value.args]
            stack += [((*path, k), v) for k, v in (value.items or {}).items()]
            if isinstance(value.state, dict):
                stack += [((*path, k), v) for k, v in value.state.items()]
        elif isinstance(value, dict):
            stack += [((*path, k), v) for k, v in value.items()]
        elif isinstance(value, (list, tuple)):
            stack += [((*path, i), v) for i, v in enumerate(value)]
    return "?"


def _prescan_legacy(path: Path) -> dict[tuple[Any, ...], str]:
    """Check a legacy torch.save file's pickle before torch.load sees it (storage sizes against the file's)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if f.read(512)[257:262] == b"ustar":
                return {}  # the tar variant of torch 0.1-0.3: torch's reader checks it
            f.seek(0)
            if _scan_pickle(f).result != _LEGACY_MAGIC:  # type: ignore[attr-defined]
                return {}  # not torch's legacy layout: torch.load says what it is
            _scan_pickle(f), _scan_pickle(f)  # protocol version, system info
            scan = _scan_pickle(f)
    except Exception as exc:  # noqa: BLE001 - pickle on hostile bytes raises many types
        raise SourceError(f"corrupt checkpoint: its pickle cannot be read: {_pickle_problem(exc)}", where=str(path)) from None
    claimed: dict[Any, int] = {}
    for pid in scan.storages:
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
            itemsize, numel = _storage_itemsize(pid[1]), pid[4]
            if itemsize is not None and _is_int(numel) and numel >= 0 and isinstance(pid[2], (str, bytes)):
                claimed[pid[2]] = max(claimed.get(pid[2], 0), numel * itemsize)
    if sum(claimed.values()) > size:
        raise SourceError(
            f"corrupt checkpoint: its pickle claims {len(claimed)} storages of {sum(claimed.values())} bytes in all, "
            f"more than the whole file ({size} bytes)",
            where=str(path),
        )
    return _scanned(scan, str(path))


def _pickle_problem(exc: BaseException) -> str:
    """An unpickling error in words, without echoing the file's bytes."""
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    text = _first_line(exc)
    if "load key" in text or "opcode" in text:
        return f"{type(exc).__name__}: an unknown pickle opcode"
    return f"{type(exc).__name__}: {text[:200]}"


_EMPTY_ARRAY = (
    "refused a numpy array built with shape {shape} from no data: numpy pickles an array as an empty one "
    "filled from the bytes in its state, so a non-empty shape here would hand out memory the file never held"
)


class _ArrayFromNothing(Exception):
    """Raised inside torch.load by :func:`_checked_reconstruct`."""


def _checked_reconstruct(real: Callable[..., Any]) -> Callable[..., Any]:
    """numpy's ``_reconstruct``, refusing any shape but an empty one (the only one numpy writes)."""

    def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        if _numel(shape) != 0:
            raise _ArrayFromNothing(_EMPTY_ARRAY.format(shape=_safe_repr(shape)))
        return real(subtype, shape, dtype)

    return _reconstruct


class _TorchReader(_Reader):
    """A torch.save file: metadata through a meta-device load, data through mmap."""

    def __init__(self, path: Path, fmt: str, *, key: str | None, trust_pickle: bool) -> None:
        self.path, self.format = path, fmt
        self._stamp = _stamp(path)
        self._weights_only = True
        self.notes: list[str] = []
        with collector_paused():  # all that is made here stays referenced: collections would walk it for nothing
            self._open(key, trust_pickle)
        self._tensors: Mapping[Any, Any] | None = None

    def _open(self, key: str | None, trust_pickle: bool) -> None:
        """``meta``, ``parts``, ``detected``, ``entries``: from the scan when it is plain, else from torch.load."""
        path, fmt, obj = self.path, self.format, None
        if fmt == "torch-zip":
            zipped = _prescan_zip(path)
            found, self._records = zipped.found, (zipped.layout.foreign, zipped.layout.records)
            obj = _meta_from_scan(zipped.scan, zipped.layout.data, zipped.prefix, str(path))
            del zipped  # the scanned tree, before torch.load builds its own
        else:
            found = _prescan_legacy(path)
        if obj is None:
            obj = self._load_meta(trust_pickle)
        try:
            weights, self.parts, self.detected = _locate(obj, key)
        except SourceError as exc:
            raise SourceError(exc.message, where=str(path)) from None
        _refuse_in_weights(found, self.parts, weights.keys(), str(path))
        _check_names(weights.keys(), "the checkpoint", str(path))
        self.meta = _tensors_meta(weights)
        if fmt == "torch-zip":
            self._check_storages(weights)
        self._meta_tensors = weights if fmt == "torch-zip" and sys.byteorder == "little" else {}
        self.entries = _entries(obj, self.parts)
        if fmt == "torch-legacy":
            self.notes.append(
                "legacy torch.save format cannot be memory-mapped: the whole file is loaded on the first read"
            )

    def _load_meta(self, trust_pickle: bool) -> Any:
        """The checkpoint through ``torch.load`` on the meta device (weights_only unless trusted)."""
        try:
            return _torch_load(self.path, meta=True, weights_only=True, mmap=False)
        except _PickleRefused:
            if not trust_pickle:
                raise
            warnings.warn(
                f"{self.path}: loaded with torch.load(weights_only=False) because trust_pickle is set; "
                "unpickling runs code from the file",
                UserWarning,
                stacklevel=7,  # the caller of open_source
            )
            self._weights_only = False
            self.notes.append("trusted pickle: loaded with weights_only=False")
            return _torch_load(self.path, meta=True, weights_only=False, mmap=False)

    def read(self, key: str) -> torch.Tensor:
        if self._tensors is None:
            self._check_unchanged()
            # torch.load(mmap=True) maps a record's raw bytes, so it reads a compressed record as garbage
            mmap = self.format == "torch-zip" and all(stored for _, stored in self._zip_records()[1].values())
            obj = _torch_load(self.path, meta=False, weights_only=self._weights_only, mmap=mmap)
            try:
                self._tensors = _walk(obj, self.parts)
            except (KeyError, TypeError, AttributeError) as exc:
                raise self._fail_read(key, exc) from None
        tensor = self._tensors.get(key) if isinstance(self._tensors, Mapping) else None
        if not isinstance(tensor, torch.Tensor):
            message = f"cannot read tensor {key!r}: the loaded file holds {type(tensor).__name__} there"
            raise SourceError(message, where=str(self.path))
        return tensor

    def span(self, key: str) -> Span | None:
        t = self._meta_tensors.get(key) if isinstance(self._meta_tensors, Mapping) else None
        offset = getattr(t.untyped_storage(), "_checkpoint_offset", None) if isinstance(t, torch.Tensor) else None
        if offset is None:
            return None
        foreign, records = self._zip_records()
        if foreign:
            return None
        nbytes = t.untyped_storage().nbytes()
        record = records.get(int(offset))
        if record is None:
            return None  # not where a stored record's data starts: let torch.load read it
        if not record[1]:
            return None  # a compressed record cannot be mapped: torch.load reads it
        if nbytes > record[0]:
            raise self._oversized(key, nbytes, record[0])
        meta = self.meta[key]
        return Span(str(self.path), int(offset), nbytes, meta.dtype, meta.shape,
                    tuple(t.stride()), t.storage_offset())  # fmt: skip

    def _check_storages(self, weights: Mapping[Any, Any]) -> None:
        """Every tensor's storage fits in the archive record it claims (the pickle says how
        big a storage is, the archive how big its record is: a lie is a corrupt file)."""
        records = self._zip_records()[1]
        for key, t in weights.items():
            offset = getattr(t.untyped_storage(), "_checkpoint_offset", None) if isinstance(t, torch.Tensor) else None
            record = records.get(int(offset)) if offset is not None else None
            if record is not None and record[1] and t.untyped_storage().nbytes() > record[0]:
                raise self._oversized(str(key), t.untyped_storage().nbytes(), record[0])

    def _oversized(self, key: str, nbytes: int, size: int) -> SourceError:
        return SourceError(
            f"corrupt checkpoint: the storage of tensor {key!r} needs {nbytes} bytes but its record in the archive holds {size}",
            where=str(self.path),
        )

    def _zip_records(self) -> tuple[bool, dict[int, tuple[int, bool]]]:
        """(byte order differs, data offset -> (size, stored uncompressed)) of the archive's records.

        Read once, on the first :meth:`span`: a span is trusted only where it lies inside
        the record it claims, so a checkpoint whose pickle lies about a storage's size is
        an error rather than a read of other records' bytes.
        """
        if not hasattr(self, "_records"):
            try:
                self._records = _zip_table(self.path)
            except Exception as exc:  # noqa: BLE001 - zipfile on corrupt bytes raises many types
                raise SourceError(f"corrupt zip archive: {_first_line(exc)}", where=str(self.path)) from None
        return self._records

    def release(self) -> None:
        self._tensors = None


class _TorchScriptReader(_Reader):
    """A TorchScript archive, read with torch.jit.load (runs code: trusted only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch.jit raises many types
            message = f"torch.jit.load cannot read it: {type(exc).__name__}: {_first_line(exc)}"
            raise SourceError(message, where=str(path)) from None
        self._tensors = dict(module.state_dict())
        self.meta = _tensors_meta(self._tensors)
        self.entries = {}
        self.notes = ["TorchScript archive: loaded with torch.jit.load (runs its code) because trust_pickle is set"]

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def release(self) -> None:
        """The tensors were read at open: nothing to release."""


class _ZipLayout(NamedTuple):
    """Where a torch zip archive's records sit, from one pass over their local headers."""

    foreign: bool  # its byte order differs from this machine's
    records: dict[int, tuple[int, bool]]  # data offset -> (size, stored uncompressed)
    data: dict[str, int]  # record name -> data offset


def _zip_layout(z: zipfile.ZipFile, path: Path) -> _ZipLayout:
    """The layout of the archive ``z`` opened from ``path`` (each local header read once)."""
    import mmap

    records: dict[int, tuple[int, bool]] = {}
    data: dict[str, int] = {}
    foreign = False
    local = struct.Struct("<4s22xHH").unpack_from  # signature, name and extra field lengths
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:  # 30 bytes a record, no syscall each
        for info in z.infolist():
            at = info.header_offset
            if not 0 <= at <= len(m) - 30 or (head := local(m, at))[0] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"no local header for {info.filename!r} at byte {at}")
            start = at + 30 + head[1] + head[2]
            records[start] = (info.file_size, info.compress_type == zipfile.ZIP_STORED)
            data[info.filename] = start
            if info.filename.endswith("/byteorder"):
                foreign = z.read(info).decode() != sys.byteorder
    return _ZipLayout(foreign, records, data)


def _layout_or_error(z: zipfile.ZipFile, path: Path) -> _ZipLayout:
    try:
        return _zip_layout(z, path)
    except Exception as exc:  # noqa: BLE001 - zipfile on corrupt bytes raises many types
        raise SourceError(f"corrupt zip archive: {_first_line(exc)}", where=str(path)) from None


def _zip_table(path: Path) -> tuple[bool, dict[int, tuple[int, bool]]]:
    """Whether a torch zip archive's byte order differs from ours, and where each record's data sits."""
    with zipfile.ZipFile(path) as z:
        layout = _zip_layout(z, path)
    return layout.foreign, layout.records


def _zip_kind(path: Path) -> str:
    """``"torch-zip"`` or ``"torchscript"`` for a zip archive; SourceError for others."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except Exception as exc:  # noqa: BLE001 - zipfile on corrupt bytes: BadZipFile, NotImplementedError, UnicodeDecodeError...
        message = f"looks like a torch.save zip archive but is truncated or corrupt ({exc})"
        raise SourceError(message, where=str(path)) from None
    inner = {name.split("/", 1)[-1] for name in names}
    if "constants.pkl" in inner or any(name.startswith("code/") for name in inner):
        return "torchscript"
    if "data.pkl" not in inner:
        message = f"is a zip archive but not a torch.save checkpoint (no data.pkl in it); expected {ACCEPTED_FORMATS}"
        raise SourceError(message, where=str(path))
    return "torch-zip"
