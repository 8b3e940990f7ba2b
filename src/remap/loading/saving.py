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
import re
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..files import refuse_non_regular_target

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_path", "write_text_atomic", "save_state_dict", "save_tensors", "save_dcp", "parse_size", "save_format",
           "check_savable", "clean_stale_temporaries", "SAVE_FORMATS", "FOLDER_FORMATS", "TEMPORARY_PATTERN"]  # fmt: skip

SAVE_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch"}
#: Saves that write a folder: a torch.distributed.checkpoint (``save_dcp``), also to an existing DCP folder of any name.
FOLDER_FORMATS = {".dcp": "dcp"}


def save_format(path: str | os.PathLike[str], *, what: str = "save") -> str:
    """The format a save to ``path`` writes, from its suffix: ``safetensors``, ``torch``, or
    ``dcp`` (a ``.dcp`` name or an existing DCP folder: a torch.distributed.checkpoint folder).

    Any other suffix is a UsageError naming the accepted ones (``what`` says where the
    path came from), raised before anything is loaded or written.

    >>> save_format("out/model.safetensors"), save_format("model.PTH")
    ('safetensors', 'torch')
    >>> save_format("out.npz", what="output.save")
    Traceback (most recent call last):
    ...
    remap.errors.UsageError: output.save: cannot save 'out.npz': unknown format '.npz'; expected a file name ending in .safetensors, .pt, .pth, .bin or .ckpt, or a folder name ending in .dcp (torch.distributed.checkpoint)
    """
    suffix = Path(path).suffix
    fmt = SAVE_FORMATS.get(suffix.lower()) or FOLDER_FORMATS.get(suffix.lower()) or ("dcp" if _is_dcp_folder(Path(path)) else None)
    if fmt is None:
        accepted = ", ".join(list(SAVE_FORMATS)[:-1]) + f" or {list(SAVE_FORMATS)[-1]}"
        found = f"unknown format {suffix!r}" if suffix else "the name has no suffix"
        raise UsageError(f"cannot save {str(path)!r}: {found}; expected a file name ending in {accepted}, "
                         "or a folder name ending in .dcp (torch.distributed.checkpoint)", where=what)  # fmt: skip
    return fmt


# ---------------------------------------------------------------------------- temporaries

# Every file a save creates before it is complete is hidden and says whose it is:
# ``.NAME.remap-HOST-PID-RANDOM.tmp`` (a file being written) or ``.STEM.remap-HOST-PID-RANDOM.shards``
# (the names a sharded save has claimed). HOST is a short hash of the host name, PID the
# writing process: a later save on the same host removes those whose process is gone.
TEMPORARY_PATTERN = re.compile(r"\.(?P<name>.*)\.remap-(?P<host>[0-9a-f]{6})-(?P<pid>[0-9]{1,10})-[a-z0-9_]+\.(?P<kind>tmp|shards)", re.DOTALL)
_NAME_KEEP = 100  # bytes of the target's name kept in a temporary's name (names are at most 255 bytes)


def _host_tag() -> str:
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:6]


_HOST = _host_tag()


def _temp_prefix(name: str) -> str:
    """``.NAME.remap-HOST-PID-`` for a temporary beside ``name`` (the name cut to fit)."""
    short = os.fsencode(name)[:_NAME_KEEP].decode("utf-8", "ignore")
    return f".{short}.remap-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (when in doubt: yes, so nothing of it is removed)."""
    if os.name != "posix" or pid == os.getpid():
        return True  # os.kill(pid, 0) would end the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # EPERM: someone else's running process
    return True


def _stale(entry: os.DirEntry[str]) -> re.Match[str] | None:
    """The name match of a temporary of a remap save on this host whose process is gone,
    owned by this user and a plain file (or a folder, not a link, for a ``.tmp``: a DCP
    save's); None for anything else."""
    found = TEMPORARY_PATTERN.fullmatch(entry.name)
    if found is None or found["host"] != _HOST or _alive(int(found["pid"])):
        return None
    try:
        info = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    folder = stat.S_ISDIR(info.st_mode) and found["kind"] == "tmp"
    if not (stat.S_ISREG(info.st_mode) or folder) or (hasattr(os, "geteuid") and info.st_uid != os.geteuid()):
        return None
    return found


