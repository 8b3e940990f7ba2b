"""``remap export``: a fine-tuned model written back in the original's names, shapes, dtypes
and layout, proven to round-trip before anything is written.

1. The forward plan: the rules from the original (``like``, metadata only) onto the
   fine-tuned model's keys and shapes. It must pass its checks as a load would (freeze
   aside), or the export fails naming them.
2. The inverse (:mod:`remap.exporting.inverse`): every original key a target key came from,
   computed backwards from the fine-tuned tensors; every other original key (dropped by
   the rules, declared unused) taken unchanged from ``like``, or left out (``only_loaded``).
   Target keys that no source key fed are reported and left out.
3. The proof: the exported keys, planned forward again, reach the same target keys from
   the same source keys through the same ops; every exported tensor has ``like``'s shape
   and dtype; and where every op was inverted exactly, loading the export gives back the
   fine-tuned tensor bit for bit. Any failure raises CheckError and nothing is written.
4. The write (:mod:`remap.exporting.layout`): ``like``'s format, metadata and shards, atomically.

>>> import torch
>>> from remap.rules.parse import parse_rules
>>> from remap.sources.readers import open_source
>>> rules = parse_rules({"version": 1, "rules": [{"strip_prefix": "module."}]})
>>> like = open_source({"module.w": torch.zeros(2)})
>>> report = run_export(rules, Finetuned.of({"w": torch.ones(2)}), like)
>>> report.state_dict["module.w"], report.record("module.w").status
(tensor([1., 1.]), 'exported')
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckError
from ..meta import TargetMeta, meta_of_tensor
from ..planning.planner import Plan, make_plan
from ..report.grouping import group_keys
from ..report.records import DROPPED, MISMATCHED, MISSING, SKIPPED, UNUSED, Failure
from ..rules.steps import run_recipe
from .inverse import LEFT_OUT, UNCHANGED, Result, invert, same_tensor, strip
from .layout import plan_layout
from .optimizer import ExportedOptimizer, FinetunedOptimizer, export_state, original_order, save_optimizer_state
from .report import ExportRecord, ExportReport, LeftOutTarget

if TYPE_CHECKING:
    import os

    from ..rules.parse import Rules
    from ..sources.readers import Source

__all__ = ["Finetuned", "run_export", "export_failed", "IGNORED_FAILURES"]

#: Failures of the forward plan that do not concern an export (what to freeze after a load).
IGNORED_FAILURES = frozenset({"freeze"})


@dataclass
class Finetuned:
    """The fine-tuned tensors under the target's names: ``meta`` for planning, ``read`` for data."""

    meta: dict[str, TargetMeta]
    read: Callable[[str], torch.Tensor]
    description: dict[str, Any] = field(default_factory=dict)
    close: Callable[[], None] = lambda: None

    @classmethod
    def of(cls, model: Any, *, key: str | None = None, trust_pickle: bool = False, trust_links: bool = False) -> Finetuned:
        """A module (its state_dict in the plain architecture: tied parameters marked, frozen
        BatchNorm counters put back), a state_dict, a checkpoint path or a Source."""
        if isinstance(model, torch.nn.Module):
            return cls._of_module(model)
        from ..sources.readers import Source, open_source

        src = model if isinstance(model, Source) else open_source(model, key=key, trust_pickle=trust_pickle, trust_links=trust_links)
        meta = {k: TargetMeta(m.shape, m.dtype) for k, m in src.meta.items()}
        return cls(meta, src.read, dict(src.description), src.close)

    @classmethod
    def _of_module(cls, module: torch.nn.Module) -> Finetuned:
        from ..loading.freeze import plain_state_dict
        from ..meta import target_meta_of_module

        described = target_meta_of_module(module)
        state = {k: v for k, v in plain_state_dict(module).items() if isinstance(v, torch.Tensor)}
        meta = {}
        for k, v in state.items():  # the plain architecture's order; a frozen BatchNorm's counter is a buffer again
            meta[k] = described.get(k) or TargetMeta(tuple(v.shape), meta_of_tensor(v).dtype, "buffer", False)
        kind = type(module)
        return cls(meta, state.__getitem__, {"kind": "module", "class": f"{kind.__module__}.{kind.__qualname__}"})


class _Original(Mapping[str, torch.Tensor]):
    """The original's tensors, each read once, on first use."""

    def __init__(self, source: Source) -> None:
        self.source, self.read = source, {}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.read:
            self.read[key] = self.source.read(key)
        return self.read[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.source.meta)

    def __len__(self) -> int:
        return len(self.source.meta)


