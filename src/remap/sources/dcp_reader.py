"""torch.distributed.checkpoint (DCP) folders: ``.metadata`` plus ``*.distcp`` files.

What writes them: ``torch.distributed.checkpoint.save`` (``dcp.save``) on one process or on
many, torchtitan (the model's keys at the top level, ``optimizer``, ``lr_scheduler``,
``dataloader`` and ``train_state`` beside them), torchtune and the DCP tutorial's
``{"app": AppState}`` (``app.model.*``, ``app.optim.*``). DCP flattens nested state dicts:
``{"model": {"fc.weight": t}}`` is stored under ``model.fc.weight``, and the metadata's
``planner_data`` keeps each key's path (``("model", "fc.weight")``). Tensors are stored in
chunks (one per saving rank's shard); non-tensor values (``BytesStorageMetadata``: an
optimizer's hyperparameters, a scheduler's state) are stored pickled.

How it is read:

- Planning reads ``.metadata`` only: names, shapes and dtypes (``TensorStorageMetadata``).
  That file is a pickle, and torch reads it with a plain ``pickle.load``
  (``FileSystemReader.read_metadata``), which runs whatever the file names. remap reads it
  with the inert unpickler of :mod:`~remap.sources.pickled_module` (nothing the file names is
  imported or called) and then builds torch's own metadata dataclasses from the recorded
  fields, for exactly the classes DCP writes (:data:`ALLOWED`); any other name in the file is
  a SourceError. Every field is checked: shapes, dtypes, chunks that tile their tensor
  exactly, storage records that name a plain file in the folder and lie inside it (a
  truncated ``.distcp`` is an error at open, before any data is read).
- A tensor is read by ``torch.distributed.checkpoint.load`` (``no_dist=True``, so it reads
  locally on a rank too) into a tensor of the saved shape and dtype, through a
  ``FileSystemReader`` whose ``read_metadata`` hands back the metadata read here (so torch
  never unpickles ``.metadata``). DCP reads each chunk with ``torch.load(weights_only=True)``
  and assembles the tensor, whatever the number of ranks that saved it.
  :meth:`_DcpReader.read_many` reads several keys in one ``dcp.load``.
- A box of a tensor (``read_box``: the part one rank owns of a sharded target) is read by
  ``dcp.load`` too, with a planner whose plan is DCP's own resharding of the saved chunks onto
  that one box (``create_read_items_for_chunk_list``): only the chunks that overlap the box are
  read, each narrowed into a box-shaped tensor.
- Non-tensor values are never read (DCP's planner would ``torch.load`` them with
  ``weights_only=False``); they are listed in ``entries``.

Keys. With ``source.key`` (``model``, ``app.model``, ``optimizer``) the keys under that
path, with the path removed. Without it: the top-level tensors when there are any (a plain
``dcp.save(model.state_dict())``, torchtitan), else the one sub-tree named like a weights
dict (``model``, ``state_dict``, … up to two levels deep, as for torch.save checkpoints).
Everything left out is counted in ``entries``.

>>> sniff(b"\\x80\\x04", Path("ckpt/.metadata"))
True
"""

from __future__ import annotations

import io
import math
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SourceError
from ..meta import TensorMeta
from .readers import CANDIDATE_KEYS, _check_names, _did_you_mean, _first_line, _Reader, _safe_repr, _stamp

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "EXTRA", "METADATA", "ALLOWED", "sniff", "resolve_path", "open_reader", "read_metadata"]

FORMAT = "dcp"
EXTRA = None  # torch.distributed.checkpoint ships with torch
METADATA = ".metadata"
SUFFIX = ".distcp"
MAX_METADATA_BYTES = 256 << 20  # the inert unpickler reads ~2 MB/s of DCP metadata: ~2 minutes at most
MAX_DIMS = 64
MAX_CHUNKS = 1 << 16  # chunks of one tensor (one per saving rank's shard, usually)

