"""Coverage: which loaded tensors the verify check can vouch for.

Two models that agree on one input prove nothing about a weight the outputs do not
depend on: timm ResNets zero-initialise the last BatchNorm of every residual block, so
two blocks' ``conv1`` can be swapped and the outputs still agree; a dead ReLU, an unused
head, a gate at zero hide weights the same way. :func:`check_coverage` measures, on the
loaded target, which loaded tensors the compared outputs depend on.

Method. In eval mode, the gradient of a fixed seeded random projection of every selected
output tensor (not a plain sum: the sum of a softmax or of a LayerNorm's outputs over its
last dim does not change, so its gradient is zero) with respect to every loaded floating
tensor, parameters and floating buffers, at both inputs; a tensor is covered when its
gradient has a finite nonzero entry at either. ``torch.autograd.grad`` is used, so no
``.grad`` is touched. Tensors one name shares with another (tied weights) are one tensor:
covered under any name is covered under all.

Where the gradient cannot say, a perturbation does: seeded noise of 10% of the tensor's
RMS added in place, one forward pass, the outputs compared with the unperturbed ones
beyond ``atol``, the tensor restored bit for bit. It measures the tensors autograd refuses
(BatchNorm's running statistics: ``native_batch_norm`` is not differentiable in them), all
tensors when the outputs carry no gradient at all (integer outputs, a model that runs under
``no_grad`` inside), and it re-checks every tensor the gradient found uncovered, so a
``detach()`` in the model (a stop-gradient, a straight-through estimator) does not read as
uncovered. The tensors the gradient found uncovered are perturbed together first (one pass
confirms them all; a group that moves the outputs splits in halves), the others one at a
time: a forward pass per tensor, two when the first input shows nothing, which is fine for
small models and BatchNorm statistics. It stops at :data:`MAX_PERTURBATIONS` passes;
tensors past the cap keep the gradient's answer (uncovered) or, when the gradient never
saw them, are unmeasurable.

Memory: the gradient pass holds one forward's activations and a gradient the size of the
loaded tensors, once per input.

The module comes back as it came: training flags of every submodule, ``requires_grad`` of
every tensor, its ``.grad`` and its values, also when the model raises.

>>> import torch
>>> class Gated(torch.nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
...         self.gate = torch.nn.Parameter(torch.zeros(()))
...     def forward(self, x):
...         return self.a(x) + self.gate * self.b(x)
>>> m = Gated()
>>> x, y = ([torch.randn(2, 3)], {}), ([torch.randn(2, 3)], {})
>>> cov = check_coverage(m, x, y, keys=list(m.state_dict()))
>>> cov["uncovered"], cov["method"], cov["input_sensitive"]
(['b.weight', 'b.bias'], 'gradient', True)
>>> describe_coverage(cov)
'coverage (gradient): 2 of 5 tensor(s) do not influence the outputs: b.{bias, weight}'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..errors import RulesError, UsageError
from ..report.grouping import fold_keys
from ..rules.patterns import PatternError, compile_regex
from .compare import tensor_leaves
from .inputs import select_output

__all__ = ["check_coverage", "describe_coverage", "MAX_PERTURBATIONS", "PERTURBATION"]

MAX_PERTURBATIONS = 512  # forward passes the perturbation may take in one check
PERTURBATION = 0.1  # noise, relative to the tensor's RMS (absolute for an all-zero tensor)
_PROJECTION_SEED = 17  # the random projection of the outputs: fixed, so two runs agree
_NOISE_SEED = 23
_SHOWN_GROUPS = 8  # groups of keys one line of describe_coverage names
# How an integer tensor's reason ends: describe_coverage counts them and names the others.
_INTEGER = ": no gradient, cannot be perturbed"

Inputs = tuple[Sequence[Any], Mapping[str, Any]]


@dataclass
class _Tensor:
    """One tensor of the model under every loaded name it has (tied weights: several)."""

    objects: list[Any]  # the distinct tensor objects (one, unless two share their storage)
    names: list[str]
    is_parameter: bool
    number: int  # its place among the measured tensors: the seed of its perturbation
    covered: bool = False
    by_gradient: bool = False  # the gradient measured it (covered or not)
    reason: str | None = None  # unmeasurable, and why


@dataclass
class _Found:
    tensors: list[_Tensor] = field(default_factory=list)
    unmeasurable: dict[str, str] = field(default_factory=dict)  # key -> reason


class _NoGradient(Exception):
    """The gradient cannot be taken here (the reason is the message)."""


def check_coverage(model: Any, inputs: Inputs, other_inputs: Inputs, *, output: Any = None, keys: Iterable[str],
                   declared: Iterable[str] = (), atol: float = 1e-6,
                   max_perturbations: int = MAX_PERTURBATIONS) -> dict[str, Any]:  # fmt: skip
    """Which of ``keys`` (loaded target keys) the selected outputs of ``model`` depend on,
    and whether the outputs depend on the input at all.

    ``inputs`` and ``other_inputs`` are two different ``(args, kwargs)``; ``output`` is the
    target's ``verify.output`` selector; ``declared`` are regexes (``verify.uncovered``,
    matched anywhere in the key as ``expect.missing`` is): the uncovered keys they match are
    listed as ``declared`` instead of ``uncovered``. Keys come back in the order given.

    Returns ``method`` (``gradient``, or ``perturbation`` when no gradient could be taken),
    ``checked`` (keys measured), ``uncovered``, ``declared``, ``unmeasurable`` (``{key,
    reason}``: integer tensors, keys the model has no tensor for, tensors the perturbation
    could not measure), ``input_sensitive`` and ``input_spread`` (the largest difference of
    the outputs between the two inputs; a NaN or Inf on one side only counts as sensitive),
    and ``perturbed`` (tensors measured by perturbation, e.g. BatchNorm statistics).

    >>> import torch
    >>> lin = torch.nn.Linear(2, 2)
    >>> cov = check_coverage(lin, ([torch.ones(1, 2)], {}), ([torch.zeros(1, 2)], {}), keys=["weight", "bias"])
    >>> cov["checked"], cov["uncovered"], cov["input_spread"] > 0
    (2, [], True)
    """
    import torch

    matchers = _compile(declared)
    found = _loaded_tensors(model, list(dict.fromkeys(keys)))
    pair = (inputs, other_inputs)
    with _preserved(model, [o for t in found.tensors for o in t.objects]):
        model.eval()
        method, outputs = "gradient", _gradient_pass(model, pair, output, found.tensors)
        if outputs is None:
            method = "perturbation"
            with torch.no_grad():
                outputs = [_leaves(_forward(model, one, output)) for one in pair]
        perturbed = _perturbation_pass(model, pair, output, outputs, found.tensors, atol, max_perturbations)
    spread, mismatched = _difference(*outputs)
    return _result(found, list(dict.fromkeys(keys)), matchers, method=method, perturbed=perturbed,
                   spread=spread, sensitive=mismatched or spread > atol)  # fmt: skip


def describe_coverage(cov: Mapping[str, Any]) -> str:
    """One line: how many tensors the outputs do not depend on, grouped as the report
    groups keys; the declared and unmeasurable ones; an input that changes nothing.

    >>> describe_coverage({"method": "gradient", "checked": 4, "uncovered": ["l.0.w", "l.1.w"], "declared": [],
    ...                    "unmeasurable": [], "input_sensitive": False, "input_spread": 0.0})
    'coverage (gradient): 2 of 4 tensor(s) do not influence the outputs: l.{0, 1}.w;
     the outputs do not depend on the input (spread 0 between two inputs)'
    >>> describe_coverage({"method": "gradient", "checked": 4, "uncovered": [], "declared": [], "unmeasurable": [],
    ...                    "input_sensitive": True, "input_spread": 0.5})
    'coverage (gradient): all 4 tensor(s) influence the outputs'
    """
    uncovered, declared = list(cov.get("uncovered", ())), list(cov.get("declared", ()))
    entries = [u if isinstance(u, Mapping) else {"key": str(u), "reason": ""} for u in cov.get("unmeasurable", ())]
    unmeasurable = [u["key"] for u in entries if not str(u.get("reason", "")).endswith(_INTEGER)]
    integers = len(entries) - len(unmeasurable)
    head = f"coverage ({cov.get('method')}): "
    if uncovered:
        parts = [f"{head}{len(uncovered)} of {cov.get('checked')} tensor(s) do not influence the outputs: {_grouped(uncovered)}"]
    else:
        parts = [f"{head}all {cov.get('checked')} tensor(s) influence the outputs"
                 if not declared else f"{head}{cov.get('checked')} tensor(s) checked, none uncovered but the declared"]  # fmt: skip
    if declared:
        parts.append(f"{len(declared)} declared uncovered (verify.uncovered): {_grouped(declared)}")
    if unmeasurable:
        parts.append(f"{len(unmeasurable)} unmeasurable: {_grouped(unmeasurable)}")
    if integers:
        parts.append(f"{integers} integer tensor(s) not measured")
    if not cov.get("input_sensitive", True):
        parts.append(f"the outputs do not depend on the input (spread {cov.get('input_spread', 0.0):.3g} between two inputs)")
    return "; ".join(parts)


def _grouped(keys: list[str]) -> str:
    groups = [g.text for g in fold_keys(keys, numbered=True)]
    more = f" and {len(groups) - _SHOWN_GROUPS} more group(s)" if len(groups) > _SHOWN_GROUPS else ""
    return ", ".join(groups[:_SHOWN_GROUPS]) + more


def _compile(patterns: Iterable[str]) -> list[Any]:
    compiled = []
    for p in patterns:
        try:
            compiled.append(compile_regex(p))
        except PatternError as exc:
            raise RulesError(f"verify.uncovered: {exc}") from None
    return compiled


def _result(found: _Found, keys: list[str], matchers: list[Any], *, method: str, perturbed: int, spread: float,
            sensitive: bool) -> dict[str, Any]:  # fmt: skip
    state: dict[str, _Tensor] = {n: t for t in found.tensors for n in t.names}
    uncovered, declared, unmeasurable, checked = [], [], [], 0
    for key in keys:
        tensor = state.get(key)
        reason = found.unmeasurable.get(key) or (tensor.reason if tensor else None)
        if reason is not None:
            unmeasurable.append({"key": key, "reason": reason})
            continue
        checked += 1
        if tensor is not None and not tensor.covered:
            (declared if any(m.search(key) for m in matchers) else uncovered).append(key)
    return {"method": method, "checked": checked, "uncovered": uncovered, "declared": declared, "unmeasurable": unmeasurable,
            "input_sensitive": bool(sensitive), "input_spread": float(spread), "perturbed": perturbed}  # fmt: skip


# --------------------------------------------------------------------------- the tensors


def _loaded_tensors(model: Any, keys: list[str]) -> _Found:
    """The loaded floating tensors, one entry per storage; the other keys with their reason."""
    import torch

    named: dict[str, tuple[Any, bool]] = {n: (p, True) for n, p in model.named_parameters(remove_duplicate=False)}
    named.update({n: (b, False) for n, b in model.named_buffers(remove_duplicate=False) if b is not None})
    found, by_storage = _Found(), {}
    for key in keys:
        if key not in named:
            found.unmeasurable[key] = "not a parameter or buffer of the target (written by the module's own state_dict code)"
            continue
        tensor, is_param = named[key]
        reason = _unmeasurable_reason(tensor, torch)
        if reason:
            found.unmeasurable[key] = reason
            continue
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()),
                 tensor.dtype, str(tensor.device))  # fmt: skip
        entry = by_storage.get(where)
        if entry is None:
            entry = by_storage[where] = _Tensor([tensor], [], is_param, len(found.tensors))
            found.tensors.append(entry)
        elif not any(o is tensor for o in entry.objects):
            entry.objects.append(tensor)
            entry.is_parameter = entry.is_parameter and is_param
        entry.names.append(key)
    # Every name of a measured tensor takes part, loaded or not: a name that is not loaded is not reported.
    return found


def _unmeasurable_reason(tensor: Any, torch: Any) -> str | None:
    if not tensor.is_floating_point():
        return f"{str(tensor.dtype).removeprefix('torch.')} tensor{_INTEGER}"
    if tensor.device.type == "meta":
        return "on the meta device: it holds no values"
    if tensor.numel() == 0:
        return "empty: it holds no values"
    return None


@contextmanager
def _preserved(model: Any, tensors: list[Any]) -> Any:
    """Give back every submodule's training flag and every tensor's ``requires_grad``."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(t, t.requires_grad) for t in tensors]
    try:
        yield
    finally:
        for t, flag in flags:
            if t.requires_grad != flag:
                t.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