def clean_stale_temporaries(folder: str | os.PathLike[str]) -> list[str]:
    """Remove what saves into ``folder`` that were killed left behind, and say so (a
    ``UserWarning`` naming the files): temporaries of remap's own (by name, see
    :data:`TEMPORARY_PATTERN`; files, and the hidden folders of DCP saves, with what they
    hold) written on this host by a process that no longer runs, and
    the shards such a save had claimed but never published (those no index names).
    Files of running saves, of other hosts and users, and everything else are left alone.
    Returns the names removed. Called by every save, holding the folder's save lock.
    """
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    removed: list[str] = []
    for entry in entries:
        found = _stale(entry)
        if found is None:
            continue
        if found["kind"] == "shards":
            removed += _release_claim(Path(entry.path))
        if entry.is_dir(follow_symlinks=False):
            import shutil

            shutil.rmtree(entry.path, ignore_errors=True)  # a DCP save's temporary folder; rmtree follows no link
        else:
            _remove([Path(entry.path)])
        removed.append(entry.name)
    if removed:
        import warnings

        shown = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
        warnings.warn(f"removed {len(removed)} file{'' if len(removed) == 1 else 's'} left in {str(folder)!r} by "
                      f"remap saves that were killed before they finished: {shown}", stacklevel=2)  # fmt: skip
    return removed


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold the save lock of ``folder`` (``flock`` on the folder itself: no lock file).

    Saves into one folder choose their shard names, publish and clean up one at a time;
    writing the shards happens outside it. Where ``flock`` is unavailable (Windows, some
    network file systems) saves are not serialised, and concurrent sharded saves to one
    path are then not guarded.
    """
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        fd = None
    try:
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)


# ---------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, commit: Callable[[], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically.

    The temporary file is fsynced before the rename and the folder after it, so a crash
    or a kill at any point leaves ``path`` as it was or complete. On any failure, a
    KeyboardInterrupt included, the temporary file is removed and ``path`` untouched. The
    new file gets the old file's permissions, or the umask's for a new file (not
    ``mkstemp``'s 0600). An OSError (disk full, permission denied, a name too long) is a
    UsageError naming the path; so is a ``path`` that exists and is not a regular file (a
    device node, a FIFO: it is never replaced). The temporary's name is
    ``.NAME.remap-HOST-PID-RANDOM.tmp`` (:data:`TEMPORARY_PATTERN`), so that a killed
    write's leftover is recognised and removed by a later save (:func:`clean_stale_temporaries`).
    ``commit``, if given, runs right after the rename, both under the folder's save lock.
    """
    final = Path(path)
    folder = final.parent
    _make_folder(final)
    _check_target(final, what="remap")
    tmp: str | None = None
    mode = _mode_for(final)
    mask = _hold_interrupts()  # a Ctrl-C while the temporary file is made lands below, where it is cleaned up
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(final.name), suffix=".tmp", dir=folder)
        os.close(fd)
        mask = _release_interrupts(mask)
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fchmod(fh.fileno(), mode)  # after the write: a writer may have replaced the file
            os.fsync(fh.fileno())
        if commit is None:
            os.replace(tmp, final)
            _fsync_dir(folder)
        else:
            with _folder_lock(folder):
                os.replace(tmp, final)
                _fsync_dir(folder)
                commit()
    except OSError as exc:
        _unlink(tmp)
        raise UsageError(f"cannot write {str(final)!r}: {exc.strerror or exc}{_kept(final)}") from None
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        _release_interrupts(mask)


def _make_folder(final: Path) -> None:
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder for {str(final)!r}: {exc.strerror}") from None


