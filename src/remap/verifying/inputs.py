"""The verify input, made the same for both models: seeded floats or token ids, or the
tensors of a file (``input: {file: sample.safetensors}``); each model then gets them on its
own device with floating inputs in its own dtype (:func:`place_inputs`); and the part of each
model's output to compare (``verify.output``).

>>> from remap.rules.verify_spec import VerifySpec
>>> spec = VerifySpec.parse({"input": {"ids": [1, 4], "high": 10}, "output": "logits"})
>>> make_inputs(spec)[0][0].dtype
torch.int64
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..rules.verify_spec import VerifySpec

__all__ = ["make_inputs", "inputs_from_file", "place_inputs", "model_dtype", "model_device", "select_output"]


def make_inputs(spec: VerifySpec, *, seed: int | None = None,
                base_dir: str | os.PathLike[str] | None = None) -> tuple[list[Any], dict[str, Any]]:  # fmt: skip
    """The inputs: the file's tensors when ``verify.input`` names a file (relative to
    ``base_dir``, the rules file's folder), else seeded ones (``seed``, default the spec's
    first): floats from a normal distribution, token ids uniform in [low, high). Made on the CPU,
    so a seed gives the same input whatever device the models run on.

    >>> spec = VerifySpec.parse({"input": [2, 3]})
    >>> bool((make_inputs(spec, seed=1)[0][0] == make_inputs(spec, seed=1)[0][0]).all())
    True
    """
    import torch

    if spec.input_file is not None:
        return inputs_from_file(spec.input_file, base_dir=base_dir)
    g = torch.Generator().manual_seed(spec.seed if seed is None else seed)
    args, kwargs = [], {}
    for name, shape in spec.inputs:
        if isinstance(shape, Mapping):
            tensor = torch.randint(int(shape.get("low", 0)), int(shape["high"]), tuple(shape["ids"]), generator=g)
        else:
            tensor = torch.randn(tuple(shape), generator=g)
        (args.append(tensor) if name is None else kwargs.__setitem__(name, tensor))
    return args, kwargs


def inputs_from_file(path: str | os.PathLike[str], *, base_dir: str | os.PathLike[str] | None = None) -> tuple[list[Any], dict[str, Any]]:
    """Every tensor of the file (safetensors, or any format :func:`remap.sources.readers.open_source`
    reads without running code): one named ``0``, ``1``, ... is a positional input (numbered from 0
    with no gap), any other name a keyword input.

    A file that cannot be read is a SourceError naming it; one that holds no tensor, or
    positional numbers with a gap, a UsageError saying what was found.
    """
    from ..sources.readers import open_source

    where = Path(path).expanduser()
    if not where.is_absolute() and base_dir is not None:
        where = Path(base_dir) / where
    src = open_source(where)  # a Path: never a hub name or a factory
    try:
        tensors = {name: src.read(name) for name in src.meta}
    finally:
        src.close()
    if not tensors:
        raise UsageError(f"verify.input.file: {where} holds no tensor; expected the inputs, named by input name or 0, 1, ... for positional ones")
    numbered = sorted(int(n) for n in tensors if n.isascii() and n.isdigit())
    if numbered != list(range(len(numbered))):
        raise UsageError(f"verify.input.file: {where}: positional inputs must be named 0, 1, ... with no gap; found {numbered}")
    args = [tensors[str(n)] for n in numbered]
    return args, {k: v for k, v in tensors.items() if not (k.isascii() and k.isdigit())}


def model_dtype(model: Any) -> Any:
    """The dtype of the model's first floating parameter (or buffer); float32 when it has none.

    >>> import torch
    >>> model_dtype(torch.nn.Linear(2, 2).to(torch.bfloat16))
    torch.bfloat16
    """
    import torch

    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def model_device(model: Any) -> Any:
    """The device of the model's first parameter (or buffer); cpu when it has none.

    >>> import torch
    >>> model_device(torch.nn.Linear(2, 2))
    device(type='cpu')
    """
    import torch

    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def place_inputs(args: list[Any], kwargs: dict[str, Any], model: Any) -> tuple[list[Any], dict[str, Any]]:
    """Copies of the inputs for ``model``: on its device, floating ones in its dtype (a bf16
    target gets bf16 inputs), integer ones (token ids, masks) as they are.

    >>> import torch
    >>> args, _ = place_inputs([torch.ones(2), torch.ones(2, dtype=torch.int64)], {}, torch.nn.Linear(2, 2).half())
    >>> [a.dtype for a in args]
    [torch.float16, torch.int64]
    """
    dtype, device = model_dtype(model), model_device(model)

    def place(t: Any) -> Any:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype, copy=True)

    return [place(a) for a in args], {k: place(v) for k, v in kwargs.items()}


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