# --------------------------------------------------------------------------- running the model


def _clone(value: Any) -> Any:
    import torch

    return value.clone() if isinstance(value, torch.Tensor) else value


def _forward(model: Any, inputs: Inputs, output: Any) -> Any:
    """The selected outputs on ``inputs`` (cloned: a model may write into its input)."""
    args, kwargs = inputs
    try:
        out = model(*[_clone(a) for a in args], **{k: _clone(v) for k, v in kwargs.items()})
    except Exception as exc:  # the user's model raising on the verify input
        raise UsageError(f"verify coverage: the target model failed on the verify input: {type(exc).__name__}: {exc}") from None
    return select_output(out, output, "target")


def _leaves(value: Any) -> list[Any]:
    return [t for _, t in tensor_leaves(value)]

def _projection(leaves: list[Any]) -> Any:
    """A fixed seeded random projection of every differentiable output tensor, summed;
    ``None`` when no output carries a gradient. Non-finite positions are left out."""
    import torch

    total = None
    for index, leaf in enumerate(leaves):
        if not leaf.is_floating_point() or not leaf.requires_grad:
            continue
        weights = torch.randn(tuple(leaf.shape), generator=torch.Generator().manual_seed(_PROJECTION_SEED + index))
        finite = torch.isfinite(leaf.detach())
        term = (torch.where(finite, leaf, torch.zeros((), dtype=leaf.dtype, device=leaf.device)).float()
                * weights.to(leaf.device)).sum()  # fmt: skip
        total = term if total is None else total + term
    return total


