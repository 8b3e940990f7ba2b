"""``verify``: run the source model and the loaded target on the same input, compare outputs.

The conversion scripts every model hub carries end with a hand-written ``allclose``; here it
is a section of the rules::

    verify:
      input: [1, 3, 224, 224]          # a seeded float tensor; or {ids: [1, 16], high: 1000}
      output: logits                   # which part of the outputs: a key, an attribute or an index
      atol: 1.0e-5

Several named inputs: ``input: {input_ids: {ids: [1, 16], high: 1000}, pixel_values: [1, 3, 32, 32]}``;
from a file: ``input: {file: sample.safetensors}``. ``output`` may differ per side:
``{source: logits, target: 0}``. ``seeds: [0, 1, 2]`` runs once per seed (each run's numbers in
``runs``; the verdict over all). ``metrics`` (or ``task``) add language-model and classifier
metrics (:mod:`remap.verifying.metrics`, which also says how they join the verdict).

Each model runs as it is: the target in the dtype it was loaded in, the source model in its
own (a bf16 target is checked against an fp32 source: each gets the inputs in its own dtype,
the outputs are compared in float64, with tolerances for the lower precision unless the rules
give them). ``dtype`` states the target's dtype (checked, never cast: a cast of the loaded
weights would not be the model that was loaded); ``device`` is where both run: the source
model is moved there for the run and back, the target must already be there.

>>> from remap.verifying.inputs import make_inputs
>>> spec = VerifySpec.parse({"input": {"ids": [1, 4], "high": 10}, "output": "logits"})
>>> spec.output
('logits', 'logits')
>>> make_inputs(spec)[0][0].dtype
torch.int64
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ..errors import UsageError
from ..report.records import LOADED
from ..rules.verify_spec import VerifySpec
from .compare import compare, tensor_leaves
from .inputs import make_inputs, model_device, model_dtype, place_inputs, select_output
from .reference import Reference
from .metrics import compare_greedy, default_tolerances, greedy_decode, lower_precision, measure, thresholds_for

__all__ = ["run_verify", "with_coverage", "other_inputs", "evaluating"]

AGREE, DIFFER, INCONCLUSIVE = "agree", "differ", "inconclusive"


def run_verify(spec: VerifySpec, source_model: Any, target_model: Any, *, base_dir: str | os.PathLike[str] | None = None,
               reference: Reference | None = None, records: Sequence[Any] | None = None,
               loaded: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run both models in eval mode, without gradients, on the same inputs (once per seed);
    compare. ``base_dir`` is the rules file's folder (an input file is relative to it).

    The result holds :func:`~remap.verifying.compare.compare`'s numbers (over every run: the
    largest differences, the run they came from in ``worst_seed``), ``outcome`` (agree or
    differ), ``ok``, ``close`` (within atol/rtol), the tolerances and why, the dtypes and devices,
    ``metrics`` when asked for, and ``runs`` (each seed's numbers) when there are several seeds.

    ``reference`` (a recorded :class:`~remap.verifying.reference.Reference`) stands for the
    source model: its inputs are used and its outputs compared (``source_model`` may be None).
    Then :func:`with_coverage` measures which of the ``loaded`` target keys (default: those
    the report's ``records`` say were loaded; without records, every tensor of the target) the
    outputs depend on (an agreement that did not look at a loaded tensor is ``inconclusive``),
    and, when the outputs differ and the plan's ``records`` are at hand,
    :func:`~remap.verifying.divergence.first_divergence` finds where the two models part.
    """
    if reference is not None:
        return _against_reference(spec, reference, target_model, records=records, loaded=loaded)
    dtypes = _check_dtype(spec, source_model, target_model)
    precision = lower_precision(model_dtype(source_model), model_dtype(target_model))
    atol, rtol, tol_why = default_tolerances(spec, precision)
    thresholds, metric_why = thresholds_for(spec, precision)
    seeds: list[int | None] = [None] if spec.input_file is not None else list(spec.seeds)
    with _on_device(spec, source_model, target_model) as devices:
        runs = [_one_run(spec, source_model, target_model, seed, atol=atol, rtol=rtol, thresholds=thresholds, base_dir=base_dir)
                for seed in seeds]  # fmt: skip
    result = _combine(runs)
    verdict_by = _verdict_by(spec, thresholds)
    result.update(
        atol=atol, rtol=rtol, input=dict(spec.raw).get("input"), output=list(spec.output),
        tolerances={"atol": atol, "rtol": rtol, "why": tol_why, "given": spec.atol_given or spec.rtol_given},
        dtypes={**dtypes, "precision": precision, "compared_in": "float64"}, devices=devices, verdict_by=verdict_by,
        seeds=[s for s in seeds if s is not None],
    )  # fmt: skip
    if thresholds:
        result["metrics"] = {**_combine_metrics([r["metrics"] for r in runs]), "thresholds": thresholds, "why": metric_why}
    result["outcome"] = AGREE if all(r["outcome"] == AGREE for r in runs) else DIFFER
    result["ok"] = result["outcome"] == AGREE
    if len(runs) > 1:
        result["runs"] = [{k: r[k] for k in ("seed", "outcome", "close", "max_abs", "max_rel", "worst", "nonfinite_mismatched", "metrics") if k in r}
                          for r in runs]  # fmt: skip
    inputs = make_inputs(spec, seed=seeds[0], base_dir=base_dir)
    result = with_coverage(result, spec, target_model, inputs, records=records, loaded=loaded)
    if result["outcome"] == DIFFER and records is not None:
        result["divergence"] = _divergence(source_model, target_model, inputs, records, atol=atol, rtol=rtol)
    return result


