"""Optimizer state through the plan: ``remap.load(model, source, rules, optimizer=opt)``.

A saved optimizer state is indexed by position (``state: {0: {...}}``, ``param_groups:
[{"params": [0, 1, ...]}]``). Each position gets a name first, never by guessing: the
``param_names`` torch saves for an optimizer built from ``named_parameters()``, else the
parameter order of the rules' ``source.model`` (one param group only), else the load
fails and says what to give. Each parameter of the new optimizer is named by identity
in the target module. Then every target parameter's state is computed from its source
parameters' state with the plan's own :class:`~remap.rules.steps.Recipe`: a rename moves
it, a q/k/v merge concatenates the moments as it concatenates the weights, a transpose
transposes them. Only ops that move elements (transpose, permute, reshape, slice, cat,
stack, split, cast) carry state; a parameter that ``pad``, ``adapt`` or any other op
computed starts without state, as does one no source fed, and the report says which.

Everything is checked and computed before anything is written. :meth:`Carried.committed`
loads the optimizer (and a scheduler) and puts both back when the module's load, run
inside it, fails: a failed load leaves the module and the optimizer as they were.

>>> import torch
>>> from remap.rules.steps import Op, Recipe
>>> recipe = Recipe(Op("cat", "cat", lambda *t: torch.cat(t)), ("q", "k"))
>>> run_recipe(recipe, {"q": torch.zeros(1), "k": torch.ones(1)}).tolist()
[0.0, 1.0]
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import CheckError, InternalError, SourceError, UsageError
from ..meta import is_dtensor
from ..report.records import (
    DROPPED,
    DUPLICATE,
    OPT_DISCARDED,
    OPT_FAILED,
    OPT_LOADED,
    OPT_RESET,
    OPT_STATELESS,
    SKIPPED,
    USED,
    Failure,
    OptimizerGroupRecord,
    OptimizerReport,
    OptimizerSourceRecord,
    OptimizerTargetRecord,
    PassthroughRecord,
)
from ..rules.parse import OPTIMIZER_HPARAMS, OptimizerSpec, Rules

if TYPE_CHECKING:
    from ..planning.planner import Assignment, Plan
    from ..rules.steps import Recipe
    from ..sources.readers import Source

__all__ = ["carry_optimizer", "Carried", "run_recipe", "is_scalar_state", "LAYOUT_OPS"]

#: Ops that only move, pick or cast elements: a per-element state (a moment) follows its
#: element through them exactly. Any other op computes new values, so no state can follow.
LAYOUT_OPS = frozenset({"transpose", "permute", "reshape", "slice", "cat", "stack", "split", "cast", "permute_heads"})
#: Entries of a checkpoint that hold an optimizer state, tried in this order when none is named.
OPTIMIZER_KEYS = ("optimizer", "optimizer_state", "optimizer_state_dict", "optimizer_states")
#: Files beside the weights that Hugging Face's Trainer writes.
OPTIMIZER_FILE = "optimizer.pt"
SIDE_FILES = {"scheduler.pt": "lr_scheduler", "scaler.pt": "grad_scaler", "rng_state.pth": "rng_state"}
_NAMES_HINT = (
    "give the names one of two ways: build the optimizer that saved it from named parameters "
    "(torch >= 2.5 saves them: `AdamW(model.named_parameters())`), or add a `param_names` list to each saved "
    "param group (the source key of each entry of its `params`) and pass that state dict as "
    "`remap.load(..., optimizer_state=state_dict)`"
)


# --------------------------------------------------------------------------- the recipe on state tensors


def run_recipe(node: Recipe | str, leaves: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Run a plan's recipe on given tensors: ``leaves`` maps each source key to the tensor that
    stands in for it (a state tensor of that parameter; a sharded load's source tensor). The
    engine runs recipes the same way (``node.op.fn`` on its inputs, inputs first)."""
    if isinstance(node, str):
        return leaves[node]
    return node.op.fn(*(run_recipe(i, leaves) for i in node.inputs))


def _op_names(node: Recipe | str | None) -> list[str]:
    if node is None or isinstance(node, str):
        return []
    return [n for i in node.inputs for n in _op_names(i)] + [node.op.name]


# --------------------------------------------------------------------------- where the saved state is


@dataclass
class _Saved:
    """The saved optimizer state, where it came from, and what lies beside it."""

    state_dict: Mapping[str, Any]
    description: dict[str, Any]
    container: Mapping[Any, Any] | None = None  # the dict that holds it, for the scheduler and scaler beside it
    folder: Path | None = None  # where scheduler.pt, scaler.pt and rng_state.pth may lie
    notes: list[str] = field(default_factory=list)


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def _torch_file(path: Path, trust_pickle: bool) -> Any:
    """A torch.save file read with ``torch.load(weights_only=True)`` (the reader's own
    loading, with its errors), unless the caller trusts pickles."""
    from ..sources.torch_reader import _torch_load

    if not path.is_file():
        raise SourceError("no such file; expected the saved optimizer state (a torch.save file)", where=str(path))
    return _torch_load(path, meta=False, weights_only=not trust_pickle, mmap=False)


