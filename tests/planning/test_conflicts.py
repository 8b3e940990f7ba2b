"""Conflicts and drift: each is a clear error, or a documented behaviour pinned by a test.

| situation                                         | behaviour                                                     |
|---------------------------------------------------|---------------------------------------------------------------|
| two source keys renamed onto one key              | ``collision`` failure naming both keys and the step           |
| ``module.x`` and ``x`` after ``strip_prefix``     | the same collision; ``drop`` one of them first                |
| ``{a: b, b: a}`` in one ``rename``                | a swap: each key takes the first pattern found in it, once    |
| ``a -> b`` then ``b -> a`` in two steps           | a collision at the first step (``b`` exists already)          |
| a ``merge`` part found twice                      | ``op`` failure naming both keys; ``order: [q, q]`` a RulesError |
| ``split`` parts landing on an existing key        | ``collision``                                                 |
| a tied target parameter fed under both its names  | loaded once; the second copy checked equal (``duplicate``), else ``tied_conflict`` |
| a tied target parameter fed under either name     | loaded once, the alias reported ``tied``                      |

Every failed case leaves the module untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from weights import Small, Tied, perturb, snapshot

import remap
from remap.cli import main
from remap.errors import CheckError, RulesError
from remap.report.records import DUPLICATE, LOADED, TIED, UNUSED, USED
from remap.rules.parse import parse_rules


def plan(steps: list[dict[str, Any]], source: dict[str, Any], target: dict[str, Any], **sections: Any) -> Any:
    return remap.make_plan(parse_rules({"version": 1, "rules": steps, **sections}), source, target)


def kinds(p: Any) -> list[str]:
    return [f.kind for f in p.failures]


def failure(p: Any, kind: str) -> Any:
    return next(f for f in p.failures if f.kind == kind)


# ---------------------------------------------------------------------------- two keys, one name


@pytest.mark.parametrize(
    ("steps", "step", "key"),
    [
        ([{"rename": {r"^a\.": "x.", r"^b\.": "x."}}], "step 1 (rename)", "x.w"),
        ([{"rename": {r"^(a|b)\.": "x."}}], "step 1 (rename)", "x.w"),
        ([{"strip_prefix": ["a.", "b."]}, {"add_prefix": "x."}], "step 1 (strip_prefix)", "w"),
        # after a tensor op the planner runs key by key rather than once per key shape: same answer
        ([{"transpose": "^nothing$", "optional": True}, {"rename": {r"^a\.": "x.", r"^b\.": "x."}}], "step 2 (rename)", "x.w"),
    ],
    ids=["two-patterns", "one-pattern", "prefixes", "after-an-op"],
)
def test_two_source_keys_onto_one_key_is_a_collision_naming_both(steps: list[dict[str, Any]], step: str, key: str) -> None:
    p = plan(steps, {"a.w": [2, 2], "b.w": [2, 2]}, {"x.w": [2, 2]})
    assert kinds(p)[0] == "collision" and not p.ok
    f = failure(p, "collision")
    assert f.message == f"{step}: source keys 'a.w' and 'b.w' both become {key!r}"
    assert f.keys == ("a.w", "b.w")
    # the first comes through; the second is set aside, saying why, and not reported a second time as unused
    assert p.report.target_record("x.w").sources == ("a.w",)
    second = p.report.source_record("b.w")
    assert second.fate == UNUSED and "collision" in second.note
    assert [f.kind for f in p.failures].count("unused") == 0


def test_duplicates_after_strip_prefix_collide_and_dropping_one_resolves_it() -> None:
    source = {"module.fc.weight": [2, 3], "fc.weight": [2, 3]}
    p = plan([{"strip_prefix": "module."}], source, {"fc.weight": [2, 3]})
    assert failure(p, "collision").message == "step 1 (strip_prefix): source keys 'module.fc.weight' and 'fc.weight' both become 'fc.weight'"
    p = plan([{"drop": r"^fc\."}, {"strip_prefix": "module."}], source, {"fc.weight": [2, 3]})
    assert p.ok and p.report.target_record("fc.weight").sources == ("module.fc.weight",)


def test_strip_prefix_is_repeated_so_a_doubled_prefix_collides_too() -> None:
    p = plan([{"strip_prefix": "module."}], {"module.module.x": [1], "module.x": [1]}, {"x": [1]})
    assert failure(p, "collision").keys == ("module.module.x", "module.x")


def test_a_collision_through_the_api_and_the_cli_leaves_the_module_untouched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = perturb(Small(), seed=4).state_dict()
    ckpt = {**{f"module.{k}": v for k, v in state.items()}, "fc.weight": torch.zeros(5, 4)}
    model = Small()
    before = snapshot(model)
    with pytest.raises(CheckError) as info:
        remap.load(model, ckpt, {"version": 1, "rules": [{"strip_prefix": "module."}]})
    assert "source keys 'module.fc.weight' and 'fc.weight' both become 'fc.weight'" in str(info.value)
    assert snapshot(model) == before
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\ntarget: {model: 'weights:Small'}\nrules:\n  - strip_prefix: module.\n")
    code = main(["apply", str(rules), "--source", str(path)])
    out, err = capsys.readouterr()
    assert code == 1 and "collision" in err and "'module.fc.weight' and 'fc.weight' both become 'fc.weight'" in out


# ---------------------------------------------------------------------------- cycles


def test_a_rename_cycle_in_one_mapping_is_a_swap() -> None:
    """For each key the first pattern found in it applies, once: {a: b, b: a} swaps a and b."""
    source = {"a.w": [2], "b.w": [3]}
    p = plan([{"rename": {r"^a\.": "b.", r"^b\.": "a."}}], source, {"a.w": [3], "b.w": [2]})
    assert p.ok
    assert {a.target: a.sources for a in p.assignments} == {"b.w": ("a.w",), "a.w": ("b.w",)}
    model = torch.nn.Module()
    model.a = torch.nn.Module()
    model.b = torch.nn.Module()
    model.a.w = torch.nn.Parameter(torch.zeros(3))
    model.b.w = torch.nn.Parameter(torch.zeros(2))
    tensors = {"a.w": torch.tensor([1.0, 2.0]), "b.w": torch.tensor([3.0, 4.0, 5.0])}
    remap.load(model, tensors, {"version": 1, "rules": [{"rename": {r"^a\.": "b.", r"^b\.": "a."}}]})
    assert torch.equal(model.a.w.detach(), tensors["b.w"]) and torch.equal(model.b.w.detach(), tensors["a.w"])


def test_a_rename_cycle_over_two_steps_collides_at_the_first() -> None:
    """Steps run one after the other: after `a -> b` there are two b's, before `b -> a` can run."""
    p = plan([{"rename": {r"^a\.": "b."}}, {"rename": {r"^b\.": "a."}}], {"a.w": [2], "b.w": [3]}, {"a.w": [3], "b.w": [2]})
    assert failure(p, "collision").message == "step 1 (rename): source keys 'a.w' and 'b.w' both become 'b.w'"


