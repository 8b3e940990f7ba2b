"""The original's file layout, read before an export and kept when it is written.

An export is written in the format of ``--like`` (safetensors or torch.save), with its
safetensors ``__metadata__``, the key its torch.save checkpoint nests the weights under, and
for a sharded original the same key-to-shard assignment (one shard file per original shard,
the index written last), through the atomic saves of :mod:`remap.loading.saving`.

Where the export goes (``save``): for a single-file original, a file name of the same
format, or a folder (the original's file name inside it); for a sharded original, a
folder (the original's index name inside it) or a ``*.index.json`` path.

>>> Layout("safetensors", Path("out/model.safetensors")).describe()
'safetensors file out/model.safetensors'
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SourceError, UsageError
from ..files import read_text_capped, refuse_non_regular_target
from ..loading.saving import SAVE_FORMATS, save_format, save_tensors

if TYPE_CHECKING:
    import torch

    from ..sources.readers import Source

__all__ = ["Layout", "plan_layout"]

INDEX = ".index.json"
WRITABLE = {"safetensors": "safetensors", "torch-zip": "torch", "torch-legacy": "torch", "safetensors-index": "safetensors", "torch-index": "torch"}
MAX_INDEX_BYTES = 100_000_000


@dataclass(frozen=True)
class Layout:
    """How an export is written: ``fmt`` (``safetensors`` or ``torch``) at ``path`` (the file,
    or for shards the name their index is named after); ``shards``: (original shard name, its
    keys) in order, or None for one file; ``metadata``: each file's safetensors
    ``__metadata__``; ``index_metadata``; ``nest``: the keys a torch.save file nests the
    tensors under; ``notes``: what the export could not keep, for the report."""

    fmt: str
    path: Path
    shards: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    metadata: tuple[dict[str, str] | None, ...] | None = None
    index_metadata: dict[str, Any] | None = None
    nest: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        if self.shards is not None:
            return f"{self.fmt} shards ({len(self.shards)}) indexed by {self.path.parent / (self.path.name + INDEX)}"
        return f"{self.fmt} file {self.path}"

    def write(self, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Write ``tensors`` (every key of the export, in order) atomically; returns what was written."""
        if self.fmt == "safetensors":
            tensors = _unshared(tensors)
        if self.shards is None:
            return save_tensors(tensors, self.path, metadata=list(self.metadata) if self.metadata else None, nest=self.nest, what="export")
        groups, metadata = [], []
        for n, (_, keys) in enumerate(self.shards):
            present = [k for k in keys if k in tensors]
            if present:
                groups.append(present)
                metadata.append(self.metadata[n] if self.metadata else None)
        saved = save_tensors(tensors, self.path, shards=groups, metadata=metadata, index_metadata=self.index_metadata, what="export")
        return {**saved, "original_shards": [name for name, keys in self.shards if any(k in tensors for k in keys)]}


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors holds each tensor in its own bytes: a second key on memory already written
    (a tied parameter saved under two names) gets a copy."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        out[key] = t.clone() if ptr is not None and ptr in seen else t
        if ptr is not None:
            seen.add(ptr)
    return out


def plan_layout(like: Source, save: str | os.PathLike[str]) -> Layout:
    """The layout of an export of ``like`` written to ``save``; a UsageError before anything is
    read when ``save`` cannot hold it (another format, a single file for a sharded original)."""
    layout = _layout(like.description, Path(save))
    written = layout.path if layout.shards is None else layout.path.parent / (layout.path.name + INDEX)
    refuse_non_regular_target(written, error=UsageError, what="export (--save)")  # a FIFO or a device is never replaced
    return layout


def _layout(desc: dict[str, Any], path: Path) -> Layout:
    fmt = WRITABLE.get(str(desc.get("format")))
    if desc.get("kind") != "file" or fmt is None:
        return _other(desc, path)
    original = Path(desc["path"])
    if desc["format"].endswith("-index"):
        return _sharded(original, path, fmt)
    if _is_folder(path):
        path = path / original.name
    _same_format(path, fmt, original)
    if fmt == "safetensors":
        return Layout(fmt, path, metadata=(_safetensors_metadata(original),))
    nest = tuple(desc["key"].split(".")) if desc.get("key") else ()
    notes = ()
    others = [k for k in desc.get("entries", {}) if k not in nest[:1]]
    if nest and others:
        shown = ", ".join(map(repr, others[:5])) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        notes = (f"--like holds other entries beside {desc['key']!r} ({shown}); the export writes the weights only",)
    return Layout(fmt, path, nest=nest, notes=notes)