def _walk(obj: Any, key: str, where: str) -> tuple[Any, list[str]]:
    """The entry ``key`` names: dotted names through dicts (an entry may hold dots), numbers through lists."""
    parts, taken, cur, i = key.split("."), [], obj, 0
    while i < len(parts):
        if isinstance(cur, (list, tuple)):
            if not parts[i].isdigit() or int(parts[i]) >= len(cur):
                raise SourceError(f"optimizer key {key!r}: {'.'.join(taken) or 'the checkpoint'!r} is a list of {len(cur)}; "
                                  f"{parts[i]!r} is not an index into it", where=where)  # fmt: skip
            taken.append(parts[i])
            cur, i = cur[int(parts[i])], i + 1
            continue
        if not isinstance(cur, Mapping):
            raise SourceError(f"optimizer key {key!r}: {'.'.join(taken)!r} holds a {type(cur).__name__}, not a dict", where=where)
        for j in range(len(parts), i, -1):
            name = ".".join(parts[i:j])
            if name in cur:
                break
        else:
            found = ", ".join(repr(k) for k in list(cur)[:12])
            at = f"under {'.'.join(taken)!r}" if taken else "at the top level"
            raise SourceError(f"optimizer key {key!r}: no entry {parts[i]!r} {at}; found {found or 'nothing'}", where=where)
        taken.append(name)
        cur, i = cur[name], j
    return cur, taken


def _pick(value: Any, key: str, saved_notes: list[str], where: str) -> Any:
    """An optimizer state, or the first of a list of them (Lightning's ``optimizer_states``), noted."""
    if isinstance(value, (list, tuple)) and value and all(_is_optimizer_state(v) for v in value):
        if len(value) > 1:
            saved_notes.append(f"{key!r} holds {len(value)} optimizer states; the first was taken "
                               f"(`source.optimizer: {key}.1` takes the second)")  # fmt: skip
        return value[0]
    if not _is_optimizer_state(value):
        what = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else type(value).__name__
        raise SourceError(f"optimizer key {key!r} holds {what}, expected an optimizer state_dict "
                          "(a dict with 'state' and 'param_groups')", where=where)  # fmt: skip
    return value


def _container(source: Any, src: Source, rules: Rules, trust_pickle: bool) -> tuple[Any, str] | None:
    """The checkpoint dict the weights came from, when there is one: the mapping passed as
    the source, or the torch.save file read again (a safetensors file holds tensors only)."""
    if isinstance(source, Mapping):
        return source, "source (state_dict)"
    path = src.description.get("path")
    if src.description.get("kind") == "file" and path and str(src.description.get("format", "")).startswith("torch-") \
            and src.description.get("format") not in ("torch-index",):  # fmt: skip
        return _torch_file(Path(path), trust_pickle), str(path)
    return None


def _locate(spec: OptimizerSpec | None, given: Any, source: Any, src: Source, rules: Rules, trust_pickle: bool) -> _Saved:
    """Find the saved optimizer state: ``given`` (the API's ``optimizer_state``), else the
    rules' ``source.optimizer``, else an entry of the checkpoint or an ``optimizer.pt``
    beside a folder source (detected, and said so)."""
    if isinstance(given, Mapping):
        if not _is_optimizer_state(given):
            raise UsageError("optimizer_state: expected an optimizer state_dict (a dict with 'state' and 'param_groups'), "
                             f"found a dict of {', '.join(map(repr, list(given)[:8])) or 'nothing'}")  # fmt: skip
        return _Saved(given, {"kind": "state_dict", "path": None, "key": None, "detected": False})
    base = None if given is not None else rules.base_dir  # a path in the rules is relative to the rules file
    spec = OptimizerSpec.parse(given) if given is not None else spec
    if spec is not None and spec.path is not None:
        path = Path(spec.path).expanduser()
        path = Path(base) / path if base is not None and not path.is_absolute() else path
        return _from_file(path / OPTIMIZER_FILE if path.is_dir() else path, spec.key, trust_pickle)
    found = _container(source, src, rules, trust_pickle)
    folder = Path(src.description["folder"]) if src.description.get("folder") else None
    if spec is not None and spec.key is not None:
        if found is None:
            raise SourceError(f"source.optimizer key {spec.key!r}: the source ({src.description.get('format') or src.description.get('kind')}) "
                              "is not a checkpoint dict that could hold it; give the file that holds the optimizer state "
                              "(`source.optimizer: {path: ..., key: ...}`)", where=str(src.description.get("path") or "source"))  # fmt: skip
        obj, where = found
        notes: list[str] = []
        value, taken = _walk(obj, spec.key, where)
        state = _pick(value, ".".join(taken), notes, where)
        desc = {"kind": "key", "path": src.description.get("path"), "key": ".".join(taken), "detected": False}
        return _Saved(state, desc, obj, folder, notes)
    return _detect(found, src, folder, trust_pickle)


