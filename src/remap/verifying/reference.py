"""Recorded references: a model's inputs and outputs in one safetensors file, for a target to
be verified against when the source model cannot run here (a Keras, ONNX, TensorFlow or JAX
original) or is not at hand.

The file holds the inputs as ``input.0``, ``input.1``, ... (positional) and ``input.NAME``
(keyword), the outputs flattened as ``output`` (one tensor) or ``output.PATH`` with the leaf
paths :func:`~remap.verifying.compare.compare` names (``output.logits``, ``output[0]``,
``output.hidden_states[2]``), and as metadata the outputs' structure (``remap.structure``,
JSON: dicts, tuples and lists of tensors, so that ``verify.output`` selects in a recorded
reference as in a live model's output) and the settings it was recorded with
(``remap.settings``, JSON: seed, input, dtype, model, remap version, framework).

>>> import torch, tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "ref.safetensors")
>>> write_reference(path, inputs=([torch.ones(1, 3)], {}), outputs={"logits": torch.zeros(1, 2)}, settings={"framework": "torch"})
>>> ref = read_reference(path)
>>> ref.args[0].shape, list(ref.outputs), ref.settings["framework"]
(torch.Size([1, 3]), ['logits'], 'torch')
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SourceError, UsageError

if TYPE_CHECKING:
    from ..rules.verify_spec import VerifySpec

__all__ = ["Reference", "write_reference", "read_reference", "verify_against_reference", "output_leaves"]

FORMAT = "remap.reference"  # metadata key: the layout's version
STRUCTURE = "remap.structure"  # metadata key: the outputs' structure, JSON
SETTINGS = "remap.settings"  # metadata key: how the reference was recorded, JSON
HINT = "write one with `remap verify RULES.yaml --record REF` or remap.verifying.reference.write_reference (docs/verify.md)"


@dataclass(frozen=True)
class Reference:
    """A recorded reference: the inputs (``args``, ``kwargs``), the outputs rebuilt in their
    structure (dicts, tuples and lists of tensors) and the settings they were recorded with."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    outputs: Any
    settings: Mapping[str, Any] = field(default_factory=dict)
    path: str = ""

    def input_shapes(self) -> dict[str, list[int]]:
        """Each input's name (``0``, ``1`` for positional ones) and shape, for the report.

        >>> import torch
        >>> Reference((torch.ones(1, 3),), {"mask": torch.ones(1)}, None).input_shapes()
        {'0': [1, 3], 'mask': [1]}
        """
        named = {str(n): a for n, a in enumerate(self.args)} | dict(self.kwargs)
        return {name: list(t.shape) for name, t in named.items()}


# ---------------------------------------------------------------------------- writing


