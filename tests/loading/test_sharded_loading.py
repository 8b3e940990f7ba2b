"""Loading rules into sharded (DTensor) targets on 2 and 4 gloo ranks (issue 19, items 1, 2, 4, 5).

Each case (tests/loading/sharded_cases.py) loads a checkpoint in another layout (``module.``
prefix, fused qkv split by the rules, transposed head) into a model sharded with FSDP2, tensor
parallel or both, and returns the full tensors gathered with ``full_tensor()``; they must equal
the checkpoint's own tensors (and a one-process ``remap.load`` of the same rules). Reads are
counted twice: by remap (``stats.ranks``) and by the kernel (``rchar`` of /proc/self/io).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loading.sharded_cases import RULES, Net, checkpoint, reference
from ranks import RankFailed, run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def ok(results: list) -> list:
    for r in results:
        if isinstance(r, RankFailed):
            raise AssertionError(r.traceback)
    return results


def expect_equal(result: dict) -> None:
    ref = reference().state_dict()
    assert result["ok"]
    assert set(result["full"]) == set(ref)
    different = [k for k in ref if not torch.equal(result["full"][k], ref[k])]
    assert different == []
    assert all(torch.equal(result["full"][k], result["single"][k]) for k in ref)
    torch.testing.assert_close(result["forward"], result["want"], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    variants = [["load_equal", "fsdp", "safetensors", False], ["load_equal", "tp", "pth", False],
                ["load_equal", "fsdp", "pth", True], ["bytes_per_rank"], ["one_rank_fails", "check"],
                ["one_rank_fails", "read"], ["in_bfloat16"], ["one_rank_fails", "read", True],
                ["with_a_key_missing"], ["with_optimizer_state"], ["truncated_after_planning"],
                ["other_weights_on_one_rank"]]  # fmt: skip
    return ok(run_ranks("loading.sharded_cases:many", 2, tmp_path_factory.mktemp("two"), args=(variants,), timeout=300))


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    variants = [["load_equal", "2d", "safetensors", True], ["load_equal", "fsdp", "safetensors", False], ["bytes_per_rank"]]
    return ok(run_ranks("loading.sharded_cases:many", 4, tmp_path_factory.mktemp("four"), args=(variants,), timeout=300))


@pytest.mark.parametrize("case", [0, 1, 2], ids=["fsdp2", "tensor-parallel-pth", "fsdp2-built-on-meta"])
def test_two_ranks_load_equal_to_the_checkpoint(two, case):
    for rank in two:
        expect_equal(rank[case])


@pytest.mark.parametrize("case", [0, 1], ids=["2d-mesh-on-meta", "fsdp2"])
def test_four_ranks_load_equal_to_the_checkpoint(four, case):
    for rank in four:
        expect_equal(rank[case])


def test_each_rank_reads_its_part_and_the_report_has_every_rank(two, four):
    for results, world, case in ((two, 2, 3), (four, 4, 2)):
        for rank, r in enumerate(results):
            got = r[case]
            assert got["equal"]
            share = got["file"] / world
            assert got["rchar"] <= 1.1 * share, (world, rank, got["rchar"], share)  # what the kernel saw
            assert got["stats"]["ranks"][rank]["bytes_read"] <= 1.1 * share
            assert [s["rank"] for s in got["stats"]["ranks"]] == list(range(world))
    two_fsdp = two[0][0]
    assert two_fsdp["target"]["sharded"]["world_size"] == 2
    assert two_fsdp["stats"]["ranks"][0]["box_reads"] > 0


def test_a_failed_check_on_one_rank_stops_every_rank_before_any_write(two):
    for rank in two:
        kind, message = rank[4]["error"]
        assert kind == "CheckError"
        assert message == (
            "the ranks planned differently (2 ranks; every rank must load the same rules, source and target: "
            "a file that differs between nodes, a model built differently); no rank wrote anything:\n"
            "- rank 1's plan failed its checks: 1 mapped key(s) differ in shape from the target (shapes: error):\n"
            "    blocks.1.up.weight: checkpoint [3, 3] (from 'module.blocks.1.up.weight') vs model [20, 8]\n"
            "  Fix the rules, or allow skipping them with `shapes: {skip: [pattern]}` and list them in expect.missing.\n"
            "- first difference: rank 0 has `blocks.1.up.weight [20, 8] float32 <- module.blocks.1.up.weight [20, 8] float32`, "
            "rank 1 has `embed.weight [16, 8] float32 <- module.embed.weight [16, 8] float32`"
        )
        assert rank[4]["untouched"]


def test_a_read_failing_on_one_rank_puts_every_rank_back(two):
    path = None
    for rank in two:
        kind, message = rank[5]["error"]
        path = message.split("(", 1)[1].split(")", 1)[0]
        assert kind == "SourceError"
        assert message == f"disk on fire ({path})\n(on rank 1 of 2; every rank put its module back as it was)"
        assert rank[5]["untouched"]


def test_a_read_failing_on_one_rank_puts_a_target_built_on_meta_back_on_meta(two):
    for rank in two:
        kind, message = rank[7]["error"]
        assert kind == "SourceError" and message.endswith("(on rank 1 of 2; every rank put its module back as it was)")
        assert rank[7]["untouched"] and rank[7]["devices"] == ["cpu", "meta"]  # the buffers real, the parameters meta


def test_a_bfloat16_sharded_target_loads_the_float32_checkpoint_cast_and_says_so(two):
    for rank in two:
        got = rank[6]
        assert all(torch.equal(got["full"][k], v) for k, v in got["ref"].items())
        assert got["precision"] == [("float32", "bfloat16", "narrowed", 26)]


def test_a_key_no_source_feeds_is_initialised_by_its_module_and_reported(two):
    for rank in two:
        got = rank[8]
        assert got["ok"] and got["materialised"] == ["head.weight"] and got["others_equal"]
        assert got["warnings"] == ("1 tensor(s) not in the checkpoint were initialised on the meta-device target by their "
                                   "modules' initialisers: head.weight",)  # fmt: skip
        assert 0.1 < got["head_std"] < 0.4  # Linear.reset_parameters: uniform(-1/sqrt(8), 1/sqrt(8)), std 0.20


def test_optimizer_state_follows_the_weights_into_a_sharded_optimizer(two):
    """AdamW's saved moments land in an FSDP2 model's AdamW as DTensors placed like their
    parameters, equal (gathered) to a one-process load's; the next step gives the same weights."""
    for rank in two:
        got = rank[9]
        assert got["loaded"] == ["loaded"] and got["placed"]
        assert set(got["got"]) == set(got["want"]) and len(got["want"]) == 24
        for name, state in got["want"].items():
            assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
            assert all(torch.equal(got["got"][name][k], v) for k, v in state.items()), name
        assert any(bool(v.abs().sum()) for s in got["want"].values() for v in (s["exp_avg"],))  # a real, stepped state
        assert max(got["stepped"].values()) <= 1e-6