def export_failed(report: ExportReport) -> CheckError:
    """The CheckError for an export that failed a check, its message listing every failure."""
    kinds = ", ".join(dict.fromkeys(f.kind for f in report.failures))
    body = "\n".join(f"- {f.message}" for f in report.failures)
    return CheckError(f"{len(report.failures)} check(s) failed ({kinds}); nothing was written.\n{body}", report=report)  # type: ignore[arg-type]


def run_export(rules: Rules, finetuned: Finetuned, like: Source, *, save: str | os.PathLike[str] | None = None,
               only_loaded: bool = False, allow_lossy: bool = False, optimizer: FinetunedOptimizer | None = None,
               optimizer_save: str | os.PathLike[str] | None = None) -> ExportReport:  # fmt: skip
    """Plan, invert, prove and (with ``save``) write; returns the :class:`ExportReport`, whose
    ``state_dict`` holds the exported tensors. Raises CheckError, writing nothing, when the
    forward plan or the proof fails. With ``optimizer`` (the fine-tuned optimizer's state by
    target name) the same plan runs its state back (:mod:`remap.exporting.optimizer`): the
    report's ``optimizer`` section and ``optimizer_state_dict``, written to ``optimizer_save``."""
    if optimizer_save is not None and optimizer is None:
        from ..errors import UsageError

        raise UsageError("optimizer_save was given without an optimizer to export (optimizer=)")
    layout = plan_layout(like, save) if save is not None else None  # a save the original's layout cannot take fails first
    base = ExportReport(rules=rules.filename, source=finetuned.description, like=dict(like.description),
                        options={"only_loaded": only_loaded, "allow_lossy": allow_lossy},
                        warnings=layout.notes if layout is not None else ())  # fmt: skip
    plan = make_plan(rules, like.meta, finetuned.meta, source_description=like.description,
                     target_description=finetuned.description, source_handle=like)  # fmt: skip
    failures = tuple(f for f in plan.failures if f.kind not in IGNORED_FAILURES) + _refused(plan)
    left_out = _left_out_targets(plan)
    if failures:
        raise export_failed(base.replace(failures=failures, left_out=left_out))
    original = _Original(like)
    results = {k: strip(r) for k, r in invert(plan, finetuned.read, original, allow_lossy=allow_lossy).items()}
    tensors, records = _assemble(plan, like, original, results, only_loaded)
    report = base.replace(keys=tuple(records), left_out=left_out)
    failures = _prove(plan, rules, like, finetuned, tensors, results)
    if failures:
        raise export_failed(report.replace(failures=tuple(failures)))
    exported = _export_optimizer(plan, rules, like, optimizer) if optimizer is not None else None
    saved = layout.write(tensors) if layout is not None else None
    if exported is None:
        return report.replace(saved=saved, state_dict=tensors)
    if optimizer_save is not None:
        saved = {**(saved or {}), "optimizer": save_optimizer_state(exported.state_dict, optimizer_save)}
    return report.replace(saved=saved, state_dict=tensors, optimizer=exported.record, optimizer_state_dict=exported.state_dict)


def _export_optimizer(plan: Plan, rules: Rules, like: Source, optimizer: FinetunedOptimizer) -> ExportedOptimizer:
    """The fine-tuned optimizer's state run back through ``plan``, laid out for the original."""
    order, how = original_order(plan, rules, like)
    return export_state(plan, optimizer.state, optimizer.position, optimizer.hparams, order, how,
                        group_of=optimizer.group_of, optimizer=optimizer.optimizer)  # fmt: skip


def _refused(plan: Plan) -> tuple[Failure, ...]:
    """The export fails on an op whose inverse is ``refuse`` (a LoRA merge: the factors are gone), naming the keys it made."""
    hits: dict[str, list[str]] = {}
    for a in plan.assignments:
        stack = [a.recipe] if a.recipe is not None else []
        while stack:
            node = stack.pop()
            if not isinstance(node, str):
                if node.op.inverse is not None and node.op.inverse.kind == "refuse":
                    hits.setdefault(node.op.inverse["why"], []).append(f"{a.target!r}: {node.op.describe}")
                    break
                stack.extend(node.inputs)
    return tuple(_failure(f"{len(keys)} target key(s) come from an op that no export can run backwards: {why}", keys) for why, keys in hits.items())


def _left_out_targets(plan: Plan) -> tuple[LeftOutTarget, ...]:
    out = []
    for rec in plan.report.targets:
        if rec.status == MISSING:
            out.append(LeftOutTarget(rec.key, "no source key feeds it" + (" (expect.missing)" if rec.declared else "")))
        elif rec.status == MISMATCHED:
            shape = list(rec.source_shape) if rec.source_shape is not None else "?"
            out.append(LeftOutTarget(rec.key, f"its source key {', '.join(map(repr, rec.sources))} reaches it with another shape, {shape}"))
    return tuple(out)


