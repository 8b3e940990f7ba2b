"""Applying a plan: the only code that reads tensor data and writes to a module.

Order matters, so that a failed check leaves the module untouched:

1. the plan must be ``ok`` and must describe this very module;
2. every tensor is read and every op run, each result checked against its planned shape;
3. copies of a tied parameter must agree;
4. only then ``module.load_state_dict(sd, strict=False)`` — torch's own missing and
   unexpected keys are cross-checked against the plan (a disagreement is a bug);
5. freezing; the final report reads requires_grad back from the module.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from .errors import CheckError, InternalError, UsageError
from .freeze import apply_freeze
from .meta import target_meta_of_module
from .report import Failure, Report, TargetRecord
from .planner import _totals

if TYPE_CHECKING:
    from .planner import Plan
    from .sources import Source
    from .steps import Recipe

__all__ = ["apply_plan", "check_failed"]


def check_failed(report: Report) -> CheckError:
    """The CheckError for a report with failures, its message listing every failure."""
    kinds = ", ".join(dict.fromkeys(f.kind for f in report.failures))
    body = "\n".join(f"- {f.message}" for f in report.failures)
    return CheckError(
        f"{len(report.failures)} check(s) failed ({kinds}); the module was not touched.\n{body}", report=report
    )


def apply_plan(plan: Plan, module: torch.nn.Module, *, dry_run: bool = False) -> Report:
    """Load ``plan`` into ``module`` and freeze; returns the report of what happened.

    Raises :class:`CheckError` (module untouched) when the plan failed a check. With
    ``dry_run`` the checks run and the dry-run report is returned, nothing is read.
    """
    _check_same_target(plan, module)
    if not plan.ok:
        raise check_failed(plan.report.replace(dry_run=dry_run))
    if dry_run:
        return plan.report
    if plan.source is None or plan.source.description.get("kind") == "metadata":
        raise UsageError("this plan was made from metadata only; make it from a source with tensors to apply it")
    state = _materialise(plan, plan.source)
    _check_duplicates(plan, plan.source)
    _load(module, state)
    apply_freeze(module, plan.frozen, plan.rules.freeze.batchnorm, plan.batchnorm_modules)
    return _final_report(plan, module)


def _check_same_target(plan: Plan, module: torch.nn.Module) -> None:
    actual = target_meta_of_module(module)
    planned = plan.target_meta
    if {k: m.shape for k, m in actual.items()} == {k: m.shape for k, m in planned.items()}:
        return
    extra = [k for k in actual if k not in planned][:5]
    lost = [k for k in planned if k not in actual][:5]
    shape = [f"{k}: planned {list(planned[k].shape)}, module {list(actual[k].shape)}" for k in planned if k in actual and planned[k].shape != actual[k].shape][:5]
    raise UsageError(
        "the module is not the target this plan was made for: "
        + "; ".join(filter(None, [
            f"keys not in the plan: {', '.join(extra)}" if extra else "",
            f"planned keys the module lacks: {', '.join(lost)}" if lost else "",
            f"shapes differ: {', '.join(shape)}" if shape else "",
        ]))
    )  # fmt: skip


def _materialise(plan: Plan, source: Source) -> OrderedDict[str, torch.Tensor]:
    """Every planned tensor, read and computed; source tensors no op touches are not copied."""
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    order = {k: n for n, k in enumerate(source.meta)}  # file order: one pass over each shard
    memo: dict[int, torch.Tensor] = {}  # a tensor split into parts is read and computed once
    for a in sorted(plan.assignments, key=lambda a: order.get(a.sources[0], 0)):
        value = source.read(a.sources[0]) if a.recipe is None else _evaluate(a.recipe, source, memo)
        if tuple(value.shape) != tuple(plan.target_meta[a.target].shape):
            raise InternalError(f"{a.target!r}: planned shape {list(a.meta.shape)}, got {list(value.shape)} after {list(a.ops)}")
        state[a.target] = value
    return state


def _evaluate(node: Recipe | str, source: Source, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    if isinstance(node, str):
        return source.read(node)
    if id(node) not in memo:
        memo[id(node)] = node.op.fn(*(_evaluate(i, source, memo) for i in node.inputs))
    return memo[id(node)]


def _check_duplicates(plan: Plan, source: Source) -> None:
    failures = []
    for d in plan.duplicates:
        if not torch.equal(source.read(d.source), source.read(d.first)):
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


def _load(module: torch.nn.Module, state: OrderedDict[str, torch.Tensor]) -> None:
    own = module.state_dict(keep_vars=True)
    # Pass the module's own version metadata: without it BatchNorm invents num_batches_tracked.
    state._metadata = getattr(own, "_metadata", None)  # type: ignore[attr-defined]
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise InternalError(f"load_state_dict failed after every check passed: {exc}") from exc
    expected_missing = sorted(k for k, v in own.items() if isinstance(v, torch.Tensor) and k not in state)
    if sorted(result.missing_keys) != expected_missing or result.unexpected_keys:
        raise InternalError(
            "torch and the plan disagree on what was loaded",
            details={"torch_missing": result.missing_keys, "planned_missing": expected_missing, "unexpected": result.unexpected_keys},
        )


def _final_report(plan: Plan, module: torch.nn.Module) -> Report:
    grads = {k: p.requires_grad for k, p in module.named_parameters(remove_duplicate=False)}
    targets = [_with_grad(t, grads) for t in plan.report.targets]
    return plan.report.replace(dry_run=False, targets=tuple(targets), totals=_totals(targets, list(plan.report.sources)))


def _with_grad(t: TargetRecord, grads: dict[str, Any]) -> TargetRecord:
    if t.kind != "parameter":
        return t
    trainable = grads.get(t.key, False)  # a BatchNorm parameter now a FrozenBatchNorm2d buffer is frozen
    return t if trainable == t.trainable else dataclasses.replace(t, trainable=trainable)