def _gradient_pass(model: Any, pair: tuple[Inputs, Inputs], output: Any, tensors: list[_Tensor]) -> list[list[Any]] | None:
    """Mark the tensors the gradient finds covered, at both inputs; the detached outputs,
    or ``None`` when no gradient could be taken. All floating tensors first; when the model
    refuses that (BatchNorm's running statistics), the parameters only."""
    for subset in (tensors, [t for t in tensors if t.is_parameter]):
        if not subset:
            continue
        try:
            outputs = _gradients(model, pair, output, subset)
        except _NoGradient:
            continue
        for t in subset:
            t.by_gradient = True
        return outputs
    return None


def _gradients(model: Any, pair: tuple[Inputs, Inputs], output: Any, subset: list[_Tensor]) -> list[list[Any]]:
    import torch

    objects = [o for t in subset for o in t.objects]
    try:
        for o in objects:
            o.requires_grad_(True)
    except RuntimeError as exc:  # an inference tensor
        raise _NoGradient(str(exc)) from None
    outputs, covered = [], set()
    try:
        with torch.enable_grad():
            for one in pair:
                leaves = _leaves(_forward_for_gradient(model, one, output))
                scalar = _projection(leaves)
                if scalar is None:
                    raise _NoGradient("the outputs carry no gradient")
                try:
                    grads = torch.autograd.grad(scalar, objects, allow_unused=True)
                except RuntimeError as exc:
                    raise _NoGradient(str(exc)) from None
                covered.update(id(o) for o, g in zip(objects, grads) if g is not None and _nonzero(g))
                outputs.append([leaf.detach() for leaf in leaves])
                del grads, scalar, leaves
    finally:
        for o in objects:
            o.requires_grad_(False)  # _preserved puts back what each had; plain for the perturbation
    for t in subset:
        t.covered = any(id(o) in covered for o in t.objects)
    return outputs


