"""Saving a sharded model (issue 19, item 3, the output half): FSDP2, tensor-parallel and 2-D
models on 2 and 4 gloo ranks (``tests/ranks.py``) written as DCP (each rank its part) and as
safetensors (one file, or shards, streamed one tensor at a time), read back by
torch's ``dcp.load``, safetensors' ``load_file`` and remap's single-process DCP reader and
compared with the unsharded model's state_dict; one rank's failure stops every rank and
keeps what was saved before. The case functions are in ``sharded_save_cases.py``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from remap.errors import UsageError
from remap.loading import saving
from remap.loading.saving import TEMPORARY_PATTERN, save_state_dict
from remap.loading.sharded_saving import check_sharded_savable, save_sharded
from remap.sources.readers import open_source

from loading import sharded_save_cases as cases
from ranks import RankFailed, run_ranks

pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")

TIES = {"fsdp": {"head.weight": "embed.weight"}}
PLAIN = {"fsdp": cases.plain_fsdp_model, "tp": cases.plain_tp_model}


def _ok(results: list[Any]) -> list[Any]:
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    return results


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    """FSDP2, TP and 2-D models saved on 4 ranks."""
    out = tmp_path_factory.mktemp("four")
    return out, _ok(run_ranks("loading.sharded_save_cases:save_all", 4, out / "work", args=(str(out), ["fsdp", "tp", "2d"]), timeout=300))


@pytest.fixture(scope="module")
def two(four: tuple[Path, list[Any]], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    """FSDP2, TP and many-dtype models saved on 2 ranks; then what 4 ranks wrote as DCP loaded on these 2."""
    out = four[0]
    loads = [("fsdp", "fsdp-4"), ("tp", "tp-4")]
    return out, _ok(run_ranks("loading.sharded_save_cases:save_and_load", 2, out / "work2",
                              args=(str(out), ["fsdp", "tp", "dtypes"], loads), timeout=300))  # fmt: skip


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    out = tmp_path_factory.mktemp("failing")
    return out, _ok(run_ranks("loading.sharded_save_cases:failures", 2, out / "work", args=(str(out / "saves"),), timeout=300))


def _equal(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(found) == sorted(expected), (sorted(found), sorted(expected))
    for key, value in expected.items():
        assert found[key].dtype == value.dtype and found[key].shape == value.shape, key
        assert torch.equal(found[key], value), key


def _untied(reference: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in reference.items() if k not in TIES.get(name, {})}


def _no_temporaries(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if TEMPORARY_PATTERN.fullmatch(p.name)]
    assert not left, left


# ---------------------------------------------------------------------------- DCP


@pytest.mark.parametrize("name", ["fsdp", "tp", "2d"])
def test_dcp_written_on_four_ranks_reads_whole_on_one_process(four, name):
    out, ranks = four
    reference = ranks[0][name]["reference"]
    assert [r[name]["results"]["dcp"] for r in ranks] == [{"path": str(out / f"{name}-4" / "model.dcp"), "format": "dcp", "ranks": 4}] * 4
    folder = out / f"{name}-4" / "model.dcp"
    assert sorted(p.name for p in folder.iterdir()) == [".metadata"] + [f"__{r}_0.distcp" for r in range(4)]
    with open_source(folder) as src:
        _equal({k: src.read(k) for k in src.meta}, reference)
    _no_temporaries(out / f"{name}-4")


def test_plain_buffers_are_written_once_with_rank_0_s_value(four):
    """The BatchNorm's running_mean is plain (not sharded) and differs on every rank (+rank):
    the checkpoint holds rank 0's."""
    out, ranks = four
    expected = ranks[0]["fsdp"]["reference"]["norm.running_mean"]
    with open_source(out / "fsdp-4" / "model.dcp") as src:
        assert torch.equal(src.read("norm.running_mean"), expected)
    assert torch.equal(load_file(out / "fsdp-4" / "model.safetensors")["norm.running_mean"], expected)


@pytest.mark.parametrize("name", ["fsdp", "tp"])
def test_dcp_written_on_four_ranks_loads_on_two_with_dcp_load(two, four, name):
    reference = four[1][0][name]["reference"]
    for rank in two[1]:
        _equal(rank["loaded"][name], reference)


# ---------------------------------------------------------------------------- safetensors