def _from_file(path: Path, key: str | None, trust_pickle: bool) -> _Saved:
    """A file of its own (``optimizer.pt``): the state itself, ``key`` inside it, or its one optimizer entry."""
    obj = _torch_file(path, trust_pickle)
    if key is None and _is_optimizer_state(obj):
        return _Saved(obj, {"kind": "file", "path": str(path), "key": None, "detected": False}, None, path.parent)
    if key is None:
        return _in_container(obj, str(path), path.parent, file=path)
    notes: list[str] = []
    value, taken = _walk(obj, key, str(path))
    state = _pick(value, ".".join(taken), notes, str(path))
    return _Saved(state, {"kind": "file", "path": str(path), "key": ".".join(taken), "detected": False}, obj, path.parent, notes)


def _detect(found: tuple[Any, str] | None, src: Source, folder: Path | None, trust_pickle: bool) -> _Saved:
    """No place named: the checkpoint's one optimizer entry, else ``optimizer.pt`` beside a
    folder source; else a UsageError that says where to look."""
    if found is not None and isinstance(found[0], Mapping) and any(k in found[0] for k in OPTIMIZER_KEYS):
        return _in_container(found[0], found[1], folder, path=src.description.get("path"))
    if folder is not None and (folder / OPTIMIZER_FILE).is_file():
        path = folder / OPTIMIZER_FILE
        obj = _torch_file(path, trust_pickle)
        if not _is_optimizer_state(obj):
            raise SourceError("expected an optimizer state_dict (a dict with 'state' and 'param_groups'), "
                              f"found {type(obj).__name__}", where=str(path))  # fmt: skip
        note = f"the optimizer state was found beside the weights: {path} (`source.optimizer` names another)"
        return _Saved(obj, {"kind": "file", "path": str(path), "key": None, "detected": True}, None, folder, [note])
    entries = ", ".join(map(repr, list(found[0])[:12])) if found and isinstance(found[0], Mapping) else None
    weights = src.description.get("path")
    beside = Path(weights).parent / OPTIMIZER_FILE if weights else None
    hint = f"; {beside} lies beside the weights: `source.optimizer: {beside}`" if beside is not None and beside.is_file() else ""
    raise UsageError("an optimizer was given, but no saved optimizer state was found: "
                     + (f"the checkpoint's entries are {entries}" if entries else "the source holds weights only")
                     + hint + ". Say where it is with `source.optimizer` (a key in the checkpoint such as `optimizer`, "
                     "or a path such as `ckpt/optimizer.pt`) or remap.load(..., optimizer_state=...)")  # fmt: skip


def _in_container(obj: Any, where: str, folder: Path | None, *, file: Path | None = None, path: str | None = None) -> _Saved:
    """The optimizer state among a checkpoint's entries (none named): exactly one of :data:`OPTIMIZER_KEYS`."""
    keys = [k for k in OPTIMIZER_KEYS if isinstance(obj, Mapping) and k in obj]
    if not keys:
        found = ", ".join(map(repr, list(obj)[:12])) if isinstance(obj, Mapping) else type(obj).__name__
        raise SourceError(f"no optimizer state in it (looked for {', '.join(OPTIMIZER_KEYS)}); found {found}; "
                          "name the entry with `source.optimizer: {path: ..., key: ...}`", where=where)  # fmt: skip
    if len(keys) > 1:
        raise SourceError(f"the checkpoint holds several optimizer entries: {', '.join(map(repr, keys))}; "
                          "say which with `source.optimizer`", where=where)  # fmt: skip
    notes = [f"the optimizer state was found at key {keys[0]!r} of {where} (`source.optimizer` names another)"]
    state = _pick(obj[keys[0]], keys[0], notes, where)
    kind = "file" if file is not None else "key"
    desc = {"kind": kind, "path": str(file) if file is not None else path, "key": keys[0], "detected": True}
    return _Saved(state, desc, obj, folder, notes)


# --------------------------------------------------------------------------- what the saved state holds


@dataclass(frozen=True)
class _Entry:
    """One saved parameter: its position (the saved id), name, group and state (None: none saved)."""

    index: Any
    name: str
    group: int
    state: Mapping[str, Any] | None


def _check_layout(sd: Mapping[str, Any], where: str) -> list[tuple[Any, int]]:
    """The saved ids in order with their group; a SourceError for a state_dict torch would not have written."""
    groups, state = sd["param_groups"], sd["state"]
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in groups):
        raise SourceError("param_groups: expected a list of dicts", where=where)
    if not isinstance(state, Mapping):
        raise SourceError(f"state: expected a dict of position -> state, found {type(state).__name__}", where=where)
    ids: list[tuple[Any, int]] = []
    for n, g in enumerate(groups):
        params = g.get("params")
        if not isinstance(params, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in params):
            raise SourceError(f"param_groups[{n}]['params']: expected a list of integer ids, found {params!r:.80}", where=where)
        names = g.get("param_names")
        if names is not None and (not isinstance(names, (list, tuple)) or len(names) != len(params) or not all(isinstance(x, str) for x in names)):
            raise SourceError(f"param_groups[{n}]['param_names']: expected {len(params)} names, one per entry of 'params'", where=where)
        ids += [(i, n) for i in params]
    seen = [i for i, _ in ids]
    if len(set(seen)) != len(seen):
        raise SourceError("param_groups list one parameter id twice", where=where)
    for i, value in state.items():
        if not isinstance(value, Mapping):
            raise SourceError(f"state[{i!r}]: expected a dict of state entries, found {type(value).__name__}", where=where)
    return ids


