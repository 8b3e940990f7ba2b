"""Shard a built target as ``target.shard`` says (:class:`~remap.rules.shard_spec.ShardSpec`), with
torch's own calls: ``init_device_mesh``, ``parallelize_module`` with ``ColwiseParallel`` /
``RowwiseParallel`` on the ``tp`` dim, then ``fully_shard`` (FSDP2) on the ``dp`` dim, children
before their parents (the torchtitan order); ``rowwise`` on an ``nn.Embedding`` takes the token
ids whole, as torchtitan's plan does. A module built on ``meta`` is sharded on ``meta``
(its DTensors hold no memory until loaded); a real one must hold the same values on every rank
(fully_shard keeps each rank's slice of its own copy; tensor parallelism takes rank 0's).

Every check runs before the module is touched: each pattern names modules (``resolve_shard``,
which needs no process group), tp names only ``nn.Linear`` / ``nn.Embedding``, fsdp names no
bare ``ModuleList`` (never called, so its hooks would never run), the process group holds as
many ranks as the mesh.

>>> import torch
>>> from remap.rules.shard_spec import ShardSpec
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
>>> resolve_shard(model, ShardSpec.parse({"tp": {"0": "colwise", "2": "rowwise"}, "fsdp": [""], "mesh": {"dp": 1, "tp": 1}}))
ShardLayout(tp=(('0', 'colwise'), ('2', 'rowwise')), fsdp=('',))
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, NoReturn

import regex

from ..errors import RulesError, TargetError, UsageError
from ..rules.patterns import compile_regex
from ..rules.shard_spec import ShardSpec

if TYPE_CHECKING:
    import torch

__all__ = ["ShardLayout", "resolve_shard", "shard_module"]

MAX_SHOWN = 5  # close module names an error lists


@dataclass(frozen=True)
class ShardLayout:
    """A :class:`ShardSpec` resolved against one module: ``tp`` (module name, style) in module
    order; ``fsdp``: the module names given to ``fully_shard``, in the order it is called
    (children before their parents; ``''`` is the root)."""

    tp: tuple[tuple[str, str], ...] = ()
    fsdp: tuple[str, ...] = ()


def resolve_shard(module: torch.nn.Module, spec: ShardSpec) -> ShardLayout:
    """Which modules ``spec`` shards, and how; no process group needed and nothing changed.

    :class:`~remap.errors.RulesError` for a pattern that names no module (listing close names),
    tp on a module that is not ``nn.Linear`` / ``nn.Embedding``, a module two tp patterns give
    different styles, fsdp on a ``ModuleList`` / ``ModuleDict``; :class:`~remap.errors.UsageError`
    when the module is already sharded.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.ModuleList([torch.nn.Linear(2, 2)]))
    >>> resolve_shard(model, ShardSpec(fsdp=True)).fsdp
    ('1.0', '')
    """
    _check_unsharded(module)
    modules = dict(module.named_modules())
    return ShardLayout(_tp_plan(module, modules, spec), _fsdp_names(module, modules, spec))


def shard_module(module: torch.nn.Module, spec: ShardSpec) -> torch.nn.Module:
    """Shard ``module`` in place over a device mesh as ``spec`` says; returns the same module.

    Needs an initialised process group (``torchrun``, or ``torch.distributed.init_process_group``)
    whose world size is the mesh's size (:class:`~remap.errors.UsageError` otherwise). The mesh's
    device type is the module's (``cpu``, ``cuda``, ...); for a module on ``meta``, ``cuda`` under
    an NCCL process group, else ``cpu``. Example, on 2 ranks::

        model = shard_module(build(), ShardSpec.parse({"fsdp": [r"layers\\.\\d+", ""]}))
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    layout = resolve_shard(module, spec)
    if not dist.is_available() or not dist.is_initialized():
        raise UsageError("target.shard needs torch.distributed initialised: run under `torchrun --nproc-per-node N` or call "
                         "torch.distributed.init_process_group first; found no process group")  # fmt: skip
    world = dist.get_world_size()
    dims = spec.mesh_shape(world)
    size = math.prod(n for _, n in dims)
    if size != world:
        shown = "{" + ", ".join(f"{d}: {n}" for d, n in dims) + "}"
        raise UsageError(f"target.shard: the mesh {shown} holds {size} ranks, but the process group has {world}; run with "
                         f"--nproc-per-node {size}, or change target.shard.mesh")  # fmt: skip
    mesh = init_device_mesh(_device_type(module, dist), tuple(n for _, n in dims), mesh_dim_names=tuple(d for d, _ in dims))
    for name, style in layout.tp:
        sub = module.get_submodule(name)
        parallelize_module(sub, mesh["tp"] if len(dims) > 1 else mesh, _style(sub, style, ColwiseParallel, RowwiseParallel))
    for name in layout.fsdp:
        fully_shard(module.get_submodule(name), mesh=mesh["dp"] if len(dims) > 1 else mesh)
    return module


def _style(sub: torch.nn.Module, style: str, colwise: Any, rowwise: Any) -> Any:
    """torch's ParallelStyle for ``style``; rowwise on an ``nn.Embedding`` takes the token ids whole
    (``input_layouts=Replicate()``, as torchtitan's plan does): torch's default would read each
    rank's ids as a shard of a longer sequence."""
    from torch import nn
    from torch.distributed.tensor import Replicate

    if style == "colwise":
        return colwise()
    return rowwise(input_layouts=Replicate()) if isinstance(sub, nn.Embedding) else rowwise()