_M = "torch.distributed.checkpoint.metadata."
#: Every class a DCP ``.metadata`` may name; each is rebuilt by remap from its recorded fields.
ALLOWED = (
    f"{_M}Metadata", f"{_M}TensorStorageMetadata", f"{_M}BytesStorageMetadata", f"{_M}TensorProperties",
    f"{_M}ChunkStorageMetadata", f"{_M}MetadataIndex", f"{_M}StorageMeta", f"{_M}_MEM_FORMAT_ENCODING",
    "torch.distributed.checkpoint.filesystem._StorageInfo", "torch.serialization._get_layout",
    "torch._utils._get_layout", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.PurePosixPath",
    "pathlib.PureWindowsPath", "pathlib.Path",
)  # fmt: skip
#: What the inert unpickler itself recognises and never calls (sizes, dtypes, containers).
_PLAIN = ("torch.Size", "collections.OrderedDict", "builtins.dict", "builtins.list", "builtins.tuple",
          "builtins.set", "builtins.frozenset", "copyreg._reconstructor")  # fmt: skip


class _Bad(Exception):
    """A malformed metadata field; turned into a SourceError naming ``.metadata``."""


# ---------------------------------------------------------------------------- detection


def sniff(head: bytes, path: Path) -> bool:
    """A file named ``.metadata`` that starts as a pickle does, or a ``*.distcp`` file with a
    ``.metadata`` beside it.

    >>> sniff(b"PK\\x03\\x04", Path("/nonexistent/__0_0.distcp"))
    False
    """
    if path.name == METADATA:
        return head[:1] == b"\x80"
    return path.name.endswith(SUFFIX) and (path.parent / METADATA).is_file()


def resolve_path(path: Path) -> Path | None:
    """The ``.metadata`` of a DCP folder, or None when ``path`` is no such folder.

    >>> resolve_path(Path("/nonexistent")) is None
    True
    """
    found = path / METADATA
    return found if path.is_dir() and found.is_file() else None


def open_reader(path: Path, *, key: str | None = None, trust_pickle: bool = False) -> _DcpReader:
    """The reader of the DCP folder holding ``path`` (its ``.metadata`` or one of its
    ``*.distcp`` files). ``trust_pickle`` changes nothing: the metadata is always read
    inertly, and pickled non-tensor values are never read."""
    _torch_dcp(path)
    return _DcpReader(path.parent, key=key, named=path)


def _torch_dcp(path: Path) -> Any:
    try:
        import torch.distributed.checkpoint as dcp
    except ImportError as exc:  # a torch build without torch.distributed
        raise SourceError(f"reading a DCP checkpoint needs torch.distributed.checkpoint, which this torch cannot import "
                          f"({_first_line(exc)})", where=str(path)) from None  # fmt: skip
    return dcp


# ---------------------------------------------------------------------------- the metadata