def _names(sd: Mapping[str, Any], rules: Rules, where: str) -> tuple[list[str], str]:
    """A name per saved position: torch's ``param_names``, else ``source.model``'s parameter order."""
    groups = sd["param_groups"]
    with_names = [("param_names" in g) for g in groups]
    if all(with_names) and groups:
        names = [n for g in groups for n in g["param_names"]]
        if len(set(names)) != len(names):
            raise SourceError("param_names list one name twice", where=where)
        return names, "param_names"
    if any(with_names):
        raise SourceError("some param groups have param_names and others do not", where=where)
    count = sum(len(g["params"]) for g in groups)
    spec = rules.source
    if spec.model is None:
        raise UsageError(f"the saved optimizer state holds {count} parameters by position, without their names; remap "
                         "never pairs them by guessing. Set `source.model` (the architecture that was trained, whose "
                         f"named_parameters() order the optimizer followed), or {_NAMES_HINT}")  # fmt: skip
    if len(groups) > 1:
        sizes = ", ".join(str(len(g["params"])) for g in groups)
        raise UsageError(f"the saved optimizer state has {len(groups)} param groups ({sizes} parameters) and no param_names: "
                         "which parameter went into which group is not in the file, so source.model's parameter order "
                         "cannot name them (a Hugging Face Trainer puts the weights that decay first and the rest after). "
                         f"To name them, {_NAMES_HINT}")  # fmt: skip
    from ..sources.factories import build, describe_call

    model = build(spec.model, spec.args, dict(spec.kwargs), what="source.model", device="meta")
    if not hasattr(model, "named_parameters"):
        raise UsageError(f"{describe_call(spec.model, spec.args, spec.kwargs)} returned a {type(model).__name__}, expected a torch.nn.Module",
                         where="source.model")  # fmt: skip
    names = [n for n, _ in model.named_parameters()]
    if len(names) != count:
        raise UsageError(f"the saved optimizer state holds {count} parameters, source.model {spec.model} has {len(names)}: "
                         f"its parameter order cannot name them (was part of the model frozen, or another model trained?); {_NAMES_HINT}")  # fmt: skip
    return names, "source.model"


def is_scalar_state(key: str, value: Any, shape: tuple[int, ...]) -> bool:
    """A state value that is one number for the whole parameter (``step``), not one per
    element; ``shape`` is the parameter's (the export runs state back by the same rule).

    >>> is_scalar_state("step", torch.tensor(3.0), (2, 2)), is_scalar_state("exp_avg", torch.zeros(2, 2), (2, 2))
    (True, False)
    """
    if isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, torch.Tensor) and value.dim() == 0 and (key == "step" or len(shape) > 0)


_is_scalar = is_scalar_state


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------- mapping, checked before any write


@dataclass
class Carried:
    """A checked optimizer state ready to load, and the report's ``optimizer`` section."""

    optimizer: torch.optim.Optimizer
    state_dict: dict[str, Any]
    record: OptimizerReport
    scheduler: Any = None
    scheduler_state: Any = None

    @contextlib.contextmanager
    def committed(self) -> Iterator[None]:
        """Load the optimizer (and the scheduler) now; put them back as they were if the
        block raises (the module's load runs inside it)."""
        opt, sched = self.optimizer, self.scheduler
        old_state, old_groups = opt.state, opt.param_groups
        sched_keys = set(vars(sched)) if sched is not None else set()
        sched_old = copy.deepcopy(sched.state_dict()) if sched is not None else None
        try:
            opt.load_state_dict(self.state_dict)
            if sched is not None:
                sched.load_state_dict(copy.deepcopy(self.scheduler_state))
            yield
        except BaseException:
            opt.state, opt.param_groups = old_state, old_groups
            if sched is not None:
                for k in set(vars(sched)) - sched_keys:
                    delattr(sched, k)
                sched.load_state_dict(sched_old)
            raise


