"""Applying a plan to a model whose tensors are DTensors (FSDP2, tensor parallel, 2-D meshes), on every rank.

Every rank of the process group calls :func:`remap.load` with the same rules, source and
target; each plans from the DTensors' global shapes (identical everywhere), then:

1. **one decision**: each rank's plan digest and the outcome of its checks (target as
   planned, the ops on meta tensors, a meta-device target completable) are gathered on every
   rank; a digest that differs or a check that failed anywhere raises on every rank before
   any rank writes (every module untouched);
2. **each rank reads what it owns**: a tensor loaded unchanged from a file span is read as
   the byte ranges of this rank's box of it (``compute_local_shape_and_global_offset``); a
   tensor an op changes is read whole, the op runs, and the rank keeps its part (torch's
   ``distribute_tensor(..., src_data_rank=None)``: no communication); one tensor at a time,
   so a rank holds its shard plus one tensor;
3. **all or nothing**: the local shards are kept (host copies) before the first write; the
   outcome of every rank's load is gathered, and if any rank failed every rank puts its
   module back;
4. the report carries each rank's bytes read, tensors and time (``stats.ranks``).

A target built on meta (``fully_shard`` / ``parallelize_module`` accept one) gets real memory
per module (``to_empty``, the tensors that are already real kept), then the load; keys no
source fed are initialised by their module's ``reset_parameters`` as for one process.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .. import errors
from ..errors import CheckError, RemapError, SourceError, UsageError
from ..meta import is_dtensor
from .dtype_policy import DtypePolicy, RangeFailure, check_range, precision_changes
from .empty import initialise, init_owners
from .engine import _check_same_target, _dry_op, _final_report, _meta_gaps, check_failed
from .freeze import apply_freeze
from .optimizer import run_recipe
from ..rules.ops import CastOverflow
from .streaming import ITEMSIZE, Rollback, _check_span, _contiguous, _order, _pread_into, _writable_bytes, cast_failure, read_tensor

if TYPE_CHECKING:
    from ..planning.planner import Assignment, Plan
    from ..report.records import Report
    from ..sources.readers import Source, Span

__all__ = ["agree", "agreed", "apply_sharded", "plan_lines"]


def plan_lines(plan: Plan, spans: Mapping[str, Span | None] | None = None) -> list[str]:
    """One line per assignment: what a rank's load depends on (target, shape, dtype, source keys
    with theirs, ops), then the plan's failures, then a fingerprint of each file it reads
    (``spans``: source key -> its span, from :func:`source_spans` when not given). Equal on every
    rank that planned the same rules, source and target; the first line that differs is what a
    mismatch error shows.

    >>> from remap import plan
    >>> plan_lines(plan({"fc.w": (2, 3)}, {"module.fc.w": (2, 3)}, {"version": 1, "rules": [{"strip_prefix": "module."}]}))
    ['fc.w [2, 3] float32 <- module.fc.w [2, 3] float32']
    """
    lines = []
    for a in plan.assignments:
        m = plan.target_meta[a.target]
        fed = ", ".join(f"{k} {list(plan.source_meta[k].shape)} {plan.source_meta[k].dtype}" for k in a.sources)
        ops = f" [{'; '.join(a.ops)}]" if a.ops else ""
        lines.append(f"{a.target} {list(m.shape)} {m.dtype} <- {fed}{ops}")
    lines += [f"failure ({f.kind}): {f.message}" for f in plan.report.failures]
    return lines + _file_lines(source_spans(plan) if spans is None else spans)


def source_spans(plan: Plan) -> dict[str, Span | None]:
    """Source key -> where its bytes sit (None: no file span), for every key the plan reads."""
    if plan.source is None:
        return {}
    return {k: plan.source.span(k) for a in plan.assignments for k in a.sources}


#: The fingerprint of a checkpoint file (see :func:`_file_lines`): this many bytes from the start of
#: each of up to ``FINGERPRINT_SAMPLES`` of its tensors, spread over the file.
FINGERPRINT_BYTES, FINGERPRINT_SAMPLES = 1024, 8


def _file_lines(spans: Mapping[str, Span | None]) -> list[str]:
    """One line per checkpoint file of ``spans``: its size and a hash of the first KiB of up to 8
    of its tensors, spread over it. Two nodes holding different checkpoints with the same names and
    shapes (two fine-tunes) would otherwise plan alike and load a model mixed from both. A sample,
    not a hash of every byte: checkpoints that differ only in tensors it does not sample pass as
    one. The file's path is left out (a mount point may differ between nodes)."""
    by_file: dict[str, list[Span]] = {}
    for span in spans.values():
        if span is not None:
            by_file.setdefault(span.path, []).append(span)
    return [_fingerprint(path, sorted(found, key=lambda sp: sp.offset)) for path, found in sorted(by_file.items())]


