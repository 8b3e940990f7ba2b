"""What each rank runs in tests/loading/test_sharding.py (through tests/ranks.py).

Every case builds the same tiny model twice on every rank: one is sharded by
``remap.loading.sharding.shard_module`` from a ``target.shard`` spec, the other by hand with
torch's own calls (``init_device_mesh``, ``parallelize_module`` with torch's own glob plan,
``fully_shard`` on the blocks and then the root: the torchtitan recipe). The case returns,
for both, each parameter's placements, local shape and mesh, the modules FSDP2 manages, the
local shards' values, and the forward output beside an unsharded copy's, so the test compares
remap against torch and against the unsharded model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

SEED = 0
IDS = torch.tensor([[1, 5, 7, 3], [2, 2, 9, 0]])


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 16)
        self.o = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attn()
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.attn(x))


class Tiny(nn.Module):
    """An embedding, two blocks in a ModuleList, a head: the shape of a transformer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build(device: str = "cpu") -> Tiny:
    """The same values on every rank (seeded), or on meta."""
    torch.manual_seed(SEED)
    with torch.device(device):
        return Tiny()


TP_SPEC = {r"layers\.\d+\.attn\.q": "colwise", r"layers\.\d+\.attn\.o": "rowwise", "emb": "rowwise"}
TP_TORCH = {"layers.*.attn.q": "colwise", "layers.*.attn.o": "rowwise", "emb": "rowwise"}  # torch's own glob dialect


def by_hand(model: nn.Module, dims: tuple[tuple[str, int], ...], *, tp: bool, fsdp: bool) -> nn.Module:
    """The torchtitan recipe with torch's calls alone: TP on the tp dim, then fully_shard on each block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", tuple(n for _, n in dims), mesh_dim_names=tuple(d for d, _ in dims))
    two = len(dims) > 1
    if tp:
        plan = {k: ColwiseParallel() if v == "colwise" else RowwiseParallel() for k, v in TP_TORCH.items()}
        plan["emb"] = RowwiseParallel(input_layouts=Replicate())  # torchtitan's tok_embeddings: the ids are whole on each rank
        parallelize_module(model, mesh["tp"] if two else mesh, plan)
    if fsdp:
        for block in model.layers:
            fully_shard(block, mesh=mesh["dp"] if two else mesh)
        fully_shard(model, mesh=mesh["dp"] if two else mesh)
    return model


def describe(model: nn.Module) -> dict[str, Any]:
    """Each parameter's (type, placements, local shape, mesh dim names, mesh ranks, device type), and the FSDP modules."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    params = {}
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            params[name] = ("DTensor", tuple(map(repr, p.placements)), tuple(p.to_local().shape), mesh.mesh_dim_names,
                            mesh.mesh.tolist(), p.device.type)  # fmt: skip
        else:
            params[name] = (type(p).__name__, None, tuple(p.shape), None, None, p.device.type)
    return {"params": params, "fsdp": sorted(n for n, m in model.named_modules() if isinstance(m, FSDPModule))}


def locals_of(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def compare(spec: dict[str, Any], dims: tuple[tuple[str, int], ...], *, tp: bool, fsdp: bool) -> dict[str, Any]:
    """remap's sharding of ``spec`` and torch's by hand, on a real model and on meta."""
    from remap.loading.sharding import shard_module
    from remap.rules.shard_spec import ShardSpec

    parsed = ShardSpec.parse(spec)
    plain = build()
    with torch.no_grad():
        expected = plain(IDS)
    model = build()
    mine = shard_module(model, parsed)
    hand = by_hand(build(), dims, tp=tp, fsdp=fsdp)
    layout, shards = describe(mine), locals_of(mine)  # before the forward: FSDP2 leaves the root's parameters unsharded after it
    with torch.no_grad():
        out = mine(IDS)
    from torch.distributed.tensor import DTensor

    gathered = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in mine.named_parameters()}
    mine_meta = shard_module(build("meta"), parsed)
    hand_meta = by_hand(build("meta"), dims, tp=tp, fsdp=fsdp)
    return {
        "returned_same": mine is model,
        "mine": layout,
        "hand": describe(hand),
        "mine_meta": describe(mine_meta),
        "hand_meta": describe(hand_meta),
        "locals_equal": _equal(shards, locals_of(hand)),
        "gathered_equal": _equal(gathered, dict(plain.named_parameters())),
        "forward_diff": float((out - expected).abs().max()),
    }


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {n: a[n].shape == b[n].shape and bool(torch.equal(a[n], b[n].detach())) for n in a}


def one_dim(rank: int, world: int, workdir: Path) -> dict[str, Any]:
    """2 ranks: fsdp by patterns and by ``true``, tp alone, and the errors that need a process group."""
    from remap.errors import UsageError
    from remap.loading.sharding import shard_module
    from remap.rules.shard_spec import ShardSpec

    out = {
        "fsdp": compare({"fsdp": [r"layers\.\d+", ""], "mesh": [2]}, (("dp", 2),), tp=False, fsdp=True),
        "fsdp_true": compare({"fsdp": True}, (("dp", 2),), tp=False, fsdp=True),
        "tp": compare({"tp": TP_SPEC}, (("tp", 2),), tp=True, fsdp=False),
    }
    model = build()
    try:
        shard_module(model, ShardSpec.parse({"fsdp": True, "mesh": [4]}))
        out["too_many"] = None
    except UsageError as exc:
        out["too_many"] = str(exc)
    out["too_many_untouched"] = _untouched(model)
    try:
        shard_module(shard_module(build(), ShardSpec.parse({"fsdp": True})), ShardSpec.parse({"fsdp": True}))
        out["twice"] = None
    except UsageError as exc:
        out["twice"] = str(exc)
    return out


def _untouched(model: nn.Module) -> bool:
    """Plain parameters holding the seeded values, and no FSDP module."""
    from torch.distributed.fsdp import FSDPModule

    fresh = dict(build().named_parameters())
    plain = all(type(p) is nn.Parameter and torch.equal(p, fresh[n]) for n, p in model.named_parameters())
    return plain and not any(isinstance(m, FSDPModule) for m in model.modules())


def two_dim(rank: int, world: int, workdir: Path) -> dict[str, Any]:
    """4 ranks: a {dp: 2, tp: 2} mesh, tp on the attention then fsdp on the blocks and the root."""
    return compare({"mesh": {"dp": 2, "tp": 2}, "tp": TP_SPEC, "fsdp": [r"layers\.\d+", ""]}, (("dp", 2), ("tp", 2)),
                   tp=True, fsdp=True)  # fmt: skip

