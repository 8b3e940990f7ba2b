"""What an ONNX graph and a target's forward pass say about keys whose names say nothing.

Exported ONNX initializers are often named after the graph (``onnx::Conv_123``,
``onnx::MatMul_45``), so names cannot pair them with a module's keys. Two other things can:

* the **role** an initializer plays in the node that reads it: input 1 of a ``Conv`` is a
  convolution's ``weight``, input 2 its ``bias``; input 1 of ``MatMul`` is a linear layer's
  weight stored as (in, out), the transpose of torch's; inputs 1 to 4 of
  ``BatchNormalization`` are ``weight``, ``bias``, ``running_mean``, ``running_var``
  (:data:`ROLES`);
* the **order** in which the graph reads them, against the order in which the target's
  forward pass calls the modules that hold its keys (the target run once on meta input of
  the graph's input shapes, with hooks). Definition order (the order a module registers its
  parameters) is never used: a library may declare modules in any order.

:func:`graph_evidence` reads the first from an ONNX source (the reader's consumers, and the
graph's inputs and ``Gemm`` attributes by a bounded protobuf scan that seeks past tensor
data); :func:`forward_evidence` reads the second from a module.

>>> ROLES[("BatchNormalization", 3)]
('batchnorm', 'running_mean')
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["ROLES", "Role", "GraphEvidence", "ForwardEvidence", "graph_evidence", "forward_evidence", "module_families"]

#: (ONNX op type, input index) -> (family, torch leaf name) of the parameter read there.
#: ``Gemm`` input 1 is (out, in) with ``transB=1`` (what torch exports), else (in, out);
#: ``MatMul`` input 1 is (in, out); an ``Add`` reading a 1-d initializer and a ``MatMul``
#: output is that linear layer's bias (see :func:`_role`).
ROLES: dict[tuple[str, int], tuple[str, str]] = {
    ("Conv", 1): ("conv", "weight"), ("Conv", 2): ("conv", "bias"),
    ("ConvTranspose", 1): ("convtranspose", "weight"), ("ConvTranspose", 2): ("convtranspose", "bias"),
    ("Gemm", 1): ("linear", "weight"), ("Gemm", 2): ("linear", "bias"),
    ("MatMul", 1): ("linear", "weight"),
    ("BatchNormalization", 1): ("batchnorm", "weight"), ("BatchNormalization", 2): ("batchnorm", "bias"),
    ("BatchNormalization", 3): ("batchnorm", "running_mean"), ("BatchNormalization", 4): ("batchnorm", "running_var"),
    ("InstanceNormalization", 1): ("instancenorm", "weight"), ("InstanceNormalization", 2): ("instancenorm", "bias"),
    ("LayerNormalization", 1): ("layernorm", "weight"), ("LayerNormalization", 2): ("layernorm", "bias"),
    ("GroupNormalization", 1): ("groupnorm", "weight"), ("GroupNormalization", 2): ("groupnorm", "bias"),
    ("Gather", 0): ("embedding", "weight"),
}  # fmt: skip

#: ONNX op type -> the family of modules an exporter may fold away (a BatchNorm after a
#: convolution, in eval mode with constant folding). Not LayerNorm and the like: an opset
#: without their op spells them out in Mul and Add nodes, which still read their parameters.
_FOLDABLE = {"BatchNormalization": "batchnorm"}

#: ONNX elem_type -> torch dtype name, for the graph's inputs.
_INPUT_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
                 11: "float64", 16: "bfloat16"}  # fmt: skip

#: Most graph inputs, and most dims of one, that the scan keeps (a model has a handful).
_MAX_INPUTS, _MAX_DIMS = 64, 16
#: Largest number of elements of one input the target is run on (meta tensors hold none,
#: but a target built for real gets zeros of this size at most).
_MAX_INPUT_NUMEL = 1 << 26


@dataclass(frozen=True)
class Role:
    """What an initializer is to the node(s) reading it: ``family`` and torch ``leaf`` name,
    whether it is stored ``transposed`` against torch's layout, and the first reader."""

    family: str
    leaf: str
    transposed: bool
    op: str
    node: str
    slot: int

    def describe(self) -> str:
        """``input 1 of Conv /conv1/Conv``."""
        return f"input {self.slot} of {self.op} {self.node or '(unnamed node)'}"

    def what(self) -> str:
        """``Conv weight``, ``MatMul weight (stored (in, out))``."""
        return f"{self.op} {self.leaf}" + (" (stored (in, out))" if self.transposed else "")


