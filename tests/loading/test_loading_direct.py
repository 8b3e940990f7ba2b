"""How tensors travel from the file: direct reads into the parameters, mapped views, and
the opt-in ``mmap_weights`` mode that keeps the file's pages as a meta-device target's weights."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from weights import perturb, snapshot

import remap
from remap.loading import streaming
from remap.errors import SourceError, UsageError


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)


def write(path, state):
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def meta_net(**kwargs) -> Net:
    with torch.device("meta"):
        return Net(**kwargs)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_plain_tensors_are_read_straight_into_the_parameters(tmp_path, suffix):
    src = perturb(Net(), seed=1)
    path = write(tmp_path / f"ckpt{suffix}", src.state_dict())
    dst = Net()
    params_before = {k: (p.data_ptr(), p._version) for k, p in dst.named_parameters()}
    report = remap.load(dst, path)
    assert report.stats["direct_tensors"] == 6 and report.stats["zero_copy_tensors"] == 0
    assert report.stats["load_calls"] == 3  # load_state_dict still runs for every owner
    for k, p in dst.named_parameters():
        assert torch.equal(p, src.state_dict()[k]), k
        assert p.data_ptr() == params_before[k][0]  # the same memory, written in place
        assert p._version > params_before[k][1]  # autograd sees an in-place write, as with copy_
        assert p.requires_grad


def test_what_needs_an_op_a_cast_or_a_gather_is_read_as_a_view(tmp_path):
    src = perturb(Net(), seed=2)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["a.weight"] = state["a.weight"].half()  # cast on the way by load_state_dict
    state["b.weight"] = src.b.weight.detach().t().contiguous().t()  # strided in the file (.pth keeps strides)
    path = write(tmp_path / "ckpt.pth", state)
    dst = Net()
    report = remap.load(dst, path)
    assert report.stats["direct_tensors"] == 4 and report.stats["zero_copy_tensors"] == 2
    assert torch.equal(dst.a.weight, state["a.weight"].float())
    assert torch.equal(dst.b.weight, src.b.weight)
    assert torch.equal(dst.norm.weight, src.norm.weight)


def test_an_op_reads_a_view(tmp_path):
    src = perturb(Net(), seed=3)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["a.weight"] = state["a.weight"].t().contiguous()
    path = write(tmp_path / "ckpt.safetensors", state)
    dst = Net()
    report = remap.load(dst, path, rules={"version": 1, "rules": [{"transpose": "^a\\.weight$"}]})
    assert report.stats["direct_tensors"] == 5 and report.stats["zero_copy_tensors"] == 1
    assert torch.equal(dst.a.weight, src.a.weight)


class Doubling(nn.Linear):
    """A module whose load rewrites the incoming values: direct reads must not bypass it."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = state_dict[key] * 2
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def test_a_module_with_its_own_loading_gets_the_file_values_through_torch(tmp_path):
    src = perturb(Net(), seed=4)
    path = write(tmp_path / "ckpt.safetensors", src.state_dict())
    dst = Net()
    dst.a = Doubling(16, 16)
    hooked = []
    dst.b.register_load_state_dict_pre_hook(lambda module, sd, prefix, *a: hooked.append(torch.equal(sd[prefix + "weight"], src.b.weight)))
    report = remap.load(dst, path)
    assert report.stats["direct_tensors"] == 2 and report.stats["zero_copy_tensors"] == 4  # only norm is plain
    assert torch.equal(dst.a.weight, src.a.weight * 2)
    assert hooked == [True]
    assert torch.equal(dst.b.weight, src.b.weight)


def test_large_tensors_are_read_in_pieces_by_several_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "PIECE_BYTES", 1000)  # not a multiple of anything
    monkeypatch.setattr(streaming, "_read_threads", lambda: 3)
    src = perturb(Net(width=40), seed=5)
    path = write(tmp_path / "ckpt.safetensors", src.state_dict())
    dst = Net(width=40)
    report = remap.load(dst, path, batch_bytes=1)
    assert report.stats["direct_tensors"] == 6
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_bfloat16_model_from_a_bfloat16_file(tmp_path):
    src = perturb(Net(), seed=6).to(torch.bfloat16)
    path = write(tmp_path / "ckpt.safetensors", src.state_dict())
    dst = Net().to(torch.bfloat16)
    report = remap.load(dst, path)
    assert report.stats["direct_tensors"] == 6
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_a_short_read_is_a_source_error(tmp_path, monkeypatch):
    path = write(tmp_path / "ckpt.safetensors", perturb(Net(), seed=7).state_dict())
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: 0)  # the file ends early
    with pytest.raises(SourceError, match="truncated since it was planned"):
        remap.load(Net(), path)


def test_a_meta_target_gets_fresh_tensors_read_directly(tmp_path):
    src = perturb(Net(), seed=8)
    path = write(tmp_path / "ckpt.safetensors", src.state_dict())
    dst = meta_net()
    report = remap.load(dst, path)
    assert report.stats["direct_tensors"] == 6 and report.stats["mmap_weights_tensors"] == 0
    for k, v in dst.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, src.state_dict()[k]), k
    assert all(p.requires_grad and type(p) is nn.Parameter for p in dst.parameters())


# --------------------------------------------------------------------------- mmap_weights