def carry_optimizer(
    plan: Plan,
    module: torch.nn.Module,
    optimizer: Any,
    rules: Rules,
    src: Source,
    *,
    source: Any = None,
    optimizer_state: Any = None,
    hparams: str | None = None,
    scheduler: Any = None,
    trust_pickle: bool | None = None,
) -> Carried:
    """Check and compute the new optimizer state for ``optimizer`` (whose parameters are
    ``module``'s) from the saved one, through ``plan``; nothing is written here.

    Raises UsageError (names missing, a wrong argument), SourceError (no or a malformed
    saved state) or CheckError (the saved state does not fit: a moment's shape, a name
    that is no source key, hyperparameters of several saved groups asked for one group).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UsageError(f"optimizer: expected a torch.optim.Optimizer, found {type(optimizer).__name__}")
    spec = rules.source.optimizer
    hparams = hparams or (spec.hparams if spec is not None else None) or "new"
    if hparams not in OPTIMIZER_HPARAMS:
        raise UsageError(f"optimizer_hparams: expected one of {', '.join(OPTIMIZER_HPARAMS)}, found {hparams!r}")
    ident = _module_params(module, optimizer)
    trust = rules.source.trust_pickle if trust_pickle is None else trust_pickle
    saved = _locate(spec, optimizer_state, source, src, rules, trust)
    where = saved.description.get("path") or "optimizer state"
    ids = _check_layout(saved.state_dict, where)
    names, how = _names(saved.state_dict, rules, where)
    entries = [_Entry(i, name, g, saved.state_dict["state"].get(i)) for (i, g), name in zip(ids, names)]
    known = {i for i, _ in ids}
    failures = [Failure("optimizer", f"the saved optimizer state has state for id {i!r}, which no param group lists", ()) for i in saved.state_dict["state"] if i not in known]
    mapper = _Mapper(plan, entries, failures)
    targets, state, groups_of = mapper.targets(optimizer, ident)
    sources = mapper.source_records()
    groups, packed = _groups(optimizer, saved.state_dict, groups_of, hparams, failures)
    passthrough, notes, sched_state = _passthrough(saved, scheduler, trust)
    notes = saved.notes + notes
    if scheduler is not None and hparams == "new":
        notes.append("the scheduler's state was loaded, but the param groups' lr is the new optimizer's: "
                     "optimizer_hparams='checkpoint' resumes the lr the schedule had reached")  # fmt: skip
    cls = type(optimizer)
    record = OptimizerReport(f"{cls.__module__}.{cls.__qualname__}", saved.description, how, hparams, tuple(groups),
                             tuple(targets), tuple(sources), tuple(passthrough), tuple(notes))  # fmt: skip
    if failures:
        body = "\n".join(f"- {f.message}" for f in failures)
        report = plan.report.replace(failures=tuple(failures), optimizer=record)
        raise CheckError(f"{len(failures)} optimizer check(s) failed; the module and the optimizer were not touched.\n{body}", report=report)
    return Carried(optimizer, {"state": state, "param_groups": packed}, record, scheduler, sched_state)


def _module_params(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """id -> name of the module's parameters; every parameter of the optimizer must be one."""
    ident = {id(p): n for n, p in module.named_parameters()}
    if any(p.device.type == "meta" for p in module.parameters()):
        raise UsageError("optimizer= needs a module with its memory: loading a meta-device target replaces its "
                         "parameters, so an optimizer built over them would hold stale ones; load first, then build "
                         "the optimizer and load its state with a module that has its memory")  # fmt: skip
    strangers = [f"group {g} item {n} {list(p.shape)}" for g, group in enumerate(optimizer.param_groups)
                 for n, p in enumerate(group["params"]) if id(p) not in ident]  # fmt: skip
    if strangers:
        raise UsageError(f"the optimizer holds {len(strangers)} tensor(s) that are not parameters of the module being loaded "
                         f"({', '.join(strangers[:4])}); build the optimizer over this module's parameters")  # fmt: skip
    return ident


