"""Applying a plan: the only code that reads tensor data and writes to a module.

Order matters, so that a failed check leaves the module untouched:

1. the plan must be ``ok`` and must describe this very module;
2. every op is run once on meta tensors, so an op that cannot run fails before any write;
3. copies of a tied parameter must agree; a meta-device target must be completable;
4. only then the tensors stream in (:mod:`remap.loading.streaming`: read straight into the
   parameters where nothing changes them, else mapped and copied) through
   ``load_state_dict(strict=False)`` — torch's own missing and unexpected keys are
   cross-checked against the plan (a disagreement is a bug);
5. a meta-device target's keys that were not loaded are materialised and initialised
   by their module's ``reset_parameters`` (then, in a Hugging Face model, its
   ``_init_weights``), and its non-persistent buffers still on meta are computed by
   ``_init_weights`` (checked on meta tensors in step 3) or, where it does not write them,
   taken from a twin built again from the model's recorded construction (built in step 3);
   then freezing. The final report reads
   requires_grad back from the module.

Steps 4 and 5 run under a :class:`~remap.loading.streaming.Rollback`: if anything fails once
writing has begun (a file truncated or changed during the load, an I/O error, Ctrl-C),
the module is put back as it was before the error propagates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from itertools import repeat
from operator import attrgetter, eq
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckError, InternalError, SourceError, TargetError, UsageError
from .dtype_policy import AUTO, DtypePolicy, RangeFailure, precision_changes
from .empty import REPLAYED, Rebuilt, hf_initialises, init_owners, initialise, rebuild_buffers
from .freeze import apply_freeze
from ..meta import dtype_name, is_dtensor
from ..report.records import Failure, Report, TargetRecord
from ..planning.planner import totals_of
from .streaming import BATCH_BYTES, Progress, Rollback, read_tensor, stream

if TYPE_CHECKING:
    from ..planning.planner import Assignment, Plan
    from ..sources.readers import Source
    from ..rules.steps import Recipe

__all__ = ["apply_plan", "check_failed"]


def check_failed(report: Report) -> CheckError:
    """The CheckError for a report with failures, its message listing every failure."""
    kinds = ", ".join(dict.fromkeys(f.kind for f in report.failures))
    body = "\n".join(f"- {f.message}" for f in report.failures)
    return CheckError(
        f"{len(report.failures)} check(s) failed ({kinds}); the module was not touched.\n{body}", report=report
    )


def apply_plan(
    plan: Plan,
    module: torch.nn.Module,
    *,
    dry_run: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_bytes: int | None = None,
    progress: Progress | None = None,
    mmap_weights: bool = False,
    rollback: bool = True,
) -> Report:
    """Load ``plan`` into ``module`` and freeze; returns the report of what happened.

    Raises :class:`CheckError` (module untouched) when the plan failed a check. With
    ``dry_run`` the checks run and the dry-run report is returned, nothing is read.
    A module on the meta device is loaded with ``assign=True``: each tensor is copied once
    onto ``device`` (default cpu), floating tensors cast to ``dtype`` when given. With
    ``mmap_weights`` (meta-device targets only) the tensors that need no op or cast are not
    copied: they stay views of a private copy-on-write mapping of the file (see
    :func:`remap.load` for what that risks).

    A failure once writing has begun puts the module back as it was. For an allocated
    target that costs one host-memory copy of the tensors being loaded, held during the
    load; ``rollback=False`` saves it, and a failure then may leave the module partly
    loaded (the error says so). A meta-device target is always put back (it costs nothing).
    """
    state = module.state_dict(keep_vars=True)  # walked once: the checks and the stream share it
    if any(map(is_dtensor, state.values())):  # FSDP2 / tensor parallel: every rank loads its part, in step with the others
        from .sharded import apply_sharded

        return apply_sharded(plan, module, state, dry_run=dry_run, device=_device(device), dtype=dtype,
                             rollback=rollback, mmap_weights=mmap_weights)  # fmt: skip
    _check_same_target(plan, state)
    if not plan.ok:
        raise check_failed(plan.report.replace(dry_run=dry_run))
    policy = DtypePolicy.of(dtype, plan.rules.target.keep_fp32)
    on_meta = _is_meta(state)
    precision, checks = precision_changes(plan, policy, state, on_meta)
    planned = plan.report.replace(precision=precision, warnings=_cast_warnings(plan.report.warnings, policy, on_meta))
    if dry_run:
        return planned
    if plan.source is None or plan.source.description.get("kind") == "metadata":
        raise UsageError("this plan was made from metadata only; make it from a source with tensors to apply it")
    if mmap_weights and not on_meta:
        raise UsageError("mmap_weights keeps the file's pages as the weights of a meta-device target; "
                         "this module already has its memory: build it under torch.device('meta')")  # fmt: skip
    dev = _device(device)
    if mmap_weights and dev is not None and dev.type != "cpu":
        raise UsageError(f"mmap_weights maps the file into CPU memory; it cannot load onto device {dev}")
    rebuilt = _preflight(plan, module, on_meta)
    _check_duplicates(plan, plan.source)
    dt = None if policy.dtype in (None, AUTO) else getattr(torch, dtype_name(policy.dtype))
    undo = Rollback(module)
    try:
        stats = stream(plan, plan.source, module, assign=on_meta, device=dev, dtype=dt, state=state,
                       rollback=undo if rollback else None,
                       batch_bytes=batch_bytes or BATCH_BYTES, progress=progress, mmap_weights=mmap_weights,
                       policy=policy if policy.active else None, checks=checks)  # fmt: skip
        del state  # a meta target's entries are stale now
        initialised: dict[str, str] = {}
        if on_meta:
            _retie(plan, module)
            stats.materialised, initialised = _materialise_rest(module, dev or torch.device("cpu"), dt, rebuilt, policy)
    except BaseException as exc:
        undo.restore()
        if isinstance(exc, RangeFailure):
            kept = "" if rollback or on_meta else "; the module may be partly loaded (rollback=False)"
            failure = dataclasses.replace(exc.failure, message=exc.failure.message + kept)
            raise check_failed(planned.replace(dry_run=False, failures=(failure,))) from None
        if isinstance(exc, SourceError):
            state_now = ("the module was restored as it was before the load" if rollback or on_meta else
                         "the module may be partly loaded (rollback=False)")  # fmt: skip
            raise SourceError(f"{exc.message}; {state_now}", where=exc.where) from None
        raise
    del undo
    apply_freeze(module, plan.frozen, plan.rules.freeze.batchnorm, plan.batchnorm_modules)
    report = _final_report(plan, module).replace(precision=precision)
    warnings = planned.warnings
    copied = len(plan.assignments) - stats.mmap_weights if mmap_weights else 0
    if copied:
        warnings = (*warnings, f"mmap_weights: {copied} tensor(s) were copied, not mapped: an op or a cast changes them, "
                               "or the source has no file to map")  # fmt: skip
    unlike_a_real_build = {k: by for k, by in initialised.items() if by != REPLAYED}
    if unlike_a_real_build:  # replayed init calls give what building for real gives: nothing to say
        warnings = (*warnings, _initialised_note(plan, unlike_a_real_build))
    return report.replace(target={**report.target, "meta": on_meta}, stats=stats.as_dict(), warnings=warnings)


def _initialised_note(plan: Plan, initialised: Mapping[str, str]) -> str:
    """One report line: the keys of a meta-device target that no source fed and what initialised
    them (non-persistent buffers are computed, not keys)."""
    groups: dict[str, list[str]] = {}
    for key, by in initialised.items():
        groups.setdefault(by, []).append(key if key in plan.target_meta else f"{key} (non-persistent buffer)")
    parts = "; ".join(f"by {by}: {_some(keys)}" for by, keys in groups.items())
    return f"{len(initialised)} tensor(s) not in the checkpoint were initialised on the meta-device target {parts}"


def _some(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a torch.device this build can allocate on; UsageError otherwise (before anything is read)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError, TypeError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load onto device {device!r}: {message}") from None
    return dev


def _check_same_target(plan: Plan, state: Mapping[str, Any]) -> None:
    """The module's state_dict (``keep_vars=True``) has the planned keys and shapes."""
    planned = plan.target_meta
    if _same_keys_and_shapes(state, planned):
        return
    actual = {k: tuple(t.shape) for k, t in state.items() if isinstance(t, torch.Tensor)}  # as target_meta_of_module
    extra = [k for k in actual if k not in planned][:5]
    lost = [k for k in planned if k not in actual][:5]
    shape = [f"{k}: planned {list(planned[k].shape)}, module {list(actual[k])}" for k in planned if k in actual and tuple(planned[k].shape) != actual[k]][:5]
    raise UsageError(
        "the module is not the target this plan was made for: "
        + "; ".join(filter(None, [
            f"keys not in the plan: {', '.join(extra)}" if extra else "",
            f"planned keys the module lacks: {', '.join(lost)}" if lost else "",
            f"shapes differ: {', '.join(shape)}" if shape else "",
        ]))
    )  # fmt: skip