def _fingerprint(path: str, spans: Sequence[Span]) -> str:
    step = max(1, len(spans) // FINGERPRINT_SAMPLES)
    h = hashlib.blake2b(digest_size=12)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            for span in spans[::step][:FINGERPRINT_SAMPLES]:
                h.update(os.pread(f.fileno(), min(FINGERPRINT_BYTES, span.nbytes), span.offset))
    except OSError as exc:
        raise SourceError(f"cannot read the file for its fingerprint: {exc.strerror or exc}", where=path) from None
    return f"file of {size} bytes, sampled tensors {h.hexdigest()}"


def _digest(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


#: Lines per digest of a part of the plan: ranks whose plans differ exchange these first, then the lines of the first part that differs.
CHUNK = 256


# ---------------------------------------------------------------------------- agreeing across ranks


@dataclass
class _Outcome:
    """One rank's word in a collective decision: its digest and what failed there, if anything."""

    rank: int
    digest: str | None = None
    error: str | None = None  # the class name in remap.errors
    message: str | None = None
    report: Any = None  # a CheckError's report
    chunks: tuple[str, ...] = ()  # digests of the plan's lines, CHUNK at a time
    failures: tuple[str, ...] = ()  # this rank's plan's failures (its checks)


def _gather(value: Any) -> list[Any]:
    """``value`` from every rank of the default group, in rank order (``all_gather_object``)."""
    import torch.distributed as dist

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, value)
    return everyone


def _outcome_of(exc: BaseException | None, rank: int, digest: str | None = None) -> _Outcome:
    if exc is None:
        return _Outcome(rank, digest)  # the first gather adds the plan's parts and failures
    if isinstance(exc, KeyboardInterrupt):
        return _Outcome(rank, digest, "KeyboardInterrupt", "interrupted")
    if isinstance(exc, RemapError):
        report = exc.report if isinstance(exc, CheckError) else None
        where = f" ({exc.where})" if exc.where and exc.where not in exc.message else ""
        return _Outcome(rank, digest, type(exc).__name__, exc.message + where, report)
    return _Outcome(rank, digest, "InternalError", f"{type(exc).__name__}: {exc}")


def _check_digests(everyone: Sequence[_Outcome], plan: Plan, lines: Sequence[str]) -> None:
    """Raise on every rank, naming what differs, when the ranks' plans are not the same."""
    if len({o.digest for o in everyone}) == 1:
        return
    world = len(everyone)
    parts = [f"rank {o.rank}'s plan failed its checks: {o.failures[0]}"
             + (f" (and {len(o.failures) - 1} more)" if len(o.failures) > 1 else "") for o in everyone if o.failures]  # fmt: skip
    other = next(o for o in everyone if o.digest != everyone[0].digest)
    parts.append(_first_difference(everyone[0], other, lines))
    raise agreed(CheckError(
        f"the ranks planned differently ({world} ranks; every rank must load the same rules, source and target: "
        "a file that differs between nodes, a model built differently); no rank wrote anything:\n"
        + "\n".join("- " + p.replace("\n", "\n  ") for p in parts),
        report=plan.report,
    ))


def _first_difference(first: _Outcome, other: _Outcome, lines: Sequence[str]) -> str:
    """The first plan line where rank ``other`` differs from rank ``first`` (one more gather of one part's lines)."""
    k = next((i for i, (a, b) in enumerate(zip(first.chunks, other.chunks)) if a != b), min(len(first.chunks), len(other.chunks)))
    part = _gather(list(lines[k * CHUNK:(k + 1) * CHUNK]))
    mine, theirs = part[first.rank], part[other.rank]
    i = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
    said = lambda side: f"`{side[i]}`" if i < len(side) else "nothing more"  # noqa: E731
    return f"first difference: rank {first.rank} has {said(mine)}, rank {other.rank} has {said(theirs)}"


# ---------------------------------------------------------------------------- each rank's part


@dataclass
class _Box:
    """This rank's part of a global tensor: a box of ``shape`` at ``offset`` (or None when the
    placements do not give one box, e.g. a strided shard of a 2-D mesh)."""

    shape: tuple[int, ...]
    offset: tuple[int, ...]


def _box(t: torch.Tensor) -> _Box | None:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # older torch: a strided shard is read whole and split by distribute_tensor
        _StridedShard = Shard
    if not all(type(p) in (Shard, Replicate, _StridedShard) for p in t.placements):
        return None  # Partial and others: read whole, distribute_tensor keeps this rank's part
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if tuple(shape) != tuple(t._local_tensor.shape):
        return None
    box = _Box(tuple(shape), tuple(offset))
    strided = _StridedShard is not Shard and any(type(p) is _StridedShard for p in t.placements)
    return None if strided and not _strided_box_holds(t, box) else box


def _strided_box_holds(t: torch.Tensor, box: _Box) -> bool:
    """Whether a strided shard's part (FSDP over tensor parallel on one dim) really is ``box``:
    checked with an index vector along that dim split the way torch splits it (no communication);
    several sharded dims are not checked, so they are read whole."""
    from torch.distributed.tensor import distribute_tensor

    dims = {p.dim for p in t.placements if hasattr(p, "dim")}
    if len(dims) != 1:
        return False
    (dim,) = dims
    size = t.shape[dim]
    probe = torch.arange(size).reshape([size if d == dim else 1 for d in range(len(t.shape))])
    local = distribute_tensor(probe, t.device_mesh, t.placements, src_data_rank=None).to_local().flatten()
    return torch.equal(local, torch.arange(box.offset[dim], box.offset[dim] + box.shape[dim]))


def _runs(span: Span, box: _Box) -> list[tuple[int, int, int]] | None:
    """The byte runs of ``box`` in a row-major span: (file offset, bytes, destination offset), or
    None when the span is not row-major."""
    if not _contiguous(span):
        return None
    shape, itemsize = span.shape, ITEMSIZE[span.dtype]
    stride = [math.prod(shape[d + 1:]) for d in range(len(shape))]  # row-major, in elements
    if not shape:
        return [(span.offset + span.storage_offset * itemsize, itemsize, 0)]
    if 0 in box.shape:
        return []
    last = len(shape) - 1  # the outermost dim from which the box is whole to the end is contiguous
    while last > 0 and box.shape[last] == shape[last]:
        last -= 1
    inner = box.shape[last] * (stride[last] if last < len(shape) else 1)
    runs, dest = [], 0
    outer = [range(box.offset[d], box.offset[d] + box.shape[d]) for d in range(last)]
    for index in _product(outer):
        start = sum(i * stride[d] for d, i in enumerate(index)) + box.offset[last] * stride[last]
        runs.append((span.offset + (span.storage_offset + start) * itemsize, inner * itemsize, dest))
        dest += inner * itemsize
    return runs


def _product(ranges: Sequence[range]) -> list[tuple[int, ...]]:
    from itertools import product

    return list(product(*ranges)) if ranges else [()]


def _read_box(span: Span, box: _Box, stats: _RankStats, into: torch.Tensor | None = None) -> torch.Tensor | None:
    """This rank's box of the tensor at ``span``, read as byte runs with ``pread`` (straight into
    ``into`` when given: a contiguous CPU tensor of the box's shape and the span's dtype); None
    when the span's layout does not allow it."""
    runs = _runs(span, box)
    if runs is None:
        return None
    out = into if into is not None else torch.empty(box.shape, dtype=getattr(torch, span.dtype))
    raw = _writable_bytes(out)
    try:
        with open(span.path, "rb") as f:
            _check_span(span, os.fstat(f.fileno()).st_size)
            for offset, nbytes, dest in runs:
                if nbytes:
                    _pread_into(f.fileno(), offset, raw[dest:dest + nbytes], span.path, out)
    except OSError as exc:
        raise SourceError(f"cannot open the file for reading: {exc.strerror or exc}", where=span.path) from None
    stats.bytes += sum(n for _, n, _ in runs)
    return out


@dataclass
class _RankStats:
    rank: int
    bytes: int = 0
    tensors: int = 0
    boxes: int = 0
    whole: int = 0
    seconds: float = 0.0
    materialised: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "bytes_read": self.bytes, "tensors": self.tensors, "box_reads": self.boxes,
                "whole_reads": self.whole, "seconds": round(self.seconds, 6)}  # fmt: skip