class _Mapper:
    """Computes each new parameter's state from the saved entries through the plan."""

    def __init__(self, plan: Plan, entries: list[_Entry], failures: list[Failure]) -> None:
        self.plan, self.entries, self.failures = plan, entries, failures
        self.by_name = {e.name: e for e in entries}
        self.events: dict[str, list[tuple[str, str, str | None]]] = {}  # saved name -> (fate, target, reason) per target it reached
        self.bad: set[str] = set()
        self._check_entries()
        self.by_target = {a.target: a for a in plan.assignments}
        for key, m in plan.target_meta.items():
            if getattr(m, "tied_to", None) and key in self.by_target:
                self.by_target.setdefault(m.tied_to, self.by_target[key])

    def _check_entries(self) -> None:
        """Every name a source key; every per-element state shaped like its parameter."""
        meta = self.plan.source_meta
        strangers = [e.name for e in self.entries if e.name not in meta]
        if strangers:
            from ..rules.steps import close_keys

            near = close_keys(strangers[0], list(meta))
            hint = f"; the closest source keys to {strangers[0]!r}: {', '.join(map(repr, near))}" if near else ""
            self.failures.append(Failure("optimizer", f"{len(strangers)} saved optimizer parameter name(s) are not keys of the source: "
                                         f"{', '.join(map(repr, strangers[:6]))}{hint}", tuple(strangers)))  # fmt: skip
            self.bad.update(strangers)
        for e in self.entries:
            if e.state is None or e.name not in meta:
                continue
            shape = tuple(meta[e.name].shape)
            for k, v in e.state.items():
                problem = None
                if isinstance(v, torch.Tensor):
                    if v.device.type == "meta":
                        problem = "is on the meta device: it holds no data"
                    elif v.layout != torch.strided or v.is_quantized:
                        problem = f"is a {str(v.layout).removeprefix('torch.')}{' quantized' if v.is_quantized else ''} tensor, which remap cannot map (dense tensors only)"
                    elif not _is_scalar(str(k), v, shape) and tuple(v.shape) != shape:
                        problem = (f"has shape {list(v.shape)} but the parameter is {list(shape)}: the names do not fit the saved "
                                   "state (the wrong source.model, or positions paired wrongly), or the optimizer keeps "
                                   "state of another shape, which no plan can map")  # fmt: skip
                elif not isinstance(v, (bool, int, float)) and v is not None:
                    problem = f"is a {type(v).__name__}, which remap cannot map (tensors and numbers only)"
                if problem:
                    self.failures.append(Failure("optimizer", f"saved optimizer state {k!r} of {e.name!r} (position {e.index}) {problem}", (e.name,)))
                    self.bad.add(e.name)

    def targets(self, optimizer: torch.optim.Optimizer, ident: Mapping[int, str]) -> tuple[list[OptimizerTargetRecord], dict[int, dict[str, Any]], dict[int, set[int]]]:
        """A record per parameter of the new optimizer, its new state by packed position, and
        per new group the saved groups whose state it took."""
        records, state, groups_of, position = [], {}, {}, 0
        for g, group in enumerate(optimizer.param_groups):
            groups_of[g] = set()
            for p in group["params"]:
                name = ident[id(p)]
                rec, value, used = self._one(name, g, tuple(p.shape))
                records.append(rec)
                if value and is_dtensor(p):  # FSDP2 / tensor parallel: each rank keeps its part, placed like the parameter
                    value = _placed_like(value, p)
                if value:
                    state[position] = value
                    groups_of[g].update(e.group for e in used)
                position += 1
        return records, state, groups_of

    def _one(self, name: str, group: int, shape: tuple[int, ...]) -> tuple[OptimizerTargetRecord, dict[str, Any] | None, list[_Entry]]:
        a = self.by_target.get(name)
        if a is None:
            return OptimizerTargetRecord(name, OPT_RESET, group, reason="not loaded: no source key feeds it"), None, []
        leaves = [self.by_name.get(s) for s in a.sources]
        ops = a.ops
        with_state = [e for e in leaves if e is not None and e.state]
        if not with_state:
            why = "no saved state: " + ("its source parameters were not in the saved optimizer" if all(e is None for e in leaves)
                                        else "its source parameters had none (never stepped)")  # fmt: skip
            return OptimizerTargetRecord(name, OPT_RESET, group, a.sources, ops, reason=why), None, []
        bad = [e.name for e in leaves if e is not None and e.name in self.bad]
        if bad:
            self._mark(with_state, OPT_FAILED, name, "its state cannot be mapped (see the failures)")
            return OptimizerTargetRecord(name, OPT_FAILED, group, a.sources, ops, reason=f"saved state of {', '.join(map(repr, bad))} does not fit"), None, []
        reason = self._reset_reason(a, leaves, with_state)
        if reason is not None:
            self._mark(with_state, OPT_DISCARDED, name, f"its target was reset: {reason}")
            return OptimizerTargetRecord(name, OPT_RESET, group, a.sources, ops, reason=reason), None, []
        try:
            value = self._compute(a, with_state, shape)
        except InternalError:
            raise
        except Exception as exc:  # an op that cannot run on this state (its dtype, say): named, never a traceback
            why = f"the ops ({' then '.join(ops)}) cannot run on its saved state: {type(exc).__name__}: {exc}"
            self.failures.append(Failure("optimizer", f"{name!r}: {why}", a.sources))
            self._mark(with_state, OPT_FAILED, name, why)
            return OptimizerTargetRecord(name, OPT_FAILED, group, a.sources, ops, reason=why), None, []
        self._mark(with_state, USED, name, None)
        return OptimizerTargetRecord(name, OPT_LOADED, group, a.sources, ops, tuple(str(k) for k in value)), value, with_state

    def _reset_reason(self, a: Assignment, leaves: list[_Entry | None], with_state: list[_Entry]) -> str | None:
        """Why a parameter fed by saved state must start without it (None: its state follows)."""
        lossy = [n for n in _op_names(a.recipe) if n not in LAYOUT_OPS]
        if lossy:
            return f"op {', '.join(dict.fromkeys(lossy))} computes new values, so no saved state fits them"
        if len(with_state) < len(leaves):
            missing = [s for s, e in zip(a.sources, leaves) if e is None or not e.state]
            return f"only some of its sources have saved state ({', '.join(map(repr, missing))} has none)"
        keys = [tuple(sorted(map(str, e.state))) for e in with_state]
        if len(set(keys)) > 1:
            return "its sources hold different state entries: " + "; ".join(f"{e.name}: {', '.join(k)}" for e, k in zip(with_state, keys))
        first = with_state[0]
        shape = tuple(self.plan.source_meta[first.name].shape)
        for k, v in first.state.items():
            if _is_scalar(str(k), v, shape) and not all(_same(v, e.state[k]) for e in with_state[1:]):
                values = ", ".join(f"{e.name}: {_short(e.state[k])}" for e in with_state)
                return f"its sources' {k!r} differ ({values})"
        return None

    def _compute(self, a: Assignment, with_state: list[_Entry], shape: tuple[int, ...]) -> dict[str, Any]:
        """The new state: per-element entries through the recipe, scalars as they are."""
        first = with_state[0]
        src_shape = tuple(self.plan.source_meta[first.name].shape)
        out: dict[str, Any] = {}
        for k, v in first.state.items():
            if v is None or _is_scalar(str(k), v, src_shape):
                out[k] = v.clone() if isinstance(v, torch.Tensor) else v
                continue
            leaves = {e.name: e.state[k] for e in with_state}
            value = leaves[first.name] if a.recipe is None else run_recipe(a.recipe, leaves)
            if tuple(value.shape) != shape:
                raise InternalError(f"{a.target!r}: optimizer state {k!r} came out {list(value.shape)}, the parameter is {list(shape)}")
            out[k] = _own(value, leaves.values())
        return out

    def _mark(self, entries: list[_Entry], fate: str, target: str, reason: str | None) -> None:
        for e in entries:
            self.events.setdefault(e.name, []).append((fate, target, reason))

    def _resolve(self, name: str) -> tuple[str, tuple[str, ...], str | None]:
        """A saved parameter that reached several targets (a split) is used when any of them took its state."""
        events = self.events[name]
        for fate in (USED, OPT_FAILED, OPT_DISCARDED):
            hits = [(t, r) for f, t, r in events if f == fate]
            if hits:
                reasons = list(dict.fromkeys(r for _, r in hits if r))
                return fate, tuple(t for t, _ in hits), "; ".join(reasons) or None
        raise InternalError(f"saved optimizer parameter {name!r}: no fate among {events!r}")

    def source_records(self) -> list[OptimizerSourceRecord]:
        """Every saved parameter: used, discarded (why), stateless or failed."""
        plan_fates = {r.key: r for r in self.plan.report.sources}
        out = []
        for e in self.entries:
            keys = tuple(sorted(map(str, e.state))) if e.state else ()
            if e.name in self.events:
                fate, targets, reason = self._resolve(e.name)
                out.append(OptimizerSourceRecord(e.name, _index(e.index), fate, e.group, targets, keys, reason))
                continue
            if e.name in self.bad:
                out.append(OptimizerSourceRecord(e.name, _index(e.index), OPT_FAILED, e.group, (), keys, "its state does not fit (see the failures)"))
            elif not e.state:
                out.append(OptimizerSourceRecord(e.name, _index(e.index), OPT_STATELESS, e.group))
            else:
                rec = plan_fates.get(e.name)
                targets = tuple(rec.targets) if rec is not None else ()
                out.append(OptimizerSourceRecord(e.name, _index(e.index), OPT_DISCARDED, e.group, targets, keys, _discard_reason(rec)))
        return out