def write_reference(path: str | os.PathLike[str], *, inputs: Any, outputs: Any, settings: Mapping[str, Any]) -> None:
    """Write ``inputs`` and ``outputs`` to one safetensors file at ``path``, atomically.

    ``inputs`` is ``(args, kwargs)`` (a list and a mapping), or for short a list of positional
    inputs, a mapping of named inputs, or one array. ``outputs`` is a tensor or array, or dicts,
    tuples and lists of them. Tensors may be torch tensors, NumPy arrays or anything NumPy reads
    (a JAX array, a Keras output), so that a recipe in another framework is a few lines::

        write_reference("ref.safetensors", inputs=[x], outputs=model.predict(x), settings={"framework": "keras"})

    ``settings`` (seed, input, dtype, model, framework: what a reader needs to know how it
    was made) is stored as JSON with remap's version added.
    """
    from ..loading.saving import atomic_path

    args, kwargs = _split_inputs(inputs)
    tensors = {f"input.{n}": _tensor(a, f"input {n}") for n, a in enumerate(args)}
    tensors.update({f"input.{k}": _tensor(v, f"input {k}") for k, v in kwargs.items()})
    leaves: dict[str, Any] = {}
    structure = _structure(outputs, "", leaves)
    if not leaves:
        raise UsageError(f"write_reference: the outputs hold no tensor (found {type(outputs).__name__})")
    if not tensors:
        raise UsageError("write_reference: no inputs given; a reference needs the inputs the outputs came from")
    tensors.update(leaves)
    metadata = {FORMAT: "1", STRUCTURE: json.dumps(structure), SETTINGS: json.dumps(_settings(settings))}
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _split_inputs(inputs: Any) -> tuple[list[Any], dict[str, Any]]:
    if isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[0], (list, tuple)) and isinstance(inputs[1], Mapping):
        return list(inputs[0]), {str(k): v for k, v in inputs[1].items()}
    if isinstance(inputs, Mapping):
        return [], {str(k): v for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return list(inputs), {}
    return [inputs], {}


def _tensor(value: Any, what: str) -> Any:
    """A contiguous CPU torch tensor of its own (safetensors refuses shared memory)."""
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone().contiguous()
    try:
        array = np.array(value, copy=True)
    except Exception as exc:  # an object NumPy cannot read
        raise UsageError(f"write_reference: {what} is a {type(value).__name__}, not a tensor or array ({exc})") from None
    if array.dtype == object or array.dtype.kind not in "biuf":
        raise UsageError(f"write_reference: {what} is a {type(value).__name__} of dtype {array.dtype}, not numbers")
    return torch.from_numpy(np.ascontiguousarray(array))


def _is_tensor_like(value: Any) -> bool:
    import torch

    return isinstance(value, torch.Tensor) or (hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype"))


def _structure(value: Any, path: str, leaves: dict[str, Any]) -> Any:
    """The JSON form of ``value``'s structure; its tensors go into ``leaves`` under their file
    names. Leaf paths are compare()'s: ``logits``, ``[0]``, ``hidden_states[2]``."""
    if _is_tensor_like(value):
        name = tensor_name(path)
        leaves[name] = _tensor(value, f"output {path or 'output'}")
        return {"tensor": name, "shape": list(leaves[name].shape), "dtype": str(leaves[name].dtype).removeprefix("torch.")}
    if isinstance(value, Mapping):
        return {"dict": [[str(k), _structure(v, f"{path}.{k}" if path else str(k), leaves)] for k, v in value.items()]}
    if isinstance(value, (tuple, list)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_structure(v, f"{path}[{n}]", leaves) for n, v in enumerate(value)]}
    return {"none": None}  # not a tensor: compare() skips it too


def tensor_name(path: str) -> str:
    """The file's name for an output leaf path: ``output``, ``output.logits``, ``output[0]``.

    >>> tensor_name(""), tensor_name("logits"), tensor_name("[0]")
    ('output', 'output.logits', 'output[0]')
    """
    return "output" if not path else ("output" + path if path.startswith("[") else f"output.{path}")


def output_leaves(outputs: Any) -> dict[str, list[int]]:
    """Each output tensor's file name and shape, in order (for a summary of what was recorded).

    >>> import torch
    >>> output_leaves((torch.ones(2), {"a": torch.ones(1, 3)}))
    {'output[0]': [2], 'output[1].a': [1, 3]}
    """
    leaves: dict[str, Any] = {}
    _structure(outputs, "", leaves)
    return {name: list(t.shape) for name, t in leaves.items()}


def _settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    from .. import __version__

    try:
        json.dumps(dict(settings))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"write_reference: settings must be JSON values (strings, numbers, lists, mappings): {exc}") from None
    return {**dict(settings), "remap": __version__}


# ---------------------------------------------------------------------------- reading


