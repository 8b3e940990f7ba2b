"""Streaming a plan into a module: batches of tensors mapped from the file, copied, released.

Each batch covers at most ``batch_bytes`` of the file (or one tensor, when a tensor is
larger); a source without file spans (in memory, a factory, a legacy pickle) is one batch,
so every read that could fail happens before the first write. Tensors whose bytes sit
plainly in a file (safetensors, torch zip checkpoints) are zero-copy views of a ``mmap`` of
the file, opened and mapped before the first write; after each batch its pages are dropped
from the process, so it never holds more than about one batch of file pages above the model. Each batch goes through ``load_state_dict(strict=False)`` of the modules
that own its keys — so every call walks only those modules — and torch's missing and
unexpected keys are cross-checked against the plan.

>>> plan_batches([("a", 10), ("b", 10), ("c", 30)], 20)
[['a', 'b'], ['c']]
"""

from __future__ import annotations

import mmap
import os
import time
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import InternalError, SourceError

if TYPE_CHECKING:
    from .planner import Assignment, Plan
    from .sources import Source, Span
    from .steps import Recipe

__all__ = ["BATCH_BYTES", "LoadStats", "plan_batches", "stream"]

BATCH_BYTES = 64 << 20
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
            "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16, "float8_e4m3fn": 1, "float8_e5m2": 1,
            "uint16": 2, "uint32": 4, "uint64": 8}  # fmt: skip

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
    materialised: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        rate = self.bytes / self.seconds if self.seconds else None
        return {"bytes_read": self.bytes, "tensors": self.tensors, "batches": self.batches, "load_calls": self.load_calls,
                "seconds": round(self.seconds, 6), "bytes_per_second": rate, "zero_copy_tensors": self.zero_copy,
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


def _order(plan: Plan, source: Source) -> list[Assignment]:
    """Assignments in the order their bytes sit in the files: one forward pass per file."""
    position = {k: n for n, k in enumerate(source.meta)}

    def where(a: Assignment) -> tuple[str, int]:
        span = source.span(a.sources[0])
        return (span.path, span.offset) if span is not None else ("", position.get(a.sources[0], 0))

    return sorted(plan.assignments, key=where)


# --------------------------------------------------------------------------- zero-copy regions


class _Files:
    """Every file the load reads, opened and mapped whole before the first write.

    Mapping reserves address space only; pages are read as tensors are copied, and after each
    batch :meth:`release` tells the kernel to drop that batch's pages from this process
    (``MADV_DONTNEED``: they stay in the page cache), so the process never holds more than
    about one batch of file pages above the model.
    """

    def __init__(self, spans: Iterable[Span]) -> None:
        ends: dict[str, int] = defaultdict(int)
        sizes: dict[str, int] = {}
        for s in spans:
            if s.path not in sizes:
                sizes[s.path] = os.path.getsize(s.path)
            _check_span(s, sizes[s.path])
            ends[s.path] = max(ends[s.path], s.offset + s.nbytes)
        self.maps: dict[str, mmap.mmap] = {}
        self._files: list[Any] = []
        try:
            for path, end in ends.items():
                f = open(path, "rb")  # noqa: SIM115 - closed in close()
                self._files.append(f)
                self.maps[path] = mmap.mmap(f.fileno(), end, access=mmap.ACCESS_READ) if end else None  # type: ignore[assignment]
        except (OSError, ValueError) as exc:
            self.close()
            raise SourceError(f"cannot map the file for reading: {exc}", where=path) from None

    def release(self, spans: Iterable[Span]) -> None:
        """Drop the pages of each file's byte range this batch read (one call per file)."""
        ranges: dict[str, tuple[int, int]] = {}
        for s in spans:
            lo, hi = ranges.get(s.path, (s.offset, s.offset + s.nbytes))
            ranges[s.path] = (min(lo, s.offset), max(hi, s.offset + s.nbytes))
        page = mmap.PAGESIZE
        for path, (lo, hi) in ranges.items():
            mm = self.maps.get(path)
            if mm is None or not hasattr(mm, "madvise") or hi <= lo:
                continue
            start = lo // page * page
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, min(len(mm), hi) - start)
            except (OSError, ValueError):  # an advice, not a requirement
                pass

    def close(self) -> None:
        for mm in self.maps.values():
            if mm is None:
                continue
            try:
                mm.close()
            except BufferError:  # a view is still referenced somewhere: the GC unmaps it later
                pass
        for f in self._files:
            f.close()
        self.maps, self._files = {}, []


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
    lo = 0
    dtype = getattr(torch, span.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=span.nbytes, offset=span.offset - lo) if span.nbytes and mm is not None else torch.empty(0, dtype=torch.uint8)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (span.offset - lo) % itemsize:
        raw = raw.clone()  # unaligned for this dtype: one copy of this tensor
    return raw.view(dtype).as_strided(span.shape, span.stride, span.storage_offset)