def test_a_rename_that_maps_a_key_onto_itself_is_not_a_collision() -> None:
    p = plan([{"rename": {r"^(a)\.": r"\1."}}], {"a.w": [2]}, {"a.w": [2]})
    assert p.ok


# ---------------------------------------------------------------------------- merge and split


QKV = r"^(.*)\.(q|k|v)(_proj)?\.weight$"


def test_a_merge_part_found_twice_fails_naming_both() -> None:
    source = {"x.q_proj.weight": [2, 4], "x.q.weight": [2, 4], "x.k_proj.weight": [2, 4], "x.v_proj.weight": [2, 4]}
    p = plan([{"merge": {"match": QKV, "into": r"\1.in_proj_weight", "order": ["q", "k", "v"], "group": 2}}], source, {"x.in_proj_weight": [6, 4]})
    f = failure(p, "op")
    assert f.message == "step 1 (merge): cannot merge into 'x.in_proj_weight': part 'q' appears twice: 'x.q_proj.weight' and 'x.q.weight'"
    assert set(f.keys) == set(source)


def test_a_merge_order_listing_a_part_twice_is_a_rules_error() -> None:
    with pytest.raises(RulesError, match=r"order lists a part twice: \['q', 'k', 'q'\]"):
        parse_rules({"version": 1, "rules": [{"merge": {"match": QKV, "into": "m", "order": ["q", "k", "q"], "group": 2}}]})


