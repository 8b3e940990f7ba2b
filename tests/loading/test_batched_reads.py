"""Tensors without a file span are read a batch at a time through ``Source.read_many``: a DCP
folder (a training run consolidated on one process) then costs one ``dcp.load`` per batch, not
one per key; every other source reads them one by one as before, with the same values."""

from __future__ import annotations

import warnings

import pytest
import torch

import remap
from remap.sources import dcp_reader
from remap.sources.readers import open_source

dcp = pytest.importorskip("torch.distributed.checkpoint")


class Many(torch.nn.Module):
    def __init__(self, n: int = 40) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(3, 2) for _ in range(n))


def saved(tmp_path, n: int = 40) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = Many(n).state_dict()
    folder = tmp_path / "run.dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, checkpoint_id=str(folder), no_dist=True)
    return str(folder), state


def test_a_dcp_folder_loads_in_one_dcp_load_per_batch(tmp_path, monkeypatch):
    folder, state = saved(tmp_path)
    calls = []
    real = dcp_reader._DcpReader._load

    def counted(self, keys, *args, **kwargs):
        calls.append(len(list(keys)))
        return real(self, keys, *args, **kwargs)

    monkeypatch.setattr(dcp_reader._DcpReader, "_load", counted)
    model = Many()
    report = remap.load(model, folder, rules={"version": 1, "source": {"key": "model"}, "rules": []})
    assert report.ok and report.stats["tensors"] == len(state) == 80
    assert calls == [80]  # one batch (80 small tensors), one dcp.load
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_read_many_equals_read_for_every_source_kind(tmp_path):
    folder, state = saved(tmp_path, n=3)
    torch.save({f"x.{k}": v for k, v in state.items()}, tmp_path / "a.pth")
    for path, prefix, key in ((folder, "", "model"), (tmp_path / "a.pth", "x.", None)):
        with open_source(path, key=key) as src:
            keys = list(src.meta)[::-1]
            many = src.read_many([*keys, keys[0]])  # a repeated key is read once
            assert list(many) == keys
            assert all(torch.equal(many[k], src.read(k)) for k in keys)
            assert all(torch.equal(many[k], state[k.removeprefix(prefix)]) for k in keys)


def test_read_many_names_an_unknown_key(tmp_path):
    folder, _ = saved(tmp_path, n=1)
    with open_source(folder, key="model") as src, pytest.raises(remap.errors.SourceError, match="no tensor 'nope' in this source"):
        src.read_many(["layers.0.weight", "nope"])
