"""Streaming a plan into a module: batches of tensors read from the file, loaded, released.

Each batch covers at most ``batch_bytes`` of the file (or one tensor, when a tensor is
larger); a source without file spans (in memory, a factory, a legacy pickle) is one batch,
so every read that could fail happens before the first write. Each batch goes through
``load_state_dict(strict=False)`` of the modules that own its keys — so every call walks
only those modules — and torch's missing and unexpected keys are cross-checked against
the plan.

How a tensor whose bytes sit plainly in a file (safetensors, torch zip checkpoints) is
read depends on what it needs:

* **direct**: a tensor that goes into its target unchanged (no op, same dtype, contiguous
  in the file) is read with ``pread`` straight from the file into the memory it ends in:
  the target's own parameter or buffer, or, for a meta-device target, the fresh tensor
  that is assigned. One kernel copy from the page cache, no mapping, no page of the file
  in the process; large tensors are read in pieces by a few threads, which are given all
  of them at the start and read ahead of the batch being loaded. See :class:`_Direct`
  for why this still goes through ``load_state_dict``.
* **staged**: any other tensor is read with ``pread`` into a fresh buffer of its batch,
  which the op, the cast or ``load_state_dict`` copies from; the buffers are freed after
  the batch, so the process never holds more than about one batch of them. Never a view
  of a mapping: a file truncated under a mapping would kill the process with SIGBUS,
  while a short ``pread`` is a :class:`SourceError`.
* **kept mapped** (``mmap_weights``, opt-in, meta-device targets only): the assigned
  tensors *are* views of a private copy-on-write mapping of the file; nothing is copied.

Every file is opened (and mapped for ``mmap_weights``) before the first write. A failure
after the first write (a file truncated or rewritten during the load, an I/O error, an
interrupt) leaves the module as it was: :class:`Rollback` puts back what was written.

>>> plan_batches([("a", 10), ("b", 10), ("c", 30)], 20)
[['a', 'b'], ['c']]
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InternalError, SourceError
from ..meta import is_dtensor
from ..rules.ops import CastOverflow
from ..report.records import Failure
from .dtype_policy import RangeFailure

if TYPE_CHECKING:
    from ..planning.planner import Assignment, Plan
    from .dtype_policy import DtypePolicy
    from ..sources.readers import Source, Span
    from ..rules.steps import Recipe

__all__ = ["BATCH_BYTES", "LoadStats", "Rollback", "plan_batches", "read_tensor", "stream"]

BATCH_BYTES = 64 << 20
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "uint16": 2, "uint32": 4, "uint64": 8}  # fmt: skip
#: Direct reads are cut into pieces of at most this size, shared among the reading threads.
PIECE_BYTES = 32 << 20
#: Tensors from this size on (or PIECE_BYTES, if smaller) go to the reading threads; a
#: smaller one is read where it is loaded (a hand-off to a thread costs more than its read).
THREAD_MIN_BYTES = 4 << 20
#: Reading threads at most (fewer when torch is told to use fewer threads).
MAX_READ_THREADS = 8
#: A meta-device target's fresh tensor of this size or more has the pages of each piece
#: faulted in by one ``madvise(MADV_POPULATE_WRITE)`` just before the piece is read into
#: it, instead of one fault per 4 KiB page inside the kernel's copy: remap.load of a
#: meta target took 0.85x the wall time (median of 9 same-round ratios) in
#: ``benchmarks/first_touch.py`` (1.36 GB, 218 tensors). Linux 5.14 and later; elsewhere
#: the read faults the pages in as before. Huge pages (MADV_HUGEPAGE) measured slower there.
POPULATE_MIN_BYTES = 4 << 20
_MADV_POPULATE_WRITE = 23

Progress = Callable[[int, int, int, int], None]  # bytes done, bytes total, tensors done, tensors total


@dataclass
class LoadStats:
    """What one apply read and how long it took (recorded in the report)."""

    bytes: int = 0
    tensors: int = 0
    batches: int = 0
    load_calls: int = 0
    seconds: float = 0.0
    zero_copy: int = 0
    direct: int = 0
    mmap_weights: int = 0
    materialised: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        rate = self.bytes / self.seconds if self.seconds else None
        return {"bytes_read": self.bytes, "tensors": self.tensors, "batches": self.batches, "load_calls": self.load_calls,
                "seconds": round(self.seconds, 6), "bytes_per_second": rate, "zero_copy_tensors": self.zero_copy,
                "direct_tensors": self.direct, "mmap_weights_tensors": self.mmap_weights,
                "materialised": list(self.materialised)}  # fmt: skip


def plan_batches(sizes: Sequence[tuple[str, int]], budget: int) -> list[list[str]]:
    """Consecutive groups of keys whose sizes add up to at most ``budget`` (a larger key alone)."""
    batches: list[list[str]] = []
    current: list[str] = []
    total = 0
    for key, size in sizes:
        if current and total + size > budget:
            batches.append(current)
            current, total = [], 0
        current.append(key)
        total += size
    if current:
        batches.append(current)
    return batches


def _nbytes(source: Source, key: str) -> int:
    meta = source.meta[key]
    return meta.numel * ITEMSIZE.get(meta.dtype, 4)


def _order(assignments: Iterable[Assignment], spans: Mapping[str, Span | None], source: Source) -> list[Assignment]:
    """Assignments in the order their bytes sit in the files: one forward pass per file."""
    position = {k: n for n, k in enumerate(source.meta)}

    def where(a: Assignment) -> tuple[str, int]:
        span = spans[a.sources[0]]
        return (span.path, span.offset) if span is not None else ("", position.get(a.sources[0], 0))

    return sorted(assignments, key=where)


# --------------------------------------------------------------------------- files


class _Files:
    """Every file the load reads, opened as reads need it and mapped whole (a private,
    copy-on-write mapping) where ``mmap_weights`` keeps tensors as views of it. Everything
    else is read with ``pread``: no read-only mapping, so a file truncated during the load
    is an error, never a SIGBUS. At most :attr:`cap` files stay open at once (the least
    recently used idle one is closed first), so a checkpoint of thousands of shards loads
    under the usual limit of 1,024 open files.
    """

    def __init__(self, spans: Iterable[Span], private: Iterable[str] = (), *, cap: int | None = None) -> None:
        ends: dict[str, int] = defaultdict(int)
        sizes: dict[str, int] = {}
        for s in spans:
            if s.path not in sizes:
                sizes[s.path] = os.path.getsize(s.path)
            _check_span(s, sizes[s.path])
            ends[s.path] = max(ends[s.path], s.offset + s.nbytes)
        self.cap = cap if cap is not None else _open_file_cap()
        self.private: dict[str, mmap.mmap | None] = {}
        self._open: OrderedDict[str, list[Any]] = OrderedDict()  # path -> [file, readers now]
        self._lock = threading.Lock()
        for path in dict.fromkeys(private):
            with self.opened(path) as fd:
                try:
                    self.private[path] = mmap.mmap(fd, ends[path], access=mmap.ACCESS_COPY) if ends[path] else None
                except (OSError, ValueError) as exc:
                    raise SourceError(f"cannot map the file for reading: {exc}", where=path) from None

    @contextmanager
    def opened(self, path: str) -> Iterator[int]:
        """The descriptor of ``path``, open for as long as the block runs."""
        with self._lock:
            entry = self._open.get(path)
            if entry is None:
                self._close_idle(keep=self.cap - 1)
                try:
                    entry = self._open[path] = [open(path, "rb"), 0]  # noqa: SIM115 - closed by _close_idle/close
                except OSError as exc:
                    raise SourceError(f"cannot open the file for reading: {exc.strerror or exc}", where=path) from None
            self._open.move_to_end(path)
            entry[1] += 1
        try:
            yield entry[0].fileno()
        finally:
            with self._lock:
                entry[1] -= 1

    def _close_idle(self, *, keep: int) -> None:
        """Close the least recently used files nobody reads until at most ``keep`` are open."""
        for path in [p for p, (_, users) in self._open.items() if not users][: max(0, len(self._open) - keep)]:
            self._open.pop(path)[0].close()

    def close(self) -> None:
        """Close the files. A private map stays alive for as long as a tensor views it (the
        mapping holds its own reference to the file)."""
        with self._lock:
            for f, _ in self._open.values():
                f.close()
            self._open.clear()
        self.private = {}


def _open_file_cap() -> int:
    """How many checkpoint files a load keeps open: a quarter of the process's limit, 8 to 256.

    >>> 8 <= _open_file_cap() <= 256
    True
    """
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY or soft <= 0:
            soft = 1024
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        soft = 1024
    return max(8, min(256, soft // 4))


def _pread_path(files: _Files, path: str, offset: int, buf: memoryview, owner: torch.Tensor | None = None,
                populate: bool = False) -> None:  # fmt: skip
    """:func:`_pread_into` through the file pool; with ``populate`` (fresh memory of
    :data:`POPULATE_MIN_BYTES` or more) the pages are faulted in first, see :func:`_populate`."""
    if populate:
        _populate(buf)
    with files.opened(path) as fd:
        _pread_into(fd, offset, buf, path, owner)


def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` (address, length, advice) -> 0 or -1; None off Linux."""
    global _MADVISE
    if _MADVISE is False:
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            except (OSError, AttributeError):
                fn = None
        _MADVISE = fn
    return _MADVISE  # type: ignore[return-value]


