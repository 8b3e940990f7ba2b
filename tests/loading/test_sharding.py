"""``target.shard`` applied: remap.loading.sharding.shard_module on gloo ranks against torch's own
calls by hand (tests/loading/shard_cases.py), and the checks that need no process group here.

The reference for every placement, local shape and local value is the same model sharded by
hand with ``init_device_mesh`` / ``parallelize_module`` (torch's glob plan) / ``fully_shard``;
the reference for the values and the forward is the unsharded model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from ranks import RankFailed, run_ranks
from torch import nn

from remap.errors import RulesError, UsageError
from remap.loading.sharding import ShardLayout, resolve_shard, shard_module
from remap.rules.shard_spec import ShardSpec

from .shard_cases import TP_SPEC, build

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")

SHARD0, SHARD1, REPLICATE = "Shard(dim=0)", "Shard(dim=1)", "Replicate()"


@pytest.fixture(scope="module")
def one_dim(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One spawn of 2 ranks for every 1-D check (each spawn costs seconds)."""
    results = run_ranks("loading.shard_cases:one_dim", 2, tmp_path_factory.mktemp("one_dim"), timeout=180)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    return results


def _same_as_torch(case: dict[str, Any]) -> None:
    """remap's sharding equals torch's by hand (real and meta), keeps the values, and computes the same forward."""
    assert case["returned_same"]
    assert case["mine"] == case["hand"]
    assert case["mine_meta"]["params"] == {n: (*d[:5], "meta") for n, d in case["hand"]["params"].items()}
    assert case["mine_meta"] == case["hand_meta"]
    assert all(case["locals_equal"].values()), case["locals_equal"]
    assert all(case["gathered_equal"].values()), case["gathered_equal"]
    assert case["forward_diff"] < 1e-5


def _placements(case: dict[str, Any]) -> dict[str, Any]:
    return {n: d[1] for n, d in case["mine"]["params"].items()}


def _local_shapes(case: dict[str, Any]) -> dict[str, Any]:
    return {n: d[2] for n, d in case["mine"]["params"].items()}


@pytest.mark.parametrize("which", ["fsdp", "fsdp_true"])
def test_fsdp_shards_every_parameter_on_dim_0_like_fully_shard(one_dim: list[dict[str, Any]], which: str) -> None:
    for rank, result in enumerate(one_dim):
        case = result[which]
        _same_as_torch(case)
        assert case["mine"]["fsdp"] == ["", "layers.0", "layers.1"]
        assert set(_placements(case).values()) == {(SHARD0,)}
        assert {d[3] for d in case["mine"]["params"].values()} == {("dp",)}
        assert _local_shapes(case)["emb.weight"] == (6, 8)
        assert _local_shapes(case)["layers.0.attn.q.weight"] == (8, 8)


def test_tp_colwise_and_rowwise_place_the_weights_like_parallelize_module(one_dim: list[dict[str, Any]]) -> None:
    for result in one_dim:
        case = result["tp"]
        _same_as_torch(case)
        placements = _placements(case)
        for n in (0, 1):
            assert placements[f"layers.{n}.attn.q.weight"] == placements[f"layers.{n}.attn.q.bias"] == (SHARD0,)
            assert placements[f"layers.{n}.attn.o.weight"] == (SHARD1,)
            assert placements[f"layers.{n}.attn.o.bias"] == (REPLICATE,)
            assert placements[f"layers.{n}.norm.weight"] is None  # not in the plan: a plain parameter
        assert placements["emb.weight"] == (SHARD0,)
        assert placements["head.weight"] is None
        assert _local_shapes(case)["layers.0.attn.q.weight"] == (8, 8)
        assert _local_shapes(case)["layers.0.attn.o.weight"] == (8, 8)
        assert case["mine"]["fsdp"] == []


def test_a_mesh_bigger_than_the_process_group_is_a_usage_error_and_the_module_is_untouched(
    one_dim: list[dict[str, Any]],
) -> None:
    for result in one_dim:
        assert result["too_many"] == ("target.shard: the mesh {dp: 4} holds 4 ranks, but the process group has 2; run with "
                                      "--nproc-per-node 4, or change target.shard.mesh")  # fmt: skip
        assert result["too_many_untouched"]


def test_a_sharded_module_is_not_sharded_again(one_dim: list[dict[str, Any]]) -> None:
    for result in one_dim:
        assert result["twice"] == ("target.shard: the target is sharded already (its parameter 'emb.weight' is a DTensor with "
                                   "placements (Shard(dim=0),)); leave target.shard out when the factory shards the model, or "
                                   "give it an unsharded module")  # fmt: skip