def _assemble(plan: Plan, like: Source, original: _Original, results: dict[str, Result],
              only_loaded: bool) -> tuple[dict[str, torch.Tensor], list[ExportRecord]]:  # fmt: skip
    """Every key of the original, in its order: exported, a copy of a tied key's export,
    unchanged from the original, or left out."""
    fates = {r.key: r for r in plan.report.sources}
    copies = {d.source: d for d in plan.duplicates}
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for key, meta in like.meta.items():
        r = results.get(key)
        d = copies.get(key)
        if r is None and d is not None and d.first in results and meta == like.meta[d.first]:
            r = Result(results[d.first].tensor, results[d.first].status, results[d.first].targets,
                       notes=(f"a second copy of the tied {d.target!r}: the same tensor as {d.first!r}",))  # fmt: skip
        if r is not None:
            tensors[key] = r.tensor
            records.append(ExportRecord(key, r.status, meta.shape, meta.dtype, r.targets, r.ops, r.notes))
            continue
        why = _why_unchanged(fates.get(key))
        if only_loaded:
            records.append(ExportRecord(key, LEFT_OUT, meta.shape, meta.dtype, notes=(f"{why}; left out (only_loaded)",)))
            continue
        tensors[key] = original[key]
        records.append(ExportRecord(key, UNCHANGED, meta.shape, meta.dtype, notes=(why,)))
    return tensors, records


def _why_unchanged(fate: Any) -> str:
    """Why no target key gave an original key back, from its fate in the forward plan."""
    if fate is None:
        return "no target key came from it"
    if fate.fate == DROPPED:
        return f"dropped by step {fate.step} ({fate.step_kind})"
    if fate.fate == UNUSED:
        return "reaches no target key" + (" (expect.unused)" if fate.declared else "") + (f": {fate.note}" if fate.note else "")
    if fate.fate == SKIPPED:
        return f"its target key {fate.final_key!r} has another shape (shapes: skip)"
    return "no target key came from it"


def _prove(plan: Plan, rules: Rules, like: Source, finetuned: Finetuned, tensors: dict[str, torch.Tensor],
           results: dict[str, Result]) -> list[Failure]:  # fmt: skip
    """Why the export does not round-trip: shapes or dtypes other than the original's, a
    forward plan of the exported keys that differs, a tensor that does not load back."""
    failures = []
    wrong = [f"{k!r}: {list(m.shape)} {m.dtype}, the original {list(like.meta[k].shape)} {like.meta[k].dtype}"
             for k, t in tensors.items() if (m := meta_of_tensor(t)) != like.meta[k]]  # fmt: skip
    if wrong:
        failures.append(_failure(f"{len(wrong)} exported tensor(s) differ from the original in shape or dtype", wrong))
        return failures
    again = make_plan(rules, {k: meta_of_tensor(t) for k, t in tensors.items()}, finetuned.meta)
    before = {a.target: (a.sources, a.ops) for a in plan.assignments}
    after = {a.target: (a.sources, a.ops) for a in again.assignments}
    moved = [f"{t!r}: from {list(before[t][0])} through {list(before[t][1])}, planned again from "
             + (f"{list(after[t][0])} through {list(after[t][1])}" if t in after else "nothing")
             for t in before if before[t] != after.get(t)]  # fmt: skip
    moved += [f"{t!r}: planned again from {list(after[t][0])}, which no key fed before" for t in after if t not in before]
    if moved:
        failures.append(_failure(f"the exported keys, planned forward again, do not give back the target keys ({len(moved)})", moved))
        return failures
    differ = []
    for a in plan.assignments:
        if not all(results[s].exact for s in a.sources if s in results):
            continue  # a pad cut off, a lossy op: loading the export cannot give the fine-tuned tensor back
        value = run_recipe(a.recipe if a.recipe is not None else a.sources[0], tensors)
        expected = finetuned.read(a.target).detach().cpu()
        if not same_tensor(value.to(expected.dtype), expected):
            differ.append(a.target)
    if differ:
        failures.append(_failure(f"loading the export does not give back {len(differ)} fine-tuned tensor(s); "
                                 "this is a bug in remap, please report it with the rules file", group_keys(differ)))  # fmt: skip
    return failures


def _failure(message: str, lines: list[str]) -> Failure:
    shown = lines[:10] + ([f"... and {len(lines) - 10} more"] if len(lines) > 10 else [])
    return Failure("round_trip", message + ":\n  " + "\n  ".join(shown))