def _same_keys_and_shapes(state: Mapping[str, Any], planned: Mapping[str, Any]) -> bool:
    """Whether the tensors of ``state`` are exactly the keys of ``planned``, with its shapes:
    key sets compared as sets and shapes pair by pair, so that a module of a million keys
    costs a few C-level passes (a ``torch.Size`` equals the tuple of its sizes)."""
    values = state.values()
    if not all(map(isinstance, values, repeat(torch.Tensor))):  # _extra_state entries: leave them out
        state = {k: t for k, t in state.items() if isinstance(t, torch.Tensor)}
        values = state.values()
    if len(state) != len(planned) or state.keys() != planned.keys():
        return False
    return all(map(eq, map(_SHAPE, values), map(_SHAPE, map(planned.__getitem__, state))))  # streamed: no list of a million sizes


_SHAPE = attrgetter("shape")


def _is_meta(state: Mapping[str, Any]) -> bool:
    return any(t.device.type == "meta" for t in state.values() if isinstance(t, torch.Tensor))


def _preflight(plan: Plan, module: torch.nn.Module, on_meta: bool) -> dict[str, Rebuilt]:
    """Checks that need the module or the ops' kernels, run before anything is written; returns
    the non-persistent buffers of a meta-device target computed by building it again."""
    failures = [f for a in plan.assignments if a.recipe is not None for f in _dry_op(a, plan)]
    rebuilt: dict[str, Rebuilt] = {}
    if on_meta:
        gaps, rebuilt = _meta_gaps(plan, module)
        failures += gaps
    if failures:
        raise check_failed(plan.report.replace(dry_run=False, failures=tuple(failures)))
    return rebuilt


