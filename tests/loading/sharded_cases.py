"""What each rank runs in tests/loading/test_sharded_loading.py (through tests/ranks.py).

Every case builds the same small model on every rank, has rank 0 write a checkpoint in
another layout (``module.``-prefixed, a fused ``qkv``, a transposed head), shards the target
(FSDP2, tensor parallel, or both on a 2-D mesh), loads it with ``remap.load`` and returns the
full tensors (gathered with ``full_tensor()``) beside a single-process ``remap.load`` of the
same rules into a plain copy of the model: the reference is remap's own one-process engine,
itself checked against torch's ``load_state_dict`` by the rest of the suite, and the
checkpoint's own tensors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

RULES = {
    "version": 1,
    "rules": [
        {"strip_prefix": "module."},
        {"split": {"match": r"^(.*)\.qkv\.weight$", "into": [r"\1.q.weight", r"\1.k.weight", r"\1.v.weight"], "dim": 0}},
        {"transpose": r"^head\.weight$"},
    ],
}
RENAME_ONLY = {"version": 1, "rules": [{"strip_prefix": "module."}]}


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q, self.k, self.v = (nn.Linear(width, width, bias=False) for _ in range(3))
        self.up = nn.Linear(width, 2 * width + 4)  # 2w+4 rows: uneven on 4 ranks for w=8 (20/4) only when not divisible
        self.down = nn.Linear(2 * width + 4, width)
        self.gate = nn.Linear(width, 5)  # 5 rows: uneven on 2 and 4 ranks
        self.register_buffer("scale", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), dim=-1) @ self.v(h)
        a = a.full_tensor() if hasattr(a, "full_tensor") else a  # tensor parallel: q, k, v give DTensors
        return x + a + self.down(torch.relu(self.up(h))) * self.scale + self.gate(h).mean(-1, keepdim=True)


class Net(nn.Module):
    def __init__(self, width: int = 8, depth: int = 2, vocab: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def checkpoint(model: nn.Module, *, fused: bool = True) -> dict[str, torch.Tensor]:
    """``model``'s weights in the checkpoint's layout: ``module.`` prefix, fused qkv, transposed head."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if fused:
        for i in range(len(model.blocks)):
            p = f"blocks.{i}."
            sd[p + "qkv.weight"] = torch.cat([sd.pop(p + "q.weight"), sd.pop(p + "k.weight"), sd.pop(p + "v.weight")])
        sd["head.weight"] = sd["head.weight"].t().contiguous()
    return {f"module.{k}": v for k, v in sd.items()}


def reference(width: int = 8) -> Net:
    torch.manual_seed(1234)
    model = Net(width)
    with torch.no_grad():
        for b in model.blocks:
            b.scale.uniform_(0.5, 1.5)
            b.norm.weight.uniform_(0.5, 1.5)
            b.norm.bias.uniform_(-0.5, 0.5)
    return model


