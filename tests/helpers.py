"""Shared test helpers: checkpoints on disk in each format, and tensor comparisons."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from remap.meta import TensorMeta, meta_of_tensor


class Config:
    """A custom class that torch.load(weights_only=True) refuses to unpickle."""

    def __init__(self, lr: float = 0.1) -> None:
        self.lr = lr

    def __repr__(self) -> str:
        return f"Config(lr={self.lr})"


def mixed_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict with several dtypes and a scalar, with random values."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(17),
        "fc.weight": torch.randn(5, 4, generator=g).to(torch.float16),
        "fc.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "mask": torch.rand(6, generator=g) > 0.5,
        "ids": torch.randint(0, 100, (2, 3), generator=g, dtype=torch.int32),
    }


def save(obj: Any, path: Path, fmt: str = "torch-zip") -> Path:
    """Write ``obj`` as ``fmt``: torch-zip, torch-legacy or safetensors (a flat state_dict)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "torch-zip")
    return path


def save_sharded(state: Mapping[str, torch.Tensor], folder: Path, shards: int = 2, fmt: str = "safetensors") -> Path:
    """Split ``state`` into ``shards`` files plus an HF-style index; returns the index path."""
    suffix = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"{prefix}-{i + 1:05d}-of-{shards:05d}.{suffix}"
        part = {k: state[k] for k in keys[i::shards]}
        save(part, folder / name, "safetensors" if fmt == "safetensors" else "torch-zip")
        weight_map.update(dict.fromkeys(part, name))
    index = folder / f"{prefix}.{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 123}, "weight_map": weight_map}))
    return index


def metas(state: Mapping[str, Any]) -> dict[str, TensorMeta]:
    """Key -> TensorMeta of every tensor in ``state``."""
    return {k: meta_of_tensor(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same shape, dtype and values (bitwise, NaN-safe)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    assert torch.equal(a.cpu(), b.cpu())