class _Values:
    """Source tensors read whole, counted in this rank's stats."""

    def __init__(self, source: Source, stats: _RankStats) -> None:
        self.source, self.stats = source, stats

    def read(self, key: str) -> torch.Tensor:
        t = read_tensor(self.source, key)
        meta = self.source.meta[key]
        self.stats.bytes += meta.numel * ITEMSIZE.get(meta.dtype, 4)
        self.stats.whole += 1
        return t


def _own_part(values: _Values, key: str, span: Span | None, t: torch.Tensor, box: _Box, stats: _RankStats,
              into: torch.Tensor | None) -> torch.Tensor | None:  # fmt: skip
    """Only this rank's box of source tensor ``key``: byte runs of its file span (read straight
    into ``into`` where it can take them), or the source's own ``read_box`` (a DCP folder reads
    the chunks that overlap it); None when neither can."""
    source = values.source
    if span is not None and span.shape == tuple(t.shape) and span.dtype in ITEMSIZE:
        fits = (into is not None and into.device.type == "cpu" and into.is_contiguous() and tuple(into.shape) == box.shape
                and str(into.dtype).removeprefix("torch.") == span.dtype)  # fmt: skip
        part = _read_box(span, box, stats, into if fits else None)
    else:
        read_box = getattr(source, "read_box", None)
        part = read_box(key, box.offset, box.shape) if read_box is not None else None
        if part is not None:
            if tuple(part.shape) != box.shape:
                raise errors.InternalError(f"{key!r}: read_box gave shape {list(part.shape)} for a box of {list(box.shape)}")
            stats.bytes += part.numel() * part.element_size()
    stats.boxes += part is not None
    return part


