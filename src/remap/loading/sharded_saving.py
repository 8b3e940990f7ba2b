"""Saving a sharded model (FSDP2 ``fully_shard``, tensor parallel ``parallelize_module``, DTensors
on any mesh) from every rank of a process group, never the whole model on one rank.

``save_sharded(module, path)`` is called on every rank with the same arguments:

- a DCP folder (``.dcp``, or an existing DCP checkpoint): each rank writes its own part with
  ``torch.distributed.checkpoint.save`` into one hidden temporary folder that rank 0 names,
  and rank 0 swaps it in as a whole (as :func:`remap.loading.saving.save_dcp` does on one process);
- ``.safetensors`` (one file, or shards and an index with ``max_shard_size``): rank 0 writes
  the header from the global shapes and dtypes every rank knows, then the tensors one at a
  time, each gathered with ``full_tensor()`` (a collective) and freed before the next;
- ``.pt``/``.pth``/``.bin``/``.ckpt`` is refused: ``torch.save`` needs the whole state_dict.

Every decision is taken together: the ranks compare what they hold (names, global shapes,
dtypes, ties) before anything is written, and any rank's failure makes every rank raise the
same UsageError, with the previous checkpoint left in place and no temporary left behind.

>>> SAFETENSORS_DTYPES["bfloat16"]
'BF16'
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InternalError, RemapError, UsageError
from ..meta import is_dtensor
from .sharded import agreed
from .saving import (
    _check_dcp_target,
    _check_targets,
    _check_tensors_only,
    _folder_lock,
    _fsync_dir,
    _is_dcp_folder,
    _make_folder,
    _retire_index,
    _swap_in,
    _temp_prefix,
    _umask,
    _write_sharded,
    atomic_path,
    clean_stale_temporaries,
    parse_size,
    save_format,
)

if TYPE_CHECKING:
    import torch

__all__ = ["save_sharded", "check_sharded_savable", "SAFETENSORS_DTYPES"]

#: torch dtype name -> the dtype string of a safetensors header (the names the safetensors library writes).
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ", "complex64": "C64", "uint64": "U64",
    "uint32": "U32", "uint16": "U16",
}  # fmt: skip


def check_sharded_savable(path: str | os.PathLike[str], *, fmt: str | None = None, max_shard_size: int | str | None = None,
                          what: str = "save") -> str:  # fmt: skip
    """The format :func:`save_sharded` writes to ``path``, or the UsageError it raises for it
    (an unknown suffix, torch.save's formats, max_shard_size with a DCP folder), on this rank
    alone and before anything is loaded.

    >>> check_sharded_savable("out/model.safetensors"), check_sharded_savable("out/run.dcp")
    ('safetensors', 'dcp')
    >>> check_sharded_savable("model.pt")
    Traceback (most recent call last):
    ...
    remap.errors.UsageError: save: cannot save 'model.pt' from a sharded model: torch.save needs the whole state_dict in one process; save to a .safetensors file (written one tensor at a time) or a .dcp folder (each rank writes its part)
    """
    found = save_format(path, what=what) if fmt is None else fmt
    if found not in ("safetensors", "torch", "dcp"):
        raise UsageError(f"cannot save {str(path)!r}: unknown format {found!r}; expected safetensors or dcp", where=what)
    if found == "torch":
        raise UsageError(f"cannot save {str(path)!r} from a sharded model: torch.save needs the whole state_dict in one "
                         "process; save to a .safetensors file (written one tensor at a time) or a .dcp folder "
                         "(each rank writes its part)", where=what)  # fmt: skip
    if found == "dcp" and max_shard_size is not None:
        _check_dcp_target(Path(path), sharded=True, what=what)
    if found == "safetensors" and max_shard_size is not None:
        parse_size(max_shard_size)
    return found


def save_sharded(module: torch.nn.Module, path: str | os.PathLike[str], *, fmt: str | None = None,
                 max_shard_size: int | str | None = None, what: str = "save") -> dict[str, Any]:  # fmt: skip
    """Write ``module``'s state_dict from every rank of the default process group; call it on
    every rank with the same arguments. ``fmt`` (``safetensors`` or ``dcp``) overrides the
    format the suffix says. Returns the same description on every rank:
    ``{"path", "format", "ranks"}`` (and ``"shards"`` for a sharded safetensors save).

    The keys are those of :func:`remap.loading.freeze.plain_state_dict`; a DTensor is
    written as its full (global) tensor, a plain tensor (a buffer FSDP leaves unsharded) as
    rank 0 holds it. Parameters tied under two names are written once in safetensors and
    named in the metadata under ``remap.tied``, as :func:`remap.loading.saving.save_state_dict`
    does. Rank 0's extra memory while writing safetensors is one full tensor.

    Raises a UsageError on every rank when any rank fails (the message names the rank and
    what it met); what ``path`` held before is then kept and nothing of this save is left.

    Example, on every rank (``torchrun --nproc-per-node 4``)::

        fully_shard(model)                                        # or parallelize_module(...)
        save_sharded(model, "out/run.dcp")                        # each rank writes its part
        save_sharded(model, "out/model.safetensors", max_shard_size="5GB")  # rank 0 writes, streamed
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError(f"cannot save {str(path)!r} with save_sharded: no torch.distributed process group is "
                         "initialised; call it on every rank after init_process_group (torchrun), or use "
                         "save_state_dict for a module in one process", where=what)  # fmt: skip
    final = Path(path)
    chosen, error = None, None
    try:
        chosen = check_sharded_savable(final, fmt=fmt, max_shard_size=max_shard_size, what=what)
    except Exception as exc:  # noqa: BLE001 - agreed on below, raised on every rank
        error = exc
    _agree(error, final, what=what, kept="nothing was written")
    if chosen == "dcp":
        return _save_dcp(module, final, what=what)
    limit = parse_size(max_shard_size) if max_shard_size is not None else None
    return _save_safetensors(module, final, limit=limit, what=what)


# ---------------------------------------------------------------------------- agreeing


def _describe(exc: BaseException) -> str:
    """One line for what a rank met."""
    if isinstance(exc, RemapError):
        return exc.message
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename!r}" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