def _dry_op(a: Assignment, plan: Plan) -> list[Failure]:
    """Run an assignment's ops on meta tensors: the kernels check dtypes and shapes, no data moves."""

    def run(node: Recipe | str) -> torch.Tensor:
        if isinstance(node, str):
            m = plan.source_meta[node]
            return torch.empty(m.shape, dtype=getattr(torch, m.dtype), device="meta")
        return node.op.fn(*(run(i) for i in node.inputs))

    try:
        out = run(a.recipe)
    except NotImplementedError:
        return []  # no meta kernel for this op: it runs for real at apply time
    except Exception as exc:  # an op that cannot run on these inputs
        return [Failure("op", f"{a.target!r}: {' then '.join(a.ops)} cannot run: {type(exc).__name__}: {exc}", a.sources)]
    if tuple(out.shape) != tuple(plan.target_meta[a.target].shape):
        raise InternalError(f"{a.target!r}: planned shape {list(a.meta.shape)}, the ops give {list(out.shape)}")
    return []


def _meta_gaps(plan: Plan, module: torch.nn.Module) -> tuple[list[Failure], dict[str, Rebuilt]]:
    """A meta-device target must end with no meta tensor: what is not loaded needs the init calls
    its ``__init__`` made under :func:`~remap.loading.empty.empty_weights` (replayed), its module's
    ``reset_parameters`` or (in a Hugging Face model) ``_init_weights``; a non-persistent buffer
    on meta needs ``_init_weights`` to compute it (found by running it on meta tensors) or else a
    twin of the model built again from its recorded construction
    (:func:`~remap.loading.empty.rebuild_buffers`): returns the failures and those buffers' values."""
    assigned = {a.target for a in plan.assignments}
    loaded = assigned | {k for k, m in plan.target_meta.items() if m.tied_to in assigned}
    persistent = set(plan.target_meta)
    owners = init_owners(module)
    failures = []
    volatile_left: dict[str, torch.Tensor] = {}
    for name, m in module.named_modules():
        prefix = f"{name}." if name else ""
        own = [(n, t) for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)] if t is not None and t.device.type == "meta"]
        if not own:
            continue
        gaps = [n for n, t in own if prefix + n in persistent and prefix + n not in loaded and not getattr(t, "_remap_inits", None)]
        volatile = [n for n, _ in own if prefix + n not in persistent]
        computed = hf_initialises(owners.get(name), m) if volatile or (gaps and not callable(getattr(m, "reset_parameters", None))) else set()
        volatile_left.update({prefix + n: m._buffers[n] for n in volatile if n not in computed})
        gaps = [prefix + n for n in gaps if n not in computed]
        if gaps and not callable(getattr(m, "reset_parameters", None)):
            failures.append(Failure("missing", f"{', '.join(gaps)} of a meta-device target would stay uninitialised: "
                                    f"{type(m).__name__} has no reset_parameters; load them or build the target on a real device", tuple(gaps)))  # fmt: skip
    rebuilt, left = rebuild_buffers(module, volatile_left) if volatile_left else ({}, [])
    for names, why in left:
        failures.append(Failure("missing", f"non-persistent buffer(s) {', '.join(names)} of a meta-device target are not in any checkpoint "
                                f"and remap cannot compute them{f' ({why})' if why else ''}; build the target with "
                                "`with remap.empty_weights(): model = ...` (parameters on meta, buffers computed by the module as usual) "
                                "or on a real device", tuple(names)))  # fmt: skip
    return failures, rebuilt