@pytest.mark.parametrize(("name", "world"), [("fsdp", 2), ("fsdp", 4), ("tp", 2), ("tp", 4), ("2d", 4), ("dtypes", 2)])
def test_consolidated_safetensors_equal_the_unsharded_state_dict(two, four, name, world):
    out, ranks = (two[0], [r["saved"] for r in two[1]]) if world == 2 else four
    path = out / f"{name}-{world}" / "model.safetensors"
    assert [r[name]["results"]["single"] for r in ranks] == [{"path": str(path), "format": "safetensors", "ranks": world}] * world
    _equal(load_file(path), _untied(ranks[0][name]["reference"], name))
    with safe_open(path, framework="pt") as f:
        tied = ",".join(f"{a}={b}" for a, b in TIES.get(name, {}).items())
        assert f.metadata() == {"format": "pt", "remap.tied": tied}


@pytest.mark.parametrize(("name", "world"), [("fsdp", 2), ("fsdp", 4), ("tp", 4)])
def test_sharded_safetensors_are_laid_out_as_save_state_dict_lays_out_the_plain_model(two, four, name, world, tmp_path):
    out, ranks = (two[0], [r["saved"] for r in two[1]]) if world == 2 else four
    folder = out / f"{name}-{world}" / "shards"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    plain = save_state_dict(PLAIN[name](), tmp_path / "model.safetensors", max_shard_size=150)
    expected = json.loads(Path(plain["path"]).read_text())
    assert index == expected
    assert [r[name]["results"]["shards"] for r in ranks] == [
        {"path": str(folder / "model.safetensors.index.json"), "format": "safetensors", "shards": plain["shards"], "ranks": world}] * world
    found: dict[str, torch.Tensor] = {}
    for shard in plain["shards"]:
        found.update(load_file(folder / shard))
    _equal(found, _untied(ranks[0][name]["reference"], name))
    with open_source(folder) as src:
        _equal({k: src.read(k) for k in src.meta}, _untied(ranks[0][name]["reference"], name))


@pytest.mark.parametrize("world", [2, 4])
def test_rank_0_holds_one_gathered_tensor_at_a_time(two, four, world):
    """Every rank counts the full tensors alive at once while writing safetensors (bytes):
    the most at any moment is the largest single tensor, and each DTensor is gathered once
    per save (tied names once)."""
    ranks = [r["saved"] for r in two[1]] if world == 2 else four[1]
    for name in ranks[0]:
        reference = _untied(ranks[0][name]["reference"], name)
        sharded = len(reference) - (3 if name == "fsdp" else 0)  # the BatchNorm's buffers are plain
        for rank in ranks:
            peak, largest, calls = rank[name]["peak"]
            assert peak == largest, (name, peak, largest)
            assert largest == max(v.numel() * v.element_size() for v in reference.values()), name
            assert calls == 2 * sharded, (name, calls)


# ---------------------------------------------------------------------------- failures


def test_a_failed_dcp_write_on_one_rank_fails_every_rank_and_keeps_the_old_checkpoint(failing):
    out, ranks = failing
    path = out / "saves" / "model.dcp"
    assert [r["dcp"] for r in ranks] == [
        ("UsageError", f"save: cannot save '{path}' from 2 ranks: rank 1 failed: No space left on device; the previous checkpoint is kept")] * 2
    with open_source(path) as src:
        _equal({k: src.read(k) for k in src.meta}, ranks[0]["first"])
    _no_temporaries(out / "saves")


def test_a_failed_safetensors_write_on_rank_0_fails_every_rank_and_keeps_the_old_file(failing):
    out, ranks = failing
    path = out / "saves" / "model.safetensors"
    assert [r["single"] for r in ranks] == [
        ("UsageError", f"save: cannot save '{path}' from 2 ranks: rank 0 failed: cannot write '{path}': No space left on device; "
                       "the previous file is kept")] * 2  # fmt: skip
    _equal(load_file(path), _untied(ranks[0]["first"], "fsdp"))
    _no_temporaries(out / "saves")


def test_a_failed_shard_write_fails_every_rank_and_keeps_the_old_shards(failing):
    out, ranks = failing
    path = out / "saves" / "shards" / "model.safetensors"
    shard = re.escape(str(path.parent)) + r"/model-00003-of-00004\.[0-9a-f]{8}\.safetensors"
    pattern = (re.escape(f"save: cannot save '{path}' from 2 ranks: rank 0 failed: cannot write '") + shard
               + re.escape(f"': No space left on device: the sharded save to '{path}' stopped, its new shards were removed, "
                           "and what was saved there before is kept"))  # fmt: skip
    for rank in ranks:
        assert rank["shards"][0] == "UsageError" and re.fullmatch(pattern, rank["shards"][1]), rank["shards"]
    assert sorted(p.name for p in path.parent.iterdir()) == [f"model-0000{n}-of-00004.safetensors" for n in range(1, 5)] + [
        "model.safetensors.index.json"]
    with open_source(path.parent) as src:
        _equal({k: src.read(k) for k in src.meta}, _untied(ranks[0]["first"], "fsdp"))