def _check_target(final: Path, *, what: str) -> None:
    """A UsageError unless ``final`` can be written: not a folder, not a device node, FIFO
    or socket (never replaced), and a name the file system takes (checked here, so that
    a name of 300 characters is one clear error before anything is loaded)."""
    limit = _name_max(final.parent)
    if len(os.fsencode(final.name)) > limit:
        raise UsageError(f"cannot write {str(final)!r}: its name is {len(os.fsencode(final.name))} bytes long, "
                         f"and the file system takes names of at most {limit} bytes")  # fmt: skip
    try:
        refuse_non_regular_target(final, error=UsageError, what=what)
    except OSError as exc:  # ENAMETOOLONG (a path too long), ELOOP, EACCES on a parent: what stat says
        raise UsageError(f"cannot write {str(final)!r}: {exc.strerror or exc}") from None


def _name_max(folder: Path) -> int:
    """The longest file name (in bytes) ``folder``'s file system takes (255 when it cannot say)."""
    while True:
        try:
            return int(os.pathconf(folder, "PC_NAME_MAX"))
        except (OSError, ValueError, AttributeError):
            if folder.parent == folder or not str(folder):
                return 255
            folder = folder.parent  # not there yet: its nearest existing parent's file system


def _kept(final: Path) -> str:
    """What a failed write left at ``final``, for its message."""
    try:
        return "; the previous file is kept" if final.is_file() else "; nothing was written"
    except OSError:
        return ""


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
    (:func:`remap.loading.freeze.plain_state_dict`), so the file loads into the model it came from.

    Tied parameters are written once (safetensors refuses shared storage); the other names
    are listed in the metadata under ``remap.tied``. Above ``max_shard_size`` the tensors
    go into shards ``name-00001-of-0000N.ext`` with an index ``name.ext.index.json``, the
    layout transformers and remap read; every shard is complete before the index appears.
    Returns a description.

    What ``path`` (or its index) holds is replaced as a whole: no file that the current
    index names is ever overwritten (a new set of shards takes other names while one is
    in place), and the files of the previous save at this path, a single file or a set of
    shards, are removed only once the new save is complete. A reader, or a save killed at
    any point, sees the old save or the new one, never a mix; so do concurrent saves to
    one path (each writes shards under names it alone holds; the last to publish wins
    whole). What killed saves left in the folder is removed first, with a warning
    (:func:`clean_stale_temporaries`). A target that is a device node, FIFO or socket, a
    name too long, and a write the file system refuses (disk full) are UsageErrors that
    keep the previous save.
    """
    from .freeze import plain_state_dict

    fmt = save_format(path)
    if fmt == "dcp":
        return save_dcp(module, path, max_shard_size=max_shard_size)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    _check_targets(Path(path), sharded=limit is not None, what="save")
    state = plain_state_dict(module)
    _check_tensors_only(state, path, fmt, sharded=limit is not None)
    tensors, tied = _untie(state)
    shards = _shard(tensors, limit) if limit is not None else [tensors]
    if len(shards) == 1:
        with _folder_lock(Path(path).parent):
            clean_stale_temporaries(Path(path).parent)
        _write(shards[0], Path(path), fmt, tied if fmt == "safetensors" else {}, state if fmt == "torch" else None,
               commit=lambda: _retire_index(Path(path)))  # fmt: skip
        return {"path": str(path), "format": fmt}
    return _write_sharded(shards, Path(path), fmt, tied)


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike[str], *, shards: list[list[str]] | None = None,
                 metadata: list[dict[str, str] | None] | None = None, index_metadata: dict[str, Any] | None = None,
                 nest: tuple[str, ...] = (), what: str = "save") -> dict[str, Any]:  # fmt: skip
    """Write ``tensors`` atomically in a layout given from outside (``remap export`` keeps the
    original's), with :func:`save_state_dict`'s guarantees: a single file, or with ``shards``
    (lists of keys, in order) one file per list named ``name-0000i-of-0000N.ext`` and the
    index ``name.ext.index.json`` written last. ``metadata`` is each file's safetensors
    ``__metadata__`` (None: remap's own); ``index_metadata`` the index's ``metadata`` (its
    ``total_size`` recomputed); ``nest`` the keys a torch.save file holds the tensors under
    (``("state_dict",)`` writes ``{"state_dict": tensors}``). Returns a description.
    """
    fmt = save_format(path, what=what)
    final = Path(path)
    if fmt == "dcp":
        if shards is not None or nest:
            raise UsageError(f"cannot save {str(path)!r}: a DCP checkpoint keeps neither shards nor nesting of another "
                             "layout; give a .safetensors or .pt name", where=what)  # fmt: skip
        return _write_dcp(tensors, final, what=what)
    _check_targets(final, sharded=shards is not None, what=what)
    if shards is None:
        full: Any = tensors
        for name in reversed(nest):
            full = {name: full}
        with _folder_lock(final.parent):
            clean_stale_temporaries(final.parent)
        _write(tensors, final, fmt, {}, full if fmt == "torch" else None, commit=lambda: _retire_index(final),
               metadata=metadata[0] if metadata else None)  # fmt: skip
        return {"path": str(path), "format": fmt}
    groups = [{k: tensors[k] for k in keys} for keys in shards]
    return _write_sharded(groups, final, fmt, {}, metadata=metadata, index_metadata=index_metadata)


def check_savable(module: torch.nn.Module, path: str | os.PathLike[str], *, sharded: bool = False, what: str = "save") -> None:
    """Raise the UsageError a save of ``module`` to ``path`` would raise for its format, before
    anything is loaded: an unknown suffix, or state_dict entries that are not tensors (a
    module's ``_extra_state``), which only a single torch.save file holds; a path that is
    a folder, a device node, a FIFO or a socket (never replaced), or a name too long."""
    fmt = save_format(path, what=what)
    if fmt == "dcp":
        _check_dcp_target(Path(path), sharded=sharded, what=what)
        return
    _check_targets(Path(path), sharded=sharded, what=what)
    if fmt == "safetensors" or sharded:
        _check_tensors_only(module.state_dict(), path, fmt, sharded=sharded, what=what)


# ---------------------------------------------------------------------------- DCP folders


def save_dcp(module: torch.nn.Module, path: str | os.PathLike[str], *, max_shard_size: int | str | None = None,
             what: str = "save") -> dict[str, Any]:  # fmt: skip
    """Write ``module``'s state_dict as a torch.distributed.checkpoint folder (``.metadata`` +
    ``*.distcp``) with ``torch.distributed.checkpoint.save`` on this process, replacing the
    folder as a whole (see :func:`_write_dcp`). Non-tensor entries (``_extra_state``) are kept,
    as DCP keeps them. ``dcp.load`` reads it back, on one process or resharded on many.

    >>> import tempfile, torch
    >>> out = save_dcp(torch.nn.Linear(2, 3), os.path.join(tempfile.mkdtemp(), "m.dcp"))
    >>> out["format"], sorted(os.listdir(out["path"]))
    ('dcp', ['.metadata', '__0_0.distcp'])
    """
    from .freeze import plain_state_dict

    if max_shard_size is not None:
        raise UsageError(f"cannot save {str(path)!r} with max_shard_size: a DCP checkpoint is a folder that DCP lays out "
                         "itself; leave max_shard_size out", where=what)  # fmt: skip
    import torch

    state = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in plain_state_dict(module).items()}
    return _write_dcp(state, Path(path), what=what)


def _is_dcp_folder(path: Path) -> bool:
    """An existing folder holding a DCP checkpoint's ``.metadata`` (a save there writes DCP)."""
    try:
        return path.is_dir() and (path / ".metadata").is_file()
    except OSError:
        return False


def _check_dcp_target(final: Path, *, sharded: bool = False, what: str = "save") -> None:
    """A UsageError unless ``final`` is missing, empty or a DCP folder (never a file, never a
    folder holding anything else), with a name the file system takes."""
    if sharded:
        raise UsageError(f"cannot save {str(final)!r} with max_shard_size: a DCP checkpoint is a folder that DCP lays out "
                         "itself; leave max_shard_size out", where=what)  # fmt: skip
    limit = _name_max(final.parent)
    if len(os.fsencode(final.name)) > limit:
        raise UsageError(f"cannot write {str(final)!r}: its name is {len(os.fsencode(final.name))} bytes long, "
                         f"and the file system takes names of at most {limit} bytes", where=what)  # fmt: skip
    try:
        if not os.path.lexists(final):
            return
        if final.is_symlink() or not final.is_dir():
            raise UsageError(f"cannot save a DCP checkpoint to {str(final)!r}: it exists and is not a folder", where=what)
        names = os.listdir(final)
    except OSError as exc:
        raise UsageError(f"cannot write {str(final)!r}: {exc.strerror or exc}", where=what) from None
    if names and not _is_dcp_folder(final):
        raise UsageError(f"cannot save a DCP checkpoint to {str(final)!r}: the folder holds other files and no .metadata; "
                         "remap replaces only an empty folder or a DCP checkpoint", where=what)  # fmt: skip


def _write_dcp(state: dict[str, Any], final: Path, *, what: str = "save") -> dict[str, Any]:
    """``dcp.save`` into a hidden temporary folder beside ``final`` (files fsynced by DCP, the
    folder here), then swapped in by one rename: ``renameat2(RENAME_EXCHANGE)`` where Linux
    offers it, so that a reader sees the old folder or the new one, never a mix; elsewhere
    the old folder is renamed aside first. The old folder is removed after the swap."""
    import shutil
    import warnings

    import torch.distributed.checkpoint as dcp

    _check_dcp_target(final, what=what)
    _make_folder(final)
    with _folder_lock(final.parent):
        clean_stale_temporaries(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), suffix=".tmp", dir=final.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled ...: assuming ... a single process"
            try:
                dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=True)
            except dcp.CheckpointException as exc:  # a BaseException: the rank's own error is inside
                failures = list(exc.failures.values())
                raise failures[0][0] if failures and isinstance(failures[0][0], Exception) else RuntimeError(str(exc)) from None
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        with _folder_lock(final.parent):
            _check_dcp_target(final, what=what)
            old = _swap_in(tmp, final)
            _fsync_dir(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"cannot write {str(final)!r}: {exc.strerror or exc}{'; the previous checkpoint is kept' if _is_dcp_folder(final) else ''}",
                         where=what) from None  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(final), "format": "dcp"}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _swap_in(tmp: Path, final: Path) -> Path | None:
    """Put the folder ``tmp`` at ``final``; returns where the replaced folder now is (to remove), or None."""
    if not os.path.lexists(final):
        os.rename(tmp, final)
        return None
    if _exchange(tmp, final):
        return tmp  # tmp now holds the old checkpoint
    aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), suffix=".tmp", dir=final.parent))
    os.rename(final, aside / "old")
    os.rename(tmp, final)
    return aside


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unavailable."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: a file system or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))


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