def test_a_merge_with_a_missing_part_fails_naming_it() -> None:
    source = {"x.q_proj.weight": [2, 4], "x.k_proj.weight": [2, 4]}
    p = plan([{"merge": {"match": QKV, "into": r"\1.in_proj_weight", "order": ["q", "k", "v"], "group": 2}}], source, {"x.in_proj_weight": [6, 4]})
    assert "part 'v' is missing" in failure(p, "op").message


def test_split_parts_landing_on_an_existing_key_collide() -> None:
    source = {"x.qkv.weight": [6, 4], "x.q.weight": [2, 4]}
    p = plan([{"split": {"match": r"^(.*)\.qkv\.weight$", "into": [r"\1.q.weight", r"\1.k.weight", r"\1.v.weight"]}}], source,
             {"x.q.weight": [2, 4], "x.k.weight": [2, 4], "x.v.weight": [2, 4]})  # fmt: skip
    f = failure(p, "collision")
    assert "both become 'x.q.weight'" in f.message and set(f.keys) == set(source)


# ---------------------------------------------------------------------------- tied parameters


def _tied_source(**names: torch.Tensor) -> dict[str, torch.Tensor]:
    return dict(names)


W = torch.randn(7, 4, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["embed.weight", "head.weight"])
def test_a_tied_parameter_fed_under_either_name_loads_once(name: str) -> None:
    model = Tied()
    report = remap.load(model, {name: W})
    assert report.ok and torch.equal(model.embed.weight.detach(), W) and model.head.weight is model.embed.weight
    assert report.target_record("embed.weight").status == LOADED and report.target_record("embed.weight").sources == (name,)
    assert report.target_record("head.weight").status == TIED and report.target_record("head.weight").tied_to == "embed.weight"
    assert report.totals.target_keys == 1 and report.totals.missing == 0


def test_a_tied_parameter_fed_under_both_names_loads_once_and_checks_the_copy() -> None:
    model = Tied()
    report = remap.load(model, {"embed.weight": W, "head.weight": W.clone()})
    assert report.source_record("embed.weight").fate == USED
    assert report.source_record("head.weight").fate == DUPLICATE and report.source_record("head.weight").targets == ("embed.weight",)
    assert torch.equal(model.head.weight.detach(), W)


def test_two_different_copies_of_a_tied_parameter_fail_and_touch_nothing() -> None:
    model = Tied()
    before = snapshot(model)
    with pytest.raises(CheckError) as info:
        remap.load(model, {"embed.weight": W, "head.weight": W + 1})
    assert [f.kind for f in info.value.report.failures] == ["tied_conflict"]
    assert "'embed.weight' is a tied parameter fed by two source tensors that differ: 'embed.weight' and 'head.weight'" in str(info.value)
    assert snapshot(model) == before


def test_copies_of_a_tied_parameter_with_different_shapes_fail_the_plan() -> None:
    model = Tied()
    before = snapshot(model)
    p = remap.plan(model, {"embed.weight": W, "head.weight": torch.zeros(3, 4)}, None)
    assert kinds(p) == ["tied_conflict"]
    assert "fed by two source tensors of different shapes: 'embed.weight' [7, 4] and 'head.weight' [3, 4]" in p.failures[0].message
    with pytest.raises(CheckError):
        p.apply(model)
    assert snapshot(model) == before


def test_renames_onto_both_names_of_a_tied_parameter() -> None:
    """Two source keys renamed onto the two names of one tied parameter: one load, one check."""
    model = Tied()
    rules = {"version": 1, "rules": [{"rename": {r"^tok\.": "embed.", r"^out\.": "head."}}]}
    report = remap.load(model, {"tok.weight": W, "out.weight": W.clone()}, rules)
    assert report.target_record("embed.weight").sources == ("tok.weight",)
    assert report.source_record("out.weight").fate == DUPLICATE