@dataclass(frozen=True)
class GraphEvidence:
    """An ONNX source's evidence: ``order`` (key -> place in the graph's order of first use),
    ``roles`` (key -> :class:`Role`, None when its readers' ops are not in :data:`ROLES` or
    disagree), the graph's ``inputs`` ((name, dtype, dims), a dim None when symbolic) and
    how many nodes of each op type it holds."""

    order: Mapping[str, int]
    roles: Mapping[str, Role | None]
    inputs: tuple[tuple[str, str, tuple[int | None, ...]], ...] = ()
    ops: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ForwardEvidence:
    """A target module's evidence: ``families`` (key -> the family of the module holding it,
    None when that module is not one :data:`ROLES` knows), ``order`` (key -> place of its
    module's first call in the forward pass; only keys of leaf modules that ran), ``ran``
    (family -> the modules of that family that ran, in order) and why it could not run."""

    families: Mapping[str, str | None]
    order: Mapping[str, int] = field(default_factory=dict)
    ran: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- the ONNX side


def _scan(path: Path) -> tuple[list[tuple[str, list[str], list[str], int | None]], list[tuple[str, str, tuple[int | None, ...]]]]:
    """Top-level nodes (op, inputs, outputs, Gemm transB) and graph inputs (name, dtype, dims)
    of an ONNX model, read with the ONNX reader's bounded scanner (tensor bytes are skipped)."""
    import os

    from ..sources.onnx_reader import _Scanner

    nodes: list[tuple[str, list[str], list[str], int | None]] = []
    inputs: list[tuple[str, str, tuple[int | None, ...]]] = []
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        s = _Scanner(f, size, str(path))
        for field_, wire in s.fields(size):
            if field_ != 7 or wire != 2:  # ModelProto.graph
                s.skip(wire, size)
                continue
            end = s.sub(size)
            for g, gw in s.fields(end):
                if g == 1 and gw == 2:  # node
                    nodes.append(_scan_node(s, s.sub(end)))
                elif g == 11 and gw == 2 and len(inputs) < _MAX_INPUTS:  # input
                    inputs.append(_scan_value_info(s, s.sub(end)))
                else:
                    s.skip(gw, end)
    return nodes, inputs


def _scan_node(s: Any, end: int) -> tuple[str, list[str], list[str], int | None]:
    op, ins, outs, trans_b = "", [], [], None
    for f, w in s.fields(end):
        if f == 1:
            ins.append(s.text(w, end, "a node input"))
        elif f == 2:
            outs.append(s.text(w, end, "a node output"))
        elif f == 4:
            op = s.text(w, end, "a node op_type")
        elif f == 5 and w == 2:  # AttributeProto: only transB is kept
            stop = s.sub(end)
            name, value = "", None
            for af, aw in s.fields(stop):
                if af == 1:
                    name = s.text(aw, stop, "an attribute name")
                elif af == 3 and aw == 0:
                    value = s.varint(stop)
                else:
                    s.skip(aw, stop)
            if name == "transB":
                trans_b = value
        else:
            s.skip(w, end)
    return op, ins, outs, trans_b


def _scan_value_info(s: Any, end: int) -> tuple[str, str, tuple[int | None, ...]]:
    name, dtype, dims = "", "", []
    for f, w in s.fields(end):
        if f == 1:
            name = s.text(w, end, "an input name")
        elif f == 2 and w == 2:  # TypeProto
            stop = s.sub(end)
            for tf, tw in s.fields(stop):
                if tf != 1 or tw != 2:  # tensor_type
                    s.skip(tw, stop)
                    continue
                t_end = s.sub(stop)
                for ef, ew in s.fields(t_end):
                    if ef == 1 and ew == 0:
                        dtype = _INPUT_DTYPES.get(s.varint(t_end), "")
                    elif ef == 2 and ew == 2:  # TensorShapeProto
                        sh_end = s.sub(t_end)
                        for df, dw in s.fields(sh_end):
                            if df != 1 or dw != 2:
                                s.skip(dw, sh_end)
                                continue
                            d_end = s.sub(sh_end)
                            value = None
                            for vf, vw in s.fields(d_end):
                                if vf == 1 and vw == 0:
                                    value = s.varint(d_end)
                                else:
                                    s.skip(vw, d_end)
                            if len(dims) < _MAX_DIMS:
                                dims.append(value if value is not None and value < 1 << 62 else None)
                    else:
                        s.skip(ew, t_end)
        else:
            s.skip(w, end)
    return name, dtype, tuple(dims)


