"""Atomic writes: a temporary file in the same folder, fsync, then rename over the target.

A write that is interrupted leaves either the old file or the new one, never a part.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "report.json")
>>> write_text_atomic(path, "{}")
>>> open(path).read()
'{}'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_path", "write_text_atomic", "save_state_dict", "parse_size"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    final = Path(path)
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder for {str(final)!r}: {exc.strerror}") from None
    if final.is_dir():
        raise UsageError(f"cannot write {str(final)!r}: it is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from ``5GB`` (decimal), ``500MiB`` (binary) or an int.

    >>> parse_size("5GB"), parse_size("1.5KiB"), parse_size(100)
    (5000000000, 1536, 100)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 1:
            raise UsageError(f"max_shard_size: expected a positive size, found {size}")
        return size
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise UsageError(f"max_shard_size: expected a size such as 5GB, 500MiB or a number of bytes, found {size!r}")
    return int(float(m.group(1)) * SIZE_UNITS[(m.group(2) or "B").upper()])


def save_state_dict(module: torch.nn.Module, path: str | os.PathLike[str], *, max_shard_size: int | str | None = None) -> dict[str, Any]:
    """Write ``module.state_dict()`` atomically: safetensors unless the name ends in .pt/.pth/.bin/.ckpt.

    Tied parameters are written once (safetensors refuses shared storage); the other names
    are listed in the metadata under ``remap.tied``. Above ``max_shard_size`` the tensors
    go into shards ``name-00001-of-0000N.ext`` with an index ``name.ext.index.json``, the
    layout transformers and remap read; every shard is complete before the index appears.
    Returns a description.
    """
    state = module.state_dict()
    fmt = "torch" if Path(path).suffix in (".pt", ".pth", ".bin", ".ckpt") else "safetensors"
    tensors, tied = _untie(state)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    shards = _shard(tensors, limit) if limit is not None else [tensors]
    if len(shards) == 1:
        _write(shards[0], Path(path), fmt, tied if fmt == "safetensors" else {}, state if fmt == "torch" else None)
        return {"path": str(path), "format": fmt}
    return _write_sharded(shards, Path(path), fmt, tied)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _shard(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        if shards[-1] and size + _nbytes(t) > limit:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += _nbytes(t)
    return shards


def _write(tensors: dict[str, torch.Tensor], path: Path, fmt: str, tied: dict[str, str], full: dict[str, Any] | None = None) -> None:
    import torch

    with atomic_path(path) as tmp:
        if fmt == "torch":
            torch.save(full if full is not None else tensors, tmp)
        else:
            from safetensors.torch import save_file

            meta = {"format": "pt", "remap.tied": ",".join(f"{a}={b}" for a, b in tied.items())}
            save_file(tensors, str(tmp), metadata=meta)


def _write_sharded(shards: list[dict[str, torch.Tensor]], path: Path, fmt: str, tied: dict[str, str]) -> dict[str, Any]:
    stem, suffix = path.name[: -len(path.suffix)] if path.suffix else path.name, path.suffix
    names = [f"{stem}-{n + 1:05d}-of-{len(shards):05d}{suffix}" for n in range(len(shards))]
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    for name, shard in zip(names, shards):
        _write(shard, path.parent / name, fmt, tied)
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for shard in shards for t in shard.values()), "remap.tied": tied},
        "weight_map": {**weight_map, **{alias: weight_map[first] for alias, first in tied.items()}} if fmt == "torch" else weight_map,
    }
    index_path = path.parent / f"{path.name}.index.json"
    import json

    write_text_atomic(index_path, json.dumps(index, indent=2) + "\n")
    return {"path": str(index_path), "format": fmt, "shards": names}


def _untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors, tied = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    return tensors, tied
