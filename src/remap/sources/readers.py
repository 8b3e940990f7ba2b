"""Reading sources: names, shapes and dtypes first, tensor data one key at a time.

:func:`open_source` accepts a checkpoint path (torch.save file, safetensors file, sharded
``*.index.json`` or a folder holding one), a Hugging Face repo already in the local hub
cache (``hf://org/name@revision``), an in-memory state_dict, a mapping of key -> shape
(metadata only), or a model factory ``{"model": "module.path:callable"}``. The
:class:`Source` it returns gives the planner ``meta`` without reading any tensor data;
the engine then calls :meth:`Source.read` for each key it needs.

>>> import torch
>>> src = open_source({"fc.weight": torch.zeros(2, 3)})
>>> src.meta
{'fc.weight': TensorMeta(shape=(2, 3), dtype='float32')}
>>> src.read("fc.weight").shape
torch.Size([2, 3])

Every failure is a :class:`~remap.errors.SourceError` (exit code 3) whose message names
the file (and key) and says what was found and what was expected.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import pickle
import re
import reprlib
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import is_
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SourceError, TargetError, UsageError
from .factories import build, describe_call
from ..collector import collector_paused
from ..files import file_kind, read_text_capped, require_regular
from ..meta import TensorMeta, itemsize, meta_of_tensor, source_meta
from .registry import FORMATS, detect, open_format

if TYPE_CHECKING:
    import torch
else:

    class _Torch:
        """``torch``, imported on first use: a safetensors header, an index or a hub folder
        is read without it, so ``remap inspect`` of such a file never pays for importing torch."""

        def __getattr__(self, name: str) -> Any:
            import torch as real

            globals()["torch"] = real
            return getattr(real, name)

    torch = _Torch()

__all__ = [
    "Source", "open_source", "CANDIDATE_KEYS", "FOLDER_FILES", "ACCEPTED_FORMATS", "PICKLE_ALLOW_LIST",
    "HubRef", "parse_hub_ref", "hf_cache_dir",
]  # fmt: skip

#: Names under which checkpoints commonly nest their weights, searched two levels deep.
CANDIDATE_KEYS = (
    "state_dict", "model", "model_state", "model_state_dict", "module", "ema", "model_ema",
    "state_dict_ema", "net", "network", "params", "weights",
)  # fmt: skip
#: What a folder is searched for, in order.
FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
ACCEPTED_FORMATS = (
    "a torch.save file (.pt .pth .bin .ckpt .tar), a .safetensors file, "
    "a sharded *.safetensors.index.json or *.bin.index.json, or a folder holding one"
)
_TRUST_HINT = "`source.trust_pickle: true` in the rules or `--trust-pickle` on the command line"
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64", "C128": "complex128",
}  # fmt: skip
_FACTORY_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_SHORT = 80  # longest repr kept in description["entries"]


# ---------------------------------------------------------------------------- helpers


def _describe(kind: str, **fields: Any) -> dict[str, Any]:
    """The description every source carries, with every field present."""
    out: dict[str, Any] = {
        "kind": kind, "path": None, "format": None, "key": None, "key_detected": False,
        "files": 0, "factory": None, "entries": {}, "notes": [], "folder": None,
    }  # fmt: skip
    out.update(fields)
    return out


def _did_you_mean(name: str, options: Any) -> str:
    """``"; did you mean 'fc.weight'?"`` or ``""``."""
    matches = difflib.get_close_matches(name, [str(o) for o in options], n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""


def _plural(n: int, one: str, many: str | None = None) -> str:
    """``_plural(1, "tensor")`` -> ``"1 tensor"``; ``_plural(3, "entry", "entries")`` -> ``"3 entries"``."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _tensor_meta(tensor: torch.Tensor) -> TensorMeta:
    """TensorMeta of a tensor; dtypes the planner does not know keep torch's name."""
    try:
        return meta_of_tensor(tensor)
    except UsageError:
        return TensorMeta(tuple(int(d) for d in tensor.shape), str(tensor.dtype).removeprefix("torch."))


def _is_tensor(value: Any) -> bool:
    """``isinstance(value, torch.Tensor)``, without importing torch: before it is imported, nothing is a tensor."""
    loaded = sys.modules.get("torch")
    return loaded is not None and isinstance(value, loaded.Tensor)


def _is_module(value: Any) -> bool:
    """``isinstance(value, torch.nn.Module)``, without importing torch."""
    loaded = sys.modules.get("torch")
    return loaded is not None and isinstance(value, loaded.nn.Module)