def write(workdir: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    """Rank 0 writes the checkpoint (safetensors or torch.save by suffix); every rank waits for it."""
    path = workdir / name
    if dist.get_rank() == 0:
        if name.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(tensors, str(path))
        else:
            torch.save(tensors, path)
    dist.barrier()
    return str(path)


def shard(model: nn.Module, how: str, world: int) -> nn.Module:
    """FSDP2 per block + root, tensor parallel (colwise q/k/v/up/gate, rowwise down), or both on a 2-D mesh."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if how == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for b in model.blocks:
            fully_shard(b, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    if how == "2d":
        mesh2 = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        tp_mesh, dp_mesh = mesh2["tp"], mesh2["dp"]
    else:
        tp_mesh = dp_mesh = init_device_mesh("cpu", (world,))
    whole = ColwiseParallel(use_local_output=False)  # q, k, v outputs stay DTensors: attention runs on them
    plan = {"q": whole, "k": whole, "v": whole, "up": ColwiseParallel(), "down": RowwiseParallel()}
    for b in model.blocks:
        parallelize_module(b, tp_mesh, plan)
    if how == "2d":
        for b in model.blocks:
            fully_shard(b, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
    return model


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the (sharded) model, gathered whole (a collective for DTensors)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


# ---------------------------------------------------------------------------- cases


def load_equal(rank: int, world: int, workdir: Path, how: str, fmt: str, on_meta: bool) -> dict[str, Any]:
    """Load the fused checkpoint into a sharded target; the full tensors and the one-process load's."""
    import remap

    ref = reference()
    path = write(workdir, f"ck.{fmt}", checkpoint(ref))
    single = Net()
    remap.load(single, path, rules=RULES)
    if on_meta:
        with torch.device("meta"):
            target = Net()
    else:
        torch.manual_seed(rank + 7)  # a different random init on each rank: the load must overwrite all of it
        target = Net()
    target = shard(target, how, world)
    report = remap.load(target, path, rules=RULES)
    ids = torch.arange(12).reshape(2, 6) % 16
    with torch.no_grad():
        out = target(ids)
        want = ref(ids)
    return {"full": full(target), "single": single.state_dict(), "ref": ref.state_dict(), "stats": report.stats,
            "target": report.target, "ok": report.ok, "forward": (out.full_tensor() if hasattr(out, "full_tensor") else out), "want": want}  # fmt: skip


def bytes_per_rank(rank: int, world: int, workdir: Path) -> dict[str, Any]:
    """A rename-only plan into an FSDP2 target: what each rank counted and what the kernel says it read."""
    import remap

    torch.manual_seed(0)
    ref = Net(width=128, depth=2, vocab=1024)  # ~0.5 M parameters, 2 MB: the header and the plan fingerprint (8 KiB) are noise
    path = write(workdir, "big.safetensors", checkpoint(ref, fused=False))
    target = shard(Net(width=128, depth=2, vocab=1024), "fsdp", world)
    remap.load(target, path, rules=RENAME_ONLY)  # warm: the modules a first load imports are read outside the count
    before = _rchar()
    report = remap.load(target, path, rules=RENAME_ONLY)
    read = _rchar() - before
    got = full(target)
    equal = all(torch.equal(got[k], v) for k, v in ref.state_dict().items())
    return {"rchar": read, "stats": report.stats, "file": os.path.getsize(path), "equal": equal}


def one_rank_fails(rank: int, world: int, workdir: Path, when: str, on_meta: bool = False) -> dict[str, Any]:
    """Rank 1 fails (its checkpoint has a wrong shape: a failed check; or its reads fail half-way):
    every rank raises and every rank's module is as it was (built on meta: still on meta, its
    real buffers the very objects they were)."""
    import remap
    from remap.loading import sharded

    ref = reference()
    path = write(workdir, "ck.safetensors", checkpoint(ref))
    if when == "check" and rank == 1:
        bad = checkpoint(ref)
        bad["module.blocks.1.up.weight"] = torch.zeros(3, 3)
        from safetensors.torch import save_file

        save_file(bad, str(workdir / "bad.safetensors"))
        path = str(workdir / "bad.safetensors")
    torch.manual_seed(5)
    if on_meta:
        with remap.empty_weights():  # parameters on meta, buffers real
            target = shard(Net(), "fsdp", world)
    else:
        target = shard(Net(), "fsdp", world)
    buffers = {n: b for n, b in target.named_buffers()}
    before = {k: v._local_tensor.clone() if hasattr(v, "_local_tensor") else v.clone() for k, v in target.state_dict().items()}
    real_read_box = sharded._read_box
    if when == "read" and rank == 1:
        real, calls = sharded._read_box, []

        def failing(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) > 3:
                raise remap.errors.SourceError("disk on fire", where=path)
            return real(*args, **kwargs)

        sharded._read_box = failing
    try:
        remap.load(target, path, rules=RULES)
        error = None
    except remap.errors.RemapError as exc:
        error = (type(exc).__name__, str(exc))
    finally:
        sharded._read_box = real_read_box
    after = {k: v._local_tensor if hasattr(v, "_local_tensor") else v for k, v in target.state_dict().items()}
    same = all(before[k].device == after[k].device and (before[k].is_meta or torch.equal(before[k], after[k])) for k in before)
    same_buffers = all(b is buffers[n] for n, b in target.named_buffers())
    return {"error": error, "untouched": same and same_buffers,
            "devices": sorted({v.device.type for v in after.values()})}  # fmt: skip


def dcp_resharded(rank: int, world: int, workdir: Path, folder: str) -> dict[str, Any]:
    """A DCP checkpoint (written elsewhere on 4 ranks) loaded into an FSDP2 target on ``world`` ranks."""
    import remap

    target = shard(Net(), "fsdp", world)
    report = remap.load(target, folder, rules={"version": 1, "source": {"key": "model"}, "rules": []})
    return {"full": full(target), "stats": report.stats}


def dcp_save_four(rank: int, world: int, workdir: Path, folder: str) -> bool:
    """torch's own ``dcp.save`` of the reference model, FSDP2-sharded on ``world`` ranks."""
    import torch.distributed.checkpoint as dcp

    model = shard(reference(), "fsdp", world)
    dcp.save({"model": model.state_dict()}, checkpoint_id=folder)
    return True


def fsdp_net() -> nn.Module:
    """A target factory that shards what it builds (FSDP2 on every rank of the default group)."""
    return shard(Net(), "fsdp", dist.get_world_size())


def in_bfloat16(rank: int, world: int, workdir: Path) -> dict[str, Any]:
    """A bfloat16 model built on meta and sharded, loaded from the float32 checkpoint with dtype=bfloat16."""
    import remap

    ref = reference()
    path = write(workdir, "ck.safetensors", checkpoint(ref))
    with torch.device("meta"):
        target = Net().to(torch.bfloat16)
    target = shard(target, "fsdp", world)
    report = remap.load(target, path, rules=RULES, dtype="bfloat16")
    return {"full": full(target), "ref": {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()},
            "precision": [(p.source_dtype, p.dtype, p.kind, len(p.keys)) for p in report.precision]}  # fmt: skip


def with_a_key_missing(rank: int, world: int, workdir: Path) -> dict[str, Any]:
    """A meta-built target whose ``head.weight`` no source feeds (declared missing): initialised by its module."""
    import remap

    ck = checkpoint(reference())
    del ck["module.head.weight"]
    path = write(workdir, "ck.safetensors", ck)
    rules = {**RULES, "rules": RULES["rules"][:2], "expect": {"missing": ["head.weight"]}}
    with remap.empty_weights():
        target = shard(Net(), "fsdp", world)
    report = remap.load(target, path, rules=rules)
    got = full(target)
    return {"ok": report.ok, "materialised": report.stats["materialised"], "warnings": report.warnings,
            "head_std": float(got["head.weight"].std()), "others_equal": all(torch.equal(got[k], v) for k, v in reference().state_dict().items() if k != "head.weight")}  # fmt: skip


class Wrapped(nn.Module):
    """A DDP-style wrapper: its parameter names are the checkpoint's (``module.`` prefix)."""

    def __init__(self) -> None:
        super().__init__()
        self.module = reference()


def with_optimizer_state(rank: int, world: int, workdir: Path) -> dict[str, Any]:
    """AdamW state saved by a run of the wrapped model (one step), loaded through the rules into an
    FSDP2 target's AdamW: each parameter's moments gathered, and a one-process load's for reference."""
    import remap

    old = Wrapped()
    opt = torch.optim.AdamW(old.named_parameters(), lr=0.1)
    out = old.module(torch.arange(12).reshape(2, 6) % 16)
    out.square().mean().backward()
    opt.step()
    path = workdir / "run.pth"
    if rank == 0:
        torch.save({"model": old.state_dict(), "optimizer": opt.state_dict()}, path)
    dist.barrier()
    rules = {"version": 1, "source": {"key": "model"}, "rules": [{"strip_prefix": "module."}]}
    single = Net()
    single_opt = torch.optim.AdamW(single.named_parameters(), lr=0.1)
    remap.load(single, str(path), rules=rules, optimizer=single_opt)
    want = {n: {k: v.clone() for k, v in single_opt.state[p].items()} for n, p in single.named_parameters()}
    target = shard(Net(), "fsdp", world)
    target_opt = torch.optim.AdamW(target.named_parameters(), lr=0.1)
    report = remap.load(target, str(path), rules=rules, optimizer=target_opt)
    got = {n: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in target_opt.state[p].items()}
           for n, p in target.named_parameters()}  # fmt: skip
    placed = all(type(target_opt.state[p]["exp_avg"]).__name__ == "DTensor" for _, p in target.named_parameters())
    ids = torch.arange(12).reshape(2, 6) % 16
    for model, optimizer in ((single, single_opt), (target, target_opt)):  # the next training step, from the loaded state
        model(ids).square().mean().backward()
        optimizer.step()
    stepped = {k: float((v - single.state_dict()[k]).abs().max()) for k, v in full(target).items()}
    return {"want": want, "got": got, "placed": placed, "stepped": stepped,
            "loaded": sorted({t.status for t in report.optimizer.targets})}  # fmt: skip