def _forward_for_gradient(model: Any, inputs: Inputs, output: Any) -> Any:
    try:
        return _forward(model, inputs, output)
    except UsageError as exc:  # may be autograd refusing (not differentiable in an argument): no_grad tells
        raise _NoGradient(str(exc)) from None


def _nonzero(grad: Any) -> bool:
    import torch

    if grad.is_sparse:
        grad = grad.coalesce().values()
    return bool(((grad != 0) & torch.isfinite(grad)).any())


def _perturbation_pass(model: Any, pair: tuple[Inputs, Inputs], output: Any, outputs: list[list[Any]],
                       tensors: list[_Tensor], atol: float, budget: int) -> int:  # fmt: skip
    """Perturb the tensors the gradient did not find covered; the number measured so.

    Those the gradient saw (and found uncovered) are perturbed all together first, as they
    are expected not to move the outputs: one pass confirms them all, and a group that
    moves splits in halves down to the tensors that do. Those the gradient never saw go
    one at a time.
    """
    import torch

    todo = [t for t in tensors if not t.covered]
    if not todo:
        return 0
    with torch.no_grad():
        noise, mismatched = _difference(outputs[0], _leaves(_forward(model, pair[0], output)))
        if mismatched or noise > atol:  # the outputs move by themselves: a perturbation cannot tell
            for t in todo:
                if not t.by_gradient:
                    t.reason = f"not measurable by perturbation: two identical runs differ by {noise:.3g} (atol {atol:g})"
            return 0
        confirm = [t for t in todo if t.by_gradient]
        queue = ([confirm] if confirm else []) + [[t] for t in todo if not t.by_gradient]
        left, measured = budget, set()
        while queue:
            group = queue.pop(0)
            if left < len(pair):
                for t in [t for g in [group, *queue] for t in g if not t.by_gradient]:
                    t.reason = f"not measured: the perturbation budget ({budget} forward passes) was spent"
                break
            moved, passes = _perturb(model, pair, output, outputs, group, atol)
            left -= passes
            if len(group) > 1 and moved:
                half = len(group) // 2
                queue[:0] = [group[:half], group[half:]]
                continue
            if len(group) == 1 and moved:
                group[0].covered = True
            measured.update(id(t) for t in group)
    return len(measured)