def _against_reference(spec: VerifySpec, ref: Reference, target: Any, *, records: Sequence[Any] | None,
                       loaded: Sequence[str] | None) -> dict[str, Any]:  # fmt: skip
    """The target on the recorded inputs against the recorded outputs: tolerances for the
    lower precision of the two (unless the rules give them), the metrics that need no second
    model (greedy decoding does), then coverage."""
    if "greedy" in dict(spec.metrics or {}):
        raise UsageError("verify.metrics.greedy decodes with both models, but a recorded reference holds one output, not a "
                         "model: leave greedy out when verifying against a reference")  # fmt: skip
    recorded = select_output(ref.outputs, spec.output[0], "recorded")
    leaves = [t for _, t in tensor_leaves(recorded) if t.is_floating_point()]
    ref_dtype = leaves[0].dtype if leaves else model_dtype(target)
    precision = lower_precision(ref_dtype, model_dtype(target))
    atol, rtol, tol_why = default_tolerances(spec, precision)
    thresholds, metric_why = thresholds_for(spec, precision)
    args, kwargs = list(ref.args), dict(ref.kwargs)
    got = _forward(target, "target", args, kwargs, spec.output[1])
    result = compare(recorded, got, atol=atol, rtol=rtol)
    result["close"] = result.pop("ok")
    good = not result["nonfinite_mismatched"]
    verdict_by = _verdict_by(spec, thresholds)
    if "tolerances" in verdict_by:
        good = good and result["close"]
    if thresholds:
        metrics = measure(thresholds, recorded, got)
        metrics["ok"] = all(metrics["passed"].values())
        result["metrics"] = {**metrics, "thresholds": thresholds, "why": metric_why}
        if "metrics" in verdict_by:
            good = good and metrics["ok"]
    result.update(
        atol=atol, rtol=rtol, input={"reference": ref.input_shapes()}, output=list(spec.output), reference=ref.path,
        tolerances={"atol": atol, "rtol": rtol, "why": tol_why, "given": spec.atol_given or spec.rtol_given},
        dtypes={"source": f"{str(ref_dtype).removeprefix('torch.')} (recorded)", "target": str(model_dtype(target)).removeprefix("torch."),
                "precision": precision, "compared_in": "float64"},
        devices={"source": "recorded", "target": str(model_device(target))}, verdict_by=verdict_by,
        outcome=AGREE if good else DIFFER,
    )  # fmt: skip
    result["ok"] = result["outcome"] == AGREE
    return with_coverage(result, spec, target, (args, kwargs), records=records, loaded=loaded)


