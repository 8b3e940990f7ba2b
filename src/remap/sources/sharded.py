"""Sharded checkpoints: a ``*.index.json`` whose ``weight_map`` names the shard file of each tensor.

Only the index and each shard's metadata are read when it is opened; each shard is opened
by content like any file (:func:`~remap.sources.readers._open_reader`), and must lie in
the index's folder (a Hugging Face cache snapshot's links into its ``blobs/`` excepted,
unless links are trusted).

>>> _hub_blobs(Path("/cache/models--org--name/snapshots/abc123/sub"))
PosixPath('/cache/models--org--name/blobs')
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import SourceError
from ..files import file_kind, read_text_capped
from ..meta import TensorMeta
from .readers import (
    Source,
    _check_names,
    _describe,
    _did_you_mean,
    _FileSource,
    _open_reader,
    _Reader,
    _short,
    _unique_keys,
)

__all__ = ["MAX_INDEX_BYTES"]

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
