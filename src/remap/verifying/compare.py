"""Comparing two models' outputs: largest absolute and relative differences against
``atol``/``rtol``, NaN and Inf positions matched or not, and the sentence that says why a
comparison failed.

>>> import torch
>>> compare(torch.ones(2), torch.ones(2), atol=1e-5, rtol=1e-5)["ok"]
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from ..report.grouping import fold_keys

__all__ = ["compare", "describe_failure", "tensor_leaves", "metric_failures"]


def tensor_leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """The tensors in an output (a tensor, tuples, lists, dicts, a ModelOutput), each with its
    place (``logits``, ``[0]``, ``hidden_states[2]``); anything else (None, ints) is left out.

    >>> import torch
    >>> [p for p, _ in tensor_leaves({"logits": torch.ones(1), "past": (torch.ones(1), None)})]
    ['logits', 'past[0]']
    """
    import torch

    if isinstance(value, torch.Tensor):
        return [(path or "output", value)]
    if isinstance(value, Mapping):
        return [leaf for k, v in value.items() for leaf in tensor_leaves(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (tuple, list)):
        return [leaf for n, v in enumerate(value) for leaf in tensor_leaves(v, f"{path}[{n}]")]
    return []


def compare(source_out: Any, target_out: Any, *, atol: float, rtol: float) -> dict[str, Any]:
    """Max absolute and relative differences between two outputs (tensors, tuples, dicts).

    NaN, +Inf and -Inf are equal where both sides have the same one at the same place (a
    model whose weights hold NaN gives NaN on both sides); they are counted
    (``nan_matched``, ``inf_matched``). A position where only one side is NaN or infinite,
    or the two are different ones, is a mismatch (``nonfinite_mismatched``, the first in
    ``first_mismatch``) and fails. The differences are over the positions finite on both sides.
    """
    a, b = tensor_leaves(source_out), tensor_leaves(target_out)
    if not a or len(a) != len(b):
        raise UsageError(f"verify: the outputs do not line up: the source gives {len(a)} tensor(s), the target {len(b)}; "
                         "choose one with verify.output")  # fmt: skip
    result: dict[str, Any] = {"max_abs": 0.0, "max_rel": 0.0, "ok": True, "tensors": len(a), "worst": None,
                              "nan_matched": 0, "inf_matched": 0, "nonfinite_mismatched": 0, "first_mismatch": None}  # fmt: skip
    for (name, x), (_, y) in zip(a, b):
        if tuple(x.shape) != tuple(y.shape):
            raise UsageError(f"verify: output {name} has shape {list(x.shape)} from the source and {list(y.shape)} from the target")
        x, y = x.detach().double(), y.detach().double()
        abs_err, rel_err, close = _finite_differences(x, y, atol=atol, rtol=rtol)
        _count_non_finite(name, x, y, result)
        if abs_err >= result["max_abs"]:
            result["worst"] = name
        result["max_abs"], result["max_rel"] = max(result["max_abs"], abs_err), max(result["max_rel"], rel_err)
        result["ok"] = result["ok"] and close
    result["ok"] = result["ok"] and not result["nonfinite_mismatched"]
    return result


def _finite_differences(x: Any, y: Any, *, atol: float, rtol: float) -> tuple[float, float, bool]:
    """(max abs, max rel difference, allclose) over the positions where both are finite."""
    import torch

    both = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[both], y[both]
    if not x.numel():
        return 0.0, 0.0, True
    diff = (x - y).abs()
    rel = diff / y.abs().clamp_min(1e-12)
    return float(diff.max()), float(rel.max()), bool(torch.allclose(x, y, atol=atol, rtol=rtol))


def _count_non_finite(name: str, x: Any, y: Any, result: dict[str, Any]) -> None:
    """Add the NaN and Inf positions of ``x`` and ``y`` that match, and those that do not, to ``result``."""
    import torch

    nan = torch.isnan(x) & torch.isnan(y)
    inf = (torch.isposinf(x) & torch.isposinf(y)) | (torch.isneginf(x) & torch.isneginf(y))
    bad = (~torch.isfinite(x) | ~torch.isfinite(y)) & ~nan & ~inf
    result["nan_matched"] += int(nan.sum())
    result["inf_matched"] += int(inf.sum())
    count = int(bad.sum())
    if count and result["first_mismatch"] is None:
        at = tuple(int(i) for i in bad.nonzero()[0])
        result["first_mismatch"] = f"{name}{list(at)}: source {float(x[at])!r}, target {float(y[at])!r}"
    result["nonfinite_mismatched"] += count


def describe_failure(result: Mapping[str, Any]) -> str:
    """Why verify failed, in one sentence: inconclusive (uncovered tensors, outputs that do not
    depend on the input), NaN/Inf in different places, the metrics that missed their
    thresholds, or the largest differences against atol/rtol; then the first divergence
    when one was found.

    >>> describe_failure({"max_abs": 0.5, "max_rel": 0.1, "worst": "output", "atol": 1e-5, "rtol": 1e-5})
    'outputs differ: max abs diff 0.5 (at output), max rel diff 0.1; allowed atol 1e-05, rtol 1e-05'
    """
    if result.get("outcome") == "inconclusive":
        return _inconclusive(result)
    mismatched = result.get("nonfinite_mismatched", 0)
    if mismatched:
        text = (f"outputs differ: {mismatched} position(s) hold NaN or Inf on one side and not the same value on the "
                f"other (first at {result['first_mismatch']}); {_matched(result)}")  # fmt: skip
    else:
        parts = []
        if "tolerances" in result.get("verdict_by", "tolerances") and not result.get("close", result.get("ok", False)):
            parts.append(f"max abs diff {result['max_abs']:.3g} (at {result['worst']}{_seed(result)}), max rel diff "
                         f"{result['max_rel']:.3g}; allowed atol {result['atol']:g}, rtol {result['rtol']:g}")  # fmt: skip
        parts.extend(metric_failures(result.get("metrics") or {}))
        text = "outputs differ: " + "; ".join(parts or ["see the report"])
    first = (result.get("divergence") or {}).get("first")
    if first and (first["target"] or first["source"]):  # the whole models: nothing inside diverged first, nothing to add
        text += f"; first divergence: target {first['target']} <- source {first['source']} (max abs {first['max_abs']:.3g})"
    return text


def metric_failures(metrics: Mapping[str, Any]) -> list[str]:
    """One phrase per metric that missed its threshold.

    >>> metric_failures({"kl": 0.5, "top1_agreement": 1.0, "thresholds": {"kl": 0.01, "top1": 1.0},
    ...                  "passed": {"kl": False, "top1": True}})
    ['kl divergence 0.5 > 0.01 (the worst position)']
    """
    passed, want = metrics.get("passed", {}), metrics.get("thresholds", {})
    out = []
    if passed.get("kl") is False:
        out.append(f"kl divergence {metrics['kl']:.3g} > {want['kl']:g} (the worst position)")
    if passed.get("top1") is False:
        out.append(f"top-1 agreement {metrics['top1_agreement']:.3g} < {want['top1']:g}")
    if passed.get("topk") is False:
        k = str(want["topk"]["k"])
        out.append(f"top-{k} agreement {metrics['topk_agreement'][k]:.3g} < {want['topk']['min']:g}")
    if passed.get("greedy") is False:
        out.append(f"greedy decoding: {metrics['greedy_match']} of {metrics['greedy_tokens']} tokens agree before the first "
                   f"mismatch (at {metrics['greedy_first_mismatch']}), {want['greedy']['min']} needed")  # fmt: skip
    return out


def _seed(result: Mapping[str, Any]) -> str:
    return f", seed {result['worst_seed']}" if len(result.get("seeds") or ()) > 1 else ""


def _inconclusive(result: Mapping[str, Any]) -> str:
    """Why outputs that agree prove nothing: tensors they do not depend on, or no dependence on the input."""
    coverage = result.get("coverage") or {}
    declared = set(coverage.get("declared") or ())
    uncovered = [k for k in coverage.get("uncovered") or () if k not in declared]
    parts = []
    if uncovered:
        groups = [g.text for g in fold_keys(uncovered, numbered=True)]
        shown = ", ".join(groups[:4]) + (f" and {len(groups) - 4} more group(s)" if len(groups) > 4 else "")
        parts.append(f"{len(uncovered)} loaded tensor(s) do not influence the outputs on the verify input ({shown}); "
                     "declare the expected ones in verify.uncovered")  # fmt: skip
    if coverage.get("input_sensitive") is False:
        parts.append(f"the outputs barely depend on the input (two inputs give outputs within {coverage.get('input_spread', 0):.3g})")
    return "inconclusive: the outputs agree, but " + ("; ".join(parts) or "the check could not vouch for every weight")


def _matched(result: Mapping[str, Any]) -> str:
    return f"{result.get('nan_matched', 0)} NaN and {result.get('inf_matched', 0)} Inf position(s) matched"


