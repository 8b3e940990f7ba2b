"""Optimizer state exported back: ``remap.export(model, rules, like=..., optimizer=opt)``.

The fine-tuned optimizer's state is named by identity (each of its parameters is a
parameter of the fine-tuned module, under the target's name), then run backwards through
the same forward plan the weights use, with the same inverses (:mod:`remap.exporting.inverse`):
a merged ``qkv``'s ``exp_avg`` is split back into ``q``/``k``/``v``, a transpose is
transposed back, a cast is cast back. Scalar entries (``step``) go to every original
parameter unchanged. Only ops that move elements carry state back (transpose, permute,
reshape, merge, split, cast); an original parameter that a slice, pad or ``adapt`` (or
any op without an exact inverse) led to, or one that shares its tensor with such a
parameter, gets no state, and the report says why: remap never invents a moment.

The positions of the state_dict written are the original model's parameter order: the
rules' ``source.model`` built on the meta device (``named_parameters()``), else ``like``'s
key order restricted to the keys that reach a parameter of the fine-tuned module. A key of
``like`` that reaches no target key may be a parameter or a buffer, so that order cannot
be used and the export fails asking for ``source.model``. The param groups are the
fine-tuned optimizer's (hyperparameters and all), each original parameter in the group of
the parameters it became; ``param_names`` are filled in.

>>> import torch
>>> from remap.planning.planner import make_plan
>>> from remap.rules.parse import parse_rules
>>> rules = parse_rules({"version": 1, "rules": [{"rename": {"^fc\\\\.": "head."}}]})
>>> plan = make_plan(rules, {"fc.weight": (2, 2)}, {"head.weight": (2, 2)})
>>> state = {"head.weight": {"step": torch.tensor(1.0), "exp_avg": torch.ones(2, 2)}}
>>> out = export_state(plan, state, {"head.weight": 0}, [{"lr": 0.1}], ["fc.weight"], "like")
>>> out.state_dict["param_groups"][0]["param_names"], out.state_dict["state"][0]["exp_avg"].sum().item()
(['fc.weight'], 4.0)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InternalError, UsageError
from ..loading.optimizer import is_scalar_state
from ..report.records import (
    OPT_DISCARDED,
    OPT_LOADED,
    OPT_RESET,
    OPT_STATELESS,
    USED,
    OptimizerGroupRecord,
    OptimizerReport,
    OptimizerSourceRecord,
    OptimizerTargetRecord,
)
from .inverse import Result, _Backward

if TYPE_CHECKING:
    import os

    from ..planning.planner import Assignment, Plan
    from ..rules.parse import Rules
    from ..sources.readers import Source

__all__ = ["FinetunedOptimizer", "ExportedOptimizer", "export_state", "original_order", "save_optimizer_state", "STATE_INVERSES"]

#: Inverse kinds that move elements only: a per-element state follows them back exactly.
STATE_INVERSES = frozenset({"transpose", "reshape", "cast", "unmerge", "part", "permute_heads"})
_NOT_HPARAMS = ("params", "param_names")


@dataclass
class FinetunedOptimizer:
    """The fine-tuned optimizer's state by target parameter name, its groups' hyperparameters,
    and each parameter's group."""

    optimizer: str
    state: dict[str, dict[str, Any]]
    position: dict[str, int]
    group_of: dict[str, int]
    hparams: list[dict[str, Any]]

    @classmethod
    def of(cls, optimizer: Any, module: Any) -> FinetunedOptimizer:
        """Name ``optimizer``'s parameters by identity in ``module`` (the fine-tuned model)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageError(f"optimizer: expected a torch.optim.Optimizer, found {type(optimizer).__name__}")
        if not isinstance(module, torch.nn.Module):
            raise UsageError("optimizer= needs the fine-tuned model as a torch.nn.Module (its parameters name the optimizer's "
                             f"by identity); found {type(module).__name__}")  # fmt: skip
        ident = {id(p): n for n, p in module.named_parameters()}
        sd = optimizer.state_dict()
        state, position, group_of, hparams, pos = {}, {}, {}, [], 0
        for g, group in enumerate(optimizer.param_groups):
            hparams.append({k: v for k, v in sd["param_groups"][g].items() if k not in _NOT_HPARAMS})
            for n, p in enumerate(group["params"]):
                if id(p) not in ident:
                    raise UsageError(f"the optimizer's param group {g} item {n} {list(p.shape)} is not a parameter of the "
                                     "fine-tuned model; build the optimizer over the model being exported")  # fmt: skip
                name = ident[id(p)]
                position[name], group_of[name] = pos, g
                if sd["state"].get(pos):
                    state[name] = dict(sd["state"][pos])
                pos += 1
        kind = type(optimizer)
        return cls(f"{kind.__module__}.{kind.__qualname__}", state, position, group_of, hparams)


@dataclass
class ExportedOptimizer:
    """The optimizer state_dict laid out for the original model, and the report's section."""

    state_dict: dict[str, Any]
    record: OptimizerReport


