"""The Python API: ``remap.load`` and ``remap.plan``. The CLI is a thin shell over these.

>>> import torch, remap
>>> model = torch.nn.Linear(4, 2)
>>> ckpt = {"module.weight": torch.ones(2, 4), "module.bias": torch.zeros(2)}
>>> report = remap.load(model, ckpt, rules={"version": 1, "rules": [{"strip_prefix": "module."}]})
>>> report.ok, report.totals.loaded
(True, 2)
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckError, TargetError, UsageError
from .meta import holds_dtensors
from .planning.planner import Plan, make_plan
from .rules.parse import Rules, load_rules, parse_rules

if TYPE_CHECKING:
    import torch

    from .exporting.report import ExportReport
    from .report.records import Report
    from .sources.readers import Source

__all__ = ["load", "plan", "export", "verify", "resolve_rules", "build_target", "open_rules_source"]

def resolve_rules(rules: Any) -> Rules:
    """A path (str or PathLike), a dict, :class:`Rules`, or None (no steps: names must match)."""
    if rules is None:
        return Rules()  # no steps: names must match; no schema check to run
    if isinstance(rules, Rules):
        return rules
    if isinstance(rules, Mapping):
        return parse_rules(rules)
    if isinstance(rules, os.PathLike) or (isinstance(rules, str) and "\n" not in rules):
        return load_rules(rules)
    if isinstance(rules, str):
        return parse_rules(rules)
    raise UsageError(f"rules: expected a path, a dict or Rules, found {type(rules).__name__}")


def build_target(model: Any, rules: Rules) -> Any:
    """The module (or metadata mapping) to plan for: ``model`` when given, else ``target.model``,
    built under :func:`remap.empty_weights` (parameters on meta, buffers real; see :func:`_build`)."""
    return model if model is not None else _build(rules)[0]


def _build(rules: Rules) -> tuple[Any, str | None]:
    """Build ``target.model``: under :func:`remap.empty_weights` (on ``target.device`` when
    set), so that no random initialisation runs for what the checkpoint overwrites, or all on
    meta for ``device: meta``. A factory that cannot be built with its parameters on meta is
    built again on a real device; the second value is then a warning for the report."""
    if rules.target.model is None:
        raise UsageError("no target: set target.model in the rules, give --target on the command line, "
                         "or pass a module to remap.load / remap.plan")  # fmt: skip
    from .loading.empty import empty_weights
    from .sources.factories import build, describe_call, import_callable

    spec, note = rules.target, None
    if isinstance(spec.model, str):  # imported outside empty_weights: module-level tensors are made as usual
        import_callable(spec.model, what="target.model")
    call = functools.partial(build, spec.model, spec.args, dict(spec.kwargs), what="target.model", device=spec.device)
    if spec.device == "meta":
        module = call()
    else:
        try:
            with empty_weights():
                module = call()
            derived = [n for n, b in module.named_buffers() if b.is_meta] if _is_module(module) else []
            why = f"buffer(s) {', '.join(derived[:5])} were computed from parameters" if derived else None
        except TargetError as exc:  # e.g. __init__ reads a parameter's values
            why = exc.message
        if why is not None:
            module = call()
            note = (f"target.model could not be built with its parameters on meta ({why}); it was built on a "
                    "real device and randomly initialised before loading")  # fmt: skip
    if not _is_module(module):
        raise TargetError(f"{describe_call(spec.model, spec.args, spec.kwargs)} returned a {type(module).__name__}, "
                          "expected a torch.nn.Module", where="target.model (--target)")  # fmt: skip
    if (spec.dtype is not None or spec.keep_fp32) and spec.device != "meta":
        from .loading.dtype_policy import cast_module

        module = cast_module(module, spec.dtype, spec.keep_fp32)
    if spec.shard is not None:  # FSDP2 / tensor parallel over the ranks of the process group (torchrun)
        from .loading.sharding import shard_module

        module = shard_module(module, spec.shard)
    return module, note


def open_rules_source(source: Any, rules: Rules, *, key: str | None = None, trust_pickle: bool | None = None,
                      trust_links: bool | None = None) -> Source:
    """Open ``source`` (path, state_dict, metadata mapping, Source), else the rules' ``source``.
    Several named sources (the rules' ``sources``, or ``source`` a dict of name -> path or Source)
    open as one :class:`~remap.sources.combined.CombinedSource`."""
    from .sources.readers import Source, open_source

    if isinstance(source, Source):
        return source
    if rules.sources or _named_sources(source):
        return _open_several(source, rules, key=key, trust_pickle=trust_pickle, trust_links=trust_links)
    spec = rules.source
    key = key if key is not None else spec.key
    trust = spec.trust_pickle if trust_pickle is None else trust_pickle
    base_dir = None  # a path given by the caller is relative to the working directory
    if source is None:
        base_dir = rules.base_dir  # a path written in the rules is relative to the rules file
        source = _written_source(spec, "no source: set source.path (or source.model) in the rules, give --source on the "
                                       "command line, or pass a source to remap.load / remap.plan")  # fmt: skip
    links = spec.trust_links if trust_links is None else trust_links
    return open_source(source, key=key, trust_pickle=trust, base_dir=base_dir, trust_links=links)


def _written_source(spec: Any, missing: str) -> Any:
    """What a source section of the rules names: its path, else its factory as a mapping; a
    UsageError saying ``missing`` when it names neither."""
    if spec.path is not None:
        return spec.path
    if spec.model is not None:
        return {"model": spec.model, "args": list(spec.args), "kwargs": dict(spec.kwargs)}
    raise UsageError(missing)


def _named_sources(source: Any) -> bool:
    """Whether ``source`` is several named sources: a non-empty dict whose values are all
    paths, Sources or modules (a state_dict's values are tensors, a checkpoint's dicts)."""
    from .sources.readers import Source

    if not isinstance(source, Mapping) or not source:
        return False
    return all(isinstance(v, (str, os.PathLike, Source)) or _is_module(v) for v in source.values())


def _open_several(source: Any, rules: Rules, *, key: str | None, trust_pickle: bool | None, trust_links: bool | None) -> Source:
    """The rules' ``sources``, each overridden by ``source``'s entry of its name (a path, Source or
    module); without ``sources`` in the rules, ``source``'s entries alone. Errors name the source."""
    from .errors import RemapError
    from .sources.combined import check_source_name, open_several
    from .sources.readers import Source, open_source
    from .rules.parse import SourceSpec

    given = dict(source) if isinstance(source, Mapping) else {}
    if source is not None and not given:
        raise UsageError(f"the rules name several sources ({', '.join(rules.sources)}): give them as a dict of name -> path "
                         "(--source NAME=PATH), not one source")  # fmt: skip
    if key is not None:
        raise UsageError("key (--key) names one source's key; with several sources give each its `key` under `sources:` in the rules")
    unknown = [n for n in given if rules.sources and n not in rules.sources]
    if unknown:
        raise UsageError(f"no source {unknown[0]!r} in the rules' sources ({', '.join(rules.sources)}); --source NAME=PATH "
                         "overrides a source the rules name")  # fmt: skip
    names = list(rules.sources) or list(given)

    def opener(name: str, _: Any) -> Source:
        spec = rules.sources.get(name, SourceSpec())
        value, base_dir = given.get(name), None
        if isinstance(value, Source):
            return value
        if value is None:
            base_dir = rules.base_dir  # a path written in the rules is relative to the rules file
            value = _written_source(spec, f"sources.{name}: no path (or model); give one in the rules or with --source {name}=PATH")
        trust = spec.trust_pickle if trust_pickle is None else trust_pickle
        links = spec.trust_links if trust_links is None else trust_links
        try:
            return open_source(value, key=spec.key, trust_pickle=trust, base_dir=base_dir, trust_links=links)
        except RemapError as exc:  # the same error, saying which source
            exc.message = f"source {name!r}: {exc.message}"
            exc.args = (f"{exc.where}: {exc.message}" if exc.where else exc.message,)
            raise

    for name in names:
        check_source_name(name, where="source names")
    return open_several({n: None for n in names}, opener)


def plan(
    model: torch.nn.Module | Mapping[str, Any] | None = None,
    source: Any = None,
    rules: Any = None,
    *,
    key: str | None = None,
    trust_pickle: bool | None = None,
    trust_links: bool | None = None,
) -> Plan:
    """Plan a load without touching anything: ``model`` is a module or a mapping of key ->
    shape; ``source`` a path, a state_dict, a mapping of key -> shape, or None for the
    rules' ``source``. ``plan.report`` is the dry-run report; ``plan.apply(model)`` loads.
    ``trust_links`` (default: the rules' ``source.trust_links``, else off) accepts shards
    reached through symbolic links out of the index's folder; a Hugging Face cache
    snapshot's links into its own ``blobs/`` are always accepted.
    """
    r = resolve_rules(rules)
    target = build_target(model, r)
    src = open_rules_source(source, r, key=key, trust_pickle=trust_pickle, trust_links=trust_links)
    return _make(r, target, src, built=model is None)


def _is_module(obj: Any) -> bool:
    """A torch.nn.Module, or anything that walks like one (without importing torch)."""
    return hasattr(obj, "state_dict") and hasattr(obj, "named_modules")


def _make(rules: Rules, target: Any, src: Source, *, built: bool) -> Plan:
    """Plan for ``target``; ``built`` says remap built it from ``target.model`` (so the report
    names the factory call), not that the caller passed it."""
    from .meta import target_meta_of_module

    if isinstance(target, Mapping):
        meta, description, bn = target, {"kind": "metadata", "keys": len(target)}, {}
    elif _is_module(target):
        from .loading.freeze import batchnorm_modules

        cls = type(target)
        meta = target_meta_of_module(target)
        description: dict[str, Any] = {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}", "factory": None}
        if built:
            spec = rules.target
            description.update(factory=spec.model, args=list(spec.args), kwargs=dict(spec.kwargs))
        bn = batchnorm_modules(target)
    else:
        raise UsageError(f"target: expected a torch.nn.Module or a mapping of key -> shape, found {type(target).__name__}")
    rules = rules.bound_to(target)  # vars read from the target model's config
    names = getattr(src, "names", None) if src.description.get("kind") == "several" else None
    return make_plan(rules, src.meta, meta, source_description=src.description, target_description=description,
                     batchnorm_modules=bn, source_handle=src, source_names=names)  # fmt: skip


def load(
    model: torch.nn.Module | None = None,
    source: Any = None,
    rules: Any = None,
    *,
    dry_run: bool = False,
    key: str | None = None,
    trust_pickle: bool | None = None,
    trust_links: bool | None = None,
    save: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    max_shard_size: int | str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    batch_bytes: int | None = None,
    progress: Any = None,
    verify: bool = False,
    mmap_weights: bool = False,
    rollback: bool = True,
    optimizer: Any = None,
    optimizer_state: Any = None,
    optimizer_hparams: str | None = None,
    scheduler: Any = None,
) -> Report:
    """Plan, check, load with ``strict=False`` and freeze; returns the :class:`Report`.

    Raises :class:`~remap.errors.CheckError` (its ``report`` says why) and leaves the
    module untouched when any check fails. ``save``/``report`` (or the rules' ``output``)
    write the loaded state_dict and the JSON report atomically; ``max_shard_size``
    (bytes or "5GB") splits the save into shards with an index. A target remap builds
    (``target.model``) is built under :func:`remap.empty_weights`: no random
    initialisation, its buffers computed as usual. A module on the meta
    device is loaded with ``assign=True`` onto ``device`` (default cpu; for a built target its
    ``target.device``), floating tensors
    cast to ``dtype`` (default: the rules' ``target.dtype``). ``progress(bytes_done,
    bytes_total, tensors_done, tensors_total)`` is called after every batch. With
    ``verify`` the rules' ``verify`` section runs after loading: the source model and the
    target on the same input, :class:`~remap.errors.VerifyError` when their outputs differ.

    ``trust_links`` is :func:`plan`'s. ``mmap_weights`` (off by default; a meta-device target on the CPU only) copies nothing
    where no op or cast changes a tensor: the module's tensors stay views of a private,
    copy-on-write mapping of the checkpoint file, so loading is instant and the weights
    share the page cache. Writes to them (training) make private copies of the touched
    pages and never reach the file. The risk is the file: rewritten in place afterwards,
    the pages not yet copied may show the new bytes; truncated, reading them kills the
    process with SIGBUS. Use it only for files nobody modifies while the model lives
    (replacing a file by renaming a new one over it is safe).

    A failure during the load itself (the file truncated or changed meanwhile, an I/O
    error, Ctrl-C) puts the module back as it was. For a module that already has its
    memory that costs a host-memory copy of the tensors being loaded, for the duration of
    the load; ``rollback=False`` saves that copy, and such a failure may then leave the
    module partly loaded. A meta-device target is put back at no cost.

    ``optimizer`` (a ``torch.optim.Optimizer`` over ``model``'s parameters) loads the saved
    optimizer state too, each parameter's state (Adam's moments, SGD's momentum, ``step``)
    through the same plan as its weight: renamed, transposed, merged, split with it. It
    comes from ``optimizer_state`` (a key in the checkpoint such as ``"optimizer"`` or
    ``"optimizer_states.0"``, a path such as ``"ckpt/optimizer.pt"``, or the state_dict
    itself), else the rules' ``source.optimizer``, else the checkpoint's ``optimizer`` /
    ``optimizer_states`` entry or an ``optimizer.pt`` beside a folder source (the report
    says which). ``optimizer_hparams``: the param groups' hyperparameters from the ``"new"``
    optimizer (default) or the ``"checkpoint"``. Scheduler, grad-scaler and RNG states found
    beside it are handed back in ``report.optimizer.passthrough_values``; ``scheduler``
    loads the saved scheduler state into it. A failure leaves the module, the optimizer and
    the scheduler as they were; ``report.optimizer`` accounts for every state entry.
    """
    r = resolve_rules(rules)
    if optimizer is None and (optimizer_state is not None or optimizer_hparams is not None or scheduler is not None):
        raise UsageError("optimizer_state, optimizer_hparams and scheduler need optimizer= (the optimizer to load the state into)")
    if verify and r.verify is None:
        raise UsageError("verify was asked for (--verify, verify=True), but the rules have no `verify` section "
                         "(e.g. `verify: {input: [1, 3, 224, 224]}`)")  # fmt: skip
    report_path = _output(report, r.output.report, r)
    if report_path is not None:  # before anything is built or read: a FIFO or device is never replaced
        from .files import refuse_non_regular_target

        refuse_non_regular_target(report_path, error=UsageError, what="report (--report / output.report)")
    save_path, save_what = _save_path(save, r)
    module, build_note = (model, None) if model is not None else _build(r)
    if model is None and device is None and r.target.device not in (None, "meta"):
        device = r.target.device  # built there under empty_weights: its weights are loaded there too
    if not _is_module(module):
        raise UsageError(f"remap.load needs a torch.nn.Module to load into, found a {type(module).__name__}"
                         + ("; remap.plan takes a mapping of key -> shape" if isinstance(module, Mapping) else ""))  # fmt: skip
    if save_path is not None and not dry_run:
        from .loading.saving import check_savable

        check_savable(module, save_path, sharded=(max_shard_size or r.output.max_shard_size) is not None, what=save_what)
    sharded = _is_module(module) and holds_dtensors(module)
    if sharded and verify:
        raise UsageError("verify with a sharded (DTensor) target is not supported yet: save the loaded model "
                         "(output.save) and run `remap verify` on one process")  # fmt: skip
    src = open_rules_source(source, r, key=key, trust_pickle=trust_pickle, trust_links=trust_links)
    try:
        p = _make(r, module, src, built=model is None)
        try:
            carried = None
            if optimizer is not None and src.description.get("kind") == "several":
                raise UsageError("optimizer state with several sources is not supported: load the optimizer state with one source")
            if optimizer is not None and (p.ok or sharded):  # a failing plan is refused by apply, as without an optimizer
                carried = _carried(p, module, optimizer, r, src, sharded, source=source, optimizer_state=optimizer_state,
                                   hparams=optimizer_hparams, scheduler=scheduler, trust_pickle=trust_pickle)  # fmt: skip
            with carried.committed() if carried is not None and not dry_run else contextlib.nullcontext():
                result = p.apply(module, dry_run=dry_run, device=device, dtype=dtype or r.target.dtype,
                                 batch_bytes=batch_bytes, progress=progress, mmap_weights=mmap_weights, rollback=rollback)  # fmt: skip
            if carried is not None:
                result = result.replace(optimizer=carried.record)
            if build_note is not None:
                result = result.replace(warnings=(*result.warnings, build_note))
            if verify and not dry_run:
                result = _verify(r, src, module, result)
        except CheckError as exc:
            if report_path:
                _write_report(exc.report, report_path)
            raise
    finally:
        src.close()
    if save_path and not dry_run:
        if sharded:  # every rank writes its part (DCP), or rank 0 streams one gathered tensor at a time
            from .loading.sharded_saving import save_sharded

            saved = save_sharded(module, save_path, max_shard_size=max_shard_size or r.output.max_shard_size)
        else:
            from .loading.saving import save_state_dict

            saved = save_state_dict(module, save_path, max_shard_size=max_shard_size or r.output.max_shard_size)
        result = result.replace(target={**result.target, "saved": saved})
    if report_path:
        _write_report(result, report_path)
    return result


def _carried(p: Plan, module: Any, optimizer: Any, rules: Rules, src: Source, sharded: bool, **options: Any) -> Any:
    """The optimizer state to load with the module, checked. A sharded target's ranks each check
    their own and agree (every rank takes part, also where its plan failed) before any writes."""
    from .loading.optimizer import carry_optimizer

    if not sharded:
        return carry_optimizer(p, module, optimizer, rules, src, **options)
    from .loading.sharded import agree

    carried, failure = None, None
    try:
        carried = carry_optimizer(p, module, optimizer, rules, src, **options) if p.ok else None
    except Exception as exc:  # noqa: BLE001 - every rank must hear of it
        failure = exc
    agree(failure)
    return carried


def _verify(rules: Rules, src: Source, target: Any, report: Report) -> Report:
    """Run the rules' verify section; a VerifyError (with the report, exit 1) when the outcome
    is ``differ`` or ``inconclusive``: the weights are loaded either way."""
    from .errors import VerifyError
    from .report.records import Failure
    from .verifying.compare import describe_failure
    from .verifying.reference import reference_path, verify_against_reference
    from .verifying.run import run_verify

    ref = reference_path(None, rules.verify, rules.base_dir)
    if ref is not None:
        result = verify_against_reference(rules.verify, target, ref, records=report.targets)
    else:
        result = run_verify(rules.verify, _source_model(rules, src), target, base_dir=rules.base_dir, records=report.targets)  # type: ignore[arg-type]
    report = report.replace(verify=result)
    if result.get("outcome", "agree" if result.get("ok") else "differ") == "agree":
        return report
    failure = Failure("verify", describe_failure(result))  # shown as "verify: ..."
    report = report.replace(failures=(*report.failures, failure))
    raise VerifyError(f"verify: {failure.message}; the weights were loaded", report=report)


def _source_model(rules: Rules, src: Source) -> Any:
    """The source architecture with the source weights: ``source.model`` loaded strictly from
    ``source.path``, or the factory source's own model."""
    built = getattr(src, "module", None)
    if built is not None:
        return built
    if rules.source.model is None:
        raise UsageError("verify needs the source architecture: set source.model (with source.path holding its weights)")
    from .errors import SourceError
    from .sources.factories import build, describe_call
    from .verifying.source_model import load_source_weights

    spec = rules.source
    model = build(spec.model, spec.args, dict(spec.kwargs), what="source.model")
    if not _is_module(model):
        raise SourceError(f"{describe_call(spec.model, spec.args, spec.kwargs)} returned a {type(model).__name__}, "
                          "expected a torch.nn.Module", where="source.model")  # fmt: skip
    where = src.description.get("path")
    what = f"source.model {rules.source.model}" + (f" (from {where})" if where else "")
    try:
        load_source_weights(model, src, what=what)
    except RuntimeError as exc:  # torch: the same keys in other shapes
        raise UsageError(f"verify: the source weights do not load into {what}: {exc}") from None
    return model


def _save_path(given: str | os.PathLike[str] | None, rules: Rules) -> tuple[Path | None, str]:
    """Where to save (the argument, else the rules' output.save) and how messages name it;
    a name of no known format fails here, before anything is built or read."""
    path = _output(given, rules.output.save, rules)
    what = "save (--save)" if given is not None else "output.save"
    if path is not None:
        from .loading.saving import save_format

        save_format(path, what=what)
    return path, what


def _output(given: str | os.PathLike[str] | None, from_rules: str | None, rules: Rules) -> Path | None:
    if given is not None:
        return Path(given)
    if from_rules is None:
        return None
    path = Path(from_rules)
    return path if path.is_absolute() or rules.base_dir is None else Path(rules.base_dir) / path


def _write_report(report: Report, path: Path) -> None:
    from .loading.process_group import speaks
    from .loading.saving import write_text_atomic

    if not speaks():  # a sharded load: every rank holds the same report, rank 0 writes it
        return
    write_text_atomic(path, report.to_json() + "\n")


def export(
    model: Any,
    rules: Any = None,
    *,
    like: Any = None,
    save: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    only_loaded: bool = False,
    allow_lossy: bool = False,
    key: str | None = None,
    like_key: str | None = None,
    trust_pickle: bool | None = None,
    trust_links: bool | None = None,
    optimizer: Any = None,
    optimizer_save: str | os.PathLike[str] | None = None,
) -> ExportReport:
    """The rules run backwards: ``model`` (a fine-tuned module, its state_dict, or a checkpoint
    path; ``key`` says where a checkpoint nests its weights) written in the names, shapes,
    dtypes, format and shard layout of ``like``, the original the rules load from (a path,
    a state_dict; default: the rules' ``source``, with ``like_key`` or ``source.key``).

    The forward plan from ``like`` onto ``model``'s keys must pass its checks; each op is
    inverted from that plan (a slice is written back into ``like``'s tensor, a pad cut off,
    ``adapt`` keeps ``like``'s tensor, or with ``allow_lossy`` computes an approximate
    inverse); ``like``'s keys the rules dropped come from ``like`` unchanged (``only_loaded``:
    left out); target keys no source fed are left out. Before anything is written the
    export is proven to round-trip (the exported keys planned forward give the same target
    keys, every shape and dtype is ``like``'s, exactly inverted keys load back bit for bit);
    else :class:`~remap.errors.CheckError`, nothing written. ``save`` writes it atomically
    (a file of ``like``'s format, or for a sharded ``like`` a folder or ``*.index.json``
    path); ``report`` the JSON report. Returns the :class:`~remap.exporting.report.ExportReport`;
    its ``state_dict`` holds the exported tensors.

    ``optimizer`` (a torch optimizer over ``model``'s parameters, ``model`` a module) exports
    its state back through the same plan: ``report.optimizer_state_dict`` is laid out for the
    original model (positions in ``source.model``'s parameter order, else ``like``'s key
    order; ``param_names`` filled in), ready for a plain ``load_state_dict``; state that no
    element-moving inverse carries back is dropped and reported (``report.optimizer``).
    ``optimizer_save`` writes it with ``torch.save``, atomically.

    >>> import torch, remap
    >>> rules = {"version": 1, "rules": [{"strip_prefix": "module."}]}
    >>> out = remap.export(torch.nn.Linear(2, 1), rules, like={"module.weight": torch.zeros(1, 2), "module.bias": torch.zeros(1)})
    >>> list(out.state_dict), out.ok
    (['module.weight', 'module.bias'], True)
    """
    from .exporting.export import Finetuned, run_export
    from .exporting.optimizer import FinetunedOptimizer

    r = resolve_rules(rules).bound_to(model)  # vars read from the fine-tuned model's config
    report_path = Path(report) if report is not None else None
    if report_path is not None:
        from .files import refuse_non_regular_target

        refuse_non_regular_target(report_path, error=UsageError, what="report (--report)")
    if optimizer_save is not None:
        from .files import refuse_non_regular_target

        refuse_non_regular_target(optimizer_save, error=UsageError, what="optimizer_save")
    if r.sources or _named_sources(like):
        raise UsageError(f"remap export writes one original's files; these rules read several sources "
                         f"({', '.join(r.sources or like)}). Export each source with rules of its own (its steps, "
                         "a `source:` of its own), or save the loaded model with --save")  # fmt: skip
    if like is None and r.source.path is None and r.source.model is None:
        raise UsageError("no original to export back to (--like, like=ORIGINAL): give one, or set source.path in the rules")
    original = open_rules_source(like, r, key=like_key, trust_pickle=trust_pickle, trust_links=trust_links)
    try:
        finetuned = Finetuned.of(model, key=key, trust_pickle=bool(trust_pickle), trust_links=bool(trust_links))
        try:
            carried = FinetunedOptimizer.of(optimizer, model) if optimizer is not None else None
            result = run_export(r, finetuned, original, save=save, only_loaded=only_loaded, allow_lossy=allow_lossy,
                                optimizer=carried, optimizer_save=optimizer_save)  # fmt: skip
        except CheckError as exc:
            if report_path is not None:
                _write_report(exc.report, report_path)  # type: ignore[arg-type]
            raise
        finally:
            finetuned.close()
    finally:
        original.close()
    if report_path is not None:
        _write_report(result, report_path)  # type: ignore[arg-type]
    return result


def verify(
    rules: Any = None,
    *,
    record: str | os.PathLike[str] | None = None,
    reference: str | os.PathLike[str] | None = None,
    source: Any = None,
    target: Any = None,
    target_weights: str | os.PathLike[str] | None = None,
    key: str | None = None,
    trust_pickle: bool | None = None,
    trust_links: bool | None = None,
) -> dict[str, Any]:
    """Prove a conversion after the fact, or record reference outputs; no plan, no load of the rules.

    With ``record`` (a path): the source model (``source.model`` loaded strictly from
    ``source.path``, or ``source`` given here) runs on the rules' verify input and its inputs and
    outputs are written to ``record`` (:func:`~remap.verifying.reference.write_reference`);
    returns ``{"recorded": path, "inputs": ..., "outputs": ..., "settings": ...}``.

    Otherwise the target (``target``, a module; else ``target.model`` loaded strictly from
    ``target_weights``, default the rules' ``output.save``: what ``remap apply --save`` wrote)
    is compared with ``reference`` (else the rules' ``verify.reference``, relative to the rules
    file) or, without one, with the source model on the verify input. Returns the verify dict
    (compare()'s numbers, ``outcome``: ``"agree"`` or ``"differ"``); it raises only for bad
    usage or unreadable files, never for outputs that differ.

    >>> import torch, remap
    >>> net = torch.nn.Linear(2, 1)
    >>> rules = {"version": 1, "source": {"model": "torch.nn:Linear", "args": [2, 1]}, "verify": {"input": [1, 2]}}
    >>> remap.verify(rules, source=net.state_dict(), target=net)["outcome"]
    'agree'
    """
    r = resolve_rules(rules)
    spec = r.verify
    if record is not None:
        return _record(r, record, source, key=key, trust_pickle=trust_pickle, trust_links=trust_links)
    from .verifying.reference import reference_path, verify_against_reference

    ref = reference_path(reference, spec, r.base_dir)
    if ref is None and spec is None:
        raise UsageError("nothing to verify against: the rules have no `verify` section (e.g. `verify: {input: [1, 3, 224, 224]}`) "
                         "and no recorded reference was given with --reference REF, or pass the reference argument to remap.verify")  # fmt: skip
    module = target if target is not None else _verify_target(r, target_weights)
    if not _is_module(module):
        raise UsageError(f"verify: the target must be a torch.nn.Module, found a {type(module).__name__}")
    if ref is not None:
        return verify_against_reference(spec, module, ref)
    from .verifying.run import run_verify

    src = open_rules_source(source, r, key=key, trust_pickle=trust_pickle, trust_links=trust_links)
    try:
        result = run_verify(spec, _source_model(r, src), module, base_dir=r.base_dir)  # type: ignore[arg-type]
    finally:
        src.close()
    return {**result, "outcome": result.get("outcome", "agree" if result["ok"] else "differ")}


def _verify_target(rules: Rules, weights: str | os.PathLike[str] | None) -> Any:
    """``target.model`` loaded strictly (names must match, every key loaded) from ``weights``,
    else the rules' ``output.save``."""
    import dataclasses

    from .rules.parse import Rules as _Rules

    path = Path(weights) if weights is not None else _output(None, rules.output.save, rules)
    if path is None:
        raise UsageError("verify needs the converted weights: set output.save in the rules (what `remap apply RULES.yaml` "
                         "writes) or give --target-weights FILE, or pass the target_weights argument to remap.verify")  # fmt: skip
    from .files import file_kind

    if file_kind(path) == "missing":
        origin = "the target weights given" if weights is not None else "output.save in the rules"
        raise UsageError(f"verify: the converted weights {str(path)!r} ({origin}) do not exist: convert first "
                         "(`remap apply RULES.yaml` writes output.save), or give the converted file with --target-weights")  # fmt: skip
    strict = dataclasses.replace(_Rules(), target=rules.target)
    module, _ = _build(strict)
    device = rules.target.device if rules.target.device not in (None, "meta") else None
    try:
        load(module, path, strict, device=device, dtype=rules.target.dtype)
    except CheckError as exc:
        failures = "; ".join(_first_line_and_keys(f.message) for f in exc.report.failures) or exc.message
        raise UsageError(f"verify: the target weights {str(path)!r} do not load strictly into target.model "
                         f"{rules.target.model} (names must match): {failures}") from None  # fmt: skip
    return module


def _first_line_and_keys(message: str, limit: int = 4) -> str:
    """A check's message in one line: its first line and the first (folded) keys it lists.

    >>> _first_line_and_keys("2 target key(s) missing:\\n  a.weight\\n  b.{bias, weight}\\nhint: ...")
    '2 target key(s) missing (a.weight, b.{bias, weight})'
    """
    first, *rest = message.split("\n")
    keys = [line.strip() for line in rest if line.startswith("  ")]
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return first.rstrip().removesuffix(":") + (f" ({shown})" if keys else "")


def _record(rules: Rules, path: str | os.PathLike[str], source: Any, **opening: Any) -> dict[str, Any]:
    """Run the source model on the verify input; write its inputs and outputs to ``path``."""
    import torch

    from .verifying.inputs import make_inputs
    from .verifying.reference import output_leaves, write_reference
    from .verifying.run import evaluating

    spec = rules.verify
    if spec is None or not (spec.inputs or getattr(spec, "input_file", None)):
        raise UsageError("--record needs the input to record: the rules' verify section must give one "
                         "(e.g. `verify: {input: [1, 3, 224, 224]}`)")  # fmt: skip
    src = open_rules_source(source, rules, **opening)
    try:
        model = _source_model(rules, src)
        weights = src.description.get("path")
    finally:
        src.close()
    args, kwargs = make_inputs(spec, base_dir=rules.base_dir)
    try:
        with evaluating(model), torch.no_grad():
            out = model(*[a.clone() for a in args], **{k: v.clone() for k, v in kwargs.items()})
    except Exception as exc:  # the user's model raising on the declared input
        raise UsageError(f"verify --record: the source model failed on the verify input: {type(exc).__name__}: {exc}") from None
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()), None)
    settings = {"framework": f"torch {torch.__version__}", "model": rules.source.model, "weights": weights,
                "seed": spec.seed, "input": dict(spec.raw).get("input"), "dtype": dtype}  # fmt: skip
    write_reference(path, inputs=(args, kwargs), outputs=out, settings=settings)
    named = {str(n): list(a.shape) for n, a in enumerate(args)} | {k: list(v.shape) for k, v in kwargs.items()}
    return {"recorded": str(path), "inputs": named, "outputs": output_leaves(out), "settings": settings}
