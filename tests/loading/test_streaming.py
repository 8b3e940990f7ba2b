"""Loading at scale: streaming batches, zero-copy reads, meta-device targets, sharded saves."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from weights import Small, perturb, snapshot

import remap
from remap.errors import CheckError
from remap.loading.saving import parse_size, save_state_dict
from remap.sources.readers import open_source
from remap.loading.streaming import plan_batches


class Stack(nn.Module):
    """Eight Linear layers (4,224 bytes each) and a LayerNorm (256 bytes): 18 keys, 34,048 bytes."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(8))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.norm(x)


def save(state: dict[str, torch.Tensor], path) -> None:
    save_file({k: v.contiguous() for k, v in state.items()}, path) if str(path).endswith(".safetensors") else torch.save(state, path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("batch_bytes", [1, 10_000, 1 << 30])
def test_streamed_load_equals_source_in_any_batch_size(tmp_path, suffix, batch_bytes):
    src = perturb(Stack(), seed=3)
    path = tmp_path / f"ckpt{suffix}"
    save(src.state_dict(), path)
    dst = Stack()
    report = remap.load(dst, path, batch_bytes=batch_bytes)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    stats = report.stats
    # plain contiguous tensors of the model's dtype: read straight into the parameters
    assert stats["tensors"] == 18 and stats["direct_tensors"] == 18 and stats["zero_copy_tensors"] == 0
    assert stats["bytes_read"] == sum(v.numel() * v.element_size() for v in src.state_dict().values())
    # 10,000 bytes hold two layers (8,448 bytes) and not a third weight: 4 batches, the norm in the last
    assert stats["batches"] == {1: 18, 10_000: 4, 1 << 30: 1}[batch_bytes]


def test_batches_group_consecutive_keys_under_a_budget():
    assert plan_batches([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert plan_batches([], 8) == []


def test_non_contiguous_and_unaligned_tensors_read_correctly(tmp_path):
    t = torch.randn(6, 4)
    state = {"odd": torch.arange(3, dtype=torch.int8), "w": torch.randn(4, 6), "t": t.t()}  # t() is a strided view
    torch.save(state, tmp_path / "a.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "a.safetensors")  # w after 3 int8 bytes
    for name in ("a.pth", "a.safetensors"):
        module = nn.Module()
        module.register_buffer("odd", torch.zeros(3, dtype=torch.int8))
        module.w = nn.Parameter(torch.zeros(4, 6))
        module.t = nn.Parameter(torch.zeros(4, 6))
        remap.load(module, tmp_path / name)
        assert torch.equal(module.w, state["w"]) and torch.equal(module.t, state["t"]) and torch.equal(module.odd, state["odd"])


def test_dry_run_and_plan_read_no_bytes(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(perturb(Stack()).state_dict(), path)
    report = remap.load(Stack(), path, dry_run=True)
    assert report.dry_run and report.stats == {}


def test_progress_is_called_after_every_batch(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(perturb(Stack()).state_dict(), path)
    calls = []
    remap.load(Stack(), path, batch_bytes=10_000, progress=lambda *a: calls.append(a))
    assert len(calls) == 4
    assert calls[-1][0] == calls[-1][1] and calls[-1][2] == calls[-1][3] == 18
    assert [c[0] for c in calls] == sorted(c[0] for c in calls)


# --------------------------------------------------------------------------- meta-device targets


def meta_stack() -> Stack:
    with torch.device("meta"):
        return Stack()


def test_meta_target_is_assigned_real_tensors(tmp_path):
    src = perturb(Stack(), seed=5)
    path = tmp_path / "ckpt.safetensors"
    save(src.state_dict(), path)
    dst = meta_stack()
    report = remap.load(dst, path)
    assert report.target["meta"] is True
    for key, value in dst.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, src.state_dict()[key]), key
    assert all(p.requires_grad for p in dst.parameters())
    x = torch.randn(2, 32)
    assert torch.equal(dst(x), src(x))


def test_meta_target_missing_keys_are_initialised_by_reset_parameters(tmp_path):
    src = perturb(Stack(), seed=5)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("layers.7.")}
    path = tmp_path / "ckpt.safetensors"
    save(state, path)
    dst = meta_stack()
    torch.manual_seed(0)
    report = remap.load(dst, path, rules={"version": 1, "expect": {"missing": "^layers\\.7\\."}})
    assert report.stats["materialised"] == ["layers.7.weight", "layers.7.bias"]
    assert dst.layers[7].weight.device.type == "cpu" and dst.layers[7].weight.abs().sum() > 0
    assert torch.equal(dst.layers[0].weight, src.layers[0].weight)


def test_meta_target_partially_loaded_module_keeps_its_loaded_part(tmp_path):
    src = perturb(Stack(), seed=6)
    state = {k: v for k, v in src.state_dict().items() if k != "layers.3.bias"}
    dst = meta_stack()
    remap.load(dst, state, rules={"version": 1, "expect": {"missing": "^layers\\.3\\.bias$"}})
    assert torch.equal(dst.layers[3].weight, src.layers[3].weight)  # reset_parameters did not undo it
    assert dst.layers[3].bias.device.type == "cpu"


def test_meta_target_dtype_cast_during_copy(tmp_path):
    src = perturb(Stack(), seed=7)
    dst = meta_stack()
    remap.load(dst, {k: v.clone() for k, v in src.state_dict().items()}, dtype="bfloat16")
    assert dst.layers[0].weight.dtype == torch.bfloat16
    assert torch.equal(dst.layers[0].weight, src.layers[0].weight.bfloat16())


class NoReset(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3))
        self.b = nn.Parameter(torch.zeros(3))


def test_meta_target_that_cannot_be_completed_is_refused_before_loading():
    with torch.device("meta"):
        dst = NoReset()
    with pytest.raises(CheckError) as info:
        remap.load(dst, {"a": torch.ones(3)}, rules={"version": 1, "expect": {"missing": "^b$"}})
    assert info.value.report.failures[0].message == (
        "b of a meta-device target would stay uninitialised: NoReset has no reset_parameters; "
        "load them or build the target on a real device"
    )
    assert dst.a.device.type == "meta"


def test_meta_target_with_a_non_persistent_buffer_is_refused():
    with torch.device("meta"):
        dst = Small()
        dst.register_buffer("mask", torch.ones(3), persistent=False)
    state = {k: v.clone() for k, v in perturb(Small()).state_dict().items()}
    with pytest.raises(CheckError, match="non-persistent buffer"):
        remap.load(dst, state)


def test_rules_target_device_meta(tmp_path):
    src = perturb(Small(), seed=1)
    path = tmp_path / "ckpt.safetensors"
    save(src.state_dict(), path)
    report = remap.load(None, path, rules={"version": 1, "target": {"model": "weights:Small", "device": "meta"}})
    assert report.ok and report.target["meta"] is True


# --------------------------------------------------------------------------- saving


def test_sharded_save_round_trips_through_its_index(tmp_path):
    src = perturb(Stack(), seed=8)
    out = tmp_path / "out" / "model.safetensors"
    saved = save_state_dict(src, out, max_shard_size="20KB")  # four layers (16,896 bytes) a shard
    assert saved["path"] == str(out.parent / "model.safetensors.index.json")
    assert saved["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((out.parent / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src.state_dict())
    dst = Stack()
    remap.load(dst, out.parent / "model.safetensors.index.json")
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in src.state_dict().items())
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([*saved["shards"], "model.safetensors.index.json"])


def test_load_with_rules_output_saves_shards(tmp_path):
    src = perturb(Stack(), seed=9)
    rules = {"version": 1, "output": {"save": str(tmp_path / "m.safetensors"), "max_shard_size": 10_000}}
    report = remap.load(Stack(), {k: v.clone() for k, v in src.state_dict().items()}, rules=rules)
    assert report.target["saved"]["shards"] == [f"m-0000{n}-of-00004.safetensors" for n in range(1, 5)]


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1.5 KiB", 1536), (7, 7)])
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_failed_check_after_streaming_setup_leaves_module_untouched(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(perturb(Stack()).state_dict(), path)
    dst = Stack()
    before = snapshot(dst)
    with pytest.raises(CheckError):
        remap.load(dst, path, rules={"version": 1, "rules": [{"drop": "^norm\\."}]}, batch_bytes=1)
    assert snapshot(dst) == before


def test_source_span_matches_read(tmp_path):
    path = tmp_path / "ckpt.pth"
    save(perturb(Stack()).state_dict(), path)
    src = open_source(path)
    span = src.span("layers.0.weight")
    assert span.nbytes == 32 * 32 * 4 and span.shape == (32, 32) and span.dtype == "float32"


def test_a_file_changed_since_planning_is_refused_before_loading(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save(perturb(Stack(), seed=1).state_dict(), path)
    dst = Stack()
    before = snapshot(dst)
    plan = remap.plan(dst, path)
    mtime = path.stat().st_mtime_ns
    save(perturb(Stack(), seed=2).state_dict(), path)  # rewritten between plan and apply
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a later write, even on a coarse clock
    with pytest.raises(remap.SourceError, match="changed on disk since its metadata was read"):
        plan.apply(dst)
    assert snapshot(dst) == before


def test_a_span_outside_its_file_fails_before_the_first_write(tmp_path, monkeypatch):
    from remap.sources import readers as sources

    path = tmp_path / "ckpt.safetensors"
    save(perturb(Stack()).state_dict(), path)
    dst = Stack()
    before = snapshot(dst)
    real = sources._FileSource.span

    def lying(self, key):  # the last tensor claims bytes past the end of the file
        span = real(self, key)
        return span if key != "norm.weight" else sources.Span(span.path, span.offset + 10**6, span.nbytes, span.dtype, span.shape, span.stride)

    monkeypatch.setattr(sources._FileSource, "span", lying)
    with pytest.raises(remap.SourceError, match="lie outside the file"):
        remap.load(dst, path, batch_bytes=1)
    assert snapshot(dst) == before