def original_order(plan: Plan, rules: Rules, like: Source) -> tuple[list[str], str]:
    """The original model's parameter names in ``named_parameters()`` order, and whence:
    ``source.model`` (built on the meta device), else ``like``'s key order (a state_dict
    lists each module's parameters in that order), which needs every key of ``like`` to
    reach a target key: one that reaches none may be a parameter or a buffer."""
    spec = rules.source
    if spec.model is not None:
        from ..sources.factories import build

        model = build(spec.model, spec.args, dict(spec.kwargs), what="source.model", device="meta")
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"source.model returned a {type(model).__name__}, expected a torch.nn.Module", where="source.model")
        names = [n for n, _ in model.named_parameters()]
        strangers = [n for n in names if n not in like.meta]
        if strangers:
            raise UsageError(f"source.model's parameters {', '.join(map(repr, strangers[:6]))} are not keys of the original (like); "
                             "the optimizer state cannot be laid out for it", where="source.model")  # fmt: skip
        return names, "source.model"
    duplicates = {d.source for d in plan.duplicates}
    fates = {r.key: r for r in plan.report.sources}
    names, unknown = [], []
    for key in like.meta:
        if key in duplicates:
            continue  # a second name of a tied parameter: named_parameters() lists it once
        targets = [t for t in getattr(fates.get(key), "targets", ()) or () if t in plan.target_meta]
        if not targets:
            unknown.append(key)
        elif any(plan.target_meta[t].kind == "parameter" for t in targets):
            names.append(key)
    if unknown:
        raise UsageError(f"{len(unknown)} key(s) of the original reach no key of the fine-tuned model "
                         f"({', '.join(map(repr, unknown[:6]))}): remap cannot tell whether they are parameters of the "
                         "original, so the optimizer state's positions are not known. Set `source.model` in the rules "
                         "(the original architecture, whose named_parameters() order the optimizer follows)")  # fmt: skip
    return names, "like"


def export_state(plan: Plan, state: Mapping[str, Mapping[str, Any]], position: Mapping[str, int], hparams: list[dict[str, Any]],
                 order: list[str], how: str, *, group_of: Mapping[str, int] | None = None,
                 optimizer: str = "torch.optim.Optimizer") -> ExportedOptimizer:  # fmt: skip
    """The optimizer state_dict for the original model: ``state`` (target name -> state),
    ``position`` (target name -> its position in the fine-tuned optimizer: every parameter
    it holds), ``hparams`` its groups, ``order`` the original's parameter names."""
    group_of = group_of or dict.fromkeys(position, 0)
    alias = _aliases(plan, position)
    state = {**state, **{k: state[t] for k, t in alias.items() if t in state}}
    position, group_of = {**position, **{k: position[t] for k, t in alias.items()}}, {**group_of, **{k: group_of[t] for k, t in alias.items()}}
    why = _why_not(plan, state, position)
    kept = [a for a in plan.assignments if a.target not in why]
    results = _run_back(kept, state)
    groups: list[list[str]] = [[] for _ in hparams]
    records: dict[str, OptimizerTargetRecord] = {}
    out_state: dict[str, dict[str, Any]] = {}
    consumers = _consumers(plan)
    for name in order:
        fed = consumers.get(name, [])
        g = _group(name, fed, group_of, len(hparams))
        groups[g].append(name)
        sources = tuple(a.target for a in fed)
        ops = tuple(dict.fromkeys(o for a in fed for o in a.ops))
        if not fed:
            fate = next((r for r in plan.report.sources if r.key == name), None)
            reason = "no state: no key of the fine-tuned model came from it" + (f" ({fate.fate})" if fate is not None else "")
            records[name] = OptimizerTargetRecord(name, OPT_RESET, g, reason=reason)
            continue
        bad = [a.target for a in fed if a.target in why]
        if bad:
            records[name] = OptimizerTargetRecord(name, OPT_RESET, g, sources, ops, reason=f"no state: {why[bad[0]]}")
            continue
        first = state[fed[0].target]
        value = {k: (results[k][name].tensor.clone(memory_format=torch.contiguous_format) if k in results and name in results[k]
                     else (v.clone() if isinstance(v, torch.Tensor) else v)) for k, v in first.items()}  # fmt: skip
        out_state[name] = value
        records[name] = OptimizerTargetRecord(name, OPT_LOADED, g, sources, ops, tuple(map(str, value)))
    packed, ordered = _pack(groups, out_state, hparams, records)
    sources_rec = _source_records(plan, state, position, group_of, order, alias, why)
    group_recs = tuple(OptimizerGroupRecord(g, len(n), "fine-tuned") for g, n in enumerate(groups))
    record = OptimizerReport(optimizer, {"kind": "optimizer", "path": None, "key": None, "detected": False}, how, "fine-tuned",
                             group_recs, tuple(ordered), tuple(sources_rec))  # fmt: skip
    return ExportedOptimizer(packed, record)