def _agree(error: BaseException | None, final: Path, *, what: str, kept: str | Callable[[], str], payload: Any = None) -> list[Any]:
    """Gather every rank's outcome (``error`` or None, with ``payload``); raise on every rank
    when any failed, else return the payloads in rank order.

    The same error on every rank is raised as it is; otherwise every rank raises one
    UsageError naming the first rank that failed, and says what is kept (``kept``)."""
    import torch.distributed as dist

    every: list[Any] = [None] * dist.get_world_size()
    mine = None if error is None else (_describe(error), type(error).__name__)
    dist.all_gather_object(every, (mine, payload))
    failed = [(rank, outcome) for rank, (outcome, _) in enumerate(every) if outcome is not None]
    if not failed:
        return [p for _, p in every]
    if len(failed) == len(every) and len({o for _, o in failed}) == 1 and isinstance(error, RemapError):
        raise agreed(error)  # every rank met the same: the command line says it once (rank 0)
    rank, (message, _) = failed[0]
    others = [r for r, _ in failed[1:]]
    also = f" (and on rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))})" if others else ""
    kept_text = kept() if callable(kept) else kept
    said = message.endswith(("is kept", "nothing was written"))  # the rank's own message says it already
    raise agreed(UsageError(f"cannot save {str(final)!r} from {len(every)} ranks: rank {rank} failed{also}: {message}"
                            f"{'' if said else f'; {kept_text}'}", where=what)) from error  # fmt: skip


@dataclass(frozen=True)
class _Entry:
    """What every rank knows of one state_dict entry: its name, global shape and dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    sharded: bool

    @property
    def itemsize(self) -> int:
        import torch

        return getattr(torch, self.dtype).itemsize  # type: ignore[no-any-return]

    @property
    def nbytes(self) -> int:
        count = 1
        for n in self.shape:
            count *= n
        return count * self.itemsize


def _state(module: torch.nn.Module) -> dict[str, Any]:
    """The plain state_dict, detached (DTensors stay DTensors)."""
    import torch

    from .freeze import plain_state_dict

    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in plain_state_dict(module).items()}


def _entries(state: dict[str, Any]) -> list[_Entry]:
    import torch

    return [_Entry(k, tuple(v.shape), str(v.dtype).removeprefix("torch."), is_dtensor(v))
            for k, v in state.items() if isinstance(v, torch.Tensor)]  # fmt: skip


def _ties(module: torch.nn.Module, state: dict[str, Any]) -> dict[str, str]:
    """Names of ``state`` that are the same parameter or buffer object as an earlier name
    (tied weights): name -> the first name. Decided from the module's structure, which
    every rank shares (not from storage addresses: an empty local shard has none)."""
    order = {k: i for i, k in enumerate(state)}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    names: dict[int, list[str]] = {}
    for name, t in named:
        if name in order:
            names.setdefault(id(t), []).append(name)
    tied: dict[str, str] = {}
    for group in names.values():
        first, *others = sorted(set(group), key=order.__getitem__)  # the first in the state_dict keeps the tensor
        tied.update((other, first) for other in others)
    return dict(sorted(tied.items(), key=lambda kv: order[kv[0]]))


def _differences(every: list[tuple[list[_Entry], dict[str, str]]]) -> str | None:
    """How the ranks' views of the model differ (the first difference), or None."""
    base, base_ties = every[0]
    for rank, (entries, ties) in enumerate(every[1:], start=1):
        if entries == base and ties == base_ties:
            continue
        mine, theirs = {e.key: e for e in base}, {e.key: e for e in entries}
        for key in theirs.keys() - mine.keys():
            return f"rank {rank} holds {key!r} ({_show(theirs[key])}), which rank 0 does not"
        for key in mine.keys() - theirs.keys():
            return f"rank 0 holds {key!r} ({_show(mine[key])}), which rank {rank} does not"
        for key, entry in mine.items():
            if theirs[key] != entry:
                return f"{key!r} is {_show(entry)} on rank 0 and {_show(theirs[key])} on rank {rank}"
        if [e.key for e in entries] != [e.key for e in base]:
            return f"rank {rank} lists the state_dict's keys in another order than rank 0"
        return f"the tied parameters differ: {base_ties or 'none'} on rank 0, {ties or 'none'} on rank {rank}"
    return None