def _is_folder(path: Path) -> bool:
    return path.is_dir() or str(path).endswith((os.sep, "/")) or (not path.suffix and not path.exists())


def _same_format(path: Path, fmt: str, original: Path) -> None:
    written = save_format(path, what="export (--save)")
    if written != fmt:
        raise UsageError(f"cannot export to {str(path)!r}: the original {str(original)!r} is a {fmt} file and the export keeps its "
                         f"format; give a name ending in {_suffixes(fmt)}", where="export (--save)")  # fmt: skip


def _suffixes(fmt: str) -> str:
    return " or ".join(s for s, f in SAVE_FORMATS.items() if f == fmt)


def _other(desc: dict[str, Any], path: Path) -> Layout:
    """An original remap cannot write (ONNX, GGUF, Keras, NumPy, in memory): the format ``save`` names."""
    fmt = save_format(path, what="export (--save)")
    what = f"a {desc.get('format')} file" if desc.get("kind") == "file" else f"a {desc.get('kind')}"
    return Layout(fmt, path, notes=(f"--like is {what}, which remap does not write: the export is a {fmt} file, with --like's names, "
                                    "shapes and dtypes",))  # fmt: skip


def _sharded(index: Path, save: Path, fmt: str) -> Layout:
    if save.name.endswith(INDEX):
        folder, base = save.parent, save.name[: -len(INDEX)]
    elif save.suffix.lower() in SAVE_FORMATS:
        raise UsageError(f"cannot export to {str(save)!r}: the original is sharded ({index.name}), and the export keeps its shards; "
                         f"give a folder, or the index's path (e.g. {str(save.parent / index.name)!r})", where="export (--save)")  # fmt: skip
    else:
        folder, base = save, index.name[: -len(INDEX)] if index.name.endswith(INDEX) else index.stem
    try:
        written = save_format(base)
    except UsageError:
        raise UsageError(f"cannot name the export's shards after the index {str(index)!r}: {base!r} is not a weights file name "
                         f"(expected NAME{_suffixes(fmt).split(' or ')[0]}{INDEX}); give --save a *.index.json path",
                         where="export (--save)") from None  # fmt: skip
    if written != fmt:
        raise UsageError(f"cannot export to {str(folder / (base + INDEX))!r}: the original's shards are {fmt} files; "
                         f"name the index NAME{_suffixes(fmt).split(' or ')[0]}{INDEX}", where="export (--save)")  # fmt: skip
    data = _read_index(index)
    weight_map = data["weight_map"]
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    shards = tuple((name, tuple(by_shard[name])) for name in sorted(by_shard))
    metadata = tuple(_safetensors_metadata(index.parent / name) for name, _ in shards) if fmt == "safetensors" else None
    index_metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    stem = base[: -len(Path(base).suffix)]
    expected = [f"{stem}-{n + 1:05d}-of-{len(shards):05d}{Path(base).suffix}" for n in range(len(shards))]
    notes = ()
    if [name for name, _ in shards] != expected:
        notes = (f"the original's shards are named {shards[0][0]!r}...; the export's are {expected[0]!r}... "
                 "(each holding the keys of the original shard in the same place)",)  # fmt: skip
    return Layout(fmt, folder / base, shards, metadata, dict(index_metadata), notes=notes)


def _read_index(index: Path) -> dict[str, Any]:
    """The original's index (already read and checked once by the source reader)."""
    try:
        data = json.loads(read_text_capped(index, limit=MAX_INDEX_BYTES, error=SourceError, what="a sharded checkpoint index"))
    except (ValueError, RecursionError):  # changed since the source reader checked it
        raise SourceError("not a sharded checkpoint index: it is no longer valid JSON", where=str(index)) from None
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise SourceError("not a sharded checkpoint index: expected a JSON object with a `weight_map`", where=str(index))
    return data


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, as its strings ({} when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise SourceError(f"cannot read the safetensors header's __metadata__: {exc}", where=str(path)) from None
