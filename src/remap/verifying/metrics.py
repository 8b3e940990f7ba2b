"""Metrics that fit the model: for language models the KL divergence of next-token
distributions, top-1 agreement and greedy decoding compared token by token; for
classifiers top-k agreement; and the tolerances and thresholds a run's precision calls for.

Every metric works on logits (the last dimension: vocabulary or classes; every other
dimension a position), in float64, the source as the reference distribution:

>>> import torch
>>> logits = torch.tensor([[2.0, 1.0, 0.0]])
>>> kl_divergence(logits, logits)
(0.0, 0.0)
>>> top1_agreement(logits, torch.tensor([[0.0, 1.0, 2.0]]))
0.0

**How the verdict is made.** Without ``metrics`` the outputs must be close within
``atol``/``rtol``. With ``metrics`` the metrics decide and the atol/rtol comparison is still
measured and reported but is not part of the verdict, unless the rules set ``atol`` or
``rtol`` themselves, in which case both must pass: a language model's logits may differ by
more than any useful atol while its next-token distributions agree. NaN or Inf in different
places always fails.

**Precision.** When the rules give no ``atol``/``rtol`` they come from the lower precision of
the two runs: 1e-5 for float32 and float64, 16 × the dtype's epsilon for bfloat16 (0.125) and
float16 (0.015625). Thresholds a ``task`` chose are loosened for a bfloat16 or float16 run
(``kl`` 0.01, ``top1`` and top-k 0.9, greedy decoding reported without a threshold: near ties
part the decodes). Thresholds written in the rules are never changed. The report says which
were used and why.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from ..rules.verify_spec import DEFAULT_TOL, VerifySpec
from .inputs import place_inputs, select_output

__all__ = ["kl_divergence", "top1_agreement", "topk_agreement", "greedy_decode", "compare_greedy", "lower_precision",
           "default_tolerances", "thresholds_for", "measure", "logits_of", "LOW_PRECISION"]  # fmt: skip

LOW_PRECISION = ("bfloat16", "float16")
EPS_FACTOR = 16  # default atol/rtol of a low-precision run, in units of its epsilon
LOOSE = {"kl": 1e-2, "top1": 0.9, "topk": 0.9}  # a task's thresholds for a low-precision run


def _log_probs(logits: Any) -> Any:
    import torch

    x = logits.detach().to(device="cpu", dtype=torch.float64)
    return torch.log_softmax(x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1), dim=-1)


def kl_divergence(source_logits: Any, target_logits: Any) -> tuple[float, float]:
    """(mean, max) over positions of KL(P_source || P_target) of the softmax of the last dimension.

    >>> import torch
    >>> mean, worst = kl_divergence(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    >>> round(worst, 4)
    0.1201
    """
    p, q = _log_probs(source_logits), _log_probs(target_logits)
    per_position = (p.exp() * (p - q)).sum(-1)
    return float(per_position.mean()), float(per_position.max())


def top1_agreement(source_logits: Any, target_logits: Any) -> float:
    """The share of positions where both models' most likely token (class) is the same.

    >>> import torch
    >>> top1_agreement(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    0.5
    """
    p, q = _log_probs(source_logits), _log_probs(target_logits)
    return float((p.argmax(-1) == q.argmax(-1)).double().mean())


def topk_agreement(source_logits: Any, target_logits: Any, k: int) -> float:
    """The mean over positions of the share of the source's top ``k`` classes that are among
    the target's top ``k`` (the order within the k is not compared).

    >>> import torch
    >>> topk_agreement(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), torch.tensor([[3.0, 0.0, 1.0, 2.0]]), 2)
    0.5
    """
    import torch

    p, q = _log_probs(source_logits), _log_probs(target_logits)
    if k > p.shape[-1]:
        raise UsageError(f"verify.metrics.topk: k is {k}, but the outputs have {p.shape[-1]} classes")
    a, b = p.topk(k, dim=-1).indices, q.topk(k, dim=-1).indices
    shared = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1)
    return float(shared.to(torch.float64).mean() / k)


def logits_of(output: Any, side: str) -> Any:
    """The logits tensor in a (selected) output: the tensor itself, or its ``logits`` (a Hugging
    Face model's output); anything else is a UsageError that says to choose it with verify.output."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    found = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(found, torch.Tensor):
        return found
    raise UsageError(f"verify.metrics need one tensor of logits from each model; the {side} model's output is a "
                     f"{type(output).__name__} without logits: choose the logits with verify.output (a key, attribute or index)")  # fmt: skip


def greedy_decode(model: Any, ids: Any, tokens: int, *, name: str | None, selector: Any, side: str) -> Any:
    """``tokens`` new token ids, one at a time: the model's forward on the growing ids
    (``ids`` [batch, length], passed positionally or as keyword ``name``), the most likely next
    token at the last position appended. No ``generate``, no cache: any model whose (selected)
    output holds logits [batch, length, vocab] decodes. Returns the new ids, [batch, tokens].
    """
    import torch

    grown, _ = place_inputs([ids], {}, model)
    current = grown[0]
    start = current.shape[-1]
    for step in range(tokens):
        try:
            with torch.no_grad():
                out = model(**{name: current}) if name is not None else model(current)
        except Exception as exc:  # the user's model, e.g. past its largest position
            raise UsageError(f"verify.metrics.greedy: the {side} model failed at new token {step + 1} of {tokens} "
                             f"(length {current.shape[-1]}): {type(exc).__name__}: {exc}") from None  # fmt: skip
        logits = logits_of(select_output(out, selector, side), side)
        nxt = logits[..., -1, :].argmax(-1).to(current.dtype).reshape(current.shape[0], 1)
        current = torch.cat([current, nxt], dim=-1)
    return current[..., start:].cpu()


def compare_greedy(source_ids: Any, target_ids: Any) -> tuple[int, int | None]:
    """(tokens that agree before the first mismatch, the first mismatch's position or None);
    a position agrees when it agrees in every row of the batch.

    >>> import torch
    >>> compare_greedy(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 4]]))
    (2, 2)
    """
    same = (source_ids == target_ids).all(0)
    for n, ok in enumerate(same.tolist()):
        if not ok:
            return n, n
    return len(same), None


def lower_precision(*dtypes: Any) -> str:
    """The least precise of the dtypes (by epsilon), by name.

    >>> import torch
    >>> lower_precision(torch.float32, torch.bfloat16), lower_precision(torch.float64)
    ('bfloat16', 'float64')
    """
    import torch

    worst = max(dtypes, key=lambda d: torch.finfo(d).eps)
    return str(worst).removeprefix("torch.")


def default_tolerances(spec: VerifySpec, precision: str) -> tuple[float, float, str]:
    """(atol, rtol, why): the rules' own, else the default for a ``precision`` run.

    >>> default_tolerances(VerifySpec.parse({"input": [1]}), "bfloat16")
    (0.125, 0.125, 'atol 0.125, rtol 0.125: defaults for a bfloat16 run (16 × its epsilon 0.0078125); none given in the rules')
    >>> default_tolerances(VerifySpec.parse({"input": [1], "atol": 0.5}), "bfloat16")[2]
    'atol 0.5 given in the rules; rtol 0.125: default for a bfloat16 run (16 × its epsilon 0.0078125)'
    """
    import torch

    if precision in LOW_PRECISION:
        eps = torch.finfo(getattr(torch, precision)).eps
        default, reason = EPS_FACTOR * eps, f"for a {precision} run ({EPS_FACTOR} × its epsilon {eps:g})"
    else:
        default, reason = DEFAULT_TOL, f"for a {precision} run"
    atol = spec.atol if spec.atol_given else default
    rtol = spec.rtol if spec.rtol_given else default
    if spec.atol_given and spec.rtol_given:
        return atol, rtol, f"atol {atol:g}, rtol {rtol:g}: given in the rules"
    if not spec.atol_given and not spec.rtol_given:
        return atol, rtol, f"atol {atol:g}, rtol {rtol:g}: defaults {reason}; none given in the rules"
    given, other = ("atol", "rtol") if spec.atol_given else ("rtol", "atol")
    values = {"atol": atol, "rtol": rtol}
    return atol, rtol, f"{given} {values[given]:g} given in the rules; {other} {values[other]:g}: default {reason}"


def thresholds_for(spec: VerifySpec, precision: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(thresholds, why per metric): the rules' metrics as written; a task's defaults,
    loosened for a low-precision run.

    >>> thresholds_for(VerifySpec.parse({"input": [1], "task": "causal_lm", "metrics": {"kl": 0.5}}), "bfloat16")[0]
    {'kl': 0.5, 'top1': 0.9, 'greedy': {'tokens': 8, 'min': 0}}
    """
    thresholds: dict[str, Any] = {}
    why: dict[str, str] = {}
    for name, value in spec.metrics.items():
        if name in spec.metrics_given:
            thresholds[name], why[name] = value, "given in the rules"
            continue
        low = precision in LOW_PRECISION
        if low and name == "greedy":
            value = {**value, "min": 0}
        elif low and name == "topk":
            value = {**value, "min": min(value["min"], LOOSE["topk"])}
        elif low:
            value = min(value, LOOSE[name]) if name == "top1" else max(value, LOOSE[name])
        thresholds[name] = value
        why[name] = f"default of task {spec.task}" + (f", loosened for a {precision} run" if low else "")
    return thresholds, why


def measure(thresholds: Mapping[str, Any], source_out: Any, target_out: Any) -> dict[str, Any]:
    """kl, top-1 and top-k on the two outputs' logits (greedy decoding needs the models: run.py
    adds it). Returns the values and, per metric, whether it passed its threshold.

    >>> import torch
    >>> m = measure({"kl": 1e-6, "top1": 1.0}, torch.eye(3), torch.eye(3))
    >>> m["kl"], m["top1_agreement"], m["passed"]
    (0.0, 1.0, {'kl': True, 'top1': True})
    """
    a, b = logits_of(source_out, "source"), logits_of(target_out, "target")
    if tuple(a.shape) != tuple(b.shape):
        raise UsageError(f"verify.metrics: the logits have shape {list(a.shape)} from the source and {list(b.shape)} from the target")
    values: dict[str, Any] = {"positions": int(a[..., 0].numel())}
    passed: dict[str, bool] = {}
    if "kl" in thresholds:
        values["kl_mean"], values["kl"] = kl_divergence(a, b)
        passed["kl"] = values["kl"] <= thresholds["kl"]  # NaN fails
    if "top1" in thresholds:
        values["top1_agreement"] = top1_agreement(a, b)
        passed["top1"] = values["top1_agreement"] >= thresholds["top1"]
    if "topk" in thresholds:
        k = thresholds["topk"]["k"]
        values["topk_agreement"] = {str(k): topk_agreement(a, b, k)}
        passed["topk"] = values["topk_agreement"][str(k)] >= thresholds["topk"]["min"]
    return {**values, "passed": passed}