def _retie(plan: Plan, module: torch.nn.Module) -> None:
    """Tied names of a meta-device target share the tensor one of them was assigned
    (``assign=True`` replaced that name's tensor only)."""
    groups: dict[str, list[str]] = {}
    for key, m in plan.target_meta.items():
        if m.tied_to is not None:
            groups.setdefault(m.tied_to, [m.tied_to]).append(key)
    for keys in groups.values():
        slots = [_slot(module, k) for k in keys]
        real = [d[n] for d, n in slots if d[n] is not None and d[n].device.type != "meta"]
        if real:
            for d, n in slots:
                if d[n] is not None and d[n].device.type == "meta":
                    d[n] = real[0]


def _slot(module: torch.nn.Module, key: str) -> tuple[dict[str, Any], str]:
    """The dict (``_parameters`` or ``_buffers``) and name that hold ``key``'s tensor."""
    owner, _, name = key.rpartition(".")
    m = module.get_submodule(owner)
    return (m._parameters if name in m._parameters else m._buffers), name


def _materialise_rest(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None,
                      rebuilt: Mapping[str, Rebuilt] | None = None, policy: DtypePolicy | None = None) -> tuple[list[str], dict[str, str]]:
    """Give every module still holding meta tensors real memory and its own initialisation
    (``reset_parameters``, then a Hugging Face model's ``_init_weights``), the buffers in
    ``rebuilt`` their value from the rebuild; returns the keys materialised and, for each, what
    initialised it. A tensor that no initialiser wrote is a TargetError (the caller puts the
    module back)."""
    rebuilt = rebuilt or {}
    done, how = [], {}
    owners = None
    for name, m in module.named_modules():
        own = dict([*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)])
        if not any(t is not None and t.device.type == "meta" for t in own.values()):
            continue
        if owners is None:
            owners = init_owners(module)
        keep = {n: t.detach().clone() for n, t in own.items() if t is not None and t.device.type != "meta"}
        inits = {n: list(getattr(t, "_remap_inits", ())) for n, t in own.items() if t is not None and n not in keep}
        unreplayed = {n for n, t in own.items() if t is not None and n not in keep and getattr(t, "_remap_version", t._version) != t._version}
        m.to_empty(device=device, recurse=False)
        if dtype is not None or (policy is not None and policy.keep_fp32):
            for n, t in own.items():
                if t is not None and t.is_floating_point():
                    kept = policy is not None and policy.kept_fp32(f"{name}.{n}" if name else n)
                    if kept or dtype is not None:
                        getattr(m, n).data = getattr(m, n).data.to(torch.float32 if kept else dtype)
        fresh = [n for n, t in own.items() if t is not None and n not in keep]
        prefix = f"{name}." if name else ""
        computed = {n: rebuilt[prefix + n] for n in fresh if prefix + n in rebuilt}
        to_init = [n for n in fresh if n not in computed]
        by = initialise(m, owners.get(name), to_init, inits) if to_init else {}
        with torch.no_grad():
            for n, t in keep.items():
                getattr(m, n).copy_(t)
            for n, r in computed.items():
                getattr(m, n).copy_(r.value)
        by.update({n: r.how for n, r in computed.items()})
        left = [prefix + n for n in fresh if n not in by]
        if left:
            raise TargetError(f"{', '.join(left)} of a meta-device target stayed uninitialised: {type(m).__name__}'s initialisers "
                              "(reset_parameters, _init_weights) did not write them; load them or build the target on a real device; "
                              "the module was put back as it was")  # fmt: skip
        done += [prefix + n for n in fresh]
        if owners.get(name) is None:  # a Hugging Face model's _init_weights redoes what its __init__ wrote
            by.update({n: f"{by[n]} (its __init__ also wrote it in place, not through torch.nn.init: that was not replayed)"
                       for n in unreplayed})  # fmt: skip
        how.update({prefix + n: by[n] for n in fresh})
    return done, how


