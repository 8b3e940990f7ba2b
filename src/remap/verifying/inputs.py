"""The verify input, made the same for both models: seeded floats or token ids, and the
part of each model's output to compare (``verify.output``).

>>> from remap.rules.verify_spec import VerifySpec
>>> spec = VerifySpec.parse({"input": {"ids": [1, 4], "high": 10}, "output": "logits"})
>>> make_inputs(spec)[0][0].dtype
torch.int64
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UsageError
from ..rules.verify_spec import VerifySpec

__all__ = ["make_inputs", "select_output"]


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


def select_output(output: Any, selector: Any, side: str) -> Any:
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