_MADVISE: Any = False  # not looked up yet


def _populate(buf: memoryview) -> bool:
    """Fault in the pages under ``buf`` (fresh, writable memory that is about to be
    written whole) with one ``madvise(MADV_POPULATE_WRITE)``; False where that is not
    available (Linux < 5.14, not Linux) or refused: the write then faults them in itself.
    The pages are those the read would fault in anyway (the first and last may be shared
    with a neighbour, which populating leaves as it is), so memory use does not change.

    >>> import torch
    >>> t = torch.empty(1 << 20, dtype=torch.uint8)
    >>> _populate(_writable_bytes(t)) in (True, False)
    True
    """
    madvise = _madvise()
    if madvise is None or not len(buf):
        return False
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    page = mmap.PAGESIZE
    lo, hi = start & ~(page - 1), (start + len(buf) + page - 1) & ~(page - 1)
    return madvise(lo, hi - lo, _MADV_POPULATE_WRITE) == 0


def _check_span(span: Span, size: int) -> None:
    """A span whose view cannot be made is an error before the first write, not half-way."""
    itemsize = ITEMSIZE.get(span.dtype)
    last = span.storage_offset + sum((d - 1) * st for d, st in zip(span.shape, span.stride)) if all(span.shape) else -1
    problems = []
    if itemsize is None:
        problems.append(f"dtype {span.dtype} cannot be mapped")
    elif (last + 1) * itemsize > span.nbytes:
        problems.append(f"the tensor needs {(last + 1) * itemsize} bytes of its storage, which has {span.nbytes}")
    if span.offset < 0 or span.offset + span.nbytes > size:
        problems.append(f"bytes {span.offset}..{span.offset + span.nbytes} lie outside the file ({size} bytes)")
    if problems:
        raise SourceError(f"cannot read a tensor in place: {'; '.join(problems)}", where=span.path)