def read_reference(path: str | os.PathLike[str]) -> Reference:
    """The reference recorded at ``path``; a :class:`~remap.errors.SourceError` naming the file
    when it is not a safetensors file, holds no inputs or outputs, or its metadata is broken.

    A file written without ``remap.structure`` (by hand, with safetensors alone) is read too:
    its one tensor ``output`` is the output, else its ``output.PATH`` tensors make a dict by PATH.
    """
    from ..files import file_kind, require_regular

    where = str(path)
    if file_kind(path) == "missing":
        raise SourceError(f"no such file: the reference to verify against; {HINT}", where=where)
    require_regular(path, error=SourceError, what="a reference")
    metadata, tensors = _open(path)
    if metadata.get(FORMAT, "1") != "1":
        raise SourceError(f"reference layout version {metadata[FORMAT]!r}; this remap reads version '1'", where=where)
    args, kwargs, outputs = _sort_tensors(tensors, where)
    settings = _json(metadata, SETTINGS, where, default={})
    if not isinstance(settings, dict):
        raise SourceError(f"metadata {SETTINGS!r} is a JSON {type(settings).__name__}, expected an object", where=where)
    structure = _json(metadata, STRUCTURE, where, default=None)
    rebuilt = _default_structure(outputs) if structure is None else _rebuild(structure, outputs, where, set())
    return Reference(tuple(args), kwargs, rebuilt, settings, where)


def _open(path: str | os.PathLike[str]) -> tuple[dict[str, str], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a handle, not a dict)
    except Exception as exc:  # SafetensorError, or torch refusing a dtype: the file is not what a reference is
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceError(f"not a safetensors file ({reason}); a reference is a safetensors file of inputs and outputs: {HINT}",
                          where=str(path)) from None  # fmt: skip


def _sort_tensors(tensors: Mapping[str, Any], where: str) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """(positional inputs in order, keyword inputs, output tensors by file name)."""
    positional: dict[int, Any] = {}
    kwargs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    for name, tensor in tensors.items():
        if name.startswith("input."):
            part = name.removeprefix("input.")
            (positional.__setitem__(int(part), tensor) if part.isascii() and part.isdigit() else kwargs.__setitem__(part, tensor))
        elif name == "output" or name.startswith(("output.", "output[")):
            outputs[name] = tensor
        else:
            raise SourceError(f"holds the tensor {name!r}, which is neither an input (input.0, input.NAME) nor an output "
                              "(output, output.PATH)", where=where)  # fmt: skip
    missing = [f"input.{n}" for n in range(len(positional)) if n not in positional]
    if missing:
        raise SourceError(f"positional inputs {sorted(f'input.{n}' for n in positional)} skip {', '.join(missing)}; "
                          "they are numbered from input.0 without gaps", where=where)  # fmt: skip
    found = ", ".join(list(tensors)[:8]) or "no tensors"
    if not positional and not kwargs:
        raise SourceError(f"no input tensors (input.0, input.NAME): the inputs the outputs came from; found {found}", where=where)
    if not outputs:
        raise SourceError(f"no output tensors (output, output.PATH): the outputs to compare with; found {found}", where=where)
    return [positional[n] for n in range(len(positional))], kwargs, outputs


def _json(metadata: Mapping[str, str], key: str, where: str, *, default: Any) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise SourceError(f"metadata {key!r} is not valid JSON ({exc})", where=where) from None
    except RecursionError:  # "[[[[...": deeper than Python's JSON reader goes
        raise SourceError(f"metadata {key!r} is nested deeper than JSON can be read here", where=where) from None


def _default_structure(outputs: dict[str, Any]) -> Any:
    """No structure recorded: the one ``output`` tensor, else a dict of the leaves by path."""
    if list(outputs) == ["output"]:
        return outputs["output"]
    return {name.removeprefix("output").removeprefix("."): t for name, t in outputs.items()}


def _rebuild(node: Any, outputs: Mapping[str, Any], where: str, seen: set[str], top: bool = True) -> Any:
    """The outputs in the structure ``node`` describes; every output tensor is placed once and
    has the recorded shape."""
    rebuilt = _rebuild_node(node, outputs, where, seen)
    if top and set(outputs) - seen:
        extra = ", ".join(sorted(set(outputs) - seen))
        raise SourceError(f"the output tensor(s) {extra} are not in the structure that metadata {STRUCTURE!r} describes", where=where)
    return rebuilt