def _placed_like(state: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """A DTensor parameter's new state: each tensor of the parameter's shape split the way the
    parameter is (``distribute_tensor(..., src_data_rank=None)``: this rank keeps its part, no
    communication); scalars (``step``) as they are.

    Every rank computed the same whole state from the saved one, so the parts fit together."""
    from torch.distributed.tensor import distribute_tensor

    local = param._local_tensor  # type: ignore[attr-defined]
    return {k: distribute_tensor(v.to(local.device), param.device_mesh, param.placements, src_data_rank=None)  # type: ignore[attr-defined]
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(param.shape) and v.dim() else v
            for k, v in state.items()}  # fmt: skip


def _own(value: torch.Tensor, saved: Any) -> torch.Tensor:
    """``value`` in memory of its own, contiguous: a view of a saved tensor (a rename, a
    transpose) is copied, so that training never writes into the checkpoint's tensors."""
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    if value.untyped_storage().data_ptr() in ptrs:
        return value.clone(memory_format=torch.contiguous_format)
    return value.contiguous()


def _index(i: Any) -> int:
    return int(i)


def _short(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return repr(value.item())
    return repr(value)[:40]


def _discard_reason(rec: Any) -> str:
    """Why a saved parameter's state reaches no parameter of the new optimizer, from its
    weight's record in the plan's report (the record's ``targets`` name the keys)."""
    if rec is None:
        return "not a source key"
    if rec.fate == DROPPED:
        return f"its weight was dropped by step {rec.step}" + (f" ({rec.step_kind})" if rec.step_kind else "")
    if rec.fate == DUPLICATE:
        return "its weight is a second copy of a tied parameter"
    if rec.fate == USED:
        return "its weight's target is not in the new optimizer"
    if rec.fate == SKIPPED:
        return "its weight was skipped: its shape differs from its target's"
    return f"its weight is {rec.fate}: no target key has its name after the steps"


# --------------------------------------------------------------------------- param groups


_NOT_HPARAMS = ("params", "param_names")


def _groups(optimizer: torch.optim.Optimizer, sd: Mapping[str, Any], groups_of: Mapping[int, set[int]], hparams: str,
            failures: list[Failure]) -> tuple[list[OptimizerGroupRecord], list[dict[str, Any]]]:  # fmt: skip
    """Per new group: its record and the group as the state_dict to load holds it
    (hyperparameters from the new optimizer or the saved group that fed it; positions)."""
    saved = sd["param_groups"]
    records, packed, position = [], [], 0
    for g, group in enumerate(optimizer.param_groups):
        fed = tuple(sorted(groups_of.get(g, ())))
        new = {k: v for k, v in group.items() if k not in _NOT_HPARAMS}
        olds = [{k: v for k, v in saved[j].items() if k not in _NOT_HPARAMS} for j in fed]
        differs = tuple(sorted({k for old in olds for k in set(old) | set(new) if not _equal(old.get(k, _MISSING), new.get(k, _MISSING))}))
        source = "new"
        chosen = new
        if hparams == "checkpoint" and olds:
            if any(not _equal_groups(olds[0], o) for o in olds[1:]):
                failures.append(Failure("optimizer", f"param group {g} of the new optimizer takes parameters from saved groups "
                                        f"{', '.join(map(str, fed))}, whose hyperparameters differ; hparams from the checkpoint "
                                        "need one saved group per new group (or take them from the new optimizer)"))  # fmt: skip
            chosen, source = {**new, **olds[0]}, "checkpoint"  # what only the new group has (initial_lr) stays
        out = dict(chosen)
        out["params"] = list(range(position, position + len(group["params"])))
        if "param_names" in group:
            out["param_names"] = list(group["param_names"])
        position += len(group["params"])
        packed.append(out)
        records.append(OptimizerGroupRecord(g, len(group["params"]), source, fed, differs))
    return records, packed


_MISSING = object()


def _equal(a: Any, b: Any) -> bool:
    if a is _MISSING or b is _MISSING:
        return a is b
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _same(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    except Exception:  # a value whose == does not give a bool
        return False


def _equal_groups(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- passed through


_ROLES = (
    (re.compile(r"sched"), "lr_scheduler"),
    (re.compile(r"scaler|(^|_)amp(_|$)|mixedprecision|amp_scaling"), "grad_scaler"),
    (re.compile(r"(^|_)rngs?(_|$)"), "rng_state"),
)


def _role(name: str) -> str | None:
    """lr_scheduler, grad_scaler or rng_state, by the entry's name (Lightning's ``lr_schedulers``
    and ``MixedPrecision``, Hugging Face's ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``).

    >>> [_role(n) for n in ("lr_schedulers", "MixedPrecision", "amp", "rng_state", "num_samples", "strings")]
    ['lr_scheduler', 'grad_scaler', 'grad_scaler', 'rng_state', None, None]
    """
    low = name.lower()
    return next((role for pattern, role in _ROLES if pattern.search(low)), None)


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"dict of {len(value)} entr{'y' if len(value) == 1 else 'ies'}: {', '.join(map(str, list(value)[:6]))}" + (", ..." if len(value) > 6 else "")
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _passthrough(saved: _Saved, scheduler: Any, trust_pickle: bool) -> tuple[list[PassthroughRecord], list[str], Any]:
    """The scheduler, grad-scaler and RNG states beside the optimizer state, handed back as
    they are; the scheduler's loaded into ``scheduler`` when one is given."""
    found: list[PassthroughRecord] = []
    notes: list[str] = []
    if isinstance(saved.container, Mapping):
        where = saved.description.get("path") or "the checkpoint"
        for k, v in saved.container.items():
            role = _role(str(k)) if isinstance(k, str) and k not in OPTIMIZER_KEYS else None
            if role:
                found.append(PassthroughRecord(str(k), role, f"key {k!r} of {where}", _describe(v), value=v))
    if saved.folder is not None and saved.folder.is_dir():
        files = sorted(p for p in saved.folder.iterdir() if p.name in SIDE_FILES or (p.name.startswith("rng_state_") and p.suffix == ".pth"))
        for path in files:
            role = SIDE_FILES.get(path.name, "rng_state")
            try:
                value = _torch_file(path, trust_pickle)
            except SourceError as exc:
                notes.append(f"{path} was not read: {exc.message}")
                found.append(PassthroughRecord(path.name, role, str(path), "not read (see the notes)", value=None))
                continue
            found.append(PassthroughRecord(path.name, role, str(path), _describe(value), value=value))
    if scheduler is None:
        return found, notes, None
    schedulers = [p for p in found if p.role == "lr_scheduler"]
    if len(schedulers) != 1:
        names = ", ".join(p.where for p in schedulers) or "none"
        raise UsageError(f"scheduler= was given, but {'several scheduler states were' if schedulers else 'no scheduler state was'} "
                         f"found beside the optimizer state ({names}); load it yourself from report.optimizer.passthrough_values")  # fmt: skip
    chosen = schedulers[0]
    value = chosen.value
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise UsageError(f"scheduler=: {chosen.where} holds {len(value)} scheduler states; load the one you mean yourself "
                             "from report.optimizer.passthrough_values")  # fmt: skip
        value = value[0]
    if not isinstance(value, Mapping) or not callable(getattr(scheduler, "load_state_dict", None)):
        raise UsageError(f"scheduler=: expected a scheduler with load_state_dict and a saved state dict; {chosen.where} holds {_describe(value)}")
    out = [PassthroughRecord(p.name, p.role, p.where, p.description, True, p.value) if p is chosen else p for p in found]
    return out, notes, value