def _check_targets(path: Path, *, sharded: bool, what: str) -> None:
    """:func:`_check_target` for what a save to ``path`` replaces: the file, and for a
    sharded save its index too (the longest name it writes)."""
    _check_target(path, what=what)
    if sharded:
        _check_target(_index_path(path), what=what)


def _index_path(path: Path) -> Path:
    return path.parent / f"{path.name}.index.json"


def _indexed_names(index_path: Path) -> set[str]:
    """Every file name the ``weight_map`` of the index at ``index_path`` holds; empty when
    there is no readable index (a regular file of at most 100 MB: a FIFO put there does
    not stall the save)."""
    import json

    from ..files import read_text_capped

    try:
        weight_map = json.loads(read_text_capped(index_path, limit=100 * 2**20, error=UsageError, what="an index")).get("weight_map", {})
        return {str(v) for v in weight_map.values()}
    except (OSError, ValueError, AttributeError, RecursionError, UsageError):
        return set()


def _indexed_shards(index_path: Path, stem: str) -> set[str]:
    """The shard files an existing index at ``index_path`` names that a save of ``stem`` wrote
    (``stem-*``, plain names in the same folder); empty when there is no readable index."""
    names = _indexed_names(index_path)
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


def _write(tensors: dict[str, torch.Tensor], path: Path, fmt: str, tied: dict[str, str], full: dict[str, Any] | None = None,
           *, commit: Callable[[], None] | None = None, metadata: dict[str, str] | None = None) -> None:  # fmt: skip
    """One file, atomically. A write the file system refuses (disk full, file too large)
    is the OSError it is, so :func:`atomic_path` reports it and keeps the previous file,
    whichever library wrote."""
    with atomic_path(path, commit=commit) as tmp:
        if fmt == "torch":
            _torch_save(full if full is not None else tensors, tmp)
        else:
            _safetensors_save(tensors, tmp, tied, metadata)


