"""Index maps in renames: a distillation student picking teacher layers is one step.

``map: {1: {0: 0, 2: 1, 5: 2}}`` sends a captured index through a table and ``select:
{group: 1, keep: [0, 2, 5]}`` renumbers the kept ones; keys whose index is not listed are
dropped by that step. ``add`` works in the mapping form of ``rename`` too. The references
are the teacher's own tensors (torch), not remap's output; the error messages are pinned
whole, with their file, line and column.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import remap
from remap.errors import RulesError
from remap.planning.planner import make_plan
from remap.report.records import DROPPED
from remap.rules.parse import parse_rules


class Block(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.attn = nn.Linear(dim, dim)
        self.mlp = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)


class Net(nn.Module):
    """An embedding, ``layers.N`` blocks and a head, as transformers are laid out."""

    def __init__(self, depth: int, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 16)


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


PICK_MAP = _yaml(r"""
    version: 1
    rules:
      - rename: {from: '^layers\.(\d+)\.', to: 'layers.\1.', map: {1: {0: 0, 2: 1, 5: 2}}}
    """)
PICK_SELECT = _yaml(r"""
    version: 1
    rules:
      - rename: {from: '^layers\.(\d+)\.', to: 'layers.\1.', select: {group: 1, keep: [0, 2, 5]}}
    """)


@pytest.mark.parametrize("rules", [PICK_MAP, PICK_SELECT], ids=["map", "select"])
def test_student_picks_teacher_layers_in_one_rename(rules: str) -> None:
    torch.manual_seed(0)
    teacher, student = Net(6), Net(3)
    report = remap.load(student, teacher.state_dict(), rules=rules)

    assert report.ok
    for mine, theirs in ((0, 0), (1, 2), (2, 5)):
        for name, value in teacher.layers[theirs].state_dict().items():
            assert torch.equal(student.layers[mine].state_dict()[name], value), (mine, name)
    assert torch.equal(student.embed.weight, teacher.embed.weight) and torch.equal(student.head.weight, teacher.head.weight)

    dropped = {r.key: r.step for r in report.sources if r.fate == DROPPED}
    assert set(dropped) == {k for k in teacher.state_dict() if k.split(".")[1] in ("1", "3", "4") and k.startswith("layers.")}
    assert set(dropped.values()) == {1}  # dropped by the rename itself
    assert "    by step 1 (rename): 18 keys\n      layers.{1, 3, 4}.attn.{bias, weight}\n" in str(report)
    assert report.steps[0].matched == sum(k.startswith("layers.") for k in teacher.state_dict())


def test_dropped_layers_come_back_from_like_on_export() -> None:
    torch.manual_seed(1)
    teacher, student = Net(6), Net(3)
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert remap.load(student, original, rules=PICK_MAP).ok
    with torch.no_grad():
        student.layers[1].attn.weight.add_(1.0)  # "training"

    out = remap.export(student, PICK_MAP, like=original)

    assert out.ok and set(out.state_dict) == set(original)
    assert torch.equal(out.state_dict["layers.2.attn.weight"], original["layers.2.attn.weight"] + 1.0)
    for key, value in original.items():
        if key != "layers.2.attn.weight":
            assert torch.equal(out.state_dict[key], value), key
    statuses = {r.key: r.status for r in out.keys}
    assert {k for k, s in statuses.items() if s == "unchanged"} == {k for k in original if k.split(".")[1] in ("1", "3", "4")}


def test_three_stage_shifts_are_one_rename_with_add_in_the_mapping_form() -> None:
    rules = _yaml(r"""
        version: 1
        rules:
          - rename:
              '^stem\.(\d+)\.': {to: 'conv\1.', add: {1: 1}}
              '^stages\.(\d+)\.blocks\.(\d+)\.': {to: 'layer\1.\2.', add: {1: 1}}
              '^stages\.(\d+)\.down\.': {to: 'layer\1.0.downsample.', add: {1: 1}}
        """)
    source = {"stem.0.weight": [4], "stem.1.weight": [4]}
    for s in range(3):
        source[f"stages.{s}.down.weight"] = [s + 1]
        for b in range(2):
            source[f"stages.{s}.blocks.{b}.conv.weight"] = [s + 1, b + 1]
    target = {"conv1.weight": [4], "conv2.weight": [4]}
    for s in range(3):
        target[f"layer{s + 1}.0.downsample.weight"] = [s + 1]
        for b in range(2):
            target[f"layer{s + 1}.{b}.conv.weight"] = [s + 1, b + 1]  # shapes tell a wrong pairing apart

    plan = make_plan(parse_rules(rules), source, target)

    assert plan.ok, plan.failures
    assert len(plan.report.steps) == 1
    assert {a.target: a.sources for a in plan.assignments}["layer3.1.conv.weight"] == ("stages.2.blocks.1.conv.weight",)
    assert [n for _, n in plan.report.steps[0].patterns] == [2, 6, 3]


def test_map_on_several_groups_and_named_groups() -> None:
    rules = {"version": 1, "rules": [{"rename": {"from": r"^enc\.(?P<layer>\d+)\.head\.(\d+)\.", "to": r"l.\g<layer>.h.\2.",
                                                 "map": {"layer": {3: 0, 1: 1}, 2: {0: 1, 1: 0}}}}]}  # fmt: skip
    source = {f"enc.{layer}.head.{h}.w": [layer, h + 1] for layer in range(4) for h in range(2)}
    target = {"l.0.h.1.w": [3, 1], "l.0.h.0.w": [3, 2], "l.1.h.1.w": [1, 1], "l.1.h.0.w": [1, 2]}
    plan = make_plan(parse_rules(rules), source, target)
    assert plan.ok, plan.failures
    assert {a.target: a.sources[0] for a in plan.assignments} == {
        "l.0.h.1.w": "enc.3.head.0.w", "l.0.h.0.w": "enc.3.head.1.w", "l.1.h.1.w": "enc.1.head.0.w", "l.1.h.0.w": "enc.1.head.1.w"}
    assert {r.key for r in plan.report.sources if r.fate == DROPPED} == {f"enc.{i}.head.{h}.w" for i in (0, 2) for h in (0, 1)}


# --------------------------------------------------------------------------- plan-time failures


def test_a_map_entry_no_key_used_fails_the_plan() -> None:
    rules = parse_rules(_yaml(r"""
        version: 1
        rules:
          - rename: {from: '^layers\.(\d+)\.', to: 'layers.\1.', map: {1: {0: 0, 2: 1, 9: 2}}}
        """), filename="rules.yaml")
    source = {f"layers.{i}.w": [2] for i in range(4)}
    plan = make_plan(rules, source, {"layers.0.w": [2], "layers.1.w": [2], "layers.2.w": [2]})
    messages = [f.message for f in plan.failures if f.kind == "unmatched_step"]
    assert messages == [
        "step 1 (rename) (rules.yaml:3:5): '^layers\\.(\\d+)\\.' map group 1: no key has index 9; indices found at this step: "
        "0, 1, 2, 3. Fix the map, or add `optional: true` beside the step if that is expected."
    ]


def test_an_unused_entry_of_an_optional_step_passes() -> None:
    rules = {"version": 1, "rules": [{"rename": {"from": r"^l\.(\d+)\.", "to": r"l.\1.", "select": {"keep": [1, 7]}}, "optional": True}]}
    plan = make_plan(parse_rules(rules), {"l.0.w": [1], "l.1.w": [1]}, {"l.0.w": [1]})
    assert plan.ok, plan.failures


def test_a_non_integer_capture_is_a_bad_capture() -> None:
    rules = {"version": 1, "rules": [{"rename": {"from": r"^l\.(\w+)\.", "to": r"l.\1.", "map": {1: {0: 0}}}}]}
    plan = make_plan(parse_rules(rules), {"l.0.w": [1], "l.x.w": [1]}, {"l.0.w": [1]})
    assert [f.message for f in plan.failures if f.kind == "bad_capture"] == [
        "step 1 (rename): key 'l.x.w': group 1 captured 'x', which is not a non-negative integer"]


# (YAML text, the whole message)
ERRORS = [
    pytest.param(
        r"""
        rules:
          - rename: {from: 'l\.(\d+)\.', to: 'l.\1.', map: {1: {0: 0, 2: 1, 5: 1}}}
        """,
        "rules.yaml:3:72: step 1 (rename): field 'map': group 1: indices 2 and 5 both become 1; an index map sends each index "
        "to its own new index",
        id="two-indices-to-one",
    ),
    pytest.param(
        r"""
        rules:
          - rename: {from: 'l\.(\d+)\.', to: 'l.\1.', select: {group: 1, keep: [0, 2, 0]}}
        """,
        "rules.yaml:3:79: step 1 (rename): field 'select': keep lists index 0 twice (items 1 and 3)",
        id="select-twice",
    ),
    pytest.param(
        r"""
        rules:
          - rename: {from: 'l\.(\d+)\.', to: 'l.\1.', add: {1: 1}, map: {1: {0: 0}}}
        """,
        "rules.yaml:3:65: step 1 (rename): group 1 is in both add and the map: the map gives its new index whole (put an offset "
        "in the map's values)",
        id="add-and-map",
    ),
    pytest.param(
        r"""
        rules:
          - rename: {from: 'l\.(\d+)\.', to: 'l.', map: {1: {0: 0}}}
        """,
        "rules.yaml:3:49: step 1 (rename): map changes group 1, which replacement 'l.' does not use",
        id="map-group-unused",
    ),
    pytest.param(
        r"""
        rules:
          - rename: {from: 'l\.(\d+)\.', to: 'l.\1.', map: {2: {0: 0}}}
        """,
        "rules.yaml:3:52: step 1 (rename): map refers to group 2, but pattern 'l\\.(\\d+)\\.' has 1 group(s)",
        id="map-no-group",
    ),
    pytest.param(
        r"""
        rules:
          - rename: {from: 'l\.(\d+)\.(\d+)', to: 'l.\1.\2', select: {keep: [0, 1]}}
        """,
        "rules.yaml:3:62: step 1 (rename): field 'select': the pattern has 2 groups: say which one select renumbers (group: N)",
        id="select-which-group",
    ),
    pytest.param(
        r"""
        rules:
          - rename: {from: 'l\.(\d+)\.', to: 'l.\1.', map: {1: {0: -1}}}
        """,
        "rules.yaml:3:60: step 1 (rename): field 'map': group 1: index 0: expected a non-negative integer as its new index, "
        "found an integer -1",
        id="negative-new-index",
    ),
    pytest.param(
        r"""
        rules:
          - rename: {from: 'l\.(\d+)\.', to: 'l.\1.', map: {1: {a: 0}}}
        """,
        "rules.yaml:3:57: step 1 (rename): field 'map': group 1: expected a non-negative integer index, found a string 'a'",
        id="string-index",
    ),
    pytest.param(
        r"""
        rules:
          - rename: {from: 'l\.(\d+)\.', to: 'l.\1.', map: [0, 1]}
        """,
        "rules.yaml:3:52: step 1 (rename): field 'map': expected a mapping of group -> {index: new index}, found a list [0, 1]",
        id="map-list",
    ),
    pytest.param(
        r"""
        rules:
          - rename:
              'l\.(\d+)\.': {to: 'l.\1.', ad: {1: 1}}
        """,
        "rules.yaml:4:35: step 1 (rename): pattern 'l\\.(\\d+)\\.': unknown field 'ad' (did you mean 'add'?); a replacement "
        "mapping takes: to, add, map, select",
        id="mapping-form-unknown",
    ),
    pytest.param(
        r"""
        rules:
          - rename:
              'l\.(\d+)\.': {add: {1: 1}}
        """,
        "rules.yaml:4:21: step 1 (rename): pattern 'l\\.(\\d+)\\.': missing required field 'to' (the replacement)",
        id="mapping-form-no-to",
    ),
    pytest.param(
        r"""
        rules:
          - rename:
              'l\.(\d+)\.': {to: 'l.\1.', add: {1: x}}
        """,
        "rules.yaml:4:44: step 1 (rename): pattern 'l\\.(\\d+)\\.': group 1: expected an integer to add, found a string 'x'",
        id="mapping-form-bad-add",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_rule_errors_name_the_place(text: str, message: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules("version: 1\n" + _yaml(text), filename="rules.yaml")
    assert str(info.value) == message


def test_the_summary_shows_the_map() -> None:
    rules = parse_rules(PICK_SELECT)
    assert rules.steps[0].summary() == r"rename '^layers\.(\d+)\.' -> 'layers.\1.' select group 1 keep [0, 2, 5]"
    assert parse_rules(PICK_MAP).steps[0].summary() == r"rename '^layers\.(\d+)\.' -> 'layers.\1.' map {1: {0: 0, 2: 1, 5: 2}}"