def with_coverage(result: dict[str, Any], spec: VerifySpec, target: Any, inputs: tuple[list[Any], dict[str, Any]], *,
                  records: Sequence[Any] | None = None, loaded: Sequence[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """``result`` with ``coverage`` (:func:`~remap.verifying.coverage.check_coverage` on the
    target at ``inputs`` and at a second input, :func:`other_inputs`); an ``agree`` becomes
    ``inconclusive`` when a loaded floating tensor is uncovered (and not declared in
    ``verify.uncovered``) or when the outputs do not depend on the input."""
    from .coverage import check_coverage

    if loaded is None:
        loaded = [r.key for r in records if r.status == LOADED] if records is not None else list(target.state_dict())
    args, kwargs = place_inputs(*inputs, target)
    other = place_inputs(*other_inputs(*inputs), target)
    result["coverage"] = check_coverage(target, (args, kwargs), other, output=spec.output[1], keys=loaded,
                                        declared=spec.uncovered, atol=result["atol"])  # fmt: skip
    cov = result["coverage"]
    if result["outcome"] == AGREE and (cov["uncovered"] or not cov["input_sensitive"]):
        result["outcome"], result["ok"] = INCONCLUSIVE, False
    return result


def other_inputs(args: Sequence[Any], kwargs: Mapping[str, Any], seed: int = 1_000_003) -> tuple[list[Any], dict[str, Any]]:
    """A second input unlike the first, for the input-sensitivity check: floating tensors drawn
    again with the first's mean and spread, integer ones (token ids, labels) the first's values
    shuffled (so they stay in the range the model accepts).

    >>> import torch
    >>> (a,), _ = other_inputs([torch.arange(6)], {})
    >>> sorted(a.tolist()) == list(range(6)) and a.tolist() != list(range(6))
    True
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def other(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return t
        if t.is_floating_point():
            flat = t.detach().double().cpu()
            std = float(flat.std()) if t.numel() > 1 else 1.0
            fresh = torch.randn(t.shape, generator=g, dtype=torch.float64) * (std or 1.0) + float(flat.mean())
            return fresh.to(t.dtype)
        order = torch.randperm(t.numel(), generator=g)
        if t.numel() > 1 and torch.equal(order, torch.arange(t.numel())):
            order = order.roll(1)
        return t.reshape(-1)[order].reshape(t.shape)

    return [other(a) for a in args], {k: other(v) for k, v in kwargs.items()}


def _divergence(source: Any, target: Any, inputs: tuple[list[Any], dict[str, Any]], records: Sequence[Any], *,
                atol: float, rtol: float) -> dict[str, Any]:  # fmt: skip
    """:func:`~remap.verifying.divergence.first_divergence` on both models (each with the
    inputs in its own dtype and device)."""
    from .divergence import first_divergence

    return first_divergence(source, target, inputs, records, atol=atol, rtol=rtol)


def _one_run(spec: VerifySpec, source: Any, target: Any, seed: int | None, *, atol: float, rtol: float,
             thresholds: Mapping[str, Any], base_dir: Any) -> dict[str, Any]:  # fmt: skip
    """One seed: both forwards, the atol/rtol comparison, the metrics, the outcome."""
    args, kwargs = make_inputs(spec, seed=seed, base_dir=base_dir)
    outputs = [_forward(model, side, args, kwargs, spec.output[n]) for n, (side, model) in enumerate((("source", source), ("target", target)))]
    result = compare(*outputs, atol=atol, rtol=rtol)
    result["close"] = result.pop("ok")
    result["seed"] = seed
    if thresholds:
        metrics = measure(thresholds, *outputs)
        if "greedy" in thresholds:
            metrics.update(_greedy(spec, source, target, args, kwargs, thresholds["greedy"]))
            metrics["passed"]["greedy"] = metrics["greedy_match"] >= thresholds["greedy"]["min"]
        metrics["ok"] = all(metrics["passed"].values())
        result["metrics"] = metrics
    verdict_by = _verdict_by(spec, thresholds)
    good = not result["nonfinite_mismatched"]
    if "tolerances" in verdict_by:
        good = good and result["close"]
    if "metrics" in verdict_by:
        good = good and result["metrics"]["ok"]
    result["outcome"] = AGREE if good else DIFFER
    return result


def _verdict_by(spec: VerifySpec, thresholds: Mapping[str, Any]) -> str:
    """What decides: ``tolerances`` (no metrics), ``metrics`` (metrics, no atol/rtol in the
    rules), or ``tolerances and metrics`` (both written in the rules)."""
    if not thresholds:
        return "tolerances"
    return "tolerances and metrics" if spec.atol_given or spec.rtol_given else "metrics"


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[Any]:
    """``model`` in eval mode inside, its training flag put back afterwards (errors included).

    >>> import torch
    >>> net = torch.nn.Dropout().train()
    >>> with evaluating(net):
    ...     net.training
    False
    >>> net.training
    True
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _forward(model: Any, side: str, args: list[Any], kwargs: dict[str, Any], selector: Any) -> Any:
    """The model's selected output on its own copy of the inputs, in eval mode, without gradients."""
    import torch

    args, kwargs = place_inputs(args, kwargs, model)
    try:
        with evaluating(model), torch.no_grad():
            out = model(*args, **kwargs)
    except Exception as exc:  # the user's model raising on the declared input
        raise UsageError(f"verify: the {side} model failed on the verify input: {type(exc).__name__}: {exc}") from None
    return select_output(out, selector, side)


def _greedy(spec: VerifySpec, source: Any, target: Any, args: list[Any], kwargs: dict[str, Any], want: Mapping[str, int]) -> dict[str, Any]:
    """Both models decode ``want["tokens"]`` tokens greedily from the verify ids; compared token by token."""
    name, ids = _token_ids(args, kwargs)
    decoded = []
    for n, (side, model) in enumerate((("source", source), ("target", target))):
        with evaluating(model):
            decoded.append(greedy_decode(model, ids, want["tokens"], name=name, selector=spec.output[n], side=side))
    match, first = compare_greedy(*decoded)
    return {"greedy_tokens": want["tokens"], "greedy_match": match, "greedy_first_mismatch": first}


def _token_ids(args: list[Any], kwargs: dict[str, Any]) -> tuple[str | None, Any]:
    """(keyword or None, ids): the one input greedy decoding grows: integer, [batch, length]."""
    inputs = [(None, a) for a in args] + list(kwargs.items())
    if len(inputs) != 1 or inputs[0][1].is_floating_point() or inputs[0][1].dim() != 2:
        found = ", ".join(f"{n or 'positional'} {list(t.shape)} {str(t.dtype).removeprefix('torch.')}" for n, t in inputs)
        raise UsageError("verify.metrics.greedy grows one input of token ids, [batch, length] integers (such as "
                         f"input: {{ids: [1, 8], high: 50000}}); the verify input is: {found}")  # fmt: skip
    return inputs[0]


def _check_dtype(spec: VerifySpec, source: Any, target: Any) -> dict[str, str]:
    """The two models' dtypes by name; a UsageError when ``verify.dtype`` is not the target's."""
    dtypes = {"source": str(model_dtype(source)).removeprefix("torch."), "target": str(model_dtype(target)).removeprefix("torch.")}
    if spec.dtype is not None and spec.dtype != dtypes["target"]:
        raise UsageError(f"verify.dtype is {spec.dtype}, but the target's parameters are {dtypes['target']}: verify runs the "
                         f"target as it was loaded; load it in {spec.dtype} (target.dtype: {spec.dtype}, or dtype=) or leave verify.dtype out")  # fmt: skip
    return dtypes


@contextlib.contextmanager
def _on_device(spec: VerifySpec, source: Any, target: Any) -> Iterator[dict[str, str]]:
    """With ``verify.device``: the target must be there; the source model is moved there for
    the run and back afterwards. Yields both devices by name."""
    import torch

    if spec.device is None:
        yield {"source": str(model_device(source)), "target": str(model_device(target))}
        return
    want = torch.device(spec.device)
    have = model_device(target)
    if have.type != want.type or (want.index is not None and have.index != want.index):
        raise UsageError(f"verify.device is {spec.device}, but the target was loaded on {have}: load it there "
                         f"(target.device: {spec.device}, or device=) or leave verify.device out")  # fmt: skip
    home = model_device(source)
    try:
        source.to(have)
    except (RuntimeError, AssertionError) as exc:  # torch: no such device, not compiled with it
        raise UsageError(f"verify.device: the source model cannot be moved to {have}: {exc}") from None
    try:
        yield {"source": str(have), "target": str(have)}
    finally:
        source.to(home)


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The compare numbers over every run: the largest differences (``worst_seed`` the run
    they came from), counts summed, the first non-finite mismatch, ``close`` only if every run's."""
    worst = max(runs, key=lambda r: r["max_abs"])
    first = next((r["first_mismatch"] for r in runs if r["first_mismatch"]), None)
    return {
        "max_abs": worst["max_abs"], "max_rel": max(r["max_rel"] for r in runs), "close": all(r["close"] for r in runs),
        "tensors": runs[0]["tensors"], "worst": worst["worst"], "worst_seed": worst["seed"],
        "nan_matched": sum(r["nan_matched"] for r in runs), "inf_matched": sum(r["inf_matched"] for r in runs),
        "nonfinite_mismatched": sum(r["nonfinite_mismatched"] for r in runs), "first_mismatch": first,
    }  # fmt: skip


def _combine_metrics(per_run: list[dict[str, Any]]) -> dict[str, Any]:
    """Each metric at its worst over the runs; ``passed`` only where every run passed."""
    if len(per_run) == 1:
        return dict(per_run[0])
    out: dict[str, Any] = {"positions": sum(m["positions"] for m in per_run)}
    for name, pick in (("kl", max), ("kl_mean", max), ("top1_agreement", min), ("greedy_match", min)):
        if name in per_run[0]:
            out[name] = pick(m[name] for m in per_run)
    if "greedy_tokens" in per_run[0]:
        out["greedy_tokens"] = per_run[0]["greedy_tokens"]
        firsts = [m["greedy_first_mismatch"] for m in per_run if m["greedy_first_mismatch"] is not None]
        out["greedy_first_mismatch"] = min(firsts) if firsts else None
    if "topk_agreement" in per_run[0]:
        out["topk_agreement"] = {k: min(m["topk_agreement"][k] for m in per_run) for k in per_run[0]["topk_agreement"]}
    out["passed"] = {k: all(m["passed"][k] for m in per_run) for k in per_run[0]["passed"]}
    out["ok"] = all(m["ok"] for m in per_run)
    return out