def _check_duplicates(plan: Plan, source: Source) -> None:
    failures = []
    for d in plan.duplicates:
        if not torch.equal(read_tensor(source, d.source), read_tensor(source, d.first)):
            failures.append(
                Failure(
                    "tied_conflict",
                    f"{d.target!r} is a tied parameter fed by two source tensors that differ: {d.first!r} and {d.source!r}; "
                    f"drop one of them",
                    (d.first, d.source),
                )
            )
    if failures:
        raise check_failed(plan.report.replace(failures=tuple(failures)))


def _cast_warnings(warnings: tuple[str, ...], policy: DtypePolicy, on_meta: bool) -> tuple[str, ...]:
    """The planner's warnings, less its "will be cast by load_state_dict" lines where a dtype
    policy makes a meta-device target's tensors (the report's ``precision`` says what happens)."""
    if not (on_meta and policy.active):
        return warnings
    return tuple(w for w in warnings if not (w.endswith(" by load_state_dict") and " will be cast from " in w))


def _final_report(plan: Plan, module: torch.nn.Module) -> Report:
    grads = {k: p.requires_grad for k, p in module.named_parameters(remove_duplicate=False)}
    targets = [_with_grad(t, grads) for t in plan.report.targets]
    return plan.report.replace(dry_run=False, targets=tuple(targets), totals=totals_of(targets, list(plan.report.sources)))


def _with_grad(t: TargetRecord, grads: dict[str, Any]) -> TargetRecord:
    if t.kind != "parameter":
        return t
    trainable = grads.get(t.key, False)  # a BatchNorm parameter now a FrozenBatchNorm2d buffer is frozen
    return t if trainable == t.trainable else dataclasses.replace(t, trainable=trainable)