def truncated_after_planning(rank: int, world: int, workdir: Path) -> dict[str, Any]:
    """The checkpoint cut in half between planning and applying (by rank 0; every rank reads it)."""
    import remap

    path = write(workdir, "ck.safetensors", checkpoint(reference()))
    torch.manual_seed(3)
    target = shard(Net(), "fsdp", world)
    before = {k: getattr(v, "_local_tensor", v).clone() for k, v in target.state_dict().items()}
    plan = remap.plan(target, path, RULES)
    dist.barrier()
    if rank == 0:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    dist.barrier()
    try:
        plan.apply(target)
        error = None
    except remap.errors.RemapError as exc:
        error = (type(exc).__name__, str(exc), exc.exit_code)
    after = {k: getattr(v, "_local_tensor", v) for k, v in target.state_dict().items()}
    return {"error": error, "untouched": all(torch.equal(before[k], after[k]) for k in before)}


def other_weights_on_one_rank(rank: int, world: int, workdir: Path) -> dict[str, Any]:
    """Rank 1 reads another checkpoint with the same names and shapes (another fine-tune)."""
    import remap
    from safetensors.torch import save_file

    ck = checkpoint(reference())
    if rank == 1:
        ck = {k: v + 1 if v.is_floating_point() else v for k, v in ck.items()}
    path = workdir / f"ck{rank}.safetensors"
    save_file(ck, str(path))
    torch.manual_seed(3)
    target = shard(Net(), "fsdp", world)
    before = {k: getattr(v, "_local_tensor", v).clone() for k, v in target.state_dict().items()}
    try:
        remap.load(target, str(path), rules=RULES)
        error = None
    except remap.errors.RemapError as exc:
        error = (type(exc).__name__, str(exc))
    after = {k: getattr(v, "_local_tensor", v) for k, v in target.state_dict().items()}
    return {"error": error, "untouched": all(torch.equal(before[k], after[k]) for k in before)}


def many(rank: int, world: int, workdir: Path, variants: list[list[Any]]) -> list[Any]:
    """Several cases in one spawn (each spawn costs seconds): ``[[case name, *args], ...]``."""
    cases = {"load_equal": load_equal, "bytes_per_rank": bytes_per_rank, "one_rank_fails": one_rank_fails, "in_bfloat16": in_bfloat16,
             "with_a_key_missing": with_a_key_missing, "with_optimizer_state": with_optimizer_state,
             "truncated_after_planning": truncated_after_planning, "other_weights_on_one_rank": other_weights_on_one_rank}
    out = []
    for n, (name, *args) in enumerate(variants):
        folder = workdir / f"case{n}"
        if rank == 0:
            folder.mkdir(exist_ok=True)
        dist.barrier()
        out.append(cases[name](rank, world, folder, *args))
    return out