#: How deep an output structure may nest (a model's outputs are a few levels: dicts of tuples of tensors).
MAX_DEPTH = 32


def _rebuild_node(node: Any, outputs: Mapping[str, Any], where: str, seen: set[str], depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise SourceError(f"metadata {STRUCTURE!r} nests deeper than {MAX_DEPTH} levels; a model's outputs do not", where=where)
    if not isinstance(node, dict):
        raise _bad_node(node, where)
    if "tensor" in node:
        return _placed(node, outputs, where, seen)
    if "dict" in node and isinstance(node["dict"], list) and all(isinstance(p, list) and len(p) == 2 for p in node["dict"]):
        return {str(k): _rebuild_node(v, outputs, where, seen, depth + 1) for k, v in node["dict"]}
    for kind, build in (("tuple", tuple), ("list", list)):
        if kind in node and isinstance(node[kind], list):
            return build(_rebuild_node(v, outputs, where, seen, depth + 1) for v in node[kind])
    if "none" in node:
        return None
    raise _bad_node(node, where)


def _placed(node: Mapping[str, Any], outputs: Mapping[str, Any], where: str, seen: set[str]) -> Any:
    name, shape = node.get("tensor"), node.get("shape")
    if not isinstance(name, str) or not isinstance(shape, list):
        raise _bad_node(node, where)
    if name not in outputs:
        raise SourceError(f"metadata {STRUCTURE!r} names the output tensor {name!r}, which the file does not hold "
                          f"(it holds {', '.join(outputs)})", where=where)  # fmt: skip
    if name in seen:
        raise SourceError(f"metadata {STRUCTURE!r} places the output tensor {name!r} twice", where=where)
    seen.add(name)
    found = list(outputs[name].shape)
    if found != shape:
        raise SourceError(f"the output tensor {name!r} has shape {found}, but metadata {STRUCTURE!r} says {shape}", where=where)
    return outputs[name]


def _bad_node(node: Any, where: str) -> SourceError:
    text = json.dumps(node)
    text = text if len(text) <= 80 else text[:77] + "..."
    return SourceError(f"metadata {STRUCTURE!r}: expected {{\"tensor\": NAME, \"shape\": [...], \"dtype\": ...}}, "
                       f"{{\"dict\": [[KEY, ...], ...]}}, {{\"tuple\": [...]}}, {{\"list\": [...]}} or {{\"none\": null}}; "
                       f"found {text}", where=where)  # fmt: skip


# ---------------------------------------------------------------------------- verifying


def verify_against_reference(spec: VerifySpec | None, target_model: Any, path: str | os.PathLike[str], *,
                             records: Any = None) -> dict[str, Any]:  # fmt: skip
    """Run ``target_model`` (eval mode, no gradients) on the recorded inputs and compare its
    output (``verify.output``'s target selector) with the recorded one (its source selector:
    the reference stands for the source model), as :func:`~remap.verifying.run.run_verify`
    does with a source model: tolerances for the lower precision, metrics, coverage. Returns
    its dict, with ``reference`` (the path) and ``outcome``.
    """
    from ..rules.verify_spec import VerifySpec as _Spec
    from .run import run_verify

    ref = read_reference(path)
    return run_verify(spec if spec is not None else _Spec.parse({"reference": str(path)}), None, target_model, reference=ref,
                      records=records)  # fmt: skip


def _shapes(ref: Reference) -> str:
    return ", ".join(f"{name} {shape}" for name, shape in ref.input_shapes().items())


def reference_path(given: str | os.PathLike[str] | None, spec: Any, base_dir: str | None) -> Path | None:
    """The reference to verify against: ``given`` (relative to the working directory), else
    the rules' ``verify.reference`` (relative to the rules file's folder), else None.

    >>> str(reference_path(None, type("S", (), {"reference": "ref.safetensors"})(), "/rules"))
    '/rules/ref.safetensors'
    """
    if given is not None:
        return Path(given)
    written = getattr(spec, "reference", None)
    if written is None:
        return None
    path = Path(written)
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path
