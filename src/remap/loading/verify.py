"""``verify``: run the source model and the loaded target on the same input, compare outputs.

The conversion scripts every model hub carries end with a hand-written ``allclose``; here it
is a section of the rules::

    verify:
      input: [1, 3, 224, 224]          # a seeded float tensor; or {ids: [1, 16], high: 1000}
      output: logits                   # which part of the outputs: a key, an attribute or an index
      atol: 1.0e-5

Several named inputs: ``input: {input_ids: {ids: [1, 16], high: 1000}, pixel_values: [1, 3, 32, 32]}``.
``output`` may differ per side: ``{source: logits, target: 0}``.

>>> spec = VerifySpec.parse({"input": {"ids": [1, 4], "high": 10}, "output": "logits"})
>>> spec.output
('logits', 'logits')
>>> make_inputs(spec)[0][0].dtype
torch.int64
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from ..rules.verify_spec import VERIFY_SCHEMA, VerifySpec

__all__ = ["VerifySpec", "VERIFY_SCHEMA", "make_inputs", "compare", "run_verify", "describe_failure", "tied_aliases",
           "load_source_weights"]  # fmt: skip


def make_inputs(spec: VerifySpec) -> tuple[list[Any], dict[str, Any]]:
    """The seeded inputs: floats from a normal distribution, token ids uniform in [low, high)."""
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    args, kwargs = [], {}
    for name, shape in spec.inputs:
        if isinstance(shape, Mapping):
            tensor = torch.randint(int(shape.get("low", 0)), int(shape["high"]), tuple(shape["ids"]), generator=g)
        else:
            tensor = torch.randn(tuple(shape), generator=g)
        (args.append(tensor) if name is None else kwargs.__setitem__(name, tensor))
    return args, kwargs


def _select(output: Any, selector: Any, side: str) -> Any:
    """The part of a model's output to compare: ``logits``, ``0``, ``hidden_states.2``."""
    if selector is None:
        return output
    for part in str(selector).split(".") if isinstance(selector, str) else [selector]:
        output = _step_into(output, part, selector, side)
    return output


def _step_into(output: Any, part: Any, selector: Any, side: str) -> Any:
    if isinstance(part, str) and part.lstrip("-").isascii() and part.lstrip("-").isdigit() and not isinstance(output, Mapping):
        part = int(part)
    try:
        if isinstance(part, int):
            return output[part]
        if isinstance(output, Mapping):
            return output[part]
        return getattr(output, part)
    except (KeyError, IndexError, AttributeError, TypeError):
        raise UsageError(
            f"verify.output: the {side} model's output has no {part!r} (selector {selector!r}); "
            f"it is a {type(output).__name__}{_keys_of(output)}"
        ) from None


def _keys_of(output: Any) -> str:
    if isinstance(output, Mapping):
        return f" with keys {', '.join(map(str, output.keys()))}"
    if isinstance(output, (tuple, list)):
        return f" of {len(output)} items"
    return ""


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


def run_verify(spec: VerifySpec, source_model: Any, target_model: Any) -> dict[str, Any]:
    """Run both models in eval mode, without gradients, on the same seeded inputs; compare."""
    import torch

    args, kwargs = make_inputs(spec)
    outputs = []
    for side, model in (("source", source_model), ("target", target_model)):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(*[a.clone() for a in args], **{k: v.clone() for k, v in kwargs.items()})
        except Exception as exc:  # the user's model raising on the declared input
            raise UsageError(f"verify: the {side} model failed on the verify input: {type(exc).__name__}: {exc}") from None
        finally:
            model.train(was_training)
        outputs.append(_select(out, spec.output[0 if side == "source" else 1], side))
    result = compare(*outputs, atol=spec.atol, rtol=spec.rtol)
    return {**result, "atol": spec.atol, "rtol": spec.rtol, "input": dict(spec.raw).get("input"), "output": list(spec.output)}


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


def tied_aliases(module: Any) -> dict[str, str]:
    """Name -> first name, for every parameter that ``module`` holds under several names
    (one and the same Parameter object, as tied embeddings are); first names are left out.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    >>> m[1].weight = m[0].weight
    >>> tied_aliases(m)
    {'1.weight': '0.weight'}
    """
    first: dict[int, str] = {}
    out = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        seen = first.setdefault(id(param), name)
        if seen != name:
            out[name] = seen
    return out


def load_source_weights(model: Any, source: Any, *, what: str) -> dict[str, str]:
    """Load every tensor of ``source`` (a :class:`~remap.sources.readers.Source`) into ``model``, strictly
    but for tied parameters: a checkpoint that holds a tied parameter under one of its names
    (``save_pretrained`` writes ``transformer.wte.weight``, not the ``lm_head.weight`` tied to
    it) loads it, and copies under several names must be equal. Any other missing or
    unexpected key is a UsageError naming them, raised before a tensor is read.

    ``what`` describes the two sides for messages. Returns the aliases the source left out,
    each with the name it was loaded under.
    """
    import torch

    aliases = tied_aliases(model)
    held = set(source.meta)
    groups: dict[str, list[str]] = {}
    for alias, first in aliases.items():
        groups.setdefault(first, [first]).append(alias)
    excused = {}
    for names in groups.values():
        present = [n for n in names if n in held]
        excused.update({n: present[0] for n in names if present and n not in held})
    expected = [k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)]
    _fail_on_keys(what, [k for k in expected if k not in held and k not in excused], sorted(held - set(expected)), aliases)
    _check_tied_copies(what, source, [[n for n in names if n in held] for names in groups.values()])
    result = model.load_state_dict({k: source.read(k) for k in source.meta}, strict=False)
    _fail_on_keys(what, [k for k in result.missing_keys if k not in excused], list(result.unexpected_keys), aliases)
    return excused


def _fail_on_keys(what: str, missing: list[str], unexpected: list[str], aliases: Mapping[str, str]) -> None:
    if not missing and not unexpected:
        return
    parts = [f"{len(keys)} {label} key(s): {_some(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    tied = f" (tied parameters, which may be saved under one name: {_some([f'{a} = {b}' for a, b in aliases.items()])})" if aliases else ""
    raise UsageError(f"verify: the source weights do not load strictly into {what}: {'; '.join(parts)}{tied}; "
                     "source.model must build the architecture the checkpoint was saved from")  # fmt: skip


def _check_tied_copies(what: str, source: Any, copies: list[list[str]]) -> None:
    """Copies of one tied parameter that a checkpoint holds under several names must agree."""
    import torch

    for names in (c for c in copies if len(c) > 1):
        first = source.read(names[0])
        differ = [n for n in names[1:] if not torch.equal(source.read(n), first)]
        if differ:
            raise UsageError(f"verify: the source weights do not load into {what}: {names[0]} and {', '.join(differ)} are one tied "
                             "parameter there, but the checkpoint holds different tensors under these names")  # fmt: skip


def _some(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
