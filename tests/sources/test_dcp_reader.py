"""torch.distributed.checkpoint folders as sources (issue 19, item 3, one process): written by
torch's own ``dcp.save`` (one process, and two gloo ranks for a sharded save), read back
through remap and compared with the tensors that were saved; hostile metadata never runs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from remap.errors import SourceError
from remap.sources.dcp_reader import METADATA, read_metadata, resolve_path, sniff
from remap.sources.readers import open_source

dcp = pytest.importorskip("torch.distributed.checkpoint")


def save(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(6, 4, generator=g),
        "layers.0.attn.weight": torch.randn(4, 4, generator=g).to(torch.bfloat16),
        "layers.0.norm.weight": torch.randn(4, generator=g).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(17),
        "mask": torch.rand(5, generator=g) > 0.5,
        "empty": torch.zeros(0, 3),
    }


def adam_state() -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return opt.state_dict()


@pytest.fixture
def flat(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    sd = weights()
    return save(sd, tmp_path / "flat"), sd


@pytest.fixture
def nested(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The common training layout: ``{"model": sd, "optimizer": ..., "lr_scheduler": ..., "epoch": 3}``."""
    sd = weights(1)
    state = {"model": sd, "optimizer": adam_state(), "lr_scheduler": {"last_epoch": 4, "base_lrs": [0.1]}, "epoch": 3}
    return save(state, tmp_path / "nested"), sd


def test_flat_checkpoint_meta_in_order_and_every_tensor_equal(flat):
    folder, sd = flat
    with open_source(folder) as src:
        assert src.description["format"] == "dcp" and src.description["key"] is None
        assert list(src.meta) == list(sd)
        for k, v in sd.items():
            assert src.meta[k].shape == tuple(v.shape) and src.meta[k].dtype == str(v.dtype).removeprefix("torch.")
            got = src.read(k)
            assert got.dtype == v.dtype and torch.equal(got, v), k


def test_folder_metadata_file_and_data_file_all_open_the_checkpoint(flat):
    folder, sd = flat
    assert resolve_path(folder) == folder / METADATA
    data = next(folder.glob("*.distcp"))
    assert sniff(b"\x80\x04", folder / METADATA) and sniff(data.read_bytes()[:512], data)
    for path in (folder, folder / METADATA, data):
        with open_source(path) as src:
            assert list(src.meta) == list(sd)
            assert torch.equal(src.read("embed.weight"), sd["embed.weight"])


def test_model_subtree_is_detected_and_the_rest_listed(nested):
    folder, sd = nested
    with open_source(folder) as src:
        d = src.description
        assert (d["key"], d["key_detected"]) == ("model", True)
        assert list(src.meta) == list(sd)
        assert torch.equal(src.read("layers.0.attn.weight"), sd["layers.0.attn.weight"])
        assert d["entries"]["epoch"] == "a value (not read)"
        assert d["entries"]["lr_scheduler"] == "2 values (not read)"
        assert d["entries"]["optimizer"].startswith("6 tensors")  # step, exp_avg, exp_avg_sq of 2 params


def test_key_selects_a_subtree_and_names_it_relative(nested):
    folder, _ = nested
    with open_source(folder, key="optimizer") as src:
        assert "state.0.exp_avg" in src.meta and src.meta["state.0.exp_avg"].shape == (2, 3)
        assert src.read("state.0.step").ndim == 0
        assert "param_groups.0.lr" in src.description["entries"]


def test_unknown_key_names_the_top_level_entries(nested):
    folder, _ = nested
    with pytest.raises(SourceError, match=r"source.key 'modle'.*'model'.*did you mean 'model'") as info:
        open_source(folder, key="modle")
    assert info.value.exit_code == 3


def test_top_level_tensors_beside_optimizer_state_torchtitan_layout(tmp_path):
    """torchtitan flattens the model's keys to the top level, beside ``optimizer`` and friends."""
    sd = weights(2)
    folder = save({**sd, "optimizer": adam_state(), "train_state": {"step": 10}}, tmp_path / "titan")
    with open_source(folder) as src:
        assert list(src.meta) == list(sd)
        assert src.description["entries"]["train_state"] == "1 value (not read)"
        assert torch.equal(src.read("mask"), sd["mask"])


def test_two_weight_sets_need_a_key(tmp_path):
    folder = save({"model": weights(0), "ema": weights(1)}, tmp_path / "two")
    with pytest.raises(SourceError, match=r"several sets of weights: 'ema', 'model'"):
        open_source(folder)
    with open_source(folder, key="ema") as src:
        assert torch.equal(src.read("embed.weight"), weights(1)["embed.weight"])


def test_app_state_layout_two_levels_deep(tmp_path):
    """The DCP tutorial's ``{"app": AppState}`` saves ``app.model.*`` and ``app.optim.*``."""
    sd = weights(3)
    folder = save({"app": {"model": sd, "optim": adam_state()}}, tmp_path / "app")
    with open_source(folder) as src:
        assert src.description["key"] == "app.model"
        assert list(src.meta) == list(sd)


def test_read_many_is_one_load_equal_to_reads(flat):
    folder, sd = flat
    with open_source(folder) as src:
        reader = src._owner["embed.weight"]
        many = reader.read_many(list(sd))
        assert all(torch.equal(many[k], v) for k, v in sd.items())
        assert reader.fqn("mask") == "mask"