def _pack(groups: list[list[str]], out_state: Mapping[str, dict[str, Any]], hparams: list[dict[str, Any]],
          records: Mapping[str, OptimizerTargetRecord]) -> tuple[dict[str, Any], list[OptimizerTargetRecord]]:  # fmt: skip
    """The state_dict as torch packs one (positions group after group, ``param_names`` beside
    ``params``), and the records in that order."""
    state, packed_groups, pos, ordered = {}, [], 0, []
    for g, names in enumerate(groups):
        for i, n in enumerate(names):
            if n in out_state:
                state[pos + i] = out_state[n]
        packed_groups.append({**hparams[g], "params": list(range(pos, pos + len(names))), "param_names": list(names)})
        pos += len(names)
        ordered += [records[n] for n in names]
    return {"state": state, "param_groups": packed_groups}, ordered


def _source_records(plan: Plan, state: Mapping[str, Mapping[str, Any]], position: Mapping[str, int], group_of: Mapping[str, int],
                    order: list[str], alias: Mapping[str, str], why: Mapping[str, str]) -> list[OptimizerSourceRecord]:  # fmt: skip
    """Every parameter of the fine-tuned optimizer: used, discarded (why) or stateless."""
    consumers = _consumers(plan)
    reached: dict[str, list[str]] = defaultdict(list)
    for n in order:
        for a in consumers.get(n, []):
            reached[alias.get(a.target, a.target)].append(n)
    fed_by = {alias.get(a.target, a.target): a.target for a in plan.assignments}
    out = []
    for t, p in sorted(position.items(), key=lambda kv: kv[1]):
        if t in alias:
            continue  # the second name of a tied parameter: its first name's record says it
        keys, g, went = tuple(map(str, state[t])) if t in state else (), group_of.get(t, 0), tuple(reached.get(t, ()))
        if t not in state:
            out.append(OptimizerSourceRecord(t, p, OPT_STATELESS, g, went))
        elif fed_by.get(t) in why or not went:
            out.append(OptimizerSourceRecord(t, p, OPT_DISCARDED, g, went, keys, why.get(fed_by.get(t, t)) or "it reaches no parameter of the original"))
        else:
            out.append(OptimizerSourceRecord(t, p, USED, g, went, keys))
    return out


def _aliases(plan: Plan, position: Mapping[str, int]) -> dict[str, str]:
    """Target key -> the name the optimizer knows it by, for a tied parameter planned under
    its second name (``named_parameters()`` lists a tied parameter once, under its first)."""
    return {k: m.tied_to for k, m in plan.target_meta.items()
            if getattr(m, "tied_to", None) and k not in position and m.tied_to in position}  # fmt: skip


def _consumers(plan: Plan) -> dict[str, list[Assignment]]:
    """Source key -> the assignments it feeds."""
    out: dict[str, list[Assignment]] = defaultdict(list)
    for a in plan.assignments:
        for s in dict.fromkeys(a.sources):
            out[s].append(a)
    return out


def _group(name: str, fed: list[Assignment], group_of: Mapping[str, int], count: int) -> int:
    """The param group of an original parameter: that of the parameters it became."""
    if count == 1:
        return 0
    groups = {group_of[a.target] for a in fed if a.target in group_of}
    if len(groups) != 1:
        what = "reaches no parameter of the fine-tuned optimizer" if not groups else f"became parameters of groups {sorted(groups)}"
        raise UsageError(f"the fine-tuned optimizer has {count} param groups and the original parameter {name!r} {what}: "
                         "which group it belongs to is not known")  # fmt: skip
    return groups.pop()