def _view(span: Span, mm: mmap.mmap | None) -> torch.Tensor:
    dtype = getattr(torch, span.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=span.nbytes, offset=span.offset) if span.nbytes and mm is not None else torch.empty(0, dtype=torch.uint8)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if span.offset % itemsize:
        raw = raw.clone()  # unaligned for this dtype: one copy of this tensor
    return raw.view(dtype).as_strided(span.shape, span.stride, span.storage_offset)


def _staged(span: Span, fd: int) -> torch.Tensor:
    """The tensor of ``span``, read with ``pread`` into a fresh buffer (no mapping: a file
    truncated meanwhile is a SourceError, not a SIGBUS)."""
    raw = torch.empty(span.nbytes, dtype=torch.uint8)
    if span.nbytes:
        _pread_into(fd, span.offset, _writable_bytes(raw), span.path, raw)
    return raw.view(getattr(torch, span.dtype)).as_strided(span.shape, span.stride, span.storage_offset)


def read_tensor(source: Source, key: str) -> torch.Tensor:
    """One source tensor, read with ``pread`` where it has a span in a file (never through a
    mapping that a truncation would turn into SIGBUS), else by ``Source.read``."""
    span = source.span(key)
    if span is None:
        return source.read(key)
    try:
        with open(span.path, "rb") as f:
            _check_span(span, os.fstat(f.fileno()).st_size)
            return _staged(span, f.fileno())
    except OSError as exc:
        raise SourceError(f"cannot open the file for reading: {exc.strerror or exc}", where=span.path) from None