def _local_part(value: torch.Tensor, t: torch.Tensor, box: _Box | None) -> torch.Tensor:
    """This rank's part of the global ``value`` for the DTensor ``t``."""
    if box is not None:
        return value[tuple(slice(o, o + n) for o, n in zip(box.offset, box.shape))]
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(t._local_tensor.device), t.device_mesh, t.placements, src_data_rank=None).to_local()


def _load_one(a: Assignment, t: torch.Tensor, values: _Values, spans: Mapping[str, Span | None], stats: _RankStats,
              checks: Mapping[str, str]) -> None:  # fmt: skip
    """Write assignment ``a`` into target tensor ``t`` (a DTensor's local shard, or a plain tensor)."""
    sharded = is_dtensor(t)
    dest = t._local_tensor if sharded else t
    box = _box(t) if sharded else None
    part = None
    if box is not None and a.recipe is None and len(a.sources) == 1:
        key = a.sources[0]
        part = _own_part(values, key, spans[key], t, box, stats, dest.detach() if a.target not in checks else None)
    if part is None:
        try:
            value = (values.read(a.sources[0]) if a.recipe is None
                     else run_recipe(a.recipe, {k: values.read(k) for k in dict.fromkeys(a.sources)}))  # fmt: skip
        except CastOverflow as exc:
            raise cast_failure(a, exc) from None
        if tuple(value.shape) != tuple(t.shape):
            raise errors.InternalError(f"{a.target!r}: planned shape {list(t.shape)}, got {list(value.shape)} after {list(a.ops)}")
        part = _local_part(value, t, box) if sharded else value
    if a.target in checks:  # a narrowing cast: every value must fit the target dtype
        check_range(a.target, part, getattr(torch, checks[a.target]), a.sources)
    if part.data_ptr() != dest.data_ptr() or part.numel() == 0:  # not read in place
        with torch.no_grad():
            dest.copy_(part)
    stats.tensors += 1