def test_mmap_weights_keeps_the_file_pages_as_the_weights(tmp_path):
    src = perturb(Net(), seed=9)
    path = write(tmp_path / "ckpt.safetensors", src.state_dict())
    file_bytes = path.read_bytes()
    dst = meta_net()
    report = remap.load(dst, path, mmap_weights=True)
    assert report.ok and report.stats["mmap_weights_tensors"] == 6 and report.stats["direct_tensors"] == 0
    assert not report.warnings
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k
    assert all(p.requires_grad for p in dst.parameters())
    # the weights are private: training writes them, never the file
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    dst.a(torch.randn(2, 16)).sum().backward()
    opt.step()
    assert not torch.equal(dst.a.weight, src.a.weight)
    assert path.read_bytes() == file_bytes
    # and the module behaves as any other
    again = pickle.loads(pickle.dumps(dst))
    assert torch.equal(again.a.weight, dst.a.weight)
    assert torch.equal(copy.deepcopy(dst).b.weight, src.b.weight)


def test_mmap_weights_copies_what_a_cast_changes_and_says_so(tmp_path):
    src = perturb(Net(), seed=10)
    path = write(tmp_path / "ckpt.safetensors", src.state_dict())
    dst = meta_net()
    report = remap.load(dst, path, mmap_weights=True, dtype="bfloat16")
    assert report.stats["mmap_weights_tensors"] == 0 and report.stats["direct_tensors"] == 0
    assert report.warnings == ("mmap_weights: 6 tensor(s) were copied, not mapped: an op or a cast changes them, "
                               "or the source has no file to map",)  # fmt: skip
    assert torch.equal(dst.a.weight, src.a.weight.bfloat16())


def test_mmap_weights_needs_a_meta_target_on_the_cpu(tmp_path):
    path = write(tmp_path / "ckpt.safetensors", perturb(Net(), seed=11).state_dict())
    dst = Net()
    before = snapshot(dst)
    with pytest.raises(UsageError, match="meta-device target"):
        remap.load(dst, path, mmap_weights=True)
    assert snapshot(dst) == before
    with pytest.raises(UsageError, match="cannot load onto device"):
        remap.load(meta_net(), path, mmap_weights=True, device="cuda")


def test_without_mmap_weights_a_meta_target_owns_its_memory(tmp_path):
    src = perturb(Net(), seed=12)
    path = write(tmp_path / "ckpt.safetensors", src.state_dict())
    dst = meta_net()
    remap.load(dst, path)
    path.unlink()  # nothing refers to the file any more
    write(path, perturb(Net(), seed=13).state_dict())
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_a_failing_piece_fails_the_load_after_every_piece_is_done(tmp_path, monkeypatch):
    monkeypatch.setattr(streaming, "PIECE_BYTES", 512)
    monkeypatch.setattr(streaming, "_read_threads", lambda: 3)
    path = write(tmp_path / "ckpt.safetensors", perturb(Net(width=40), seed=14).state_dict())
    real, calls = os.preadv, []

    def flaky(fd, buffers, offset):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError(5, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", flaky)
    with pytest.raises(SourceError, match="cannot read bytes .*: Input/output error"):
        remap.load(meta_net(width=40), path)


@pytest.mark.parametrize("meta", [False, True])
def test_torch_swap_tensors_mode_still_loads_the_file_values(tmp_path, meta):
    src = perturb(Net(), seed=15)
    path = write(tmp_path / "ckpt.safetensors", src.state_dict())
    dst = meta_net() if meta else Net()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        report = remap.load(dst, path)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert report.stats["direct_tensors"] == 0 and report.stats["zero_copy_tensors"] == 6
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_reads_run_ahead_of_the_batch_being_loaded(tmp_path, monkeypatch):
    """Every large tensor is handed to the reading threads before the first batch loads,
    so the threads never wait at a batch's end; the batches still load one by one."""
    monkeypatch.setattr(streaming, "PIECE_BYTES", 1000)
    monkeypatch.setattr(streaming, "_read_threads", lambda: 2)
    events = []
    real_ahead, real_load = streaming._Direct.ahead, streaming._Loader.load

    def ahead(self, jobs):
        jobs = list(jobs)
        events.append(("ahead", sorted(t for t, *_ in jobs if t.endswith("weight"))))
        return real_ahead(self, jobs)

    monkeypatch.setattr(streaming._Direct, "ahead", ahead)
    monkeypatch.setattr(streaming._Loader, "load", lambda self, out: events.append(("load", sorted(out))) or real_load(self, out))
    src = perturb(Net(width=40), seed=16)
    path = write(tmp_path / "ckpt.safetensors", src.state_dict())
    dst = Net(width=40)
    report = remap.load(dst, path, batch_bytes=1)
    assert events[0] == ("ahead", ["a.weight", "b.weight", "norm.weight"])
    assert [e for e, _ in events[1:]] == ["load"] * 6 and report.stats["batches"] == 6
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items())


def test_a_read_ahead_failing_in_a_later_batch_stops_every_thread(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(streaming, "PIECE_BYTES", 512)
    monkeypatch.setattr(streaming, "_read_threads", lambda: 2)
    path = write(tmp_path / "ckpt.safetensors", perturb(Net(width=40), seed=17).state_dict())
    real = os.preadv
    last = os.path.getsize(path) - 2000  # somewhere in the last tensors

    def flaky(fd, buffers, offset):
        if offset >= last:
            raise OSError(5, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", flaky)
    with pytest.raises(SourceError, match="cannot read bytes .*: Input/output error"):
        remap.load(meta_net(width=40), path, batch_bytes=1)
    assert not [t for t in threading.enumerate() if t.name.startswith("remap-read")]