TWO_RANKS = r"""
import os, sys, warnings, torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, out):
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=2)
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh
    import torch.distributed.checkpoint as dcp
    mesh = init_device_mesh("cpu", (2,))
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 3, generator=g), torch.randn(7, generator=g)
    sd = {"w": distribute_tensor(w, mesh, [Shard(0)]), "b": distribute_tensor(b, mesh, [Shard(0)]), "s": torch.tensor(3)}
    dcp.save({"model": sd}, checkpoint_id=out)
    dist.barrier()  # both ranks done before either tears gloo down
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: gloo's threads can abort a rank there ("terminate called without an active exception")

if __name__ == "__main__":
    mp.spawn(run, args=(os.path.abspath(sys.argv[1]),), nprocs=2)
"""


def test_checkpoint_saved_sharded_on_two_ranks_loads_whole_on_one(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, str(script), "sharded"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "sharded"
    assert len(list(folder.glob("*.distcp"))) == 2
    assert len(read_metadata(folder / METADATA).state_dict_metadata["model.w"].chunks) == 2
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 3, generator=g), torch.randn(7, generator=g)
    with open_source(folder) as src:
        assert torch.equal(src.read("w"), w) and torch.equal(src.read("b"), b) and int(src.read("s")) == 3


# ---------------------------------------------------------------------------- broken and hostile folders


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_truncated_data_file_is_an_error_at_open_naming_it(flat):
    folder, _ = flat
    data = next(folder.glob("*.distcp"))
    truncate(data, data.stat().st_size // 2)
    with pytest.raises(SourceError, match="truncated") as info:
        open_source(folder)
    assert info.value.where == str(data) and info.value.exit_code == 3


def test_missing_data_file_is_an_error_naming_it(flat):
    folder, _ = flat
    data = next(folder.glob("*.distcp"))
    data.unlink()
    with pytest.raises(SourceError, match="missing") as info:
        open_source(folder)
    assert info.value.where == str(data)


def test_corrupt_data_is_an_error_at_read_naming_file_and_key(flat):
    folder, sd = flat
    data = next(folder.glob("*.distcp"))
    data.write_bytes(b"\x00" * data.stat().st_size)  # same size: only reading finds it
    with open_source(folder) as src:
        assert list(src.meta) == list(sd)  # planning needs no data
        with pytest.raises(SourceError, match=r"cannot read tensor 'embed.weight' \(stored in __0_0.distcp\)") as info:
            src.read("embed.weight")
    assert info.value.where == str(data)


def test_data_changed_after_planning_is_refused(flat):
    folder, _ = flat
    src = open_source(folder)
    data = next(folder.glob("*.distcp"))
    os.utime(data, ns=(1, 1))
    with pytest.raises(SourceError, match="changed on disk"):
        src.read("mask")


def rewrite_metadata(folder: Path, change) -> None:
    """Load the (trusted, test-made) metadata with torch, change it, pickle it back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = dcp.FileSystemReader(str(folder)).read_metadata()
    change(md)
    (folder / METADATA).write_bytes(pickle.dumps(md))


def test_chunks_that_do_not_tile_the_tensor_are_refused(flat):
    folder, _ = flat

    def shrink(md):
        md.state_dict_metadata["embed.weight"].size = torch.Size([7, 4])

    rewrite_metadata(folder, shrink)
    with pytest.raises(SourceError, match=r"'embed.weight'.*do not tile"):
        open_source(folder)


@pytest.mark.hostile
def test_storage_outside_the_folder_is_refused(flat, tmp_path):
    folder, _ = flat
    (tmp_path / "secret").write_bytes(b"x" * 10_000)

    def escape(md):
        for info in md.storage_data.values():
            info.relative_path = "../secret"

    rewrite_metadata(folder, escape)
    with pytest.raises(SourceError, match=r"stored in '../secret', expected the name of a file in the checkpoint's folder"):
        open_source(folder)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.hostile
def test_hostile_metadata_pickle_runs_nothing(flat, tmp_path):
    folder, _ = flat
    marker = tmp_path / "pwned"

    def inject(md):
        md.version = _Payload(str(marker))

    rewrite_metadata(folder, inject)
    with pytest.raises(SourceError, match=r"names 'posix.system'.*never imports or runs") as info:
        open_source(folder)
    assert info.value.where == str(folder / METADATA)
    assert not marker.exists()


@pytest.mark.hostile
def test_hostile_metadata_that_is_not_dcp_at_all(tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / METADATA).write_bytes(pickle.dumps(_Payload(str(marker))))
    (folder / "__0_0.distcp").write_bytes(b"PK\x03\x04")
    with pytest.raises(SourceError, match="never imports or runs"):
        open_source(folder)
    assert not marker.exists()


@pytest.mark.hostile
@pytest.mark.parametrize("data", [b"\x80\x04", b"\x80\x04K\x01.", b"\x80\x04" + b"(" * 100_000], ids=["cut", "int", "marks"])
def test_garbage_metadata_is_a_source_error(tmp_path, data):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / METADATA).write_bytes(data)
    with pytest.raises(SourceError) as info:
        open_source(folder)
    assert info.value.where == str(folder / METADATA)


def test_the_real_metadata_reads_as_torchs_own(nested):
    folder, _ = nested
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dcp.FileSystemReader(str(folder)).read_metadata()
    ours = read_metadata(folder / METADATA)
    assert ours.state_dict_metadata == theirs.state_dict_metadata
    assert ours.storage_data == theirs.storage_data
    assert ours.planner_data == theirs.planner_data


def test_torch_reader_is_never_asked_for_the_metadata(flat, monkeypatch):
    """Reads go through dcp.load with remap's metadata: torch never unpickles .metadata."""
    folder, sd = flat

    def refuse(*args, **kwargs):
        raise AssertionError("pickle.load of .metadata")

    monkeypatch.setattr(dcp.FileSystemReader, "read_metadata", refuse)
    with open_source(folder) as src:
        assert torch.equal(src.read("embed.weight"), sd["embed.weight"])