@pytest.mark.hostile
def test_a_checkpoint_cut_after_planning_is_an_error_on_every_rank_with_every_module_untouched(two):
    for rank in two:
        kind, message, code = rank[10]["error"]
        path = message.split("plan again (", 1)[1].split(")", 1)[0]
        assert (kind, code) == ("SourceError", 3)
        assert message == (f"the file changed on disk since its metadata was read; plan again ({path})\n"
                           "(on every rank of 2; every rank put its module back as it was)")  # fmt: skip
        assert rank[10]["untouched"]


def test_ranks_reading_different_checkpoints_of_the_same_shapes_are_stopped(two):
    """Two fine-tunes with the same names and shapes would plan alike: the files' fingerprints differ."""
    for rank in two:
        kind, message = rank[11]["error"]
        head, first = message.split("\n")
        assert kind == "CheckError" and head.startswith("the ranks planned differently (2 ranks;")
        assert re.fullmatch(r"- first difference: rank 0 has `file of (\d+) bytes, sampled tensors [0-9a-f]{24}`, "
                            r"rank 1 has `file of \1 bytes, sampled tensors [0-9a-f]{24}`", first), first
        assert rank[11]["untouched"]


def test_dcp_saved_on_four_ranks_loads_on_two_and_on_one(tmp_path):
    folder = str(tmp_path / "ck.dcp")
    ok(run_ranks("loading.sharded_cases:dcp_save_four", 4, tmp_path / "save", args=(folder,), timeout=240))
    ref = reference().state_dict()
    for r in ok(run_ranks("loading.sharded_cases:dcp_resharded", 2, tmp_path / "load", args=(folder,), timeout=240)):
        assert [k for k in ref if not torch.equal(ref[k], r["full"][k])] == []
        assert r["stats"]["ranks"][0]["box_reads"] > 0  # only the chunks that overlap this rank's part
    import remap

    single = Net()
    remap.load(single, folder, rules={"version": 1, "source": {"key": "model"}, "rules": []})
    assert all(torch.equal(v, ref[k]) for k, v in single.state_dict().items())