def test_a_2d_mesh_runs_tp_on_tp_then_fsdp_on_dp_like_torchtitan(tmp_path: Path) -> None:
    results = run_ranks("loading.shard_cases:two_dim", 4, tmp_path, timeout=240)
    failed = [r for r in results if isinstance(r, RankFailed)]
    assert not failed, failed[0].traceback
    for case in results:
        _same_as_torch(case)
        assert case["mine"]["fsdp"] == ["", "layers.0", "layers.1"]
        placements = _placements(case)
        assert placements["layers.0.attn.o.weight"] == (SHARD0, SHARD1)  # dp shards dim 0, tp dim 1
        assert placements["layers.0.attn.o.bias"] == (SHARD0, REPLICATE)
        assert placements["layers.0.attn.q.weight"][1] == SHARD0  # dp's dim 0 over tp's: torch's _StridedShard
        assert placements["head.weight"] == (SHARD0,)  # fsdp alone: the 1-D dp sub-mesh
        assert {d[3] for d in case["mine"]["params"].values()} == {("dp", "tp"), ("dp",)}
        assert _local_shapes(case)["layers.0.attn.q.weight"] == (4, 8)


# --------------------------------------------------------------------------- no process group


def _model() -> nn.Module:
    return build()


def test_resolve_names_the_modules_in_the_order_they_are_sharded() -> None:
    spec = ShardSpec.parse({"mesh": {"dp": 2, "tp": 2}, "tp": TP_SPEC, "fsdp": ["", r"layers\.\d+"]})
    assert resolve_shard(_model(), spec) == ShardLayout(
        tp=(("emb", "rowwise"), ("layers.0.attn.q", "colwise"), ("layers.0.attn.o", "rowwise"),
            ("layers.1.attn.q", "colwise"), ("layers.1.attn.o", "rowwise")),
        fsdp=("layers.1", "layers.0", ""),
    )  # fmt: skip
    assert resolve_shard(_model(), ShardSpec.parse({"fsdp": True})).fsdp == ("layers.1", "layers.0", "")
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert resolve_shard(plain, ShardSpec.parse({"fsdp": True})).fsdp == ("",)
    assert resolve_shard(plain, ShardSpec.parse({"tp": {"0": "colwise"}})).tp == (("0", "colwise"),)


def test_same_style_from_two_patterns_is_one_entry() -> None:
    spec = ShardSpec.parse({"tp": {r"layers\.0\.attn\.q": "colwise", r".*\.q": "colwise"}})
    assert resolve_shard(_model(), spec).tp == (("layers.0.attn.q", "colwise"), ("layers.1.attn.q", "colwise"))


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"tp": {r"layers\.\d+\.attn\.qq": "colwise"}},
         "target.shard: tp: the module pattern 'layers\\.\\d+\\.attn\\.qq' matches no module of the target (Tiny); close names: "
         "layers.0.attn.q, layers.1.attn.q, layers.0.attn.o, layers.0.attn, layers.1.attn.o"),
        ({"tp": {r"attn\.q": "colwise"}},
         "target.shard: tp: the module pattern 'attn\\.q' matches no module of the target (Tiny); it matches inside "
         "layers.0.attn.q, layers.1.attn.q (a pattern matches a whole module name)"),
        ({"fsdp": ["blocks"]},
         "target.shard: fsdp: the module pattern 'blocks' matches no module of the target (Tiny); its modules: emb, layers, "
         "layers.0, layers.0.attn, layers.0.attn.q and 8 more"),
        ({"tp": {r"layers\.\d+\.norm": "colwise"}},
         "target.shard: tp: 'layers\\.\\d+\\.norm' matches 'layers.0.norm', a LayerNorm; colwise and rowwise shard nn.Linear "
         "and nn.Embedding only"),
        ({"tp": {"": "colwise"}},
         "target.shard: tp: '' matches '' (the root), a Tiny; colwise and rowwise shard nn.Linear and nn.Embedding only"),
        ({"tp": {r"layers\.0\.attn\.q": "colwise", r".*q": "rowwise"}},
         "target.shard: tp: 'layers.0.attn.q' is colwise by 'layers\\.0\\.attn\\.q' and rowwise by '.*q'; one module takes "
         "one style"),
        ({"fsdp": ["layers", ""]},
         "target.shard: fsdp: 'layers' is a ModuleList, which is never called, so fully_shard's hooks would never run; name "
         "its items instead (layers\\.\\d+)"),
    ],
)  # fmt: skip
def test_a_pattern_the_model_does_not_fit_is_a_rules_error_naming_what_is_there(spec: dict[str, Any], message: str) -> None:
    model = _model()
    with pytest.raises(RulesError) as err:
        shard_module(model, ShardSpec.parse(spec))
    assert str(err.value) == message
    assert all(type(p) is nn.Parameter for p in model.parameters())


def test_a_module_dict_is_named_by_its_items() -> None:
    model = nn.Module()
    model.heads = nn.ModuleDict({"a": nn.Linear(2, 2)})
    with pytest.raises(RulesError, match=r"name its items instead \(heads\\\.\[\^\.\]\+\)$"):
        resolve_shard(model, ShardSpec.parse({"fsdp": ["heads"]}))


def test_without_a_process_group_shard_module_says_how_to_start_one() -> None:
    assert not torch.distributed.is_initialized()
    model = _model()
    with pytest.raises(UsageError) as err:
        shard_module(model, ShardSpec.parse({"fsdp": True}))
    assert str(err.value) == ("target.shard needs torch.distributed initialised: run under `torchrun --nproc-per-node N` or "
                              "call torch.distributed.init_process_group first; found no process group")  # fmt: skip
    assert all(type(p) is nn.Parameter for p in model.parameters())
