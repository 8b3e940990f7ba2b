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

__all__ = ["compare", "describe_failure"]


def _leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    import torch

    if isinstance(value, torch.Tensor):
        return [(path or "output", value)]
    if isinstance(value, Mapping):
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, (tuple, list)):
        return [leaf for n, v in enumerate(value) for leaf in _leaves(v, f"{path}[{n}]")]
    return []


def compare(source_out: Any, target_out: Any, *, atol: float, rtol: float) -> dict[str, Any]:
    """Max absolute and relative differences between two outputs (tensors, tuples, dicts).

    NaN, +Inf and -Inf are equal where both sides have the same one at the same place (a
    model whose weights hold NaN gives NaN on both sides); they are counted
    (``nan_matched``, ``inf_matched``). A position where only one side is NaN or infinite,
    or the two are different ones, is a mismatch (``nonfinite_mismatched``, the first in
    ``first_mismatch``) and fails. The differences are over the positions finite on both sides.
    """
    a, b = _leaves(source_out), _leaves(target_out)
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
    """Why verify failed: NaN/Inf in different places, else the largest differences."""
    mismatched = result.get("nonfinite_mismatched", 0)
    if mismatched:
        return (f"outputs differ: {mismatched} position(s) hold NaN or Inf on one side and not the same value on the "
                f"other (first at {result['first_mismatch']}); {_matched(result)}")  # fmt: skip
    return (f"outputs differ: max abs diff {result['max_abs']:.3g} (at {result['worst']}), max rel diff "
            f"{result['max_rel']:.3g}; allowed atol {result['atol']:g}, rtol {result['rtol']:g}")  # fmt: skip


def _matched(result: Mapping[str, Any]) -> str:
    return f"{result.get('nan_matched', 0)} NaN and {result.get('inf_matched', 0)} Inf position(s) matched"