def _perturb(model: Any, pair: tuple[Inputs, Inputs], output: Any, outputs: list[list[Any]], group: list[_Tensor],
             atol: float) -> tuple[bool, int]:  # fmt: skip
    """Add seeded noise to every tensor of ``group`` in place, run at each input until the
    outputs move beyond ``atol``, restore bit for bit; whether they moved, and the passes run.
    A model that fails with one tensor perturbed makes that tensor unmeasurable."""
    saved = [t.objects[0].detach().clone() for t in group]
    passes = 0
    try:
        for t, values in zip(group, saved):
            t.objects[0].add_(_noise(values, t.number))
        for one, base in zip(pair, outputs):
            passes += 1
            diff, mismatched = _difference(base, _leaves(_forward(model, one, output)))
            if mismatched or diff > atol:
                return True, passes
    except (UsageError, RuntimeError) as exc:  # the model failing on it; a tensor that refuses to be written
        if len(group) > 1:
            return True, max(passes, 1)  # split: find which one
        group[0].reason = f"the target fails with this tensor perturbed: {exc}"
    finally:
        for t, values in zip(group, saved):
            t.objects[0].copy_(values)
    return False, max(passes, 1)


def _noise(tensor: Any, number: int) -> Any:
    import torch

    values = tensor.float()
    finite = values[torch.isfinite(values)]
    rms = float(finite.square().mean().sqrt()) if finite.numel() else 0.0
    scale = PERTURBATION * (rms if rms > 0 else 1.0)
    noise = torch.randn(tuple(tensor.shape), generator=torch.Generator().manual_seed(_NOISE_SEED + number)) * scale
    return noise.to(device=tensor.device, dtype=tensor.dtype)


def _difference(a: list[Any], b: list[Any]) -> tuple[float, bool]:
    """Largest absolute difference where both are finite, and whether anything else differs
    (structure, shape, a NaN or Inf on one side only)."""
    import torch

    if len(a) != len(b):
        return 0.0, True
    largest, mismatched = 0.0, False
    for x, y in zip(a, b):
        if tuple(x.shape) != tuple(y.shape):
            return largest, True
        x, y = x.detach().double().cpu(), y.detach().double().cpu()
        both = torch.isfinite(x) & torch.isfinite(y)
        if both.any():
            largest = max(largest, float((x[both] - y[both]).abs().max()))
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        mismatched = mismatched or bool((~both & ~same).any())
    return largest, mismatched