def _show(entry: _Entry) -> str:
    return f"{'a DTensor' if entry.sharded else 'a plain tensor'} {entry.dtype} {list(entry.shape)}"


def _agree_on_model(module: torch.nn.Module, final: Path, *, what: str, check: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any], list[_Entry], dict[str, str]]:  # fmt: skip
    """Every rank's state, entries and ties, after ``check`` passed on every rank and the
    ranks agree on names, global shapes, dtypes and ties; a UsageError on every rank otherwise."""
    state: dict[str, Any] = {}
    entries: list[_Entry] = []
    ties: dict[str, str] = {}
    error = None
    try:
        state = _state(module)
        entries, ties = _entries(state), _ties(module, state)
        check(state)
    except Exception as exc:  # noqa: BLE001 - agreed on below
        error = exc
    every = _agree(error, final, what=what, kept=_kept_text(final), payload=(entries, ties))
    difference = _differences(every)
    if difference is not None:
        raise UsageError(f"cannot save {str(final)!r}: the ranks hold different models: {difference}; every rank must "
                         f"build the same model; {_kept_text(final)()}", where=what)  # fmt: skip
    return state, entries, ties


def _kept_text(final: Path) -> Callable[[], str]:
    def kept() -> str:
        try:
            if _is_dcp_folder(final):
                return "the previous checkpoint is kept"
            return "the previous file is kept" if final.is_file() or _index(final).is_file() else "nothing was written"
        except OSError:
            return "nothing was written"

    return kept


def _index(final: Path) -> Path:
    return final.parent / f"{final.name}.index.json"


# ---------------------------------------------------------------------------- DCP


