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

This module holds what every format shares: the :class:`Source` kinds, the
:class:`_Reader` interface, opening a path or folder and detecting its format by content.
Each format reads in a module of its own, which imports from here and is imported here
only inside the function that needs it: :mod:`~remap.sources.safetensors_reader`,
:mod:`~remap.sources.torch_reader` (torch.save files), :mod:`~remap.sources.sharded`
(``*.index.json``), :mod:`~remap.sources.hub` (the Hugging Face cache), and those of
:mod:`~remap.sources.registry` (ONNX, NumPy, GGUF, Keras, Flax, TensorFlow).
"""

from __future__ import annotations

import difflib
import os
import re
import reprlib
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SourceError, TargetError, UsageError
from .factories import build, describe_call
from ..files import file_kind, require_regular
from ..meta import TensorMeta, meta_of_tensor, source_meta
from .registry import FORMATS, detect, open_format

if TYPE_CHECKING:
    import torch
else:

    class _Torch:
        """``torch``, imported on first use: a safetensors header, an index or a hub folder
        is read without it, so ``remap inspect`` of such a file never pays for importing torch.
        Each module holds its own, bound to its ``globals()``, which the first use rebinds to torch."""

        def __init__(self, namespace: dict[str, Any]) -> None:
            self._namespace = namespace

        def __getattr__(self, name: str) -> Any:
            import torch as real

            self._namespace["torch"] = real
            return getattr(real, name)

    torch = _Torch(globals())

__all__ = [
    "Source", "open_source", "CANDIDATE_KEYS", "FOLDER_FILES", "ACCEPTED_FORMATS", "PICKLE_ALLOW_LIST",
    "HubRef", "parse_hub_ref", "hf_cache_dir",
]  # fmt: skip

#: Public names that moved to a format's module and stay importable from here, loaded on
#: first use (so that importing this module imports none of them).
_MOVED = {
    "PICKLE_ALLOW_LIST": "torch_reader",
    "HubRef": "hub", "parse_hub_ref": "hub", "hf_cache_dir": "hub",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    """A name of :data:`_MOVED`, from the module that now defines it.

    >>> __getattr__("HubRef").__module__
    'remap.sources.hub'
    """
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__package__}.{_MOVED[name]}"), name)


#: Names under which checkpoints commonly nest their weights, searched two levels deep.
CANDIDATE_KEYS = (
    "state_dict", "model", "model_state", "model_state_dict", "module", "ema", "model_ema",
    "state_dict_ema", "net", "network", "params", "weights",
)  # fmt: skip
#: What a folder is searched for, in order.
FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
ACCEPTED_FORMATS = (
    "a torch.save file (.pt .pth .bin .ckpt .tar; a whole pickled model or a TorchScript archive too), "
    "a .safetensors file, a sharded *.safetensors.index.json or *.bin.index.json, a folder holding one, "
    "or another framework's file (ONNX, NumPy .npz/.npy, GGUF, Keras .keras/.h5, Flax .msgpack, "
    "a TensorFlow checkpoint)"
)
_TRUST_HINT = "`source.trust_pickle: true` in the rules or `--trust-pickle` on the command line"
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
        self._check_key(key)
        return self._read(key)

    def _read(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def read_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors at once: key -> tensor, in one pass where the format allows it (a DCP
        folder reads them in one ``dcp.load``), else one :meth:`read` after another.

        >>> import torch
        >>> sorted(open_source({"a": torch.zeros(1), "b": torch.ones(2)}).read_many(["b", "a"]))
        ['a', 'b']
        """
        keys = list(dict.fromkeys(keys))
        for key in keys:
            self._check_key(key)
        return self._read_many(keys)

    def _read_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {k: self.read(k) for k in keys}  # through read: a subclass may override it

    def span(self, key: str) -> Span | None:
        """Where ``key``'s bytes sit in a file, when they can be mapped without a copy."""
        return None

    def read_box(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        """The box ``[offset[d] : offset[d] + shape[d]]`` of tensor ``key``, read without the rest
        of it, in the source's dtype; None when this source cannot (the caller reads it whole).

        >>> open_source({"w": ([4, 2], "float32")}).read_box("w", (1, 0), (2, 2)) is None
        True
        """
        self._check_key(key)
        return self._read_box(key, offset, shape)

    def _read_box(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        return None

    def _check_key(self, key: str) -> None:
        if key not in self.meta:
            raise SourceError(
                f"no tensor {key!r} in this source ({len(self.meta)} tensors){_did_you_mean(key, self.meta)}",
                where=self._where,
            )

    def check_unchanged(self) -> None:
        """SourceError when a file changed on disk since its metadata was read."""

    def read_checked(self, key: str) -> bool:
        """Whether reading ``key`` can fail only as reading a span can (the file changed or
        the disk failed): its offsets and sizes were checked against the file at open, and
        whatever the read computes (GGUF dequantization) cannot fail on checked bytes. The
        engine streams such keys batch by batch even without a rollback."""
        return False

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

    def read_checked(self, key: str) -> bool:
        return bool(getattr(self._owner[key], "checked_reads", False))

    def check_unchanged(self) -> None:
        for reader in {id(r): r for r in self._owner.values()}.values():
            if hasattr(reader, "_stamp"):
                reader._check_unchanged()

    @property
    def requires_grad(self) -> dict[str, bool] | None:
        flags = [getattr(r, "requires_grad", None) for r in {id(r): r for r in self._owner.values()}.values()]
        return None if not flags or None in flags else {k: v for f in flags for k, v in f.items() if k in self.meta}

    def _read(self, key: str) -> torch.Tensor:
        return self._activate(key).read(key)

    def _read_box(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        if getattr(self._owner[key], "read_box", None) is None:
            return None
        return self._activate(key).read_box(key, offset, shape)  # type: ignore[attr-defined]

    def _read_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Keys grouped by the file holding them, each group in one pass where its reader has ``read_many``."""
        groups: dict[int, list[str]] = {}
        for key in keys:
            groups.setdefault(id(self._owner[key]), []).append(key)
        out: dict[str, torch.Tensor] = {}
        for group in groups.values():
            reader = self._activate(group[0])
            many = getattr(reader, "read_many", None)
            out.update(many(group) if many is not None else {k: reader.read(k) for k in group})
        return {k: out[k] for k in keys}

    def _activate(self, key: str) -> _Reader:
        """The reader of ``key``, now the one holding open data (the one before released)."""
        reader = self._owner[key]
        if reader is not self._active:
            if self._active is not None:
                self._active.release()
            self._active = reader
        return reader

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
        from .safetensors_reader import _SafetensorsReader

        return _SafetensorsReader(path), fmt
    from .torch_reader import _PickleRefused, _TorchReader, _TorchScriptReader, _zip_kind

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
            from .sharded import _open_index

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
    from .hub import _bare_hub_ref, _open_hub, parse_hub_ref

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