# ---------------------------------------------------------------------------- meta-device targets


def _allocate(module: torch.nn.Module, device: torch.device, touched: list[torch.nn.Module]) -> None:
    """Give every module holding meta tensors real memory on ``device`` (its real tensors kept),
    each module appended to ``touched`` before it changes (:func:`_deallocate` undoes it)."""
    for m in module.modules():
        own = dict([*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)])
        if not any(t is not None and t.device.type == "meta" for t in own.values()):
            continue
        keep = {n: t.detach().clone() for n, t in own.items() if t is not None and t.device.type != "meta"}
        touched.append(m)
        m.to_empty(device=device, recurse=False)
        with torch.no_grad():
            for n, t in keep.items():
                getattr(m, n).copy_(t)


def _deallocate(touched: list[torch.nn.Module]) -> None:
    """Put the modules :func:`_allocate` gave memory back on meta. FSDP2 keeps a DTensor
    parameter's object and swaps what it holds, so its old value cannot be put back by
    reference; the buffers that were real get their own objects back from the rollback."""
    for m in reversed(touched):
        m.to_empty(device="meta", recurse=False)


def _initialise_rest(plan: Plan, module: torch.nn.Module, loaded: set[str]) -> list[str]:
    """Keys of a meta-built target that no source fed: their module's initialisers (reset_parameters, ...)."""
    left = [k for k in plan.target_meta if k not in loaded and plan.target_meta[k].tied_to not in loaded]
    if not left:
        return []
    owners = init_owners(module)
    by_owner: dict[str, list[str]] = {}
    for key in left:
        owner, _, name = key.rpartition(".")
        by_owner.setdefault(owner, []).append(name)
    for owner, names in by_owner.items():
        m = module.get_submodule(owner)
        initialise(m, owners.get(owner), names, {n: list(getattr(getattr(m, n), "_remap_inits", ())) for n in names})
    return left


# ---------------------------------------------------------------------------- the whole apply


