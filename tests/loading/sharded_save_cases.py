"""What each rank runs for tests/loading/test_sharded_saving.py (through ``tests/ranks.py``).

Every model is built from a seed on every rank (the same values everywhere), its plain
state_dict kept as the reference, then sharded: FSDP2 (``fully_shard`` per Linear and the
root), tensor parallel (``parallelize_module`` colwise/rowwise), FSDP2 over TP on a 2-D
mesh, and DTensors of many dtypes. Rank 0 returns the references beside what it did.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from remap.loading import sharded_saving
from remap.loading.sharded_saving import save_sharded


def _plain(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def plain_fsdp_model(seed: int = 0) -> nn.Module:
    """Linear layers of float32 and bfloat16, a BatchNorm (plain buffers), an embedding
    tied to the head; sizes that do not divide by 4 (a rank holds an empty shard)."""
    torch.manual_seed(seed)
    model = nn.Module()
    model.embed = nn.Embedding(7, 6)
    model.up = nn.Linear(6, 10)
    model.down = nn.Linear(10, 3).to(torch.bfloat16)
    model.norm = nn.BatchNorm1d(3)
    model.head = nn.Linear(6, 7, bias=False)
    model.head.weight = model.embed.weight
    with torch.no_grad():
        model.norm.running_mean.normal_()
        model.norm.running_var.uniform_(0.5, 2.0)
        model.norm.num_batches_tracked.fill_(11)
    return model


def plain_tp_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 5))


def _fsdp(world: int, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh

    model = plain_fsdp_model(seed)
    reference = _plain(model)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.up, mesh=mesh)
    fully_shard(model.down, mesh=mesh)
    fully_shard(model, mesh=mesh)
    with torch.no_grad():  # buffers are plain and may drift apart: rank 0's value is the one saved
        model.norm.running_mean.add_(dist.get_rank())
    return model, reference


def _tp(world: int, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = plain_tp_model(seed)
    reference = _plain(model)
    parallelize_module(model, init_device_mesh("cpu", (world,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    return model, reference


def _two_d(world: int, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """FSDP2 over the ``dp`` dimension of a 2 x (world/2) mesh, TP over ``tp``."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5))
    reference = _plain(model)
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model[0], mesh=mesh["dp"])
    fully_shard(model[2], mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, reference


def _dtypes(world: int, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A DTensor of every dtype gloo gathers, sharded on different dims, and one replicated."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    g = torch.Generator().manual_seed(seed)
    values = {
        "f64": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "f16": torch.randn(3, 5, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "i8": torch.randint(-100, 100, (6, 2), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 255, (2, 9), generator=g, dtype=torch.uint8),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
        "i64": torch.randint(0, 10**12, (3,), generator=g),
        "c64": torch.randn(3, 2, generator=g, dtype=torch.complex64),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    mesh = init_device_mesh("cpu", (world,))
    model = nn.Module()
    for n, (name, value) in enumerate(values.items()):
        placement = Replicate() if name in ("scalar", "c64") else Shard(n % value.dim()) if value.dim() else Replicate()
        model.register_parameter(name, nn.Parameter(distribute_tensor(value, mesh, [placement]), requires_grad=False))
    return model, {k: v.clone() for k, v in values.items()}


MODELS = {"fsdp": _fsdp, "tp": _tp, "2d": _two_d, "dtypes": _dtypes}


class _Peak:
    """Counts the full tensors ``sharded_saving._full`` hands out that are alive at once (their bytes)."""

    def __init__(self) -> None:
        self.alive = 0
        self.peak = 0
        self.largest = 0
        self.calls = 0
        self.real = sharded_saving._full

    def __call__(self, value: torch.Tensor) -> torch.Tensor:
        full = self.real(value)
        if full is not value:  # a gathered DTensor (a plain tensor is not new memory)
            size = full.numel() * full.element_size()
            self.calls += 1
            self.alive += size
            self.peak = max(self.peak, self.alive)
            self.largest = max(self.largest, size)
            weakref.finalize(full, self._gone, size)
        return full

    def _gone(self, size: int) -> None:
        self.alive -= size


def save_all(rank: int, world: int, workdir: Path, out: str, models: list[str]) -> dict[str, Any]:
    """Save each model as DCP, one safetensors file and safetensors shards of at most 150 bytes;
    rank 0 counts the gathered tensors alive at once while writing safetensors."""
    found: dict[str, Any] = {}
    for name in models:
        model, reference = MODELS[name](world)
        folder = Path(out) / f"{name}-{world}"
        results = {"dcp": save_sharded(model, folder / "model.dcp")}
        peak = _Peak()
        sharded_saving._full = peak
        try:
            results["single"] = save_sharded(model, folder / "model.safetensors")
            results["shards"] = save_sharded(model, folder / "shards" / "model.safetensors", max_shard_size=150)
        finally:
            sharded_saving._full = peak.real
        found[name] = {"results": results, "peak": (peak.peak, peak.largest, peak.calls),
                       "reference": reference if rank == 0 else None}  # fmt: skip
    return found


def load_dcp(world: int, out: str, loads: list[tuple[str, str]]) -> dict[str, Any]:
    """``dcp.load`` each (model, folder)'s ``model.dcp`` into the same model built from
    another seed and sharded here; the full tensors after, gathered on every rank."""
    import torch.distributed.checkpoint as dcp

    found = {}
    for name, folder in loads:
        model, _ = MODELS[name](world, seed=1)
        state = model.state_dict()
        dcp.load(state, checkpoint_id=str(Path(out) / folder / "model.dcp"))
        model.load_state_dict(state)
        found[name] = _plain_full(model)
    return found


def save_and_load(rank: int, world: int, workdir: Path, out: str, models: list[str], loads: list[tuple[str, str]]) -> dict[str, Any]:
    """:func:`save_all`, then :func:`load_dcp` (what other ranks wrote before): one start of the ranks for both."""
    return {"saved": save_all(rank, world, workdir, out, models), "loaded": load_dcp(world, out, loads)}


def _outcome(call: Any) -> tuple[str, str]:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - what each rank met goes back to the test
        return type(exc).__name__, str(exc)
    return "ok", ""


def failures(rank: int, world: int, workdir: Path, out: str) -> dict[str, Any]:
    """A save that fails on one rank, after a first save to the same path that succeeded."""
    import errno

    import torch.distributed.checkpoint as dcp

    found: dict[str, Any] = {}
    first, _ = _fsdp(world, seed=0)
    second, _ = _fsdp(world, seed=1)
    folder = Path(out)

    # DCP: rank 1 cannot write its part
    save_sharded(first, folder / "model.dcp")
    real_write = dcp.FileSystemWriter.write_data

    def full_disk(self: Any, plan: Any, planner: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    if rank == 1:
        dcp.FileSystemWriter.write_data = full_disk  # type: ignore[method-assign]
    try:
        found["dcp"] = _outcome(lambda: save_sharded(second, folder / "model.dcp"))
    finally:
        dcp.FileSystemWriter.write_data = real_write  # type: ignore[method-assign]

    # safetensors, one file and shards: rank 0's write fails at the third tensor
    for kind, path, size in (("single", folder / "model.safetensors", None), ("shards", folder / "shards" / "model.safetensors", 150)):
        save_sharded(first, path, max_shard_size=size)
        real_bytes = sharded_saving._bytes_of
        calls = []

        def failing(t: torch.Tensor) -> Any:
            calls.append(1)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_bytes(t)

        if rank == 0:
            sharded_saving._bytes_of = failing
        try:
            found[kind] = _outcome(lambda: save_sharded(second, path, max_shard_size=size))
        finally:
            sharded_saving._bytes_of = real_bytes

    # a gather that fails on rank 1 (after rank 0's): every rank stops at the next meeting
    real_full = sharded_saving._full
    gathered = []

    def broken(value: torch.Tensor) -> torch.Tensor:
        full = real_full(value)
        gathered.append(1)
        if len(gathered) == 2:
            raise RuntimeError("gather broke")
        return full

    if rank == 1:
        sharded_saving._full = broken
    try:
        found["gather"] = _outcome(lambda: save_sharded(second, folder / "model.safetensors"))
    finally:
        sharded_saving._full = real_full

    # the ranks built different models: rank 1 has one more buffer
    if rank == 1:
        second.register_buffer("extra", torch.zeros(2))
    found["mismatch"] = _outcome(lambda: save_sharded(second, folder / "model.safetensors"))
    found["torch"] = _outcome(lambda: save_sharded(second, folder / "model.pt"))
    full = _plain_full(first)  # a collective: on every rank
    found["first"] = full if rank == 0 else None
    return found


def _plain_full(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone() for k, v in model.state_dict().items()}
