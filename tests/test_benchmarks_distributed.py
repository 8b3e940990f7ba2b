"""benchmarks/distributed.py runs end to end at ``--quick`` size (behaviour only, never timing).

The command writes a 50 MB checkpoint and loads it into a 2-rank FSDP2 model (gloo, CPU) with each
variant, each a fresh group of processes; the JSON it writes must carry every field, every variant's
own check must pass, and the kernel's counters must agree with what each reader says it asked for
(the measurement measures). The last test shows the check failing on a wrong load.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import distributed  # noqa: E402

pytest.importorskip("torch.distributed.fsdp")
HAS_SHARDED = importlib.util.find_spec("remap.loading.sharded") is not None


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("distributed")
    out = tmp / "results.json"
    variants = list(distributed.VARIANTS) if HAS_SHARDED else list(distributed.TORCH)
    p = subprocess.run([sys.executable, str(BENCH / "distributed.py"), "--quick", "--out", str(out), "--tmpdir", str(tmp),
                        "--variants", ",".join(variants)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    r["exit"], r["stdout"], r["left_behind"] = p.returncode, p.stdout, [x.name for x in tmp.iterdir()]
    return r


def test_the_json_has_every_field(result: dict[str, Any]) -> None:
    ckpt = result["checkpoint"]
    assert result["quick"] is True and result["world"] == 2 and result["repeats"] == 1
    assert ckpt["size"] == "quick" and ckpt["tensors"] == 57 and 0 < ckpt["largest_tensor"] < ckpt["tensor_bytes"] < ckpt["bytes"]
    assert result["fastest_torch"] in distributed.TORCH
    for v, b in result["variants"].items():
        assert b["status"] == "ok", (v, b["status"], b["ranks"])
        for key in ("seconds", "bytes_read", "peak_above_shard", "bytes_read_over_share", "peak_over_largest_tensor",
                    "vs_fastest_torch", "others"):  # fmt: skip
            assert isinstance(b[key], (int, float)), (v, key)
        assert set(b["targets"]) == {"wall", "bytes_read", "peak_above_shard"}
        assert [r["rank"] for r in b["ranks"]] == [0, 1]
        for r in b["ranks"]:
            assert r["status"] == "ok" and r["seconds"] > 0 and r["samples"] > 0
            assert set(r["peak"]) == {"rss", "anon", "file"}
            assert r["bytes_read"] == r["rchar"] + r["mapped"]
            assert r["shard_bytes"] * 2 >= ckpt["tensor_bytes"]  # FSDP2 pads, never drops
    assert result["exit"] == 0, result["stdout"][-3000:]
    assert result["left_behind"] == ["results.json"]


def test_the_counters_see_what_each_reader_asked_for(result: dict[str, Any]) -> None:
    """load_file maps every tensor on rank 0 and nothing on rank 1; DCP maps each rank's slices;
    remap preads its shard: the kernel's counters (RssFile rise, rchar) show each of these."""
    total = result["checkpoint"]["tensor_bytes"]
    v = result["variants"]
    r0, r1 = v["torch_broadcast"]["ranks"]
    assert r0["asked"] == total and r1["asked"] == 0
    assert r0["mapped"] >= 0.95 * total and r1["mapped"] < 0.2 * total
    dcp = v["torch_dcp_hf"]["ranks"]
    assert sum(r["asked"] for r in dcp) == total
    for r in dcp:
        assert r["mapped"] >= 0.9 * r["asked"] and r["asked"] < 0.6 * total
    for name in ("remap", "remap_no_rollback"):
        for r in v.get(name, {}).get("ranks", []):
            assert r["rchar"] >= r["asked"] >= r["shard_bytes"] * 0.9, (name, r)


@pytest.mark.skipif(not HAS_SHARDED, reason="remap.load into DTensor targets (remap.loading.sharded) has not landed")
def test_remap_reports_its_ranks(result: dict[str, Any]) -> None:
    for name in ("remap", "remap_no_rollback"):
        ranks = result["variants"][name]["ranks"][0]["remap_ranks"]
        assert [r["rank"] for r in ranks] == [0, 1] and all(r["bytes_read"] > 0 for r in ranks)


def test_the_table_renders(result: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    distributed.distributed_table(result)
    text = capsys.readouterr().out
    for needle in ("FSDP2 load", "torch_broadcast", "torch_dcp_hf", "Per rank", "rchar MiB"):
        assert needle in text


def test_the_check_catches_a_wrong_load(tmp_path: Path) -> None:
    """The ranks' self-check on a plain (unsharded) model: equal, then one tensor changed, one missing."""
    import torch
    from safetensors.torch import load_file

    info = distributed.make_checkpoint("quick", tmp_path)
    model = distributed.build_llama("quick").to_empty(device="cpu")
    model.load_state_dict(load_file(tmp_path / distributed.ST))
    assert distributed.check(model, tmp_path) == [] and info["tensors"] == len(model.state_dict())
    with torch.no_grad():
        model.model.norm.weight.add_(1)
    assert distributed.check(model, tmp_path) == ["differs: model.norm.weight"]
    del model.lm_head
    assert distributed.check(model, tmp_path) == ["not in the model: lm_head.weight", "differs: model.norm.weight"]