def _check_unsharded(module: torch.nn.Module) -> None:
    """A module whose factory sharded it already cannot be sharded again."""
    from torch.distributed.tensor import DTensor

    for name, param in module.named_parameters():
        if isinstance(param, DTensor):
            raise UsageError(f"target.shard: the target is sharded already (its parameter {name!r} is a DTensor with placements "
                             f"{param.placements}); leave target.shard out when the factory shards the model, or give it "
                             "an unsharded module")  # fmt: skip


def _matching(pattern: str, modules: dict[str, Any], what: str, owner: torch.nn.Module) -> list[str]:
    """The module names ``pattern`` matches whole; none is a RulesError listing close names."""
    compiled = compile_regex(pattern)
    names = [n for n in modules if compiled.fullmatch(n)]
    if names:
        return names
    inside = [n for n in modules if n and compiled.search(n)]
    if inside:
        hint = f"; it matches inside {_listing(inside)} (a pattern matches a whole module name)"
    else:
        plain = pattern.replace(r"\d+", "0").replace(r"\d", "0").replace("\\", "").replace(".*", "0").replace("^", "").replace("$", "")
        near = difflib.get_close_matches(plain, [n for n in modules if n], n=MAX_SHOWN, cutoff=0.5)
        hint = f"; close names: {', '.join(near)}" if near else f"; its modules: {_listing([n for n in modules if n])}"
    return _fail(f"{what}: the module pattern '{pattern}' matches no module of the target ({type(owner).__name__}){hint}")


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_SHOWN]) or "none (the root alone: '')"
    return shown + (f" and {len(names) - MAX_SHOWN} more" if len(names) > MAX_SHOWN else "")


def _fail(message: str) -> NoReturn:
    raise RulesError(message, where="target.shard")


def _tp_plan(owner: torch.nn.Module, modules: dict[str, Any], spec: ShardSpec) -> tuple[tuple[str, str], ...]:
    """(module name, style) for every module a tp pattern names, in module order."""
    from torch import nn

    chosen: dict[str, tuple[str, str]] = {}  # name -> (style, pattern)
    for pattern, style in spec.tp:
        for name in _matching(pattern, modules, "tp", owner):
            sub = modules[name]
            if not isinstance(sub, (nn.Linear, nn.Embedding)):
                root = "" if name else " (the root)"
                _fail(f"tp: '{pattern}' matches '{name}'{root}, a {type(sub).__name__}; colwise and rowwise shard nn.Linear "
                      "and nn.Embedding only")  # fmt: skip
            if name in chosen and chosen[name][0] != style:
                other_style, other = chosen[name]
                _fail(f"tp: '{name}' is {other_style} by '{other}' and {style} by '{pattern}'; one module takes one style")
            chosen[name] = (style, pattern)
    return tuple((name, chosen[name][0]) for name in modules if name in chosen)


def _fsdp_names(owner: torch.nn.Module, modules: dict[str, Any], spec: ShardSpec) -> tuple[str, ...]:
    """The modules ``fully_shard`` is called on, children before their parents."""
    from torch import nn

    if not spec.fsdp:
        return ()
    if spec.fsdp_modules:
        chosen = {n for p in spec.fsdp_modules for n in _matching(p, modules, "fsdp", owner)}
    else:  # fsdp: true: the items of each outermost ModuleList (the repeated blocks), then the root
        lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
        outer = [n for n in lists if not any(n != o and n.startswith(f"{o}.") for o in lists)]
        chosen = {f"{n}.{i}" if n else str(i) for n in outer for i in range(len(modules[n]))} | {""}
    for name in chosen:
        if isinstance(modules[name], (nn.ModuleList, nn.ModuleDict)):
            kind = type(modules[name]).__name__
            _fail(f"fsdp: '{name}' is a {kind}, which is never called, so fully_shard's hooks would never run; name its items "
                  f"instead ({_item_pattern(name, modules[name])})")  # fmt: skip
    return tuple(name for name in reversed(modules) if name in chosen)


def _item_pattern(name: str, container: Any) -> str:
    r"""The pattern of a container's items: ``layers`` -> ``layers\.\d+``; a ModuleDict's ``heads`` -> ``heads\.[^.]+``.

    >>> import torch
    >>> _item_pattern("model.layers", torch.nn.ModuleList())
    'model\\.layers\\.\\d+'
    """
    from torch import nn

    item = "\\d+" if isinstance(container, nn.ModuleList) else "[^.]+"
    return f"{regex.escape(name)}\\.{item}" if name else item


def _device_type(module: torch.nn.Module, dist: Any) -> str:
    """The device type of the module's tensors; for a module on meta (or without tensors), ``cuda``
    under an NCCL process group with CUDA present, else ``cpu``."""
    import torch

    types = sorted({t.device.type for t in chain(module.parameters(), module.buffers())} - {"meta"})
    if len(types) > 1:
        raise TargetError(f"target.shard: the target's tensors sit on several device types ({', '.join(types)}); a device "
                          "mesh spans one")  # fmt: skip
    if types:
        return types[0]
    return "cuda" if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available() else "cpu"
