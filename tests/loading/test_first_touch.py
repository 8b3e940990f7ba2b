"""First touch of a meta-device target's fresh tensors: each large piece's pages are faulted
in by one ``madvise(MADV_POPULATE_WRITE)`` just before it is read into (benchmarks/first_touch.py
measured 0.85x the wall time of faulting page by page). The tensors stay torch's own
allocations: everything a user does with a parameter afterwards works as before."""

from __future__ import annotations

import io
import mmap
import pickle
import resource
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import remap
from remap.loading import streaming

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE is Linux-only")


class Net(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, 3 * width)
        self.norm = nn.LayerNorm(3 * width)


def checkpoint(tmp_path, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.rand(v.shape, generator=g) for k, v in Net().state_dict().items()}
    save_file(state, str(tmp_path / "ckpt.safetensors"))
    return tmp_path / "ckpt.safetensors", state


def meta_net() -> Net:
    with torch.device("meta"):
        return Net()


def populate_works() -> bool:
    return streaming._populate(streaming._writable_bytes(torch.empty(1 << 16, dtype=torch.uint8)))


@linux
def test_populate_faults_the_pages_in_so_the_write_faults_no_more():
    if not populate_works():
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
    n = 16 << 20
    # memory never touched: an anonymous mapping of its own (torch.empty may get pages the
    # allocator already faulted for an earlier tensor, and then there is nothing to populate)
    area = mmap.mmap(-1, n)
    fresh = torch.frombuffer(area, dtype=torch.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert streaming._populate(streaming._writable_bytes(fresh))
    populated = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fresh.fill_(7)  # every page written: faults only where populating did not reach
    written = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    assert populated - before >= n // 4096 // 2  # at least half the pages came in at once (huge pages: fewer)
    assert written - populated < 64
    assert int(fresh[0]) == 7 and int(fresh[-1]) == 7


@pytest.mark.parametrize("threads", [1, 2])
def test_a_meta_target_populates_its_fresh_pieces_and_loads_the_file(tmp_path, monkeypatch, threads):
    path, state = checkpoint(tmp_path)
    monkeypatch.setattr(streaming, "POPULATE_MIN_BYTES", 4096)  # the two weights (16 KiB, 48 KiB), not the rest
    monkeypatch.setattr(streaming, "PIECE_BYTES", 8192)
    monkeypatch.setattr(streaming, "THREAD_MIN_BYTES", 8192)
    monkeypatch.setattr(streaming, "_read_threads", lambda: threads)
    sizes = []
    real = streaming._populate
    monkeypatch.setattr(streaming, "_populate", lambda buf: sizes.append(len(buf)) or real(buf))
    model = meta_net()
    report = remap.load(model, path)
    assert report.ok and report.stats["direct_tensors"] == 6
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    if threads == 1:  # each large tensor whole, where it is loaded
        assert sorted(sizes) == [64 * 64 * 4, 3 * 64 * 64 * 4]
    else:  # piece by piece on the reading threads
        assert sum(sizes) == 64 * 64 * 4 + 3 * 64 * 64 * 4 and max(sizes) == 8192


def test_an_allocated_target_is_never_populated(tmp_path, monkeypatch):
    path, state = checkpoint(tmp_path, seed=1)
    monkeypatch.setattr(streaming, "POPULATE_MIN_BYTES", 1)
    calls = []
    monkeypatch.setattr(streaming, "_populate", lambda buf: calls.append(len(buf)))
    model = Net()
    assert remap.load(model, path).stats["direct_tensors"] == 6
    assert calls == [] and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("madvise", [None, lambda addr, length, advice: -1], ids=["not-linux", "refused"])
def test_without_populate_the_read_faults_the_pages_itself(tmp_path, monkeypatch, madvise):
    path, state = checkpoint(tmp_path, seed=2)
    monkeypatch.setattr(streaming, "POPULATE_MIN_BYTES", 1)
    monkeypatch.setattr(streaming, "_MADVISE", madvise)
    assert streaming._populate(streaming._writable_bytes(torch.empty(4096, dtype=torch.uint8))) is False
    model = meta_net()
    assert remap.load(model, path).ok
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_loaded_tensors_are_ordinary_tensors(tmp_path, monkeypatch):
    """resize_, pickling, torch.save, .to(), an optimizer step and freeing all work on
    what the populated path loaded, as on any tensor torch allocated."""
    path, state = checkpoint(tmp_path, seed=3)
    monkeypatch.setattr(streaming, "POPULATE_MIN_BYTES", 4096)
    model = meta_net()
    assert remap.load(model, path).ok
    w = model.b.weight
    assert w.untyped_storage().nbytes() == w.numel() * 4  # its own storage, nothing shared or padded
    assert w.untyped_storage().data_ptr() != model.a.weight.untyped_storage().data_ptr()
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(clone.b.weight, state["b.weight"])
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    assert all(torch.equal(v, state[k]) for k, v in torch.load(buf, weights_only=True).items())
    assert model.to(torch.float64).b.weight.dtype == torch.float64
    model.to(torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model.norm(model.b(model.a(torch.ones(2, 64)))).sum().backward()
    before = model.a.weight.detach().clone()
    opt.step()
    assert not torch.equal(model.a.weight, before)
    spare = model.b.bias.detach()
    spare.resize_(10 * spare.numel())  # a resizable storage, as torch.empty gives
    assert spare.numel() == 10 * 3 * 64
    if torch.cuda.is_available():
        assert model.a.weight.detach().pin_memory().is_pinned()
    del model, clone, spare