# ---------------------------------------------------------------------------- torchrun -m remap apply

RULES_YAML = """\
version: 1
source: {path: ck.safetensors}
target:
  model: loading.sharded_cases:Net
  shard: {fsdp: ['blocks\\.\\d+', '']}
rules:
  - strip_prefix: module.
  - split: {match: '^(.*)\\.qkv\\.weight$', into: ['\\1.q.weight', '\\1.k.weight', '\\1.v.weight'], dim: 0}
  - transpose: '^head\\.weight$'
output: {report: report.json, save: %s}
"""


def torchrun(folder: Path, *args: str) -> subprocess.CompletedProcess:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun is installed with torch"
    here = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), *sys.path]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "remap", "apply", "rules.yaml", *args],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=240)  # fmt: skip


@pytest.mark.parametrize("save", ["out.safetensors", "out.dcp"])
def test_torchrun_applies_the_rules_file_each_rank_its_part(tmp_path, save):
    from safetensors.torch import save_file

    save_file(checkpoint(reference()), str(tmp_path / "ck.safetensors"))
    (tmp_path / "rules.yaml").write_text(RULES_YAML % save)
    done = torchrun(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("OK: loaded as declared") == 1  # printed once, by rank 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [r["rank"] for r in report["stats"]["ranks"]] == [0, 1]
    assert report["target"]["sharded"]["world_size"] == 2
    import remap
    from remap.sources.readers import open_source

    ref = reference().state_dict()
    with open_source(tmp_path / save) as src:
        assert set(src.meta) == set(ref)
        assert all(torch.equal(src.read(k), v) for k, v in ref.items())


def test_torchrun_failure_is_said_once_with_the_same_exit_code(tmp_path):
    from safetensors.torch import save_file

    bad = checkpoint(reference())
    bad["module.blocks.1.up.weight"] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "ck.safetensors"))
    (tmp_path / "rules.yaml").write_text(RULES_YAML % "out.safetensors")
    done = torchrun(tmp_path)
    assert done.returncode != 0
    assert "blocks.1.up.weight" in done.stdout
    assert done.stderr.count("remap: ") == 1, done.stderr[-3000:]
    assert not (tmp_path / "out.safetensors").exists()


def test_torchrun_an_error_before_the_ranks_agree_is_said_by_each_rank_named(tmp_path):
    from safetensors.torch import save_file

    save_file(checkpoint(reference()), str(tmp_path / "ck.safetensors"))
    (tmp_path / "rules.yaml").write_text((RULES_YAML % "out.safetensors").replace("['blocks\\.\\d+', '']", "[nope]"))
    done = torchrun(tmp_path)
    assert done.returncode != 0
    said = sorted(line for line in done.stderr.splitlines() if line.startswith(("remap:", "remap [")))  # not torchrun's "remap FAILED"
    error = ("error: target.shard: fsdp: the module pattern 'nope' matches no module of the target (Net); its modules: "
             "embed, blocks, blocks.0, blocks.0.norm, blocks.0.q and 14 more")  # fmt: skip
    assert said == [f"remap [rank 1 of 2]: {error}", f"remap: {error}"]