def _count_tensors(value: Any, depth: int = 0) -> int:
    if _is_tensor(value):
        return 1
    if _is_module(value):
        return len(value.state_dict())
    if depth >= 4:
        return 0
    if isinstance(value, Mapping):
        return sum(_count_tensors(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_count_tensors(v, depth + 1) for v in value)
    return 0


def _short(value: Any) -> str:
    """A bounded, JSON-able summary of a non-weights checkpoint entry.

    >>> _short({"lr": 0.1})
    "{'lr': 0.1}"
    """
    if _is_tensor(value):
        return f"tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if _is_module(value):
        return f"{type(value).__name__} module, {_plural(_count_tensors(value), 'tensor')}"
    if isinstance(value, (Mapping, list, tuple)):
        n = _count_tensors(value)
        if n:
            return f"{type(value).__name__} of {_plural(len(value), 'entry', 'entries')}, {_plural(n, 'tensor')}"
    text = _safe_repr(value)
    return text if len(text) <= _SHORT else text[: _SHORT - 1] + "…"


class _BoundedRepr(reprlib.Repr):
    """``repr`` that a hostile value cannot break: nesting, length and huge integers are bounded."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 6, 6, 6, 6
        self.maxstring, self.maxother, self.maxlong = _SHORT, _SHORT, _SHORT

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # repr of a 5000-digit int raises ValueError (sys.set_int_max_str_digits)
            return f"<an integer of {x.bit_length()} bits>"
        return super().repr_int(x, level)

    def repr_instance(self, x: Any, level: int) -> str:
        if isinstance(x, dict):  # OrderedDict, Counter: bounded like a dict
            return f"{type(x).__name__}({self.repr_dict(x, level)})"
        if type(x).__name__ == "Namespace" and isinstance(getattr(x, "__dict__", None), dict):
            items = list(vars(x).items())
            inner = [f"{k}={self.repr1(v, level - 1)}" for k, v in items[: self.maxdict]]
            return f"Namespace({', '.join(inner)}{', ...' if len(items) > self.maxdict else ''})"
        try:
            text = repr(x)
        except Exception:  # noqa: BLE001 - a repr that fails says so instead of failing the load
            return f"<{type(x).__name__} that cannot be shown>"
        return text if len(text) <= self.maxother else text[: self.maxother - 1] + "…"


_BOUNDED_REPR = _BoundedRepr()


def _safe_repr(value: Any) -> str:
    """A bounded repr of checkpoint metadata; never raises, never recurses without bound.

    >>> _safe_repr({"a": {"b": {"c": {"d": 1}}}})
    "{'a': {'b': {'c': {...}}}}"
    >>> _safe_repr(10**5000)
    '<an integer of 16610 bits>'
    """
    try:
        return _BOUNDED_REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. a __repr__ of an allowed class failing on odd state
        return f"<{type(value).__name__} that cannot be shown>"


def _kind_of(value: Any) -> str:
    """``"int"``, ``"dict, 62 tensors"``: an entry's type as error messages list it."""
    if _is_tensor(value):
        return "tensor"
    n = _count_tensors(value) if isinstance(value, (Mapping, list, tuple)) or _is_module(value) else 0
    return f"{type(value).__name__}, {_plural(n, 'tensor')}" if n else type(value).__name__


def _list_entries(mapping: Mapping[Any, Any], limit: int = 12) -> str:
    items = [f"{k!r} ({_kind_of(v)})" for k, v in list(mapping.items())[:limit]]
    more = f" and {len(mapping) - limit} more" if len(mapping) > limit else ""
    return ", ".join(items) + more if items else "nothing"


def _stamp(path: Path) -> tuple[int, ...]:
    """What tells a rewritten file from the one that was planned (size, inode, times)."""
    st = path.stat()
    return st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


# ---------------------------------------------------------------------------- nesting


def _as_mapping(value: Any) -> Any:
    """A pickled module stands for its state_dict; anything else is itself."""
    return value.state_dict() if isinstance(value, torch.nn.Module) else value


def _is_weights(value: Any) -> bool:
    """A dict holding tensors, and nothing else but ``*_extra_state`` entries."""
    value = _as_mapping(value)
    if not isinstance(value, Mapping) or not value:
        return False
    has_tensor = False
    for k, v in value.items():
        if isinstance(v, torch.Tensor):
            has_tensor = True
        elif not (isinstance(k, str) and k.endswith("_extra_state")):
            return False
    return has_tensor


def _candidates(obj: Mapping[Any, Any]) -> list[list[str]]:
    """Paths (one or two keys) to dicts of tensors under the usual names."""
    found: list[list[str]] = []
    for k, v in obj.items():
        if k in CANDIDATE_KEYS and _is_weights(v):
            found.append([k])
            continue
        inner = _as_mapping(v)
        if isinstance(inner, Mapping):
            found += [[k, k2] for k2, v2 in inner.items() if k2 in CANDIDATE_KEYS and _is_weights(v2)]
    return found


def _walk(obj: Any, parts: Sequence[str]) -> Any:
    for part in parts:
        obj = _as_mapping(obj)[part]
    return _as_mapping(obj)


def _follow_key(obj: Mapping[Any, Any], key: str) -> list[str]:
    """The entries that ``key`` ("a.b") names; an entry may itself contain dots."""
    parts, taken, cur, i = key.split("."), [], obj, 0
    while i < len(parts):
        cur = _as_mapping(cur)
        if not isinstance(cur, Mapping):
            raise SourceError(
                f"source.key {key!r}: {'.'.join(taken)!r} holds a {type(cur).__name__}, not a dict, "
                f"so it has no entry {parts[i]!r}"
            )
        for j in range(len(parts), i, -1):
            name = ".".join(parts[i:j])
            if name in cur:
                break
        else:
            at = f"under {'.'.join(taken)!r}" if taken else "at the top level"
            raise SourceError(
                f"source.key {key!r}: no entry {parts[i]!r} {at}; found {_list_entries(cur)}"
                f"{_did_you_mean(parts[i], cur.keys())}"
            )
        taken.append(name)
        cur, i = cur[name], j
    return taken


def _locate(obj: Any, key: str | None) -> tuple[Mapping[Any, Any], list[str], bool]:
    """Find the weights dict in a loaded checkpoint: (weights, path taken, auto-detected).

    >>> import torch
    >>> _locate({"model": {"w": torch.ones(1)}, "epoch": 3}, None)[1:]
    (['model'], True)
    """
    top = _as_mapping(obj)
    if not isinstance(top, Mapping):
        raise SourceError(
            f"holds a {type(obj).__name__}, expected a dict of tensors (a state_dict) or a checkpoint dict holding one"
        )
    if key is not None:
        parts = _follow_key(top, key)
        weights = _walk(top, parts)
        if not isinstance(weights, Mapping):
            raise SourceError(f"source.key {key!r} holds a {type(weights).__name__}, expected a dict of tensors")
        if not any(isinstance(v, torch.Tensor) for v in weights.values()):
            raise SourceError(
                f"source.key {key!r} holds a dict with no tensors directly in it; found {_list_entries(weights)}"
            )
        return weights, parts, False
    if _is_weights(top):
        return top, [], False
    found = _candidates(top)
    tensors = sum(isinstance(v, torch.Tensor) for v in top.values())
    if not found and tensors > len(top) - tensors:  # mostly tensors, plus a few other entries
        return top, [], False
    if len(found) == 1:
        return _walk(top, found[0]), found[0], True
    if found:
        names = [f"{'.'.join(p)!r} ({_plural(len(_tensors_meta(_walk(top, p))), 'tensor')})" for p in found]
        raise SourceError(
            f"the checkpoint holds several sets of weights: {', '.join(names[:-1])} and {names[-1]}; "
            f"say which to load with `source.key` (e.g. `key: {'.'.join(found[0])}`)"
        )
    if not top:
        raise SourceError("the checkpoint is an empty dict: it holds no tensors")
    best = max(top, key=lambda k: _count_tensors(top[k]))
    example = f" (e.g. `key: {best}`)" if _count_tensors(top[best]) else ""
    raise SourceError(
        f"no weights found: no entry named {', '.join(CANDIDATE_KEYS)} (searched two levels deep) is a dict "
        f"of tensors; the checkpoint's top-level entries are {_list_entries(top)}. "
        f"Say where the weights are with `source.key`{example}"
    )


def _entries(obj: Any, parts: Sequence[str]) -> dict[str, str]:
    """Short reprs of the checkpoint's top-level entries that are not the weights."""
    top = _as_mapping(obj)
    if not isinstance(top, Mapping):
        return {}
    if not parts:
        return {str(k): _short(v) for k, v in top.items() if not isinstance(v, torch.Tensor)}
    return {str(k): _short(v) for k, v in top.items() if k != parts[0]}


def _tensors_meta(weights: Mapping[Any, Any]) -> dict[str, TensorMeta]:
    return {str(k): _tensor_meta(v) for k, v in weights.items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------- Source


@dataclass(frozen=True)
class Span:
    """Where one tensor's bytes sit in a file, for zero-copy reads through ``mmap``.

    ``offset`` and ``nbytes`` delimit the tensor's storage; the tensor is the view
    ``(shape, stride, storage_offset)`` of that storage, in elements of ``dtype``.
    """

    path: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int = 0


class Source:
    """Tensor metadata of a source, and its tensors one at a time.

    ``meta`` maps every tensor key to its :class:`TensorMeta`, in file order;
    ``description`` says what was opened (JSON-able). Use as a context manager or call
    :meth:`close` to release open files.

    >>> with open_source({"w": ([2], "float16")}) as src:
    ...     src.description["kind"], src.meta["w"].dtype
    ('metadata', 'float16')
    """

    def __init__(self, meta: dict[str, TensorMeta], description: dict[str, Any], where: str) -> None:
        self.meta = meta
        self.description = description
        self._where = where

    def read(self, key: str) -> torch.Tensor:
        """Materialise the tensor ``key`` on the CPU."""
        if key not in self.meta:
            raise SourceError(
                f"no tensor {key!r} in this source ({len(self.meta)} tensors){_did_you_mean(key, self.meta)}",
                where=self._where,
            )
        return self._read(key)

    def _read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def span(self, key: str) -> Span | None:
        """Where ``key``'s bytes sit in a file, when they can be mapped without a copy."""
        return None

    def check_unchanged(self) -> None:
        """SourceError when a file changed on disk since its metadata was read."""

    @property
    def requires_grad(self) -> dict[str, bool] | None:
        """Each saved parameter's requires_grad, where the format keeps it (a whole-model
        pickle, a TorchScript archive); None for sources that do not (a state_dict)."""
        return None

    def close(self) -> None:
        """Release open files and loaded data; ``meta`` stays usable."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        d = self.description
        at = d["path"] or d["factory"] or "<memory>"
        return f"<Source {d['kind']} {d['format'] or ''} {at} ({len(self.meta)} tensors)>".replace("  ", " ")


def _not_loadable(value: Any) -> str | None:
    """Why a tensor cannot be loaded into a module's dense parameters, or None when it can."""
    if not isinstance(value, torch.Tensor):
        return None
    if value.is_quantized:
        return "is a quantized tensor, which remap cannot load; dequantize it (`t.dequantize()`) first"
    if value.is_nested:
        return "is a nested tensor, which remap cannot load"
    if value.layout != torch.strided:
        return f"is a sparse tensor ({str(value.layout).removeprefix('torch.')}), which remap cannot load; make it dense (`t.to_dense()`)"
    return None


class _StateDictSource(Source):
    def __init__(self, tensors: Mapping[str, torch.Tensor], description: dict[str, Any]) -> None:
        for key, tensor in tensors.items():
            problem = _not_loadable(tensor)
            if problem:
                raise SourceError(f"tensor {key!r} {problem}", where="source (state_dict)")
        super().__init__(_tensors_meta(tensors), description, "source (state_dict)")
        self._tensors = tensors

    def _read(self, key: str) -> torch.Tensor:
        tensor = self._tensors[key]
        if tensor.device.type == "meta":
            raise SourceError(f"tensor {key!r} is on the meta device: it has no data to load", where=self._where)
        return tensor


class _MetadataSource(Source):
    def _read(self, key: str) -> torch.Tensor:
        raise SourceError(
            f"cannot read {key!r}: this source is metadata only (shapes and dtypes), it has no tensor data",
            where=self._where,
        )


class _FactorySource(Source):
    """A model built on the meta device for metadata, and for real on the first read."""

    def __init__(self, spec: str | Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        self._call = (spec, list(args), dict(kwargs))
        where = f"source.model {describe_call(spec, args, kwargs)}"
        notes, self._state = [], None
        try:
            state = self._state_dict(device="meta")
        except SourceError as exc:  # some factories cannot run on the meta device: build for real
            state = self._state = self._state_dict()
            notes.append(f"built for real: it failed on the meta device ({exc.message})")
        name = spec if isinstance(spec, str) else describe_call(spec).removesuffix("()")
        super().__init__(_tensors_meta(state), _describe("factory", factory=name, args=list(args), kwargs=dict(kwargs), notes=notes), where)

    def _state_dict(self, device: str | None = None) -> dict[str, Any]:
        spec, args, kwargs = self._call
        try:
            module = build(spec, args, kwargs, what="source.model", device=device)
        except TargetError as exc:
            raise SourceError(exc.message, where=exc.where) from exc.__cause__
        if not callable(getattr(module, "state_dict", None)):
            raise SourceError(
                f"{describe_call(spec, args, kwargs)} returned a {type(module).__name__}, expected a torch.nn.Module",
                where="source.model",
            )
        if device is None:
            self.module = module  # the real model whose weights this source serves (for verify)
        return dict(module.state_dict())

    def _read(self, key: str) -> torch.Tensor:
        if self._state is None:
            state = self._state_dict()
            real = _tensors_meta(state)
            if real != self.meta:
                diff = sorted(k for k in {*real, *self.meta} if real.get(k) != self.meta.get(k))
                raise SourceError(
                    "built for real, the model's state_dict differs from the one built on the meta device, "
                    f"at {', '.join(map(repr, diff[:5]))}",
                    where=self._where,
                )
            self._state = state
        return self._state[key]

    def close(self) -> None:
        self._state = None


class _FileSource(Source):
    """One or more files (shards); at most one of them holds open data at a time."""

    def __init__(self, readers: dict[str, _Reader], meta: dict[str, TensorMeta], description: dict[str, Any],
                 where: str) -> None:  # fmt: skip
        super().__init__(meta, description, where)
        self._owner = readers  # key -> reader of the file holding it
        self._active: _Reader | None = None

    def span(self, key: str) -> Span | None:
        return self._owner[key].span(key)

    def check_unchanged(self) -> None:
        for reader in {id(r): r for r in self._owner.values()}.values():
            if hasattr(reader, "_stamp"):
                reader._check_unchanged()

    @property
    def requires_grad(self) -> dict[str, bool] | None:
        flags = [getattr(r, "requires_grad", None) for r in {id(r): r for r in self._owner.values()}.values()]
        return None if not flags or None in flags else {k: v for f in flags for k, v in f.items() if k in self.meta}

    def _read(self, key: str) -> torch.Tensor:
        reader = self._owner[key]
        if reader is not self._active:
            if self._active is not None:
                self._active.release()
            self._active = reader
        return reader.read(key)

    def close(self) -> None:
        if self._active is not None:
            self._active.release()
            self._active = None


# ---------------------------------------------------------------------------- file readers


class _Reader:
    """One file: ``meta`` at construction, data on the first :meth:`read`."""

    path: Path
    meta: dict[str, TensorMeta]
    entries: dict[str, str]

    def read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def span(self, key: str) -> Span | None:
        return None

    def release(self) -> None:
        raise NotImplementedError

    def _check_unchanged(self) -> None:
        try:
            now = _stamp(self.path)
        except OSError as exc:
            raise SourceError(f"cannot read it any more: {exc.strerror or exc}", where=str(self.path)) from None
        if now != self._stamp:
            raise SourceError("the file changed on disk since its metadata was read; plan again", where=str(self.path))

    def _fail_read(self, key: str, exc: Exception) -> SourceError:
        return SourceError(f"cannot read tensor {key!r}: {type(exc).__name__}: {_first_line(exc)}", where=str(self.path))


#: safetensors' own limit on the JSON header; a longer one is refused before it is read.
MAX_SAFETENSORS_HEADER = 100_000_000


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` refusing a JSON object that names one key twice."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"the key {k!r} appears twice")
        out[k] = v
    return out


def _check_names(names: Iterable[Any], what: str, where: str) -> None:
    """Every tensor name is text that can be written out (no lone surrogate such as ``"\\ud800"``)."""
    for name in names:
        if isinstance(name, str):
            try:
                name.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise SourceError(
                    f"{what} has a name that is not valid Unicode (a lone surrogate {name[exc.start]!a} at position "
                    f"{exc.start} of {name!a})",
                    where=where,
                ) from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _header_entry(key: str, info: Any, where: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype code, shape, start, stop) of one header entry, every field checked."""
    expected = 'expected {"dtype": "F32", "shape": [d, ...], "data_offsets": [start, stop]}'
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise SourceError(f"tensor {key!r}: malformed header entry {_short(info)}, {expected}", where=where)
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in _SAFETENSORS_DTYPES:
        raise SourceError(
            f"tensor {key!r} has dtype {_short(code)}, which remap cannot read; known: {', '.join(_SAFETENSORS_DTYPES)}",
            where=where,
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SourceError(f"tensor {key!r}: shape {_short(shape)} is not a list of non-negative integers", where=where)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise SourceError(
            f"tensor {key!r}: data_offsets {_short(offsets)} is not a pair of non-negative integers [start, stop]",
            where=where,
        )
    start, stop = offsets
    if stop < start:
        raise SourceError(f"tensor {key!r}: data_offsets [{start}, {stop}] end before they start", where=where)
    nbytes = math.prod(shape) * itemsize(_SAFETENSORS_DTYPES[code])
    if stop - start != nbytes:
        raise SourceError(
            f"tensor {key!r}: shape {list(shape)} of {code} is {nbytes} bytes, but data_offsets [{start}, {stop}] "
            f"hold {stop - start}",
            where=where,
        )
    return code, tuple(shape), start, stop


def _known_entry(info: Any, known: Mapping[tuple[str, tuple[int, ...]], tuple[TensorMeta, int]]) -> tuple[TensorMeta, int, int] | None:
    """(meta, start, stop) of a header entry whose dtype and shape were already checked
    (in ``known``) and whose data_offsets hold exactly that many bytes; None for anything
    else, which :func:`_header_entry` then checks (and names what is wrong)."""
    if type(info) is not dict or len(info) != 3:
        return None
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    try:
        found = known.get((info.get("dtype"), tuple(shape)))  # type: ignore[arg-type]
    except TypeError:  # an unhashable dimension: not a shape
        return None
    start, stop = offsets
    if found is None or type(start) is not int or type(stop) is not int or start < 0 or stop - start != found[1]:
        return None
    if not all(map(is_, map(type, shape), repeat(int))):  # True and 1.0 hash as 1 does; only ints are sizes
        return None
    return found[0], start, stop


def _load_header_json(raw: bytes) -> Any:
    """The parsed header, refusing an object that names a key twice, as
    ``object_pairs_hook=_unique_keys`` does, without calling the hook per object.

    Each key of a valid JSON text is followed by one ``:`` outside strings, so with ``C``
    the colons in the text, ``S`` those inside strings and ``P`` the keys written,
    ``C = P + S``; the parsed objects hold ``K <= P`` keys, fewer exactly when a key was
    written twice (or in an object not counted here). Without backslashes in the text a
    parsed string is its text, so colons counted in some parsed strings are at most
    ``S``; ``C - that == K`` then proves ``K == P``: no duplicate. Anything else (a
    backslash and a colon in a string, objects nested deeper than an entry, a parse error)
    parses again with the hook, which raises the same errors it always did.
    """
    text = raw.decode("utf-8")
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    if type(parsed) is dict and _no_duplicates(raw, parsed):
        return parsed
    return json.loads(text, object_pairs_hook=_unique_keys)


def _no_duplicates(raw: bytes, header: dict[str, Any]) -> bool:
    """Whether the colons of ``raw`` account for every key of ``header`` and its objects'
    keys, so that no key of them was written twice (see :func:`_load_header_json`)."""
    values = [v for v in header.values() if type(v) is dict]
    keys = len(header) + sum(map(len, values))
    colons = raw.count(b":")
    if colons == keys:
        return True
    if b"\\" in raw:
        return False
    in_names = sum(map(str.count, header, repeat(":")))
    in_values = sum(s.count(":") for v in values for s in v.values() if type(s) is str)
    in_keys = sum(k.count(":") for v in values for k in v)
    return colons - in_names - in_values - in_keys == keys


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str], dict[str, tuple[int, int]]]:
    """:func:`_parse_safetensors_header` with the cyclic garbage collector paused: the
    parsed header is a dict and a list or two per tensor that all live until the entries
    are checked, and the collector would rescan them again and again (half the time of a
    header of a million tensors) while freeing nothing."""
    with collector_paused():
        return _parse_safetensors_header(path)


def _parse_safetensors_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str], dict[str, tuple[int, int]]]:
    """Names, shapes and dtypes from a safetensors header, without touching tensor data.

    The header is checked as strictly as the safetensors library checks it, because the
    engine maps tensor bytes straight from these offsets: every entry well-formed, each
    tensor's byte length equal to its shape times its dtype's size, and the tensors
    tiling the data section exactly (no gap, no overlap, nothing past the end of the file).
    Nothing longer than the file, and no header above :data:`MAX_SAFETENSORS_HEADER`, is read.
    """
    where, size = str(path), path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(
                f"truncated safetensors file: {size} bytes, too short for the 8-byte header length", where=where
            )
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise SourceError(
                f"truncated or not a safetensors file: the header claims {length} bytes but only {size - 8} follow",
                where=where,
            )
        if length > MAX_SAFETENSORS_HEADER:
            raise SourceError(
                f"the safetensors header claims {length} bytes, more than the {MAX_SAFETENSORS_HEADER} safetensors allows",
                where=where,
            )
        raw = f.read(length)
    try:
        header = _load_header_json(raw)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError, as is a duplicate key
        raise SourceError(f"the safetensors header is not valid JSON: {exc}", where=where) from None
    except RecursionError:
        raise SourceError("the safetensors header is not valid JSON: it is nested too deeply", where=where) from None
    if not isinstance(header, dict):
        raise SourceError(f"the safetensors header is a JSON {type(header).__name__}, expected an object", where=where)
    extra = header.pop("__metadata__", None) or {}
    _check_names(header, "the safetensors header", where)
    meta, spans, ranges = {}, {}, []
    known: dict[tuple[str, tuple[int, ...]], tuple[TensorMeta, int]] = {}  # checked (dtype code, shape) -> (meta, bytes)
    for key, info in header.items():
        entry = _known_entry(info, known)
        if entry is None:
            code, shape, start, stop = _header_entry(key, info, where)
            entry_meta = TensorMeta(shape, _SAFETENSORS_DTYPES[code])
            known[(code, shape)] = (entry_meta, stop - start)
        else:
            entry_meta, start, stop = entry
        meta[key] = entry_meta
        spans[key] = (8 + length + start, stop - start)
        ranges.append((start, stop, key))
    end = 0
    for start, stop, key in sorted(ranges):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves bytes {end}..{start} unclaimed"
            raise SourceError(
                f"tensor {key!r}: data_offsets [{start}, {stop}] {what}; the tensors must tile the data section",
                where=where,
            )
        end = stop
    if 8 + length + end > size:
        raise SourceError(
            f"truncated: the tensor data ends at byte {8 + length + end} but the file has {size} bytes", where=where
        )
    if 8 + length + end < size:
        raise SourceError(
            f"the tensor data ends at byte {8 + length + end} but the file has {size} bytes: "
            f"{size - 8 - length - end} trailing bytes belong to no tensor",
            where=where,
        )
    entries = {str(k): _short(v) for k, v in extra.items()} if isinstance(extra, dict) else {}
    return meta, entries, spans


def _open_safetensors(path: Path) -> Any:
    """A ``safe_open`` handle on ``path`` (the only way tensor data is read)."""
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


class _SafetensorsReader(_Reader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = _stamp(path)
        self.meta, self.entries, self._spans = _read_safetensors_header(path)
        self._handle: Any = None

    def span(self, key: str) -> Span | None:
        meta = self.meta[key]
        offset, nbytes = self._spans[key]
        stride = tuple(math.prod(meta.shape[i + 1 :]) for i in range(len(meta.shape)))
        return Span(str(self.path), offset, nbytes, meta.dtype, meta.shape, stride)

    def read(self, key: str) -> torch.Tensor:
        if self._handle is None:
            self._check_unchanged()
            try:
                self._handle = _open_safetensors(self.path)
            except Exception as exc:  # safetensors raises its own error types
                raise self._fail_read(key, exc) from None
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise self._fail_read(key, exc) from None

    def release(self) -> None:
        self._handle = None


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

    def __new__(cls, *args: Any, **kwargs: Any) -> _Named:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> _Named:  # e.g. a method fetched with getattr
        return type(self)(*args)

    def __setitem__(self, key: Any, value: Any) -> None:
        if self.items is None:
            self.items = {}
        self.items[key] = value

    def append(self, value: Any) -> None:
        self.extend([value])

    def extend(self, values: Any) -> None:
        if self.items is None:
            self.items = {}
        for value in values:
            self.items[len(self.items)] = value


class _ScanUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """An unpickler whose globals are :class:`_Named` stand-ins and whose storages are recorded.

    The pure-Python unpickler, whose memo is a dict: CPython's C unpickler zero-fills a memo
    list as long as the largest LONG_BINPUT index, so one flipped bit in a pickle of a few
    KB asked for up to 32 GB. It costs about 2.5x the C one's time (2.1 s against 0.9 s for
    a 100,000-tensor state_dict, whose torch.load then takes 5.2 s).
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="latin1")
        self.storages: list[Any] = []
        self.calls: list[_Named] = []
        self._types: dict[str, type[_Named]] = {}

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in self._types:
            scan = self

            class Stand(_Named):
                def __init__(self, *args: Any, **kwargs: Any) -> None:
                    super().__init__(*args, **kwargs)
                    scan.calls.append(self)

            Stand.name = full
            self._types[full] = Stand
        return self._types[full]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module" and isinstance(pid[1], type):
            return pid[1]  # a legacy file names a pickled module's class so: ('module', cls, source file, source)
        self.storages.append(pid)
        return _Named()


def _scan_pickle(data: Any) -> _ScanUnpickler:
    """Read one pickle from the file object ``data`` with stand-ins for every global."""
    scan = _ScanUnpickler(data)
    scan.result = scan.load()  # type: ignore[attr-defined]
    return scan


def _storage_itemsize(kind: Any) -> int | None:
    """Bytes per element of a pickled storage class (``torch.FloatStorage`` -> 4), None if unknown."""
    name = getattr(kind, "name", "")
    attr = name.rpartition(".")[2]
    if not (name.startswith("torch.") and attr.endswith("Storage")):
        return None
    if attr == "UntypedStorage":
        return 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        dtype = getattr(getattr(torch, attr, None), "dtype", None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None


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
    for pid in scan.storages:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise SourceError(f"corrupt checkpoint: data.pkl names a persistent object {_safe_repr(pid)}, expected a storage")
        _, kind, key, _location, numel = pid
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


def _prescan_zip(path: Path) -> dict[tuple[Any, ...], str]:
    """Check a torch zip archive before torch.load sees it; the tensors that have no data or are not dense."""
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            prefix = infos[0].filename.split("/", 1)[0] if infos else ""
            sizes = {i.filename: i.file_size for i in infos}
            _check_zip_records(z, prefix)
            if f"{prefix}/data.pkl" not in sizes:
                raise SourceError(f"corrupt checkpoint: no record {prefix}/data.pkl")
            with z.open(f"{prefix}/data.pkl") as f:
                scan = _scan_pickle(f)
    except SourceError as exc:
        raise SourceError(exc.message, where=str(path)) from None
    except Exception as exc:  # noqa: BLE001 - zipfile and pickle on hostile bytes raise many types
        raise SourceError(f"corrupt checkpoint: data.pkl cannot be read: {_pickle_problem(exc)}", where=str(path)) from None
    _check_storages_named(scan, sizes, prefix, path)
    return _scanned(scan, str(path))


def _check_storages_named(scan: _ScanUnpickler, sizes: Mapping[str, int], prefix: str, path: Path) -> None:
    try:
        _check_zip_storages(scan, sizes, prefix)
    except SourceError as exc:
        raise SourceError(exc.message, where=str(path)) from None


def _scanned(scan: _ScanUnpickler, where: str) -> dict[tuple[Any, ...], str]:
    _check_arrays(scan, where)
    found = _flagged(scan.result)  # type: ignore[attr-defined]
    _refuse_unreadable(found, where)
    return found


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
        found = _prescan_zip(path) if fmt == "torch-zip" else _prescan_legacy(path)
        try:
            obj = _torch_load(path, meta=True, weights_only=True, mmap=False)
        except _PickleRefused:
            if not trust_pickle:
                raise
            warnings.warn(
                f"{path}: loaded with torch.load(weights_only=False) because trust_pickle is set; "
                "unpickling runs code from the file",
                UserWarning,
                stacklevel=5,
            )
            self._weights_only = False
            self.notes.append("trusted pickle: loaded with weights_only=False")
            obj = _torch_load(path, meta=True, weights_only=False, mmap=False)
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
        self._tensors: Mapping[Any, Any] | None = None

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


# ---------------------------------------------------------------------------- formats


def _sniff(path: Path) -> str:
    """``"torch-zip"``, ``"torch-legacy"``, ``"safetensors"`` or a registered format's name
    (:mod:`remap.sources.registry`: ONNX, NumPy, GGUF, Keras) from a file's first bytes."""
    size = path.stat().st_size
    if size == 0:
        raise SourceError(f"the file is empty (0 bytes); expected {ACCEPTED_FORMATS}", where=str(path))
    with open(path, "rb") as f:
        head = f.read(512)
    registered = detect(head, path)  # before the zip test: .npz and .keras files are zip archives too
    if registered is not None:
        return registered.name
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5) or head[257:262] == b"ustar":
        return "torch-legacy"
    raise SourceError(  # the bytes themselves are not shown: the file may be anything (a link to a secret)
        f"not a checkpoint remap can read: its first bytes are neither a zip archive (torch.save), a pickle "
        f"(legacy torch.save) nor a safetensors header; expected {ACCEPTED_FORMATS}",
        where=str(path),
    )


def _zip_table(path: Path) -> tuple[bool, dict[int, tuple[int, bool]]]:
    """Whether a torch zip archive's byte order differs from ours, and where each record's data sits."""
    records: dict[int, tuple[int, bool]] = {}
    foreign = False
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                raise zipfile.BadZipFile(f"no local header for {info.filename!r} at byte {info.header_offset}")
            start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
            records[start] = (info.file_size, info.compress_type == zipfile.ZIP_STORED)
            if info.filename.endswith("/byteorder"):
                foreign = z.read(info).decode() != sys.byteorder
    return foreign, records


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


def _open_reader(path: Path, *, key: str | None, trust_pickle: bool) -> tuple[_Reader, str]:
    """Open one file by its content: (reader, format)."""
    require_regular(path, error=SourceError, what="checkpoints")
    fmt = _sniff(path)
    registered = next((f for f in FORMATS if f.name == fmt), None)
    if registered is not None:
        reader = open_format(registered, path, key=key, trust_pickle=trust_pickle)
        return reader, getattr(reader, "format", fmt)  # a format module may name a variant (npy, keras-h5)
    if fmt == "safetensors":
        if key is not None:
            raise SourceError(
                f"source.key {key!r} applies only to torch.save checkpoints; a safetensors file holds its tensors "
                "at the top level, so leave `key` out",
                where=str(path),
            )
        return _SafetensorsReader(path), fmt
    if fmt == "torch-zip" and _zip_kind(path) == "torchscript":
        from .torchscript_reader import open_torchscript  # its module tree, read without running its code

        inert = open_torchscript(path, key=key, trust_pickle=trust_pickle)
        if inert is not None:
            return inert, "torchscript"
        if key is not None:
            raise SourceError(f"source.key {key!r} does not apply to a TorchScript archive; leave `key` out", where=str(path))
        warnings.warn(f"{path}: TorchScript archive loaded with torch.jit.load because trust_pickle is set", stacklevel=4)
        return _TorchScriptReader(path), "torchscript"
    try:
        return _TorchReader(path, fmt, key=key, trust_pickle=False), fmt
    except _PickleRefused as refused:  # a whole-model pickle is read without running it, when it is one
        from .pickled_module import open_module_pickle

        inert = open_module_pickle(path, fmt, key=key, trust_pickle=trust_pickle, refused=refused)
        if inert is not None:
            return inert, inert.format
    return _TorchReader(path, fmt, key=key, trust_pickle=True), fmt


def _format_path(path: Path) -> Path | None:
    """The file that a registered format's ``resolve_path`` finds at ``path`` (a folder, or a
    path that is no file), or None: a TensorFlow checkpoint's prefix (``ckpt`` for
    ``ckpt.index``), a SavedModel folder. Asked only where remap's own rules find nothing."""
    from importlib.util import find_spec

    for fmt in FORMATS:
        resolve = getattr(fmt.load(), "resolve_path", None) if find_spec(fmt.module) is not None else None
        found = resolve(path) if resolve is not None else None
        if found is not None:
            return found
    return None


def _resolve_folder(folder: Path) -> Path:
    """The file in ``folder`` that holds the weights (see :data:`FOLDER_FILES`)."""
    for p in sorted(folder.iterdir()):
        if p.name.endswith((".json", *WEIGHT_SUFFIXES)) and file_kind(p) not in (None, "missing", "a folder"):
            raise SourceError(f"{p.name} is {file_kind(p)}, not a regular file: remap reads checkpoints only from regular files",
                              where=str(folder))
    for name in FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file())
    indexes = [p for p in files if p.name.endswith(".index.json")]
    for group in (indexes, [p for p in files if p.suffix in WEIGHT_SUFFIXES]):
        if len(group) == 1:
            return group[0]
        if group:
            break
    found = _format_path(folder)  # a format's own layout: a SavedModel, a folder of TensorFlow checkpoints
    if found is not None:
        return found
    listing = ", ".join(p.name for p in files[:10]) + (f" and {len(files) - 10} more" if len(files) > 10 else "")
    raise SourceError(
        f"cannot tell which file in this folder holds the weights: found {listing or 'no files'}; expected one of "
        f"{', '.join(FOLDER_FILES)}, or exactly one *.index.json, *.safetensors, *.pt, *.pth, *.bin or *.ckpt file",
        where=str(folder),
    )


#: The largest index remap reads (the index of a 1T-parameter model is a few MB).
MAX_INDEX_BYTES = 100_000_000


def _load_index(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """An index's shards in order of first appearance, each with its keys; other entries."""
    text = read_text_capped(path, limit=MAX_INDEX_BYTES, error=SourceError, what="a sharded checkpoint index")
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError as exc:  # JSONDecodeError, a key named twice, an integer of more than 4300 digits
        raise SourceError(f"not a valid JSON index: {exc}", where=str(path)) from None
    except RecursionError:
        raise SourceError("not a valid JSON index: it is nested too deeply", where=str(path)) from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SourceError(
            "not a sharded checkpoint index: expected a JSON object with a `weight_map` of tensor name -> shard file",
            where=str(path),
        )
    _check_names([*weight_map, *weight_map.values()], "the weight_map", str(path))
    shards: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        shards.setdefault(shard, []).append(key)
    return shards, {str(k): _short(v) for k, v in data.items() if k != "weight_map"}


def _hub_blobs(folder: Path) -> Path | None:
    """The ``blobs`` folder of the Hugging Face cache repo whose snapshot holds ``folder``, or None.

    A cache snapshot (``models--org--name/snapshots/<rev>/...``) is a tree of symlinks into
    that repo's ``blobs/``: the one layout in which a shard may lie outside the index's folder.
    """
    for at in (folder, *folder.parents):
        repo = at.parent.parent
        if at.parent.name == "snapshots" and re.match(r"^(models|datasets|spaces)--.", repo.name):
            return repo / "blobs"
    return None


def _refuse_escaping_link(shard: str, shard_path: Path, index: Path) -> None:
    """A shard that a symlink (of the file or of a folder on its way) takes outside the index's folder is refused."""
    base, real = index.parent.resolve(), shard_path.resolve()
    if real.is_relative_to(base):
        return
    blobs = _hub_blobs(base)
    if blobs is not None and real.parent == blobs:
        return
    raise SourceError(
        f"shard {shard!r} is a symbolic link (or lies under one) that leads outside the index's folder, to {real}; "
        "an index names shard files in its own folder. If you trust this layout, say so with --trust-links "
        "(`source.trust_links: true` in the rules, trust_links=True in Python)",
        where=str(index),
    )


def _open_index(path: Path, *, key: str | None, trust_pickle: bool, folder: Path | None, trust_links: bool = False) -> Source:
    """A sharded checkpoint: only the shards' headers are read here."""
    if key is not None:
        raise SourceError(f"source.key {key!r} does not apply to a sharded checkpoint; leave `key` out", where=str(path))
    shards, entries = _load_index(path)
    owner: dict[str, _Reader] = {}
    meta: dict[str, TensorMeta] = {}
    formats, notes = set(), []
    for shard, keys in shards.items():
        shard_path = path.parent / shard
        if Path(shard).is_absolute() or ".." in Path(shard).parts:  # an index names files beside it, nothing else
            raise SourceError(
                f"shard {shard!r} (holding {len(keys)} tensors, e.g. {keys[0]!r}) lies outside the index's folder; "
                "an index names shard files in its own folder",
                where=str(path),
            )
        kind = file_kind(shard_path)
        if kind == "missing":
            raise SourceError(
                f"shard {shard!r} (holding {len(keys)} tensors, e.g. {keys[0]!r}) is missing: no file {shard_path}",
                where=str(path),
            )
        if kind is not None:
            raise SourceError(
                f"shard {shard!r} (holding {len(keys)} tensors, e.g. {keys[0]!r}) is {kind}, not a regular file",
                where=str(path),
            )
        if not trust_links:
            _refuse_escaping_link(shard, shard_path, path)
        try:
            reader, fmt = _open_reader(shard_path, key=None, trust_pickle=trust_pickle)
        except SourceError as exc:
            raise SourceError(f"shard {shard!r}: {exc}", where=str(path)) from None
        formats.add(fmt)
        notes += [n for n in getattr(reader, "notes", []) if n not in notes]
        for k in keys:
            if k not in reader.meta:
                raise SourceError(
                    f"the weight_map puts {k!r} in shard {shard!r}, but that shard holds no such tensor"
                    f"{_did_you_mean(k, reader.meta)}",
                    where=str(path),
                )
            owner[k], meta[k] = reader, reader.meta[k]
    fmt = "safetensors-index" if formats <= {"safetensors"} else "torch-index"
    desc = _describe("file", path=str(path), format=fmt, files=len(shards), entries=entries, notes=notes,
                     folder=str(folder) if folder else None)  # fmt: skip
    return _FileSource(owner, meta, desc, str(path))


def _open_path(path: Path, *, key: str | None, trust_pickle: bool, trust_links: bool = False) -> Source:
    folder = None
    if not path.exists() and (found := _format_path(path)) is not None:
        path = found  # a TensorFlow checkpoint's prefix names its .index
    if not path.exists():
        raise SourceError(f"no such file or folder; expected {ACCEPTED_FORMATS}", where=str(path))
    try:
        if path.is_dir():
            folder, path = path, _resolve_folder(path)
        if path.name.endswith(".json"):
            return _open_index(path, key=key, trust_pickle=trust_pickle, folder=folder, trust_links=trust_links)
        reader, fmt = _open_reader(path, key=key, trust_pickle=trust_pickle)
    except OSError as exc:  # permissions, a folder where a file was expected, I/O errors
        raise SourceError(f"cannot read it: {exc.strerror or exc}", where=str(exc.filename or path)) from None
    parts = getattr(reader, "parts", [])
    desc = _describe(
        "file", path=str(path), format=fmt, files=1, entries=reader.entries, notes=list(getattr(reader, "notes", [])),
        key=".".join(parts) or None, key_detected=bool(getattr(reader, "detected", False)),
        folder=str(folder) if folder else None,
    )  # fmt: skip
    return _FileSource(dict.fromkeys(reader.meta, reader), dict(reader.meta), desc, str(path))


# ---------------------------------------------------------------------------- Hugging Face cache

#: How a source names a Hugging Face repo explicitly: ``hf://org/name[@revision]`` (timm writes ``hf-hub:``).
HUB_PREFIXES = ("hf://", "hf-hub:")
HUB_EXTRA = "pip install 'remap[hub]'"
_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+(?:/[\w.-]+)*))?$")
_HASH_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    """A Hugging Face model repo and revision, as a source names it.

    >>> parse_hub_ref("hf://timm/resnet18.a1_in1k@main")
    HubRef(repo='timm/resnet18.a1_in1k', revision='main', text='hf://timm/resnet18.a1_in1k@main')
    """

    repo: str
    revision: str
    text: str


def parse_hub_ref(text: str) -> HubRef | None:
    """The repo a source string names: ``hf://org/name[@rev]`` (or ``hf-hub:``); None for anything else.

    A bare ``org/name`` is not parsed here: :func:`open_source` looks it up only when no
    such local path exists (see :func:`_bare_hub_ref`).
    """
    prefix = next((p for p in HUB_PREFIXES if text.startswith(p)), None)
    if prefix is None:
        return None
    found = _REPO_RE.match(text[len(prefix) :])
    if found is None:
        raise SourceError(
            f"expected {prefix}org/name or {prefix}org/name@revision (a Hugging Face model repo, e.g. "
            f"{prefix}timm/resnet18.a1_in1k), found {text!r}",
            where="source",
        )
    return HubRef(found["repo"], found["revision"] or "main", text)


def _bare_hub_ref(text: str) -> HubRef | None:
    """``org/name[@rev]`` that could be a repo: one slash, no weight-file suffix, not ./ or ~/."""
    found = _REPO_RE.match(text)
    if found is None or text.endswith((*WEIGHT_SUFFIXES, ".json", ".tar")):
        return None
    return HubRef(found["repo"], found["revision"] or "main", text)


def hf_cache_dir() -> Path:
    """The hub cache folder, found as huggingface_hub finds it, from the environment as it is now.

    ``HF_HUB_CACHE`` (or the older ``HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.
    """
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(folder)).expanduser()


def _repo_folder(ref: HubRef, cache: Path) -> Path:
    return cache / ("models--" + ref.repo.replace("/", "--"))


def _cached_revisions(folder: Path) -> str:
    """``"refs main -> 1a2b…; snapshots 1a2b…"``: what the cache holds for one repo."""
    refs_dir, snaps_dir = folder / "refs", folder / "snapshots"
    refs = sorted(p.relative_to(refs_dir).as_posix() for p in refs_dir.rglob("*") if p.is_file()) if refs_dir.is_dir() else []
    snaps = sorted(p.name for p in snaps_dir.iterdir() if p.is_dir()) if snaps_dir.is_dir() else []
    pointed = [f"{r} -> {(refs_dir / r).read_text(encoding='utf-8', errors='replace').strip()[:12]}" for r in refs]
    return f"refs: {', '.join(pointed) or 'none'}; snapshots: {', '.join(snaps[:5]) or 'none'}" + (
        f" and {len(snaps) - 5} more" if len(snaps) > 5 else ""
    )


def _not_cached(ref: HubRef, cache: Path) -> str:
    """Why ``ref`` is not in ``cache``: no such repo there, or not at that revision."""
    folder = _repo_folder(ref, cache)
    fetch = f"`hf download {ref.repo}" + (f" --revision {ref.revision}`" if ref.revision != "main" else "`")
    if not folder.is_dir():
        return (
            f"no Hugging Face repo {ref.repo!r} in the local cache {cache} (no folder {folder.name} there); remap "
            f"reads only files already downloaded: fetch them first ({fetch}), or point HF_HUB_CACHE (or HF_HOME) "
            "at the cache that holds them"
        )
    kind = "commit" if _HASH_RE.match(ref.revision) else "revision"
    return (
        f"Hugging Face repo {ref.repo!r} is in the local cache {cache}, but not at {kind} {ref.revision!r} "
        f"({_cached_revisions(folder)}); fetch it first ({fetch}), or name a cached revision with @"
    )


def _hub_snapshot(ref: HubRef, cache: Path) -> Path | None:
    """The snapshot folder of ``ref`` in ``cache``, or None when the cache does not hold it."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SourceError(
            f"huggingface_hub is not installed, and remap needs it to find Hugging Face repo {ref.repo!r} in the "
            f"local cache: {HUB_EXTRA}",
            where=ref.text,
        ) from None
    try:
        folder = snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, HFValidationError a ValueError
        return None
    return Path(folder)


def _open_hub(ref: HubRef, *, key: str | None, trust_pickle: bool, tried: Path | None = None) -> Source:
    """Open a repo's snapshot in the local Hugging Face cache, like a local folder.

    ``tried`` is the local path looked for first (a bare ``org/name``): the error, when
    the cache does not hold the repo either, names both.
    """
    cache = hf_cache_dir()
    try:
        folder = _hub_snapshot(ref, cache)
    except SourceError as exc:
        if tried is None:
            raise
        raise SourceError(f"no such file or folder {tried}, and {exc.message}", where=ref.text) from None
    if folder is None:
        reason = _not_cached(ref, cache)
        if tried is not None:
            reason = f"no such file or folder {tried}, and {reason}"
        raise SourceError(reason, where=ref.text)
    source = _open_path(folder, key=key, trust_pickle=trust_pickle)
    source.description["notes"].append(
        f"Hugging Face repo {ref.repo} at {ref.revision} (snapshot {folder.name}) from the local cache {cache}"
    )
    return source


# ---------------------------------------------------------------------------- in memory


def _is_factory(source: Mapping[Any, Any]) -> bool:
    model = source.get("model")
    return (isinstance(model, str) or (callable(model) and not isinstance(model, torch.nn.Module))) and set(
        source
    ) <= {"model", "args", "kwargs"}


def _open_mapping(source: Mapping[Any, Any], key: str | None) -> Source:
    values = list(source.values())
    if key is None and all(isinstance(v, torch.Tensor) for v in values):
        return _StateDictSource(source, _describe("state_dict"))
    if key is None and not any(isinstance(v, (torch.Tensor, Mapping, torch.nn.Module)) for v in values):
        return _MetadataSource(source_meta(source), _describe("metadata"), "source (metadata)")
    try:
        weights, parts, detected = _locate(source, key)
    except SourceError as exc:
        raise SourceError(exc.message, where="source (state_dict)") from None
    desc = _describe("state_dict", key=".".join(parts) or None, key_detected=detected, entries=_entries(source, parts))
    return _StateDictSource(weights, desc)


def open_source(
    source: Any,
    *,
    key: str | None = None,
    trust_pickle: bool = False,
    factory_args: Sequence[Any] = (),
    factory_kwargs: Mapping[str, Any] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    trust_links: bool = False,
) -> Source:
    """Open ``source`` for planning (metadata now) and applying (tensors on demand).

    ``source`` is a path (relative ones resolve against ``base_dir``), a state_dict, a
    mapping of key -> shape / (shape, dtype) / TensorMeta, a module, a factory spec
    ``"module.path:callable"`` or ``{"model": spec, "args": [...], "kwargs": {...}}``,
    or a Hugging Face model repo in the local cache: ``hf://org/name[@revision]``, or a
    bare ``org/name[@revision]`` when no such local path exists (nothing is downloaded).
    ``key`` says where the weights sit inside a torch checkpoint dict ("a.b").
    A sharded index's shards must lie in its folder once symlinks are followed (a Hugging
    Face cache snapshot's links into its ``blobs/`` excepted); ``trust_links=True`` allows
    links that lead elsewhere, for a layout you trust.

    >>> open_source({"fc.weight": [10, 512]}).meta["fc.weight"].shape
    (10, 512)
    """
    if key is not None and (not isinstance(key, str) or not key.strip(".")):
        raise UsageError(f"source.key must be a non-empty string such as 'state_dict', found {key!r}")
    if isinstance(source, str) and (hub := parse_hub_ref(source)) is not None:
        return _open_hub(hub, key=key, trust_pickle=trust_pickle)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if isinstance(source, str) and not path.exists() and _format_path(path) is None and (hub := _bare_hub_ref(source)) is not None:
            return _open_hub(hub, key=key, trust_pickle=trust_pickle, tried=path)  # an existing local path wins
        if not (isinstance(source, str) and _FACTORY_RE.match(source) and not path.exists()):
            return _open_path(path, key=key, trust_pickle=trust_pickle, trust_links=trust_links)
        source = {"model": source}  # "module.path:callable" names a factory, unless such a file exists
    if isinstance(source, torch.nn.Module):
        if key is not None:
            raise SourceError(f"source.key {key!r} does not apply to a module; leave `key` out", where="source")
        return _StateDictSource(source.state_dict(), _describe("state_dict", entries={"module": type(source).__name__}))
    if isinstance(source, Mapping) and _is_factory(source):
        if key is not None:
            message = f"source.key {key!r} does not apply to a model factory; leave `key` out"
            raise SourceError(message, where="source.model")
        args = source.get("args", factory_args)
        kwargs = {**dict(factory_kwargs or {}), **dict(source.get("kwargs") or {})}
        return _FactorySource(source["model"], args if args is not None else (), kwargs)
    if isinstance(source, Mapping):
        return _open_mapping(source, key)
    raise UsageError(
        "a source must be a path, a state_dict, a mapping of key -> shape, a module or "
        f"{{'model': 'module.path:callable'}}; found {type(source).__name__}"
    )