def _contiguous(span: Span) -> bool:
    """The span's tensor is its storage's bytes in row-major order (from ``storage_offset``)."""
    expected = 1
    for size, stride in zip(reversed(span.shape), reversed(span.stride)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


# --------------------------------------------------------------------------- direct reads


def _plain_loading(module: nn.Module) -> bool:
    """``load_state_dict`` on ``module`` is torch's own: it copies each value as given."""
    cls = type(module)
    return (cls.load_state_dict is nn.Module.load_state_dict
            and cls._load_from_state_dict is nn.Module._load_from_state_dict
            and not module._load_state_dict_pre_hooks)  # fmt: skip


def _writable_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a writable memoryview (the tensor must outlive it)."""
    n = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * n).from_address(tensor.data_ptr())).cast("B")


class _Direct:
    """Reads tensors with ``pread`` straight from the file into the memory they end in.

    For an allocated target that memory is the parameter or buffer itself, and the value
    then given to ``load_state_dict(strict=False)`` is that very tensor: torch still walks
    the owning module, checks the shape and reports missing and unexpected keys (which are
    cross-checked against the plan as for every other key), and its ``copy_`` of a tensor
    onto itself returns at once. The bytes thus take one kernel copy from the page cache
    instead of a page fault per mapped page and a user-space copy, and no file page is ever
    mapped into the process. This is used only where ``load_state_dict`` would have done
    exactly this copy: the value is the plain file tensor (no op), its dtype and shape are
    the destination's, the destination is a contiguous CPU tensor (no subclass), and the
    owning module loads with torch's own ``load_state_dict`` / ``_load_from_state_dict``
    and has no load-state-dict pre-hook (a hook that rewrites the value would otherwise
    see the destination already written). Anything else is read as a mapped view.

    For a meta-device target the destination is the fresh tensor that is assigned; the
    targets in ``fresh`` have their pages faulted in piece by piece just before each read
    (see :data:`POPULATE_MIN_BYTES`).
    """

    def __init__(self, threads: int, fresh: Iterable[str] = ()) -> None:
        self.threads = max(1, threads)
        self.fresh = frozenset(fresh)
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[str, list[Future[None]]] = {}  # target -> its pieces, being read

    def ahead(self, jobs: Iterable[tuple[str, _Files, int, torch.Tensor, str]]) -> None:
        """Start reading the large tensors of ``(target, files, offset, tensor, path)`` on the
        reading threads, in this order (the files' order): the threads go on reading the
        next batches while a batch is loaded, so they never wait at a batch's end. Small
        tensors are left to :meth:`read` (a thread hand-off costs more than their read)."""
        if self.threads == 1:
            return
        smallest = min(THREAD_MIN_BYTES, PIECE_BYTES)
        for target, files, offset, tensor, path in jobs:
            buf = _writable_bytes(tensor)
            if len(buf) < smallest:
                continue
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="remap-read")
            populate = target in self.fresh and len(buf) >= POPULATE_MIN_BYTES
            self._ahead[target] = [self._pool.submit(_pread_path, files, path, offset + lo, buf[lo : lo + PIECE_BYTES], tensor,
                                                     populate)
                                   for lo in range(0, len(buf), PIECE_BYTES)]  # fmt: skip

    def read(self, jobs: Sequence[tuple[str, _Files, int, torch.Tensor, str]]) -> None:
        """Fill each tensor of ``(target, files, offset, tensor, path)``: wait for those being
        read ahead, read the others here. Returns (or raises the first failure) only when
        every piece of these tensors is done."""
        futures: list[Future[None]] = []
        try:
            for target, files, offset, tensor, path in jobs:
                pieces = self._ahead.pop(target, None)
                if pieces is None:
                    buf = _writable_bytes(tensor)
                    _pread_path(files, path, offset, buf, tensor, target in self.fresh and len(buf) >= POPULATE_MIN_BYTES)
                else:
                    futures += pieces
        finally:
            wait(futures)
        for f in futures:
            f.result()  # the first failure

    def close(self) -> None:
        """Stop: pieces not started are cancelled, running ones finish (each holds its
        tensor, so no thread ever writes into freed memory)."""
        self._ahead.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _pread_into(fd: int, offset: int, buf: memoryview, path: str, owner: torch.Tensor | None = None) -> None:
    """Fill ``buf`` (the bytes of ``owner``, which the caller keeps alive) from ``offset``."""
    done = 0
    while done < len(buf):
        try:
            n = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:
            raise SourceError(f"cannot read bytes {offset + done}..{offset + len(buf)}: {exc.strerror or exc}", where=path) from None
        if n == 0:
            raise SourceError(f"the file ends at byte {offset + done}, inside a tensor: it was truncated since it was planned", where=path)
        done += n


def _read_threads() -> int:
    return max(1, min(MAX_READ_THREADS, torch.get_num_threads(), os.cpu_count() or 1))


# --------------------------------------------------------------------------- reading and computing


class _Reader:
    """Reads one batch: views where the source has spans, ``Source.read`` otherwise."""

    def __init__(self, source: Source, spans: Mapping[str, Span | None], stats: LoadStats, files: _Files) -> None:
        self.source, self.spans, self.stats, self.files = source, spans, stats, files
        self.views: dict[str, torch.Tensor] = {}
        self.read_once: dict[str, torch.Tensor] = {}
        self.memo: dict[int, torch.Tensor] = {}

    @contextmanager
    def batch(self, keys: Iterable[str]) -> Iterator[None]:
        """``keys`` (those with spans) read into staging buffers for the duration of the batch."""
        try:
            unmapped = []
            for key in keys:
                span = self.spans[key]
                if span is not None and key not in self.views:
                    with self.files.opened(span.path) as fd:
                        self.views[key] = _staged(span, fd)
                    self.stats.zero_copy += 1
                elif span is None:
                    unmapped.append(key)
            many = getattr(self.source, "read_many", None)  # a duck-typed source may lack it
            if len(unmapped) > 1 and many is not None:  # the rest in one pass where the source can (a DCP folder: one dcp.load)
                for key, tensor in many(unmapped).items():
                    if key not in self.read_once:
                        self.count(key)
                        self.read_once[key] = tensor
            yield
        finally:
            self.views.clear()
            self.read_once.clear()
            self.memo.clear()

    def count(self, key: str) -> None:
        self.stats.bytes += _nbytes(self.source, key)
        self.stats.tensors += 1

    def read(self, key: str) -> torch.Tensor:
        """One source tensor, read once per batch however many parts of a split use it."""
        if key not in self.read_once:
            self.count(key)
            view = self.views.get(key)
            self.read_once[key] = view if view is not None else self.source.read(key)
        return self.read_once[key]

    def value(self, a: Assignment) -> torch.Tensor:
        return self.read(a.sources[0]) if a.recipe is None else self.evaluate(a.recipe)

    def evaluate(self, node: Recipe | str) -> torch.Tensor:
        if isinstance(node, str):
            return self.read(node)
        if id(node) not in self.memo:
            self.memo[id(node)] = node.op.fn(*(self.evaluate(i) for i in node.inputs))
        return self.memo[id(node)]


# --------------------------------------------------------------------------- loading


class _Loader:
    """``load_state_dict(strict=False)`` on the modules that own a batch's keys, cross-checked."""

    def __init__(self, module: torch.nn.Module, all_keys: Iterable[str], assign: bool, stats: LoadStats) -> None:
        self.modules = dict(module.named_modules(remove_duplicate=False))
        self.assign, self.stats = assign, stats
        self.under: dict[str, list[str]] = defaultdict(list)  # owner -> every state key below it
        for key in all_keys:
            parts = key.split(".")
            for n in range(len(parts)):
                self.under[".".join(parts[:n])].append(".".join(parts[n:]))

    def owner(self, key: str) -> nn.Module:
        return self.modules[key.rpartition(".")[0]]

    def load(self, state: dict[str, torch.Tensor]) -> None:
        by_owner: dict[str, OrderedDict[str, torch.Tensor]] = defaultdict(OrderedDict)
        for key, value in state.items():
            owner, _, leaf = key.rpartition(".")
            by_owner[owner][leaf] = value
        for owner, local in by_owner.items():
            self._call(owner, local)

    def _call(self, owner: str, local: OrderedDict[str, torch.Tensor]) -> None:
        module = self.modules[owner]
        local._metadata = {"": {"version": getattr(module, "_version", 1)}}  # type: ignore[attr-defined]
        try:
            result = module.load_state_dict(local, strict=False, assign=self.assign)
        except RuntimeError as exc:
            raise InternalError(f"load_state_dict failed after every check passed: {exc}") from exc
        self.stats.load_calls += 1
        expected = set(self.under[owner]) - set(local)
        if set(result.missing_keys) != expected or result.unexpected_keys:
            prefix = f"{owner}." if owner else ""
            raise InternalError(
                "torch and the plan disagree on what was loaded",
                details={
                    "torch_missing": sorted(prefix + k for k in set(result.missing_keys) - expected),
                    "planned_missing": sorted(prefix + k for k in expected - set(result.missing_keys)),
                    "unexpected": [prefix + k for k in result.unexpected_keys],
                },
            )


# --------------------------------------------------------------------------- how each key is read

_PLAIN_TENSORS = (torch.Tensor, nn.Parameter)


@dataclass
class _Route:
    """How one assignment is read: ``direct`` (pread into ``dest``, or into a fresh tensor of
    ``dtype`` for a meta target), ``keep`` (a view of the private map is the value) or a view."""

    kind: str  # "direct" | "keep" | "view"
    dest: torch.Tensor | None = None
    dtype: torch.dtype | None = None


def _route(a: Assignment, span: Span | None, plan: Plan, state: Mapping[str, Any], loader: _Loader, *, assign: bool,
           device: torch.device | None, dtype: torch.dtype | None, mmap_weights: bool, can_pread: bool,
           policy: DtypePolicy | None = None) -> _Route:  # fmt: skip
    if span is None or a.recipe is not None or len(a.sources) != 1:
        return _Route("view")
    meta = plan.target_meta[a.target]
    if span.shape != tuple(meta.shape):
        return _Route("view")  # the planner's shape check failed to hold: _place raises
    if assign:
        if device is not None and device.type != "cpu":
            return _Route("view")
        want = getattr(torch, meta.dtype)
        if dtype is not None and want.is_floating_point:
            want = dtype
        if policy is not None:  # per key: keep_fp32, dtype auto
            want = policy.want(a.target, meta.dtype, span.dtype)
        if span.dtype != str(want).removeprefix("torch."):
            return _Route("view")
        if mmap_weights:
            return _Route("keep")
        return _Route("direct", dtype=want) if can_pread and _contiguous(span) else _Route("view")
    dest = state.get(a.target)
    if (not can_pread or type(dest) not in _PLAIN_TENSORS or not _contiguous(span) or dest.device.type != "cpu"
            or dest.layout != torch.strided or not dest.is_contiguous() or dest.is_conj() or dest.is_neg()
            or tuple(dest.shape) != span.shape or str(dest.dtype).removeprefix("torch.") != span.dtype
            or dest.numel() == 0 or not _plain_loading(loader.owner(a.target))):  # fmt: skip
        return _Route("view")
    return _Route("direct", dest=dest)


# --------------------------------------------------------------------------- rollback


class Rollback:
    """What a load changes in a module, kept so that a failed load can put it back.

    A load can fail after its first write: the file is truncated or rewritten under it, a
    disk returns an I/O error, the user presses Ctrl-C, a module's own
    ``_load_from_state_dict`` raises. The module must then be as it was, byte for byte.

    * Every module's parameter and buffer slots (which tensor object sits under which
      name) and every tensor's ``.data`` are recorded up front: references only, no copy.
      That undoes ``assign=True`` (a meta-device target) and materialisation.
    * An allocated target is written in place, so :meth:`keep` copies the tensors that are
      about to be written (only the planned targets, once per storage) into host memory
      before the first write. This is the price of the promise: one copy of the loaded
      tensors for as long as the load runs (a meta-device target pays nothing).

    Restoring reverses the copies in the opposite order of keeping them.
    """

    def __init__(self, module: nn.Module) -> None:
        self._slots = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
        self._data = [(t, t.data) for _, params, buffers in self._slots for t in (*params.values(), *buffers.values())
                      if isinstance(t, torch.Tensor) and not is_dtensor(t)]  # fmt: skip  (a DTensor's shard is put back by its loader)
        self._saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._seen: set[tuple[int, int]] = set()
        self.bytes = 0

    def keep(self, tensor: torch.Tensor) -> None:
        """Copy ``tensor``'s values (to host memory) before the load writes into it."""
        if tensor.device.type == "meta" or tensor.numel() == 0:
            return
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if ident in self._seen:
            return
        self._seen.add(ident)
        with torch.no_grad():
            copy = tensor.detach().to("cpu", copy=True)
        self._saved.append((tensor, copy))
        self.bytes += copy.numel() * copy.element_size()

    def restore(self) -> None:
        """Put every slot, every ``.data`` and every kept value back."""
        with torch.no_grad():
            for m, params, buffers in self._slots:
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)
            for t, data in self._data:
                t.data = data
            for tensor, copy in reversed(self._saved):
                tensor.detach().copy_(copy)


# --------------------------------------------------------------------------- the stream


def stream(plan: Plan, source: Source, module: torch.nn.Module, *, assign: bool, device: torch.device | None = None,
           dtype: torch.dtype | None = None, batch_bytes: int = BATCH_BYTES, progress: Progress | None = None,
           state: Mapping[str, Any] | None = None, mmap_weights: bool = False, rollback: Rollback | None = None,
           policy: DtypePolicy | None = None, checks: Mapping[str, str] | None = None) -> LoadStats:  # fmt: skip
    """Load every assignment of ``plan`` into ``module``, one batch at a time.

    With ``assign`` (a meta-device target) every tensor is copied once into fresh memory on
    ``device`` (cast to ``dtype`` for floating tensors) and assigned; otherwise it is copied
    into the module's own parameters by ``load_state_dict``. ``state`` is the module's
    ``state_dict(keep_vars=True)`` when the caller has it. ``mmap_weights`` (with
    ``assign`` only) assigns views of a private copy-on-write mapping of the file instead of
    copies, wherever no op or cast changes the tensor: see ``remap.load``. ``rollback``,
    when given, is handed every allocated tensor before anything is written into it (the
    caller restores it on failure). ``policy`` gives each key's dtype where the load makes the
    tensor (a meta-device target); ``checks`` (target key -> dtype) are the narrowing casts whose
    range :func:`~remap.loading.dtype_policy.check_range` checks before the tensor is written.
    """
    stats = LoadStats()
    start = time.perf_counter()
    spans = {k: source.span(k) for a in plan.assignments for k in a.sources}
    ordered = _order(plan.assignments, spans, source)
    by_target = {a.target: a for a in ordered}
    sizes = [(a.target, sum(_nbytes(source, k) for k in a.sources)) for a in ordered]
    size_of = dict(sizes)
    total = sum(size_of.values())
    checked = getattr(source, "read_checked", None)
    if rollback is None and any(s is None and not (checked and checked(k)) for k, s in spans.items()):
        # Without a rollback, reads that may fail (a custom source, a factory, a legacy pickle)
        # all happen before the first write, so a failure leaves the module untouched. With
        # one, they stream batch by batch like spans: a failure restores what was written.
        # Reads checked at open (a quantized GGUF tensor) stream like spans either way.
        batch_bytes = max(total, 1)
    loader = _Loader(module, plan.target_meta, assign, stats)
    if state is None and not assign:
        state = module.state_dict(keep_vars=True)
    # torch's swap_tensors mode replaces each parameter by its value: it gets the file's bytes as a view
    can_pread = hasattr(os, "preadv") and not torch.__future__.get_swap_module_params_on_conversion()
    routes = {a.target: _route(a, spans[a.sources[0]] if a.sources else None, plan, state or {}, loader, assign=assign,
                               device=device, dtype=dtype, mmap_weights=mmap_weights, can_pread=can_pread, policy=policy)
              for a in ordered}  # fmt: skip
    kept = {k for a in ordered if routes[a.target].kind == "keep" for k in a.sources}
    check = getattr(source, "check_unchanged", None)
    if check is not None:
        check()  # the files are still the ones planned from
    files = _Files((s for s in spans.values() if s is not None), private=(spans[k].path for k in kept))  # type: ignore[union-attr]
    reader = _Reader(source, spans, stats, files)
    direct = _Direct(_read_threads(), fresh=(t for t, r in routes.items() if r.kind == "direct" and r.dest is None))
    done = 0
    try:
        if rollback is not None and not assign:
            for a in ordered:  # before the first write: the reading threads start at once
                rollback.keep((state or {})[a.target])
        jobs = _direct_jobs(ordered, routes, spans, files)
        direct.ahead((t, *job) for t, job in jobs.items() if job[2].numel())
        for keys in plan_batches(sizes, batch_bytes):
            batch = [by_target[k] for k in keys]
            values = _direct_values(batch, routes, jobs, direct, reader, stats)
            values.update(_kept_values(batch, routes, spans, files, plan, reader, stats))
            with reader.batch(k for a in batch if routes[a.target].kind == "view" for k in a.sources):
                out = {}
                for a in batch:
                    value = values.get(a.target)
                    out[a.target] = value if value is not None else _place(_checked(_value(reader, a), a, checks), a, plan, assign,
                                                                           device, dtype, policy)  # fmt: skip
                del values
                loader.load(out)
                del out
            stats.batches += 1
            done += sum(size_of[k] for k in keys)
            if progress is not None:
                progress(done, total, stats.tensors, len(ordered))
    finally:
        direct.close()
        files.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _direct_jobs(ordered: Sequence[Assignment], routes: Mapping[str, _Route], spans: Mapping[str, Span | None],
                 files: _Files) -> dict[str, tuple[_Files, int, torch.Tensor, str]]:  # fmt: skip
    """Every direct read, in file order: target key -> ``(files, offset, destination, path)``.
    The destination is the target's own tensor, or for a meta-device target the fresh
    tensor that will be assigned (its pages are touched only by the read)."""
    jobs = {}
    for a in ordered:
        route = routes[a.target]
        if route.kind != "direct":
            continue
        span = spans[a.sources[0]]
        if span is None:
            raise InternalError(f"{a.target!r}: routed to a direct read without a span in the file")
        dest = route.dest if route.dest is not None else torch.empty(span.shape, dtype=route.dtype)
        jobs[a.target] = (files, span.offset + span.storage_offset * ITEMSIZE[span.dtype], dest, span.path)
    return jobs


def _direct_values(batch: Sequence[Assignment], routes: Mapping[str, _Route], jobs: Mapping[str, tuple[_Files, int, torch.Tensor, str]],
                   direct: _Direct, reader: _Reader, stats: LoadStats) -> dict[str, torch.Tensor]:  # fmt: skip
    """The batch's direct reads, done: target key -> the tensor to hand to ``load_state_dict``."""
    values: dict[str, torch.Tensor] = {}
    todo = []
    for a in batch:
        if routes[a.target].kind != "direct":
            continue
        dest = jobs[a.target][2]
        # An allocated target's own tensor: load_state_dict's copy_ of a tensor onto itself is a no-op.
        values[a.target] = dest.detach() if routes[a.target].dest is not None else dest
        if dest.numel():
            todo.append((a.target, *jobs[a.target]))
        reader.count(a.sources[0])
        stats.direct += 1
    if todo:
        direct.read(todo)
    return values


def _kept_values(batch: Sequence[Assignment], routes: Mapping[str, _Route], spans: Mapping[str, Span | None],
                 files: _Files, plan: Plan, reader: _Reader, stats: LoadStats) -> dict[str, torch.Tensor]:  # fmt: skip
    """``mmap_weights``: views of the private mapping, assigned as they are."""
    values: dict[str, torch.Tensor] = {}
    for a in batch:
        if routes[a.target].kind != "keep":
            continue
        span = spans[a.sources[0]]
        values[a.target] = _view(span, files.private[span.path])  # type: ignore[arg-type,union-attr]
        reader.count(a.sources[0])
        stats.mmap_weights += 1
    return values


def _value(reader: _Reader, a: Assignment) -> torch.Tensor:
    """``a``'s value; a ``cast`` step that overflows is a precision failure naming the key."""
    try:
        return reader.value(a)
    except CastOverflow as exc:
        raise cast_failure(a, exc) from None


def cast_failure(a: Assignment, exc: CastOverflow) -> RangeFailure:
    """The precision failure of a ``cast`` step of ``a`` that overflowed."""
    return RangeFailure(Failure("precision", f"{a.target!r}: the rules' cast step {exc}. Cast to a wider dtype, "
                                             "or scale it in the rules", tuple(dict.fromkeys((a.target, *a.sources)))))  # fmt: skip


def _checked(value: torch.Tensor, a: Assignment, checks: Mapping[str, str] | None) -> torch.Tensor:
    """``value``, once a narrowing cast to its target dtype is known to keep it finite."""
    if checks and a.target in checks:
        from .dtype_policy import check_range

        check_range(a.target, value, getattr(torch, checks[a.target]), a.sources)
    return value


def _place(value: torch.Tensor, a: Assignment, plan: Plan, assign: bool, device: torch.device | None, dtype: torch.dtype | None,
           policy: DtypePolicy | None = None) -> torch.Tensor:  # fmt: skip
    if tuple(value.shape) != tuple(plan.target_meta[a.target].shape):
        raise InternalError(f"{a.target!r}: planned shape {list(a.meta.shape)}, got {list(value.shape)} after {list(a.ops)}")
    if not assign:
        return value
    want = dtype if dtype is not None and value.is_floating_point() else getattr(torch, plan.target_meta[a.target].dtype)
    if policy is not None:
        want = policy.want(a.target, plan.target_meta[a.target].dtype, str(value.dtype).removeprefix("torch."))
    out = torch.empty(value.shape, dtype=want, device=device or "cpu")
    out.copy_(value)
    return out