def apply_sharded(plan: Plan, module: torch.nn.Module, state: Mapping[str, Any], *, dry_run: bool = False,
                  device: torch.device | None = None, dtype: str | torch.dtype | None = None, rollback: bool = True,
                  mmap_weights: bool = False) -> Report:  # fmt: skip
    """Load ``plan`` into the DTensor-holding ``module`` on this rank, in step with every other rank.

    Called by :func:`~remap.loading.engine.apply_plan` on every rank of the default process
    group. Raises the same error on every rank when any rank's checks or load fail; the
    modules are then as they were.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError("the target holds DTensors (FSDP2 / tensor parallel) but no process group is initialised: "
                         "run under torchrun (remap initialises the group) or call torch.distributed.init_process_group first")  # fmt: skip
    if mmap_weights:
        raise UsageError("mmap_weights maps a file as a meta-device target's weights; a sharded (DTensor) target "
                         "holds its own shard: leave mmap_weights out")  # fmt: skip
    on_meta = any(t.device.type == "meta" for t in state.values() if isinstance(t, torch.Tensor))
    precision, checks, spans = _agree_on_plan(plan, state, DtypePolicy.of(dtype, plan.rules.target.keep_fp32), dry_run)
    planned = plan.report.replace(precision=precision)
    if dry_run:
        return planned
    if plan.source is None or plan.source.description.get("kind") == "metadata":
        raise UsageError("this plan was made from metadata only; make it from a source with tensors to apply it")
    _agree_on_preflight(plan, module, on_meta)
    stats = _load_all(plan, module, state, planned, checks, spans, on_meta=on_meta, rollback=rollback,
                      device=device or _shard_device(state))  # fmt: skip
    apply_freeze(module, plan.frozen, plan.rules.freeze.batchnorm, plan.batchnorm_modules)
    return _sharded_report(plan, module, stats, precision, planned.warnings, on_meta)


def _agree_on_plan(plan: Plan, state: Mapping[str, Any], policy: DtypePolicy, dry_run: bool
                   ) -> tuple[Any, Mapping[str, str], dict[str, Span | None]]:  # fmt: skip
    """Step 1, on every rank: the target is the planned one, the plans are the same (digests), the
    plan passed its checks; returns the precision records, the narrowing casts to check and the spans."""
    import torch.distributed as dist

    rank = dist.get_rank()
    digest, failure, lines, spans = None, None, [], {}
    precision: Any = ()
    checks: Mapping[str, str] = {}
    try:
        _check_same_target(plan, state)
        spans = source_spans(plan)
        lines = plan_lines(plan, spans)
        digest = _digest(lines)
        # Each shard keeps the dtype it has (a target remap builds is cast by target.dtype before it is
        # sharded): the load casts into it, as into any allocated target, range-checked where it narrows.
        precision, checks = precision_changes(plan, policy, state, False)
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it
        failure = exc
    mine = _outcome_of(failure, rank, digest)
    mine.chunks = tuple(_digest(lines[i:i + CHUNK]) for i in range(0, len(lines), CHUNK))
    mine.failures = tuple(f.message for f in plan.report.failures)
    everyone = _gather(mine)
    _raise_gathered(everyone, rank)
    _check_digests(everyone, plan, lines)
    if not plan.ok:  # the same plan on every rank (digests agree): the same failures
        raise agreed(check_failed(plan.report.replace(dry_run=dry_run)))
    return precision, checks, spans


def _agree_on_preflight(plan: Plan, module: torch.nn.Module, on_meta: bool) -> None:
    """Step 2: the checks that need the ops' kernels (run on meta tensors) or the module (a
    meta-built target must be completable), agreed by every rank."""
    failure = None
    try:
        failures = [f for a in plan.assignments if a.recipe is not None for f in _dry_op(a, plan)]
        if on_meta:
            failures += _meta_gaps(plan, module)[0]
        if failures:
            raise check_failed(plan.report.replace(dry_run=False, failures=tuple(failures)))
    except Exception as exc:  # noqa: BLE001
        failure = exc
    agree(failure)


def _load_all(plan: Plan, module: torch.nn.Module, state: Mapping[str, Any], planned: Report, checks: Mapping[str, str],
              spans: Mapping[str, Span | None], *,
              on_meta: bool, rollback: bool, device: torch.device) -> _RankStats:  # fmt: skip
    """Step 3: this rank's part of every tensor, then every rank's outcome; on any rank's failure
    every rank puts its module back and raises the same error."""
    import torch.distributed as dist

    stats = _RankStats(dist.get_rank())
    start = time.perf_counter()
    undo = Rollback(module)
    failure: BaseException | None = None
    touched: list[torch.nn.Module] = []
    try:
        real = [a.target for a in plan.assignments if state[a.target].device.type != "meta"]  # written in place
        if on_meta:
            _allocate(module, device, touched)
            state = module.state_dict(keep_vars=True)
        if rollback or on_meta:  # a meta-built target's real buffers too: they are the module's own
            for key in real:
                t = state[key]
                undo.keep(t._local_tensor if is_dtensor(t) else t)
        check = getattr(plan.source, "check_unchanged", None)
        if check is not None:
            check()
        values, loaded = _Values(plan.source, stats), set()
        for a in _order(plan.assignments, spans, plan.source):  # in file order
            _load_one(a, state[a.target], values, spans, stats, checks)
            loaded.add(a.target)
        if on_meta:
            stats.materialised = _initialise_rest(plan, module, loaded)
    except BaseException as exc:  # noqa: BLE001 - every rank must hear of it, then put back
        failure = check_failed(planned.replace(dry_run=False, failures=(exc.failure,))) if isinstance(exc, RangeFailure) else exc
    stats.seconds = time.perf_counter() - start
    everyone = _gather(_outcome_of(failure, stats.rank))
    if any(o.error for o in everyone):
        _deallocate(touched)
        undo.restore()
        _raise_gathered(everyone, stats.rank, written=True)
    return stats


def _sharded_report(plan: Plan, module: torch.nn.Module, stats: _RankStats, precision: Any, warnings: tuple[str, ...],
                    on_meta: bool) -> Report:  # fmt: skip
    """Step 4: the report, with every rank's stats (gathered) and how the target is sharded."""
    import torch.distributed as dist

    ranks = [s.as_dict() for s in _gather(stats)]
    report = _final_report(plan, module).replace(precision=precision)
    total = {"bytes_read": stats.bytes, "tensors": stats.tensors, "batches": 1, "load_calls": 0,
             "seconds": round(stats.seconds, 6), "bytes_per_second": stats.bytes / stats.seconds if stats.seconds else None,
             "zero_copy_tensors": 0, "direct_tensors": stats.boxes, "mmap_weights_tensors": 0,
             "materialised": list(stats.materialised), "ranks": ranks}  # fmt: skip
    state = module.state_dict(keep_vars=True)
    target = {**report.target, "meta": on_meta, "sharded": _describe_sharding(state, dist.get_world_size())}
    if stats.materialised:
        warnings = (*warnings, f"{len(stats.materialised)} tensor(s) not in the checkpoint were initialised on the meta-device "
                               f"target by their modules' initialisers: {', '.join(stats.materialised[:8])}")  # fmt: skip
    return report.replace(target=target, stats=total, warnings=warnings)