def _save_dcp(module: torch.nn.Module, final: Path, *, what: str) -> dict[str, Any]:
    """Every rank's part through ``dcp.save`` into one temporary folder rank 0 named; rank 0
    swaps it in. A failure anywhere removes the temporary folder and keeps the old one."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    kept = _kept_text(final)
    state, _, _ = _agree_on_model(module, final, what=what, check=lambda state: None)
    tmp: Path | None = None
    published = False
    try:
        error = None
        try:
            if rank == 0:
                tmp = _make_temporary_folder(final, what=what)
        except Exception as exc:  # noqa: BLE001
            error = exc
        named = _agree(error, final, what=what, kept=kept, payload=str(tmp) if tmp is not None else None)[0]
        shared = Path(named)
        error = None if rank == 0 or shared.is_dir() else UsageError(
            f"it cannot see the temporary folder {str(shared)!r} that rank 0 made: every rank must write to one shared file system")
        _agree(error, final, what=what, kept=kept)
        _agree(_dcp_write(state, shared, rank), final, what=what, kept=kept)
        error = None
        old: Path | None = None
        if rank == 0:
            try:
                old = _publish(shared, final, what=what)
                published = True
            except Exception as exc:  # noqa: BLE001
                error = exc
        _agree(error, final, what=what, kept=kept)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp is not None and not published:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"path": str(final), "format": "dcp", "ranks": world}


def _make_temporary_folder(final: Path, *, what: str) -> Path:
    """Rank 0: check the target, clean what killed saves left, make the hidden temporary folder."""
    _check_dcp_target(final, what=what)
    _make_folder(final)
    with _folder_lock(final.parent):
        clean_stale_temporaries(final.parent)
    try:
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name), suffix=".tmp", dir=final.parent))
    except OSError as exc:
        raise UsageError(f"cannot write {str(final)!r}: {exc.strerror or exc}", where=what) from None


def _dcp_write(state: dict[str, Any], folder: Path, rank: int) -> BaseException | None:
    """This rank's part of the checkpoint (a collective); what this rank met, or None."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the lowest rank writes what several ranks hold (replicas, plain buffers): rank 0's value
            planner = DefaultSavePlanner(dedup_save_to_lowest_rank=True)
            dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, sync_files=True), planner=planner)
    except dcp.CheckpointException as exc:  # a BaseException on every rank: each rank's own error is inside
        failure = exc.failures.get(rank)
        if failure is not None:
            return failure[0] if isinstance(failure, tuple) else failure
        return None if exc.failures else RuntimeError(str(exc))  # another rank's failure comes through _agree
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def _publish(tmp: Path, final: Path, *, what: str) -> Path | None:
    """Rank 0: make the temporary folder whole on disk and swap it in; the replaced folder (to remove) or None."""
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        _fsync_dir(tmp)
        with _folder_lock(final.parent):
            _check_dcp_target(final, what=what)
            old = _swap_in(tmp, final)
            _fsync_dir(final.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {str(final)!r}: {exc.strerror or exc}", where=what) from None
    return old


# ---------------------------------------------------------------------------- safetensors, streamed


def _save_safetensors(module: torch.nn.Module, final: Path, *, limit: int | None, what: str) -> dict[str, Any]:
    """Rank 0 writes; every rank gathers each DTensor in turn (see :class:`_Stream`)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    kept = _kept_text(final)

    def check(state: dict[str, Any]) -> None:
        _check_tensors_only(state, final, "safetensors", sharded=limit is not None, what=what)
        unknown = sorted({str(v.dtype) for v in state.values() if str(v.dtype).removeprefix("torch.") not in SAFETENSORS_DTYPES})
        if unknown:
            raise UsageError(f"cannot save {str(final)!r}: safetensors has no dtype for {', '.join(unknown)}", where=what)
        if sys.byteorder != "little":
            raise UsageError(f"cannot save {str(final)!r}: safetensors files are little-endian, this machine is not", where=what)
        if rank == 0:
            _check_targets(final, sharded=limit is not None, what=what)

    state, entries, tied = _agree_on_model(module, final, what=what, check=check)
    layout = _layout([e for e in entries if e.key not in tied], limit)
    stream = _Stream(state, [key for shard in layout for key in shard])
    result: dict[str, Any] | None = None
    error: BaseException | None = None
    if rank == 0:
        try:
            result = _write_files(stream, layout, {e.key: e for e in entries}, tied, final)
        except _Stopped:
            pass  # the rank that stopped says why
        except Exception as exc:  # noqa: BLE001 - agreed on below
            error = exc
        finally:
            stream.release()
    else:
        error = stream.follow()
    outcome = _agree(error, final, what=what, kept=kept, payload=result)[0]
    return {**outcome, "ranks": world}


def _layout(entries: list[_Entry], limit: int | None) -> list[list[str]]:
    """The files (one, or shards of at most ``limit`` bytes in state_dict order, as
    save_state_dict cuts them), each its keys in the order their bytes are written: wider
    dtypes first (every tensor then starts at a multiple of its element size), else in order."""
    shards: list[list[_Entry]] = [[]]
    size = 0
    for e in entries:
        if limit is not None and shards[-1] and size + e.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [[e.key for e in sorted(shard, key=lambda e: -e.itemsize)] for shard in shards]


class _Stopped(Exception):
    """Rank 0 learnt that another rank stopped the save (that rank reports why)."""


class _Stream:
    """The tensors in write order, each gathered when asked for, on every rank together.

    Before each tensor, and once after the last, the ranks meet (an ``all_reduce`` of one
    flag), so that one rank stopping (rank 0's failed write, another rank's failed gather)
    stops every rank at the next meeting instead of leaving them in a gather it never joins.
    Rank 0 asks through :meth:`take` and :meth:`finish` (before it publishes), the other
    ranks :meth:`follow`; rank 0 calls :meth:`release` when done, failed or not.
    """

    def __init__(self, state: dict[str, Any], order: list[str]) -> None:
        self.state, self.order = state, order
        self.position = 0  # meetings held
        self.stopped = False

    def _go(self, *, failed: bool = False) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1 if failed else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.position += 1
        self.stopped = bool(flag.item())
        return not self.stopped

    def take(self, key: str) -> torch.Tensor:
        """Rank 0: ``key``'s full tensor (the next in order)."""
        if self.position >= len(self.order) or self.order[self.position] != key:
            raise InternalError(f"sharded save: asked for {key!r} at position {self.position} of {self.order}")
        if not self._go():
            raise _Stopped
        return _full(self.state[key])

    def finish(self) -> None:
        """Rank 0, after the last tensor and before publishing: did every rank gather them all?"""
        if self.position != len(self.order):
            raise InternalError(f"sharded save: finished at position {self.position} of {len(self.order)} tensors")
        if not self._go():
            raise _Stopped

    def follow(self) -> BaseException | None:
        """Every other rank: join each gather until the end or until a rank stops; what this rank met, or None."""
        error: BaseException | None = None
        for key in self.order:
            if not self._go(failed=error is not None):
                return error
            if is_dtensor(self.state[key]):
                try:
                    _full(self.state[key])  # the collective; this rank drops the result at once
                except Exception as exc:  # noqa: BLE001 - said at the next meeting, reported by _agree
                    error = exc
        self._go(failed=error is not None)
        return error

    def release(self) -> None:
        """Rank 0, at the end: tell the ranks still waiting at a meeting that the save stopped."""
        if not self.stopped and self.position <= len(self.order):
            self._go(failed=True)


def _full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor gathered from every rank (a collective), a plain tensor as it is."""
    if is_dtensor(value):
        return value.full_tensor()  # type: ignore[attr-defined, no-any-return]
    return value


def _write_files(stream: _Stream, layout: list[list[str]], entries: dict[str, _Entry], tied: dict[str, str], final: Path) -> dict[str, Any]:  # fmt: skip
    """Rank 0: one file, or the shards and their index through saving.py's publishing."""
    import torch

    metadata = {"format": "pt", "remap.tied": ",".join(f"{a}={b}" for a, b in tied.items())}
    if len(layout) == 1:
        with _folder_lock(final.parent):
            clean_stale_temporaries(final.parent)
        with atomic_path(final, commit=lambda: _retire_index(final)) as tmp:
            _write_file(stream, layout[0], entries, metadata, tmp, last=True)
        return {"path": str(final), "format": "safetensors"}
    # saving.py publishes (names, claims, index); it sees each shard's names and sizes only
    shapes = [{k: torch.empty(entries[k].shape, dtype=getattr(torch, entries[k].dtype), device="meta") for k in keys}
              for keys in layout]  # fmt: skip

    def write(n: int, path: Path) -> None:
        with atomic_path(path) as tmp:
            _write_file(stream, layout[n], entries, metadata, tmp, last=n == len(layout) - 1)

    return _write_sharded(shapes, final, "safetensors", tied, write=write)


def _header(keys: list[str], entries: dict[str, _Entry], metadata: dict[str, str]) -> bytes:
    """A safetensors header for ``keys`` laid out in that order: JSON padded with spaces to a
    multiple of 8 bytes, after its length (8 bytes, little-endian)."""
    offsets, start = {}, 0
    for key in keys:
        offsets[key] = (start, start + entries[key].nbytes)
        start += entries[key].nbytes
    header: dict[str, Any] = {"__metadata__": metadata}
    for key in (k for k in entries if k in offsets):  # listed in state_dict order
        e = entries[key]
        header[key] = {"dtype": SAFETENSORS_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": list(offsets[key])}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _write_file(stream: _Stream, keys: list[str], entries: dict[str, _Entry], metadata: dict[str, str], tmp: Path, *,
                last: bool) -> None:  # fmt: skip
    """Rank 0: the header, then each tensor's bytes as it arrives, each freed before the next."""
    with open(tmp, "wb") as fh:
        fh.write(_header(keys, entries, metadata))
        for key in keys:
            full = stream.take(key)
            if tuple(full.shape) != entries[key].shape or str(full.dtype).removeprefix("torch.") != entries[key].dtype:
                raise InternalError(f"sharded save: {key!r} gathered as {full.dtype} {list(full.shape)}, planned as "
                                    f"{entries[key].dtype} {list(entries[key].shape)}")  # fmt: skip
            with _bytes_of(full) as data:
                fh.write(data)
            del full
        fh.flush()
    if last:
        stream.finish()  # every rank gathered every tensor: checked before the last file is published


@contextlib.contextmanager
def _bytes_of(t: torch.Tensor) -> Iterator[memoryview]:
    """The bytes of ``t`` as a memoryview (no copy when it is contiguous on the CPU)."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy() if flat.numel() else None
    try:
        yield memoryview(data) if data is not None else memoryview(b"")
    finally:
        del data, flat