class _Sink:
    """A binary file for ``torch.save`` that keeps what stopped a write — an OSError, or a
    KeyboardInterrupt delivered inside the write — which torch's writer would otherwise
    report as a RuntimeError of its own that does not say why."""

    def __init__(self, fh: Any) -> None:
        self.fh: Any = fh
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.fh.write(data))
        except (OSError, KeyboardInterrupt) as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def _torch_save(obj: Any, tmp: Path) -> None:
    import torch

    with open(tmp, "wb") as fh:
        sink = _Sink(fh)
        try:
            torch.save(obj, sink)  # type: ignore[arg-type]
            fh.flush()
        except (RuntimeError, KeyboardInterrupt):
            if sink.error is not None:
                raise sink.error from None  # Ctrl-C stays Ctrl-C; a full disk stays an OSError
            raise


_IO_ERROR = re.compile(r"I/O error: (?P<text>.*?) \(os error (?P<errno>\d+)\)")


def _safetensors_save(tensors: dict[str, torch.Tensor], tmp: Path, tied: dict[str, str], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt", "remap.tied": ",".join(f"{a}={b}" for a, b in tied.items())} if metadata is None else (dict(metadata) or None)
    try:
        save_file(tensors, str(tmp), metadata=meta)
    except Exception as exc:  # SafetensorError: the OS error is in its text, "I/O error: ... (os error 28)"
        found = _IO_ERROR.search(str(exc))
        if found is None or type(exc).__name__ != "SafetensorError":
            raise
        raise OSError(int(found["errno"]), os.strerror(int(found["errno"]))) from None


def _write_sharded(shards: list[dict[str, torch.Tensor]], path: Path, fmt: str, tied: dict[str, str], *,
                   metadata: list[dict[str, str] | None] | None = None, index_metadata: dict[str, Any] | None = None,
                   write: Callable[[int, Path], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Shards under names this save alone holds, then the index, then the previous set goes.
    ``write(n, path)``, if given, writes shard ``n`` atomically itself (the sharded save of
    a DTensor model streams it); ``shards`` then need only names, shapes and dtypes (meta tensors).

    The names are chosen and claimed (a ``.shards`` claim file) under the folder's save
    lock: the plain ``stem-00001-of-0000N`` names when no file and no running save has
    them, else the same names with a random token. Only this save writes them, so the
    index it publishes names its own shards only, whatever other saves to the same path
    do at the same time; publishing (reading the index it replaces, writing its own,
    removing the replaced one's shards) happens under the lock too, so the last save to
    publish wins whole. A save that fails removes its own shards and claim.
    """
    import json

    folder, stem, suffix = path.parent, _stem(path), path.suffix
    index_path = _index_path(path)
    _make_folder(path)
    with _folder_lock(folder):
        names = _choose_names(folder, stem, suffix, len(shards))
        claim = _claim(folder, stem, index_path.name, names)
    published = False
    try:
        for n, (name, shard) in enumerate(zip(names, shards)):
            if write is not None:
                write(n, folder / name)
            else:
                _write(shard, folder / name, fmt, tied, metadata=metadata[n] if metadata else None)
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(_nbytes(t) for shard in shards for t in shard.values())
        index = {
            "metadata": {"total_size": total, "remap.tied": tied} if index_metadata is None else {**index_metadata, "total_size": total},
            "weight_map": {**weight_map, **{alias: weight_map[first] for alias, first in tied.items()}} if fmt == "torch" else weight_map,
        }
        with _folder_lock(folder):
            replaced = _indexed_shards(index_path, stem)
            write_text_atomic(index_path, json.dumps(index, indent=2) + "\n")
            published = True
            # the new set is published: the one it replaced (its shards, or a single file) goes
            _remove([folder / n for n in replaced - set(names)] + ([path] if path.is_file() else []) + [claim])
    except UsageError as exc:
        raise UsageError(f"{exc.message.split('; ')[0]}: the sharded save to {str(path)!r} stopped, its new shards "
                         "were removed, and what was saved there before is kept", where=exc.where) from None  # fmt: skip
    finally:
        # Interrupted after the index's rename but before the flag was set (Ctrl-C during the
        # folder's fsync): the index on disk is then ours, and its shards must stay.
        if not published:
            ours = bool(set(names) & _indexed_shards(index_path, stem))
            _remove(([] if ours else [folder / n for n in names]) + [claim])
    return {"path": str(index_path), "format": fmt, "shards": names}


def _shard_names(stem: str, suffix: str, count: int, token: str | None) -> list[str]:
    tail = f".{token}{suffix}" if token else suffix
    return [f"{stem}-{n + 1:05d}-of-{count:05d}{tail}" for n in range(count)]


def _choose_names(folder: Path, stem: str, suffix: str, count: int) -> list[str]:
    """Shard names no file and no running save's claim has (call under the folder's lock):
    the plain ones when free, else with a fresh random token. Stale leftovers of killed
    saves are cleaned first, so that their names come free again."""
    import secrets

    clean_stale_temporaries(folder)
    taken = _claimed(folder)
    token = None
    while True:
        names = _shard_names(stem, suffix, count, token)
        if not taken.intersection(names) and not any(os.path.lexists(folder / n) for n in names):
            return names
        token = secrets.token_hex(4)


def _claim(folder: Path, stem: str, index_name: str, names: list[str]) -> Path:
    """Write the claim file of a sharded save: which index it publishes, which shards it writes."""
    import json

    fd, claim = tempfile.mkstemp(prefix=_temp_prefix(stem), suffix=".shards", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"index": index_name, "shards": names}, fh)
    return Path(claim)


def _read_claim(claim: Path) -> tuple[str, list[str]]:
    """(index name, shard names) of a claim file; plain names in its folder only, empty when unreadable."""
    import json

    from ..files import read_text_capped

    try:
        data = json.loads(read_text_capped(claim, limit=1 << 20, error=UsageError, what="a claim file"))
        index, names = str(data["index"]), [str(n) for n in data["shards"]]
    except (OSError, ValueError, TypeError, KeyError, RecursionError, UsageError):
        return "", []
    plain = [n for n in [index, *names] if n and "/" not in n and "\\" not in n and n not in (".", "..")]
    return (index if index in plain else ""), [n for n in names if n in plain]


def _claimed(folder: Path) -> set[str]:
    """The shard names that the claims in ``folder`` (of running saves, any host) hold."""
    names: set[str] = set()
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            found = TEMPORARY_PATTERN.fullmatch(entry.name)
            if found is not None and found["kind"] == "shards":
                names.update(_read_claim(Path(entry.path))[1])
    return names


def _release_claim(claim: Path) -> list[str]:
    """Remove the shards a dead save claimed that the index it aimed at does not name
    (it may have been killed after publishing). Returns the names removed."""
    index, names = _read_claim(claim)
    if not index or not names:
        return []
    named = _indexed_names(claim.parent / index)
    gone = [n for n in names if n not in named and (claim.parent / n).is_file()]
    _remove([claim.parent / n for n in gone])
    return gone


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
