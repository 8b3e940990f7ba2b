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
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_path", "write_text_atomic", "save_state_dict", "parse_size", "save_format", "check_savable", "SAVE_FORMATS"]

SAVE_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch"}


def save_format(path: str | os.PathLike[str], *, what: str = "save") -> str:
    """The format a save to ``path`` writes, from its suffix: ``safetensors`` or ``torch``.

    Any other suffix is a UsageError naming the accepted ones (``what`` says where the
    path came from), raised before anything is loaded or written.

    >>> save_format("out/model.safetensors"), save_format("model.PTH")
    ('safetensors', 'torch')
    >>> save_format("out.npz", what="output.save")
    Traceback (most recent call last):
    ...
    remap.errors.UsageError: output.save: cannot save 'out.npz': unknown format '.npz'; expected a file name ending in .safetensors, .pt, .pth, .bin or .ckpt
    """
    suffix = Path(path).suffix
    fmt = SAVE_FORMATS.get(suffix.lower())
    if fmt is None:
        accepted = ", ".join(list(SAVE_FORMATS)[:-1]) + f" or {list(SAVE_FORMATS)[-1]}"
        found = f"unknown format {suffix!r}" if suffix else "the name has no suffix"
        raise UsageError(f"cannot save {str(path)!r}: {found}; expected a file name ending in {accepted}", where=what)
    return fmt


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The temporary file is fsynced before the rename and the folder after it, so a crash
    or a kill at any point leaves ``path`` as it was or complete. On any failure, a
    KeyboardInterrupt included, the temporary file is removed and ``path`` untouched. The
    new file gets the old file's permissions, or the umask's for a new file (not
    ``mkstemp``'s 0600). An OSError (disk full, permission denied) is a UsageError naming the path.
    """
    final = Path(path)
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder for {str(final)!r}: {exc.strerror}") from None
    if final.is_dir():
        raise UsageError(f"cannot write {str(final)!r}: it is a directory")
    tmp: str | None = None
    mode = _mode_for(final)
    mask = _hold_interrupts()  # a Ctrl-C while the temporary file is made lands below, where it is cleaned up
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        mask = _release_interrupts(mask)
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), mode)  # after the write: a writer may have replaced the file
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(folder)
    except OSError as exc:
        _unlink(tmp)
        raise UsageError(f"cannot write {str(final)!r}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        _release_interrupts(mask)


def _unlink(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _hold_interrupts() -> Any:
    """Block SIGINT in this thread (a pressed Ctrl-C waits); the previous mask, or None where unsupported."""
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    except (AttributeError, ValueError, OSError):
        return None


def _release_interrupts(mask: Any) -> None:
    """Restore the mask from :func:`_hold_interrupts`: a Ctrl-C that waited is raised now."""
    if mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return None


def _mode_for(final: Path) -> int:
    """The permissions ``final`` should get: its current ones, or 0666 less the umask."""
    try:
        return final.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0o022)
        os.umask(umask)
        return 0o666 & ~umask


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
    """Write ``module``'s state_dict atomically: .safetensors, or torch.save for .pt/.pth/.bin/.ckpt
    (any other suffix is a UsageError).

    The keys are those of the plain architecture: a BatchNorm that ``batchnorm: frozen``
    replaced by FrozenBatchNorm2d gets its ``num_batches_tracked`` back, as it was loaded
    (:func:`remap.freeze.plain_state_dict`), so the file loads into the model it came from.

    Tied parameters are written once (safetensors refuses shared storage); the other names
    are listed in the metadata under ``remap.tied``. Above ``max_shard_size`` the tensors
    go into shards ``name-00001-of-0000N.ext`` with an index ``name.ext.index.json``, the
    layout transformers and remap read; every shard is complete before the index appears.
    Returns a description.

    What ``path`` (or its index) holds is replaced as a whole: no file that the current
    index names is ever overwritten (a new set of shards takes other names while one is
    in place), and the files of the previous save at this path, a single file or a set of
    shards, are removed only once the new save is complete. A reader, or a save killed at
    any point, sees the old save or the new one, never a mix.
    """
    from .freeze import plain_state_dict

    fmt = save_format(path)
    state = plain_state_dict(module)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    _check_tensors_only(state, path, fmt, sharded=limit is not None)
    tensors, tied = _untie(state)
    shards = _shard(tensors, limit) if limit is not None else [tensors]
    if len(shards) == 1:
        _write(shards[0], Path(path), fmt, tied if fmt == "safetensors" else {}, state if fmt == "torch" else None)
        _retire_index(Path(path))
        return {"path": str(path), "format": fmt}
    return _write_sharded(shards, Path(path), fmt, tied)


def check_savable(module: torch.nn.Module, path: str | os.PathLike[str], *, sharded: bool = False, what: str = "save") -> None:
    """Raise the UsageError a save of ``module`` to ``path`` would raise for its format, before
    anything is loaded: an unknown suffix, or state_dict entries that are not tensors (a
    module's ``_extra_state``), which only a single torch.save file holds."""
    fmt = save_format(path, what=what)
    if fmt == "safetensors" or sharded:
        _check_tensors_only(module.state_dict(), path, fmt, sharded=sharded, what=what)


def _check_tensors_only(state: dict[str, Any], path: str | os.PathLike[str], fmt: str, *, sharded: bool, what: str = "save") -> None:
    import torch

    others = [f"{k} ({type(v).__name__})" for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not others or (fmt == "torch" and not sharded):
        return
    holder = "a sharded save" if sharded else "safetensors"
    shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
    raise UsageError(f"cannot save {str(path)!r}: {holder} holds tensors only, and the state_dict has {len(others)} "
                     f"entr{'y' if len(others) == 1 else 'ies'} that {'is' if len(others) == 1 else 'are'} not: {shown}; "
                     "save to a single .pt file instead (torch.save keeps them)", where=what)  # fmt: skip


def _index_path(path: Path) -> Path:
    return path.parent / f"{path.name}.index.json"


def _indexed_shards(index_path: Path, stem: str) -> set[str]:
    """The shard files an existing index at ``index_path`` names that a save of ``stem`` wrote
    (``stem-*``, plain names in the same folder); empty when there is no readable index."""
    import json

    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
        names = {str(v) for v in weight_map.values()}
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in names if n.startswith(f"{stem}-") and "/" not in n and "\\" not in n and n not in (".", "..")}


def _remove(paths: Iterator[Path] | list[Path]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


def _retire_index(path: Path) -> None:
    """After a single-file save: a sharded save of the same path from before would still be
    found first (a folder's index wins over its single file), so remove it, index first."""
    index_path = _index_path(path)
    if not index_path.is_file():
        return
    old = _indexed_shards(index_path, _stem(path))
    _remove([index_path])
    _fsync_dir(path.parent)
    _remove([path.parent / n for n in old if n != path.name])


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


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
    import json
    import secrets

    stem, suffix = _stem(path), path.suffix
    index_path = _index_path(path)
    old = _indexed_shards(index_path, stem)
    names = [f"{stem}-{n + 1:05d}-of-{len(shards):05d}{suffix}" for n in range(len(shards))]
    if old & set(names):  # the published index names these files: the new set must not overwrite them
        token = secrets.token_hex(4)
        names = [f"{stem}-{n + 1:05d}-of-{len(shards):05d}.{token}{suffix}" for n in range(len(shards))]
    weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
    for name, shard in zip(names, shards):
        _write(shard, path.parent / name, fmt, tied)
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for shard in shards for t in shard.values()), "remap.tied": tied},
        "weight_map": {**weight_map, **{alias: weight_map[first] for alias, first in tied.items()}} if fmt == "torch" else weight_map,
    }
    write_text_atomic(index_path, json.dumps(index, indent=2) + "\n")
    # the new set is published: the previous save at this path (its shards, or a single file) goes
    _remove([path.parent / n for n in old - set(names)] + ([path] if path.is_file() else []))
    return {"path": str(index_path), "format": fmt, "shards": names}


def _untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import torch

    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors, tied = {}, {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue  # _extra_state: only a single torch.save file holds it, from the full state
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    return tensors, tied