def _role(key: str, use: tuple[int, str, str, int], nodes: Sequence[tuple[str, list[str], list[str], int | None]],
          producers: Mapping[str, str], ndim: int) -> Role | None:  # fmt: skip
    """The role of ``key`` in one reading node (index, op, name, input index), or None."""
    index, op, name, slot = use
    if op == "Add" and ndim == 1 and index < len(nodes):
        others = [v for n, v in enumerate(nodes[index][1]) if n != slot]
        if len(others) == 1 and producers.get(others[0]) == "MatMul":
            return Role("linear", "bias", False, op, name, slot)
        return None
    found = ROLES.get((op, slot))
    if found is None:
        return None
    family, leaf = found
    transposed = False
    if op == "MatMul":
        if ndim != 2:
            return None  # a batched MatMul operand is not a linear layer's weight
        transposed = True
    elif op == "Gemm" and slot == 1:
        trans_b = nodes[index][3] if index < len(nodes) else None
        transposed = not trans_b
    return Role(family, leaf, transposed, op, name, slot)


def graph_evidence(reader: Any) -> GraphEvidence:
    """The evidence of an :class:`~remap.sources.onnx_reader.OnnxReader`: roles from its
    ``consumers`` (every reader of a key must agree on the role, else it has none), order
    from its ``order``, and the graph's inputs."""
    notes: list[str] = []
    try:
        nodes, inputs = _scan(Path(reader.path))
    except Exception as exc:  # the reader scanned this file already; a change since is said, not raised
        nodes, inputs = [], []
        notes.append(f"the ONNX graph's inputs and node attributes could not be read again ({exc}); roles need them")
    producers = {out: op for op, _, outs, _ in nodes for out in outs}
    roles: dict[str, Role | None] = {}
    for key, uses in reader.consumers.items():
        found = [_role(key, u, nodes, producers, len(reader.meta[key].shape)) for u in sorted(uses)] if nodes else []
        kinds = {(r.family, r.leaf, r.transposed) if r else None for r in found}
        roles[key] = found[0] if found and len(kinds) == 1 and None not in kinds else None  # the first reader's, when all agree
    order = {k: i for i, k in enumerate(reader.order) if reader.consumers.get(k)}
    initializers = set(reader.meta)
    graph_inputs = tuple(i for i in inputs if i[0] not in initializers)
    return GraphEvidence(order, roles, graph_inputs, dict(Counter(op for op, *_ in nodes)), tuple(notes))


# --------------------------------------------------------------------------- the target side


def _family(module: Any) -> str | None:
    """The :data:`ROLES` family of a torch module, or None for any other module."""
    from torch import nn
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
    from torch.nn.modules.instancenorm import _InstanceNorm

    if isinstance(module, _ConvTransposeNd):
        return "convtranspose"
    for cls, family in ((_ConvNd, "conv"), (nn.Linear, "linear"), (_InstanceNorm, "instancenorm"), (_BatchNorm, "batchnorm"),
                        (nn.LayerNorm, "layernorm"), (nn.GroupNorm, "groupnorm"), (nn.Embedding, "embedding")):  # fmt: skip
        if isinstance(module, cls):
            return family
    return None


def _holders(module: torch.nn.Module, keys: Sequence[str]) -> dict[str, Any]:
    """Target key -> the module that holds it directly (None when the path is not a module)."""
    out: dict[str, Any] = {}
    for key in keys:
        path = key.rpartition(".")[0]
        try:
            out[key] = module.get_submodule(path) if path else module
        except AttributeError:
            out[key] = None
    return out


def module_families(module: torch.nn.Module, keys: Sequence[str]) -> dict[str, str | None]:
    """Each key's family (see :func:`_family`): only a leaf module (no children) of a known
    class gives one; a parameter a parent holds itself could be read anywhere in its forward."""
    holders = _holders(module, keys)
    return {k: _family(m) if m is not None and not any(True for _ in m.children()) else None for k, m in holders.items()}