def read_metadata(path: Path) -> Any:
    """torch's ``Metadata`` of the DCP folder whose ``.metadata`` is ``path``, read without
    running anything from the file and checked field by field (not yet against the data files:
    :func:`check_storage` does that)."""
    from .pickled_module import inert_load

    where = str(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_METADATA_BYTES:
                raise SourceError(f"the metadata is {size} bytes; remap reads at most {MAX_METADATA_BYTES}", where=where)
            data = f.read(MAX_METADATA_BYTES + 1)
    except OSError as exc:
        raise SourceError(f"cannot read it: {exc.strerror or exc}", where=where) from None

    def no_storage(pid: Any) -> Any:
        raise _Bad("it refers to a tensor storage (a persistent id), which DCP metadata never holds")

    try:
        loaded = inert_load(io.BytesIO(data), no_storage)
    except SourceError as exc:
        raise SourceError(f"not a readable DCP metadata file: {exc.message}", where=where) from None
    foreign = [n for n in loaded.names if n not in ALLOWED and n not in _PLAIN and not _is_dtype(n)]
    if foreign:
        raise SourceError(
            f"the metadata names {', '.join(map(repr, foreign[:5]))}{' and more' if len(foreign) > 5 else ''}, which DCP "
            "metadata never holds; remap reads only torch.distributed.checkpoint's own metadata classes and never "
            "imports or runs what a file names",
            where=where,
        )  # fmt: skip
    if loaded.end != len(data):
        raise SourceError(f"the metadata has {len(data) - loaded.end} bytes after its pickle ends", where=where)
    try:
        return _Convert().metadata(loaded.result)
    except _Bad as exc:
        raise SourceError(f"malformed DCP metadata: {exc}", where=where) from None


def _is_dtype(name: str) -> bool:
    import torch

    return name.startswith("torch.") and isinstance(vars(torch).get(name.removeprefix("torch.")), torch.dtype)


class _Convert:
    """Inert records -> torch's metadata dataclasses, every field checked."""

    def __init__(self) -> None:
        import torch
        import torch.distributed.checkpoint.metadata as m

        self.torch, self.m = torch, m
        try:
            from torch.distributed.checkpoint.filesystem import _StorageInfo
        except ImportError:  # pragma: no cover - a future torch that renamed it
            _StorageInfo = None
        self.storage_info = _StorageInfo

    def fields(self, value: Any, name: str, what: str) -> dict[str, Any]:
        """The recorded state of a stand-in of ``name`` (a dataclass: NEWOBJ then BUILD with its dict)."""
        from .pickled_module import Inert

        if not isinstance(value, Inert) or value.qualname != name:
            raise _Bad(f"{what} is {_shown(value)}, expected a {name.rsplit('.', 1)[-1]}")
        if value.args or value.kwargs or value.items:
            raise _Bad(f"{what} ({name.rsplit('.', 1)[-1]}) is built with arguments, which DCP never pickles")
        state = value.state
        if state is None:
            return {}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _Bad(f"{what} has the state {_shown(state)}, expected a dict of its fields")
        return state

    def metadata(self, value: Any) -> Any:
        f = self.fields(value, f"{_M}Metadata", "the file")
        _known(f, {"state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"}, "the metadata")
        sdm = f.get("state_dict_metadata")
        if not isinstance(sdm, dict):
            raise _Bad(f"state_dict_metadata is {_shown(sdm)}, expected a dict")
        entries = {}
        for fqn, item in sdm.items():
            if not isinstance(fqn, str):
                raise _Bad(f"state_dict_metadata has the key {_shown(fqn)}, expected text")
            entries[fqn] = self.entry(item, fqn)
        version = f.get("version")
        if version is not None and not isinstance(version, str):
            raise _Bad(f"version is {_shown(version)}, expected text")
        return self.m.Metadata(
            state_dict_metadata=entries, planner_data=self.planner_data(f.get("planner_data"), entries),
            storage_data=self.storage_data(f.get("storage_data"), entries), storage_meta=self.storage_meta(f.get("storage_meta")),
            version=version,
        )  # fmt: skip

    def entry(self, value: Any, fqn: str) -> Any:
        from .pickled_module import Inert

        if isinstance(value, Inert) and value.qualname == f"{_M}BytesStorageMetadata":
            self.fields(value, f"{_M}BytesStorageMetadata", repr(fqn))
            return self.m.BytesStorageMetadata()
        f = self.fields(value, f"{_M}TensorStorageMetadata", repr(fqn))
        _known(f, {"properties", "size", "chunks"}, repr(fqn))
        size = _dims(f.get("size"), f"{fqn!r}'s size")
        chunks = f.get("chunks")
        if not isinstance(chunks, list) or len(chunks) > MAX_CHUNKS:
            raise _Bad(f"{fqn!r}'s chunks are {_shown(chunks)}, expected a list of at most {MAX_CHUNKS}")
        made = []
        for i, chunk in enumerate(chunks):
            c = self.fields(chunk, f"{_M}ChunkStorageMetadata", f"{fqn!r}'s chunk {i}")
            offsets, sizes = _dims(c.get("offsets"), f"{fqn!r}'s chunk {i} offsets"), _dims(c.get("sizes"), f"{fqn!r}'s chunk {i} sizes")
            if len(offsets) != len(size) or len(sizes) != len(size) or any(o + s > d for o, s, d in zip(offsets, sizes, size)):
                raise _Bad(f"{fqn!r}'s chunk {i} (offsets {list(offsets)}, sizes {list(sizes)}) does not lie inside "
                           f"its tensor of size {list(size)}")  # fmt: skip
            made.append(self.m.ChunkStorageMetadata(offsets=self.torch.Size(offsets), sizes=self.torch.Size(sizes)))
        _check_tiling(made, size, fqn)
        return self.m.TensorStorageMetadata(properties=self.properties(f.get("properties"), fqn), size=self.torch.Size(size), chunks=made)

    def properties(self, value: Any, fqn: str) -> Any:
        state = self.fields(value, f"{_M}TensorProperties", f"{fqn!r}'s properties") if not _is_props_tuple(value) else None
        if state is None:  # __getstate__: (dtype, layout, requires_grad, memory format encoding, pin_memory)
            dtype, layout = value.state[0], value.state[1]
        else:
            dtype, layout = state.get("dtype"), state.get("layout")
        if not isinstance(dtype, self.torch.dtype):
            raise _Bad(f"{fqn!r} has the dtype {_shown(dtype)}, expected a torch dtype")
        if layout is not None and self.layout(layout) != "torch.strided":
            raise _Bad(f"{fqn!r} has the layout {self.layout(layout)}; remap reads dense (strided) tensors only")
        return self.m.TensorProperties(dtype=dtype)

    @staticmethod
    def layout(value: Any) -> str:
        from .pickled_module import Inert

        if isinstance(value, Inert) and value.qualname.endswith("._get_layout") and len(value.args) == 1 and isinstance(value.args[0], str):
            return value.args[0]
        return _shown(value)

    def planner_data(self, value: Any, entries: Mapping[str, Any]) -> dict[str, tuple[str | int, ...]] | None:
        """Each key's path in the state dict that was saved (DefaultSavePlanner's mapping), where it is sound."""
        if not isinstance(value, dict):
            return None
        out = {}
        for fqn, path in value.items():
            if fqn in entries and isinstance(path, tuple) and path and all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
                if ".".join(map(str, path)) == fqn:
                    out[fqn] = path
        return out

    def storage_data(self, value: Any, entries: Mapping[str, Any]) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise _Bad(f"storage_data is {_shown(value)}, expected a dict of where each chunk is stored")
        out = {}
        for index, info in value.items():
            f = self.fields(index, f"{_M}MetadataIndex", "a storage_data key")
            _known(f, {"fqn", "offset", "index"}, "a storage_data key")
            fqn, offset = f.get("fqn"), f.get("offset")
            if not isinstance(fqn, str):
                raise _Bad(f"a storage_data key names {_shown(fqn)}, expected text")
            key = self.m.MetadataIndex(fqn, None if offset is None else _dims(offset, f"{fqn!r}'s storage offset"))
            out[key] = self.info(info, fqn)
        return out

    def info(self, value: Any, fqn: str) -> Any:
        f = self.fields(value, "torch.distributed.checkpoint.filesystem._StorageInfo", f"{fqn!r}'s storage")
        _known(f, {"relative_path", "offset", "length", "transform_descriptors"}, f"{fqn!r}'s storage")
        name, offset, length = f.get("relative_path"), f.get("offset"), f.get("length")
        if not isinstance(name, str) or not _plain_name(name):
            raise _Bad(f"{fqn!r} is stored in {_shown(name)}, expected the name of a file in the checkpoint's folder")
        if not _count(offset) or not _count(length):
            raise _Bad(f"{fqn!r}'s storage is at offset {_shown(offset)}, length {_shown(length)}, expected non-negative integers")
        descriptors = f.get("transform_descriptors")
        if descriptors is not None and not (isinstance(descriptors, (list, tuple)) and all(isinstance(d, str) for d in descriptors)):
            raise _Bad(f"{fqn!r}'s storage transforms are {_shown(descriptors)}, expected a list of names")
        if self.storage_info is None:  # pragma: no cover
            raise _Bad("this torch has no torch.distributed.checkpoint.filesystem._StorageInfo")
        return self.storage_info(name, offset, length, list(descriptors) if descriptors else None)

    def storage_meta(self, value: Any) -> Any:
        if value is None:
            return self.m.StorageMeta()
        f = self.fields(value, f"{_M}StorageMeta", "storage_meta")
        ident, save_id = f.get("checkpoint_id"), f.get("save_id")
        modules = f.get("modules") if isinstance(f.get("modules"), list) else []
        return self.m.StorageMeta(
            checkpoint_id=_path_text(ident), save_id=save_id if isinstance(save_id, str) else None,
            modules=[m for m in modules if isinstance(m, str)],
        )  # fmt: skip


def _is_props_tuple(value: Any) -> bool:
    """A TensorProperties pickled through its ``__getstate__`` (a 5-tuple)."""
    from .pickled_module import Inert

    return (isinstance(value, Inert) and value.qualname == f"{_M}TensorProperties" and not value.args
            and isinstance(value.state, tuple) and len(value.state) == 5)  # fmt: skip


def _path_text(value: Any) -> str | None:
    """A pickled ``PosixPath('a', 'b')`` as text (its parts joined), never built."""
    from .pickled_module import Inert

    if isinstance(value, str):
        return value
    if isinstance(value, Inert) and value.qualname.startswith("pathlib.") and all(isinstance(a, str) for a in value.args):
        return "/".join(value.args)
    return None


def _known(fields: Mapping[str, Any], names: set[str], what: str) -> None:
    unknown = sorted(set(fields) - names)
    if unknown:
        raise _Bad(f"{what} has the fields {unknown[:5]}, which torch's class does not have")


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _dims(value: Any, what: str) -> tuple[int, ...]:
    """A torch.Size (recorded as a tuple) of non-negative integers."""
    if not isinstance(value, (tuple, list)) or len(value) > MAX_DIMS or not all(_count(d) for d in value):
        raise _Bad(f"{what} is {_shown(value)}, expected at most {MAX_DIMS} non-negative integers")
    if any(d > 2**62 for d in value) or math.prod(value) > 2**62:
        raise _Bad(f"{what} is {_shown(value)}, larger than any tensor can be")
    return tuple(value)


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and "\x00" not in name and name not in (".", "..")


def _shown(value: Any) -> str:
    from .pickled_module import Inert

    return f"a {value.qualname}" if isinstance(value, Inert) else _safe_repr(value)


def _check_tiling(chunks: list[Any], size: tuple[int, ...], fqn: str) -> None:
    """The chunks cover their tensor exactly: their volumes add up to it and no two overlap
    (a gap would leave part of the tensor unread, an overlap is no checkpoint DCP writes)."""
    import torch

    numel = math.prod(size)
    total = sum(math.prod(c.sizes) for c in chunks)
    if total != numel:
        raise _Bad(f"{fqn!r}'s chunks hold {total} elements, its size {list(size)} has {numel}: the chunks do not tile it")
    real = [c for c in chunks if math.prod(c.sizes)]
    if len(real) < 2:
        return
    starts = torch.tensor([list(c.offsets) for c in real], dtype=torch.int64)
    ends = starts + torch.tensor([list(c.sizes) for c in real], dtype=torch.int64)
    for i in range(0, len(real), 1024):
        a, b = starts[i : i + 1024, None, :], ends[i : i + 1024, None, :]
        overlap = ((a < ends[None]) & (starts[None] < b)).all(dim=-1)
        rows = torch.arange(i, min(i + 1024, len(real)))
        overlap[rows - i, rows] = False
        if bool(overlap.any()):
            raise _Bad(f"{fqn!r} has overlapping chunks: the chunks do not tile it")


def check_storage(folder: Path, metadata: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor chunk and value has a storage record, in a regular file of ``folder`` long
    enough to hold it; returns the stamp of each file named (for :meth:`_DcpReader._check_unchanged`)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    storage = metadata.storage_data
    stamps: dict[str, tuple[int, ...]] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        indexes = [MetadataIndex(fqn, c.offsets) for c in item.chunks] if isinstance(item, TensorStorageMetadata) else [MetadataIndex(fqn)]
        for index in indexes:
            info = storage.get(index)
            if info is None:
                at = f" at offsets {list(index.offset)}" if index.offset is not None else ""
                raise SourceError(f"malformed DCP metadata: no storage record for {fqn!r}{at}", where=str(folder / METADATA))
            if info.relative_path not in stamps:
                stamps[info.relative_path] = _data_stamp(folder / info.relative_path)
            size = stamps[info.relative_path][0]
            if info.offset + info.length > size:
                raise SourceError(
                    f"the file is {size} bytes, but the metadata stores {fqn!r} at bytes {info.offset}..{info.offset + info.length}: "
                    "the file is truncated, or is not the one this checkpoint was saved with",
                    where=str(folder / info.relative_path),
                )  # fmt: skip
    return stamps


def _data_stamp(path: Path) -> tuple[int, ...]:
    from ..files import file_kind

    kind = file_kind(path)
    if kind == "missing":
        raise SourceError("the checkpoint's metadata stores tensors in this file, which is missing", where=str(path))
    if kind is not None:
        raise SourceError(f"{kind}, not a regular file: remap reads checkpoints only from regular files", where=str(path))
    try:
        return _stamp(path)
    except OSError as exc:
        raise SourceError(f"cannot read it: {exc.strerror or exc}", where=str(path)) from None


# ---------------------------------------------------------------------------- keys


def _paths(metadata: Any) -> dict[str, tuple[str, ...]]:
    """Each key's path in the saved state dict (``planner_data``), or the key alone when unknown."""
    planner = metadata.planner_data or {}
    return {fqn: tuple(map(str, planner.get(fqn, (fqn,)))) for fqn in metadata.state_dict_metadata}


def _under(path: tuple[str, ...], fqn: str, key: str) -> str | None:
    """``fqn``'s name below ``key`` ("a.b"), or None when it is not below it."""
    for n in range(1, len(path)):
        if ".".join(path[:n]) == key:
            return ".".join(path[n:])
    if len(path) == 1 and fqn.startswith(key + "."):
        return fqn[len(key) + 1 :]
    return None


def _is_value_name(name: str) -> bool:
    return name.endswith("_extra_state")


def _candidates(paths: Mapping[str, tuple[str, ...]], tensors: set[str]) -> list[tuple[str, ...]]:
    """Sub-trees one or two levels deep named like a weights dict whose entries are all tensors
    (``*_extra_state`` values aside) directly under them."""
    found = []
    prefixes = {p[:1] for p in paths.values() if len(p) > 1 and p[0] in CANDIDATE_KEYS}
    prefixes |= {p[:2] for p in paths.values() if len(p) > 2 and p[1] in CANDIDATE_KEYS}
    for prefix in sorted(prefixes):
        members = [f for f, p in paths.items() if p[: len(prefix)] == prefix]
        if all(len(paths[f]) == len(prefix) + 1 and (f in tensors or _is_value_name(f)) for f in members):
            if any(f in tensors for f in members):
                found.append(prefix)
    return found


def _select(metadata: Any, key: str | None, where: str) -> tuple[dict[str, str], list[str], bool]:
    """(name -> DCP key) of the tensors offered, the path taken, whether it was auto-detected."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    paths = _paths(metadata)
    tensors = {f: None for f, item in metadata.state_dict_metadata.items() if isinstance(item, TensorStorageMetadata)}  # in file order
    if key is not None:
        chosen = {name: f for f in tensors if (name := _under(paths[f], f, key)) is not None}
        if not chosen:
            tops = sorted({p[0] for p in paths.values()})
            raise SourceError(
                f"source.key {key!r}: no tensors under it; the checkpoint's top-level entries are "
                f"{', '.join(map(repr, tops[:12]))}{' and more' if len(tops) > 12 else ''}{_did_you_mean(key, tops)}",
                where=where,
            )
        return chosen, key.split("."), False
    top = {f: f for f in tensors if len(paths[f]) == 1}
    if top:
        return top, [], False
    found = _candidates(paths, set(tensors))
    if len(found) == 1:
        prefix = ".".join(found[0])
        return {_under(paths[f], f, prefix): f for f in tensors if _under(paths[f], f, prefix) is not None}, list(found[0]), True  # type: ignore[misc]
    groups = _groups(paths, set(tensors), set())
    if found:
        names = [".".join(p) for p in found]
        raise SourceError(f"the checkpoint holds several sets of weights: {', '.join(map(repr, names))}; say which to load "
                          f"with `source.key` (e.g. `key: {names[0]}`)", where=where)  # fmt: skip
    shown = "; ".join(f"{k!r}: {v}" for k, v in list(groups.items())[:12])
    raise SourceError(f"no weights found: no top-level tensors and no sub-tree named {', '.join(CANDIDATE_KEYS[:6])}, … "
                      f"holding tensors only; the checkpoint holds {shown or 'no tensors'}. Say where the weights are "
                      "with `source.key`", where=where)  # fmt: skip


def _groups(paths: Mapping[str, tuple[str, ...]], tensors: set[str], taken: set[str]) -> dict[str, str]:
    """What is left out, by top-level name: ``{"optimizer": "12 tensors, 12 values"}``."""
    counts: dict[str, list[int]] = {}
    for fqn, path in paths.items():
        if fqn in taken:
            continue
        c = counts.setdefault(path[0], [0, 0])
        c[0 if fqn in tensors else 1] += 1
    out = {}
    for name, (t, v) in counts.items():
        parts = [f"{t} tensor{'s' * (t != 1)}"] * bool(t) + [f"{v} value{'s' * (v != 1)}"] * bool(v)
        out[name] = ", ".join(parts) + (" (not read)" if t == 0 else " (not loaded)")
    return out


# ---------------------------------------------------------------------------- the reader


class _DcpReader(_Reader):
    """A DCP folder: ``meta`` from its metadata, tensors by ``dcp.load`` into fresh tensors."""

    format = FORMAT

    def __init__(self, folder: Path, *, key: str | None, named: Path | None = None) -> None:
        self.folder, self.path = folder, folder / METADATA
        self._stamp = _stamp(self.path)
        self.metadata = read_metadata(self.path)
        self._stamps = check_storage(folder, self.metadata)
        where = str(self.path)
        names, self.parts, self.detected = _select(self.metadata, key, where)
        _check_names(names, "the checkpoint", where)
        sdm = self.metadata.state_dict_metadata
        self._fqn = names  # name offered -> key in the checkpoint
        self.meta: dict[str, TensorMeta] = {
            name: TensorMeta(tuple(sdm[f].size), str(sdm[f].properties.dtype).removeprefix("torch.")) for name, f in names.items()
        }
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        tensors = {f for f, item in sdm.items() if isinstance(item, TensorStorageMetadata)}
        paths = _paths(self.metadata)
        taken = set(names.values())
        prefix = ".".join(self.parts)
        inside = {f for f in sdm if f not in taken and prefix and _under(paths[f], f, prefix) is not None}
        self.entries = {_under(paths[f], f, prefix) or f: "a value (not read)" for f in sorted(inside - tensors)}
        self.entries.update(_groups({f: p for f, p in paths.items() if f not in inside}, tensors, taken))
        for f in [f for f, p in paths.items() if len(p) == 1 and f not in tensors]:  # a top-level value, by its name
            self.entries[f] = "a value (not read)"
        files = len(self._stamps)
        self.notes = [f"a torch.distributed.checkpoint folder: {len(sdm)} entries in {files} .distcp file{'s' * (files != 1)}"]
        if named is not None and named.name != METADATA:
            self.notes.append(f"{named.name} is part of the DCP checkpoint {folder}: read through its {METADATA}")
        self._storage: Any = None

    def fqn(self, key: str) -> str:
        """The key as the checkpoint stores it (``model.fc.weight`` for ``fc.weight`` under ``model``)."""
        return self._fqn[key]

    def read(self, key: str) -> torch.Tensor:
        return self.read_many([key])[key]

    def read_many(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Several tensors in one ``dcp.load`` (each into a fresh tensor of its saved shape and dtype)."""
        import torch

        keys = list(keys)
        sdm = self.metadata.state_dict_metadata
        targets = {self._fqn[k]: torch.empty(tuple(sdm[self._fqn[k]].size), dtype=sdm[self._fqn[k]].properties.dtype) for k in keys}
        self._load(keys, targets, None)
        return {k: targets[self._fqn[k]] for k in keys}

    def read_box(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
        """The box ``[offset[d] : offset[d] + shape[d]]`` of tensor ``key`` (global coordinates),
        in the checkpoint's dtype, contiguous; only the saved chunks that overlap it are read.

        ``dcp.load`` does the reading: its plan is DCP's resharding of the saved chunks onto the
        one chunk ``(offset, shape)`` (:func:`_box_planner`). An empty box reads nothing; a box
        that does not lie inside the tensor is a SourceError naming the key, the box and the shape.
        """
        import torch

        fqn = self._fqn[key]
        item = self.metadata.state_dict_metadata[fqn]
        offset, shape = _check_box(key, offset, shape, tuple(item.size), str(self.path))
        target = torch.empty(shape, dtype=item.properties.dtype)
        if target.numel():
            self._load([key], {fqn: target}, _box_planner(fqn, offset, shape))
        return target

    def _load(self, keys: list[str], targets: dict[str, torch.Tensor], planner: Any) -> None:
        """``dcp.load`` of ``targets`` (DCP key -> tensor) through the storage reader and ``planner``
        (None: DCP's default); a failure is a SourceError naming ``keys`` and their files."""
        if self._storage is None:
            self._check_unchanged()
            self._storage = _storage_reader(self.folder, self.metadata)
        dcp = _torch_dcp(self.path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "torch.distributed is disabled ...: assuming ... a single process"
                dcp.load(targets, storage_reader=self._storage, planner=planner, no_dist=True)
        except (Exception, dcp.CheckpointException) as exc:  # noqa: BLE001 - torch.load on corrupt bytes raises many types
            raise self._fail_many(keys, _unwrap(exc)) from None

    def _fail_many(self, keys: list[str], exc: BaseException) -> SourceError:
        files = self._files_of(keys)
        shown = repr(keys[0]) if len(keys) == 1 else f"{len(keys)} tensors ({', '.join(map(repr, keys[:3]))}, …)"
        if isinstance(exc, pickle.UnpicklingError):
            why = "its stored bytes do not load as a tensor with torch.load(weights_only=True): the file is corrupt"
        else:
            why = f"{type(exc).__name__}: {_first_line(exc)[:300]}"
        return SourceError(f"cannot read tensor {shown} (stored in {', '.join(files)}): {why}",
                           where=str(self.folder / files[0]) if len(files) == 1 else str(self.folder))  # fmt: skip

    def _files_of(self, keys: list[str]) -> list[str]:
        wanted = {self._fqn[k] for k in keys}
        return sorted({info.relative_path for index, info in self.metadata.storage_data.items() if index.fqn in wanted}) or ["?"]

    def release(self) -> None:
        self._storage = None

    def _check_unchanged(self) -> None:
        super()._check_unchanged()
        for name, stamp in self._stamps.items():
            path = self.folder / name
            try:
                now = _stamp(path)
            except OSError as exc:
                raise SourceError(f"cannot read it any more: {exc.strerror or exc}", where=str(path)) from None
            if now != stamp:
                raise SourceError("the file changed on disk since the checkpoint's metadata was read; plan again", where=str(path))


def _unwrap(exc: BaseException) -> BaseException:
    """The first rank's own exception inside DCP's ``CheckpointException`` (a BaseException), else ``exc``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            return first[0]
    return exc


def _check_box(key: str, offset: Any, shape: Any, size: tuple[int, ...], where: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offset, shape)`` as tuples of ints when the box lies inside a tensor of ``size``, else a SourceError.

    >>> _check_box("w", [1, 0], [2, 3], (4, 3), "ckpt/.metadata")
    ((1, 0), (2, 3))
    """
    def dims(value: Any) -> tuple[int, ...] | None:
        if not isinstance(value, (tuple, list)) or not all(_count(d) for d in value):
            return None
        return tuple(int(d) for d in value)

    o, s = dims(offset), dims(shape)
    if o is None or s is None or len(o) != len(size) or len(s) != len(size) or any(a + b > d for a, b, d in zip(o, s, size)):
        raise SourceError(f"cannot read the box at offset {_safe_repr(offset)} of shape {_safe_repr(shape)} of tensor {key!r}: "
                          f"it does not lie inside the tensor, whose shape is {list(size)}", where=where)  # fmt: skip
    return o, s


def _box_planner(fqn: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> Any:
    """A ``DefaultLoadPlanner`` whose state dict is ``{fqn: box-shaped tensor}`` and whose plan
    reads the box ``(offset, shape)`` of ``fqn``: DCP's own read items of the saved chunks that
    overlap it (``create_read_items_for_chunk_list``), each narrowed into the box tensor.
    ``planner.items`` holds the plan once made."""
    import torch
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class _BoxPlanner(DefaultLoadPlanner):
        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.items: list[Any] = []

        def create_local_plan(self) -> Any:
            box = ChunkStorageMetadata(offsets=torch.Size(offset), sizes=torch.Size(shape))
            self.items = create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [box])
            return LoadPlan(self.items)

        def lookup_tensor(self, index: Any) -> Any:
            return self.state_dict[index.fqn]  # the box itself; each read item's dest_offsets are relative to it

    return _BoxPlanner()


def _storage_reader(folder: Path, metadata: Any) -> Any:
    """torch's ``FileSystemReader`` of ``folder``, handing back ``metadata`` (read inertly)
    instead of unpickling ``.metadata`` itself."""
    import copy

    from torch.distributed.checkpoint import FileSystemReader

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("rank") is not None:
                raise FileNotFoundError("remap reads the global .metadata only")
            return copy.copy(metadata)  # DCP's planner may set fields on it; the tensors' records stay shared

    return _Reader(folder)