def test_a_failed_gather_on_another_rank_stops_rank_0_s_write(failing):
    out, ranks = failing
    path = out / "saves" / "model.safetensors"
    assert [r["gather"] for r in ranks] == [
        ("UsageError", f"save: cannot save '{path}' from 2 ranks: rank 1 failed: RuntimeError: gather broke; the previous file is kept")] * 2
    _equal(load_file(path), _untied(ranks[0]["first"], "fsdp"))


def test_ranks_that_built_different_models_are_refused_before_anything_is_written(failing):
    out, ranks = failing
    path = out / "saves" / "model.safetensors"
    assert [r["mismatch"] for r in ranks] == [
        ("UsageError", f"save: cannot save '{path}': the ranks hold different models: rank 1 holds 'extra' (a plain tensor "
                       "float32 [2]), which rank 0 does not; every rank must build the same model; the previous file is kept")] * 2  # fmt: skip
    _equal(load_file(path), _untied(ranks[0]["first"], "fsdp"))


def test_a_torch_save_file_from_a_sharded_model_is_refused_on_every_rank(failing):
    out, ranks = failing
    message = (f"save: cannot save '{out / 'saves' / 'model.pt'}' from a sharded model: torch.save needs the whole state_dict "
               "in one process; save to a .safetensors file (written one tensor at a time) or a .dcp folder (each rank writes its part)")
    assert [r["torch"] for r in ranks] == [("UsageError", message)] * 2
    assert not (out / "saves" / "model.pt").exists()


def test_without_a_process_group_save_sharded_says_what_to_do(tmp_path):
    assert not torch.distributed.is_initialized()
    with pytest.raises(UsageError) as caught:
        save_sharded(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")
    assert str(caught.value) == (f"save: cannot save '{tmp_path / 'm.safetensors'}' with save_sharded: no torch.distributed process "
                                 "group is initialised; call it on every rank after init_process_group (torchrun), or use "
                                 "save_state_dict for a module in one process")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_check_sharded_savable_names_each_refusal(tmp_path):
    assert check_sharded_savable(tmp_path / "a.safetensors", max_shard_size="1KB") == "safetensors"
    with pytest.raises(UsageError) as caught:
        check_sharded_savable(tmp_path / "a.dcp", max_shard_size="1KB", what="output.save")
    assert str(caught.value) == (f"output.save: cannot save '{tmp_path / 'a.dcp'}' with max_shard_size: a DCP checkpoint is a "
                                 "folder that DCP lays out itself; leave max_shard_size out")  # fmt: skip
    with pytest.raises(UsageError, match=r"^save: cannot save '.*a\.npz': unknown format '\.npz'; "):
        check_sharded_savable(tmp_path / "a.npz")


# ---------------------------------------------------------------------------- what killed DCP saves leave


def _killed_dcp_save(path: Path) -> int:
    """A single-process DCP save killed after its temporary folder is written, before the swap; its pid."""
    script = textwrap.dedent("""
        import sys, time, torch
        from remap.loading import saving
        def stall(tmp, final):
            print("stalled", flush=True)
            time.sleep(120)
        saving._swap_in = stall
        saving.save_dcp(torch.nn.Linear(3, 2), sys.argv[1])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line == "stalled\n", line
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    return proc.pid


def test_a_killed_dcp_save_leaves_a_named_folder_that_the_next_save_removes(tmp_path):
    path = tmp_path / "model.dcp"
    saving.save_dcp(torch.nn.Linear(3, 2), path)
    pid = _killed_dcp_save(path)
    left = [p for p in tmp_path.iterdir() if p.name != "model.dcp"]
    assert len(left) == 1 and left[0].is_dir() and (left[0] / ".metadata").is_file(), left
    found = TEMPORARY_PATTERN.fullmatch(left[0].name)
    assert found is not None and int(found["pid"]) == pid and found["kind"] == "tmp", left[0].name
    live = tmp_path / f".model.dcp.remap-{saving._HOST}-{os.getppid()}-abcd1234.tmp"  # a running save's
    live.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    link = tmp_path / f".model.dcp.remap-{saving._HOST}-{pid}-linked12.tmp"  # a dead pid's name on a link: never followed
    link.symlink_to(elsewhere, target_is_directory=True)
    with pytest.warns(UserWarning, match=re.escape(f"by remap saves that were killed before they finished: {left[0].name}")):
        saving.save_dcp(torch.nn.Linear(3, 2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, link.name, "elsewhere", "model.dcp"])
    assert (elsewhere / "keep").read_text() == "x"
    with open_source(path) as src:
        assert sorted(src.meta) == ["bias", "weight"]