def _example_inputs(inputs: Sequence[tuple[str, str, tuple[int | None, ...]]], device: Any) -> tuple[list[Any], str]:
    """Zero tensors of the graph's inputs (symbolic dims as 1), and how they read."""
    import torch

    out, text = [], []
    for name, dtype, dims in inputs:
        if not dtype:
            raise ValueError(f"graph input {name!r} has no element type remap can make a tensor of")
        shape = [d if d is not None else 1 for d in dims]
        if math.prod(shape) > _MAX_INPUT_NUMEL and device.type != "meta":
            raise ValueError(f"graph input {name!r} of shape {shape} is larger than remap builds to run the target")
        out.append(torch.zeros(shape, dtype=getattr(torch, dtype), device=device))
        text.append(f"{name} {dtype} {shape}")
    return out, ", ".join(text)


def forward_evidence(module: torch.nn.Module, keys: Sequence[str], graph: GraphEvidence | None) -> ForwardEvidence:
    """Families of ``keys`` in ``module`` and, when ``graph`` gives input shapes, the order of
    the modules' first calls in one forward pass on zero input (on the meta device when the
    module is there; no gradients; eval mode, put back as it was). A forward that fails
    leaves the order empty, with a note saying why."""
    import torch

    families = module_families(module, keys)
    if graph is None or not graph.inputs:
        notes = ("the ONNX graph names no inputs: the target could not be run for its order",) if graph is not None else ()
        return ForwardEvidence(families, notes=notes)
    holders = _holders(module, keys)
    leaves = {id(m): m for m in holders.values() if m is not None and not any(True for _ in m.children())}
    calls: dict[int, int] = {}
    ran: dict[str, list[str]] = {}
    names = {id(m): n for n, m in module.named_modules(remove_duplicate=False)}

    def hook(mod: Any, args: Any) -> None:
        if id(mod) not in calls:
            calls[id(mod)] = len(calls)
            fam = _family(mod)
            if fam:
                ran.setdefault(fam, []).append(names.get(id(mod), "?"))

    param = next(iter(module.parameters()), None)
    device = param.device if param is not None else torch.device("meta")
    modes = {id(m): m.training for m in module.modules()}
    handles = [m.register_forward_pre_hook(hook) for m in leaves.values()]
    for m in module.modules():
        if id(m) not in leaves and _family(m) is not None:  # a known module with children: count that it ran
            handles.append(m.register_forward_pre_hook(hook))
    try:
        example, text = _example_inputs(graph.inputs, device)
        module.eval()
        with torch.no_grad():
            module(*example)
    except Exception as exc:  # the user's forward, on meta input: any failure means no order
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return ForwardEvidence(families, notes=(f"the target could not be run on the ONNX graph's input shapes ({type(exc).__name__}: "
                                                f"{first}); graph order is not used",))  # fmt: skip
    finally:
        for h in handles:
            h.remove()
        for m in module.modules():
            m.training = modes.get(id(m), m.training)
    order = {k: calls[id(m)] for k, m in holders.items() if m is not None and id(m) in leaves and id(m) in calls}
    note = f"the target ran once on zero input ({text}) to find the order its modules are called in"
    return ForwardEvidence(families, order, {f: tuple(v) for f, v in ran.items()}, (note,))


def missing_families(graph: GraphEvidence, forward: ForwardEvidence) -> list[tuple[str, tuple[str, ...], bool]]:
    """(note, modules, all of them) for each foldable family (:data:`_FOLDABLE`) of which the
    target runs more modules than the graph has nodes: BatchNorms the exporter folded into
    the convolution before them (constant folding in eval mode). ``all of them`` when the
    graph has no such node at all (then none of the modules' keys has a counterpart)."""
    out = []
    for op, family in _FOLDABLE.items():
        mods = forward.ran.get(family, ())
        have = graph.ops.get(op, 0)
        if not graph.ops or len(mods) <= have:
            continue
        shown = ", ".join(mods[:4]) + (f" and {len(mods) - 4} more" if len(mods) > 4 else "")
        which = "no" if not have else f"only {have}"
        folded = "them" if not have else f"{len(mods) - have} of them"
        note = (f"the target runs {len(mods)} {family} module{'' if len(mods) == 1 else 's'} ({shown}) but the ONNX graph has "
                f"{which} {op} node{'' if have == 1 else 's'}: the exporter folded {folded} into the layer before (constant "
                "folding), so the file does not hold their parameters and the weights paired with that layer are the "
                "folded ones; load into the target with them fused (torch.ao.quantization.fuse_modules), or export with "
                "do_constant_folding=False; their keys that nothing pairs are left undeclared")  # fmt: skip
        out.append((note, tuple(mods), not have))
    return out