def _ops_ok(node: Any) -> str | None:
    """Why the state cannot follow ``node`` back (None: every op moves elements only)."""
    if node is None or isinstance(node, str):
        return None
    inv = node.op.inverse
    if inv is None or not inv.exact or inv.kind not in STATE_INVERSES:
        return f"op {node.op.describe} has no inverse that moves elements only, so no state goes back through it"
    return next((w for i in node.inputs if (w := _ops_ok(i)) is not None), None)


def _why_not(plan: Plan, state: Mapping[str, Mapping[str, Any]], position: Mapping[str, int]) -> dict[str, str]:
    """Target key -> why its state cannot go back; a source whose tensor feeds several targets
    goes back only when all of them do, with the same entries and the same scalars."""
    why: dict[str, str] = {}
    for a in plan.assignments:
        if a.target not in position:
            why[a.target] = f"{a.target!r} is not in the fine-tuned optimizer"
        elif a.target not in state:
            why[a.target] = f"{a.target!r} has no state (never stepped)"
        elif (w := _ops_ok(a.recipe)) is not None:
            why[a.target] = w
        else:
            shape = tuple(a.meta.shape)
            odd = [str(k) for k, v in state[a.target].items() if isinstance(v, torch.Tensor) and not is_scalar_state(str(k), v, shape)
                   and tuple(v.shape) != shape]  # fmt: skip
            strange = [str(k) for k, v in state[a.target].items() if not isinstance(v, (torch.Tensor, bool, int, float)) and v is not None]
            if odd or strange:
                why[a.target] = f"its state {', '.join(odd + strange)} is not one value per element or one number"
    consumers = _consumers(plan)
    for s, fed in consumers.items():
        if len(fed) > 1 and not any(a.target in why for a in fed):
            first = state[fed[0].target]
            shape = tuple(fed[0].meta.shape)
            for a in fed[1:]:
                other = state[a.target]
                if list(map(str, other)) != list(map(str, first)) or any(
                        is_scalar_state(str(k), v, shape) and not _same(v, other[k]) for k, v in first.items()):  # fmt: skip
                    for b in fed:
                        why[b.target] = f"the parameters {s!r} became hold different state entries or scalars"
                    break
    changed = True
    while changed:  # a tensor split among several targets goes back whole or not at all
        changed = False
        for s, fed in consumers.items():
            bad = [a.target for a in fed if a.target in why]
            for a in fed:
                if bad and a.target not in why:
                    why[a.target] = f"it shares {s!r} with {bad[0]!r}: {why[bad[0]]}"
                    changed = True
    return why


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    return type(a) is type(b) and a == b


class _NoOriginal(Mapping[str, torch.Tensor]):
    """The original's tensors, which optimizer state never needs: a lookup is a bug."""

    def __getitem__(self, key: str) -> torch.Tensor:
        raise InternalError(f"exporting optimizer state asked for the original tensor {key!r}; the ops were checked to need none")

    def __iter__(self) -> Any:
        return iter(())

    def __len__(self) -> int:
        return 0


class _StateBackward(_Backward):
    """The weights' backward walk on one state entry: casts are plain casts (no original bits
    to recover), and nothing is read from the original."""

    def root(self, a: Assignment, node: Any) -> Result:
        tensor = self.target(a.target).detach().cpu()
        return Result(tensor.to(getattr(torch, a.meta.dtype)), targets=(a.target,))

    def cast_back(self, tensor: torch.Tensor, dtype: str, node: Any) -> tuple[torch.Tensor, bool]:
        return tensor.to(getattr(torch, dtype)), True


def _run_back(kept: list[Assignment], state: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Result]]:
    """State entry -> source key -> its value run back, for every per-element entry."""
    out = {}
    entries = dict.fromkeys(str(k) for a in kept for k, v in state[a.target].items()
                            if isinstance(v, torch.Tensor) and not is_scalar_state(str(k), v, tuple(a.meta.shape)))  # fmt: skip
    for k in entries:
        roots = [a for a in kept if k in state[a.target] and isinstance(state[a.target][k], torch.Tensor)
                 and not is_scalar_state(k, state[a.target][k], tuple(a.meta.shape))]  # fmt: skip
        walk = _StateBackward(SimpleNamespace(assignments=roots), lambda t, k=k: state[t][k], _NoOriginal(), False)  # type: ignore[arg-type]
        out[k] = walk.run()
    return out


def save_optimizer_state(state_dict: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the exported optimizer state_dict with ``torch.save``, atomically."""
    from ..loading.saving import atomic_path

    with atomic_path(path) as tmp:
        torch.save(dict(state_dict), tmp)
    return {"path": str(Path(path)), "format": "torch"}