def agree(failure: BaseException | None) -> None:
    """Every rank's outcome of a step that runs on each rank alone (checking the optimizer state):
    the same error on every rank when any rank failed, nothing written anywhere. Every rank of the
    default process group must call it, failed or not."""
    import torch.distributed as dist

    _raise_gathered(_gather(_outcome_of(failure, dist.get_rank())), dist.get_rank())


def _raise_gathered(everyone: Sequence[_Outcome], rank: int, *, written: bool = False) -> None:
    """Raise on every rank when any rank's outcome is a failure: this rank's own error class
    where it failed (else the first failed rank's), the message naming the ranks that failed."""
    failed = [o for o in everyone if o.error is not None]
    if not failed:
        return
    world = len(everyone)
    after = "every rank put its module back as it was" if written else "no rank wrote anything"
    if len(failed) == 1:
        message = f"{failed[0].message}\n(on rank {failed[0].rank} of {world}; {after})"
    elif len(failed) == world and len({o.message for o in failed}) == 1:
        message = f"{failed[0].message}\n(on every rank of {world}; {after})"
    else:
        message = f"{len(failed)} of {world} ranks failed; {after}:\n" + "\n".join(f"rank {o.rank}: {o.message}" for o in failed)
    first = next((o for o in failed if o.rank == rank), failed[0])
    if first.error == "KeyboardInterrupt":  # Ctrl-C on a rank: every rank stops as interrupted (exit 130)
        raise KeyboardInterrupt
    cls = getattr(errors, first.error or "", None)
    if first.error in ("CheckError", "VerifyError") and first.report is not None:
        raise agreed(CheckError(message, report=first.report))
    if isinstance(cls, type) and issubclass(cls, RemapError) and cls not in (CheckError, errors.VerifyError, errors.InternalError):
        raise agreed(cls(message))
    raise agreed(errors.InternalError(message))


def agreed(exc: RemapError) -> RemapError:
    """``exc``, marked as raised by every rank alike (the command line prints it on rank 0 only)."""
    exc.agreed = True  # type: ignore[attr-defined]
    return exc


def _shard_device(state: Mapping[str, Any]) -> torch.device:
    """Where a meta-built sharded target's memory goes: its mesh's device type (cpu under gloo)."""
    for t in state.values():
        if is_dtensor(t):
            kind = t.device_mesh.device_type
            return torch.device(kind if kind == "cpu" else f"{kind}:{torch.accelerator.current_device_index()}")
    return torch.device("cpu")


def _describe_sharding(state: Mapping[str, Any], world: int) -> dict[str, Any]:
    """For the report: world size, meshes and how many keys each placement holds."""
    placements: dict[str, int] = {}
    meshes: set[tuple[int, ...]] = set()
    for t in state.values():
        if is_dtensor(t):
            name = ", ".join(str(p) for p in t.placements)
            placements[name] = placements.get(name, 0) + 1
            meshes.add(tuple(t.device_mesh.shape))
        elif isinstance(t, torch.Tensor):
            placements["not sharded"] = placements.get("not sharded", 0) + 1
    return {"world_size": world, "meshes": [list(m) for m in sorted(meshes)], "placements": placements}