# --------------------------------------------------------------------------- reading and computing


class _Reader:
    """Reads one batch: zero-copy views where the source has spans, ``Source.read`` otherwise."""

    def __init__(self, source: Source, stats: LoadStats, files: _Files) -> None:
        self.source, self.stats, self.files = source, stats, files
        self.views: dict[str, torch.Tensor] = {}
        self.read_once: dict[str, torch.Tensor] = {}
        self.memo: dict[int, torch.Tensor] = {}

    @contextmanager
    def batch(self, assignments: Sequence[Assignment]) -> Iterator[None]:
        spans = {k: self.source.span(k) for a in assignments for k in a.sources}
        try:
            for key, span in spans.items():
                if span is not None:
                    self.views[key] = _view(span, self.files.maps[span.path])
                    self.stats.zero_copy += 1
            yield
        finally:
            self.views.clear()
            self.read_once.clear()
            self.memo.clear()
            self.files.release(s for s in spans.values() if s is not None)

    def read(self, key: str) -> torch.Tensor:
        """One source tensor, read once per batch however many parts of a split use it."""
        if key not in self.read_once:
            self.stats.bytes += _nbytes(self.source, key)
            self.stats.tensors += 1
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


def stream(plan: Plan, source: Source, module: torch.nn.Module, *, assign: bool, device: torch.device | None = None,
           dtype: torch.dtype | None = None, batch_bytes: int = BATCH_BYTES, progress: Progress | None = None) -> LoadStats:  # fmt: skip
    """Load every assignment of ``plan`` into ``module``, one batch at a time.

    With ``assign`` (a meta-device target) every tensor is copied once into fresh memory on
    ``device`` (cast to ``dtype`` for floating tensors) and assigned; otherwise it is copied
    into the module's own parameters by ``load_state_dict``.
    """
    stats = LoadStats()
    start = time.perf_counter()
    ordered = _order(plan, source)
    by_target = {a.target: a for a in ordered}
    sizes = [(a.target, sum(_nbytes(source, k) for k in a.sources)) for a in ordered]
    size_of = dict(sizes)
    total = sum(size_of.values())
    if any(source.span(k) is None for a in ordered for k in a.sources):
        # Reads that may fail (a custom source, a factory, a legacy pickle) all happen before the
        # first write, so a failure leaves the module untouched; these sources hold their
        # tensors in memory anyway.
        batch_bytes = max(total, 1)
    loader = _Loader(module, plan.target_meta, assign, stats)
    check = getattr(source, "check_unchanged", None)
    if check is not None:
        check()  # the files are still the ones planned from
    files = _Files(s for a in ordered for k in a.sources if (s := source.span(k)) is not None)
    reader = _Reader(source, stats, files)
    done = 0
    try:
        for keys in plan_batches(sizes, batch_bytes):
            batch = [by_target[k] for k in keys]
            with reader.batch(batch):
                state = {a.target: _place(reader.value(a), a, plan, assign, device, dtype) for a in batch}
                loader.load(state)
                del state
            stats.batches += 1
            done += sum(size_of[k] for k in keys)
            if progress is not None:
                progress(done, total, stats.tensors, len(ordered))
    finally:
        files.close()
    stats.seconds = time.perf_counter() - start
    return stats


def _place(value: torch.Tensor, a: Assignment, plan: Plan, assign: bool, device: torch.device | None, dtype: torch.dtype | None) -> torch.Tensor:
    if tuple(value.shape) != tuple(plan.target_meta[a.target].shape):
        raise InternalError(f"{a.target!r}: planned shape {list(a.meta.shape)}, got {list(value.shape)} after {list(a.ops)}")
    if not assign:
        return value
    want = dtype if dtype is not None and value.is_floating_point() else getattr(torch, plan.target_meta[a.target].dtype)
    out = torch.empty(value.shape, dtype=want, device=device or "cpu")
    out.copy_(value)
    return out
