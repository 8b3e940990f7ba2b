"""Tensor steps select keys by rank and dtype as well as by name (``rank:``, ``dtype:``; for
``cast``, ``from_dtype:``): parsed with file:line:col errors, shown in summaries and the
report, and a pattern whose keys the selectors all turn away counts as matching nothing."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import remap
from remap.errors import RulesError
from remap.planning.planner import Plan, make_plan
from remap.report.render import format_report
from remap.rules.parse import parse_rules

KERNELS = {"conv.kernel": [3, 3, 2, 4], "dense.kernel": [4, 5], "head.kernel": [5, 6], "conv.bias": [4]}
TORCH = {"conv.kernel": [4, 2, 3, 3], "dense.kernel": [5, 4], "head.kernel": [6, 5], "conv.bias": [4]}


def plan_text(text: str, source: dict[str, Any], target: dict[str, Any]) -> Plan:
    return make_plan(parse_rules(text, filename="r.yaml"), source, target)


def ops_of(p: Plan) -> dict[str, tuple[tuple[int, ...], str, tuple[str, ...]]]:
    return {a.target: (a.meta.shape, a.meta.dtype, a.ops) for a in p.assignments}


def messages(p: Plan) -> list[tuple[str, str]]:
    return [(f.kind, f.message) for f in p.failures]


def parse_error(text: str) -> str:
    with pytest.raises(RulesError) as exc:
        parse_rules(text, filename="r.yaml")
    return str(exc.value)


# --------------------------------------------------------------------------- selecting


def test_rank_picks_dense_and_conv_kernels_apart() -> None:
    p = plan_text(
        "version: 1\n"
        "rules:\n"
        "  - transpose: {match: '\\.kernel$', rank: 4, dims: [3, 2, 0, 1]}\n"
        "  - transpose: {match: '\\.kernel$', rank: 2}\n",
        KERNELS, TORCH,
    )  # fmt: skip
    assert p.ok, messages(p)
    assert ops_of(p) == {
        "conv.kernel": ((4, 2, 3, 3), "float32", ("permute(3, 2, 0, 1)",)),
        "dense.kernel": ((5, 4), "float32", ("transpose(-2, -1)",)),
        "head.kernel": ((6, 5), "float32", ("transpose(-2, -1)",)),
        "conv.bias": ((4,), "float32", ()),
    }
    assert [(s.summary, s.matched) for s in p.report.steps] == [
        ("transpose(3, 2, 0, 1) on rank-4 keys matching '\\.kernel$'", 1),
        ("transpose(-2, -1) on rank-2 keys matching '\\.kernel$'", 2),
    ]


def test_rank_list_and_dtype_select_together() -> None:
    source = {"a.w": ([4, 5], "float16"), "b.w": ([4, 5], "float32"), "c.w": ([2, 4, 5], "float16"), "d.w": ([4], "float16")}
    target = {"a.w": ([5, 4], "float16"), "b.w": ([4, 5], "float32"), "c.w": ([2, 5, 4], "float16"), "d.w": ([4], "float16")}
    p = make_plan(parse_rules({"version": 1, "rules": [{"transpose": {"match": "w$", "rank": [2, 3], "dtype": "half"}}]}), source, target)
    assert p.ok, messages(p)
    assert ops_of(p) == {
        "a.w": ((5, 4), "float16", ("transpose(-2, -1)",)),
        "b.w": ((4, 5), "float32", ()),  # float32: not selected
        "c.w": ((2, 5, 4), "float16", ("transpose(-2, -1)",)),
        "d.w": ((4,), "float16", ()),  # rank 1: not selected
    }
    assert p.report.steps[0].summary == "transpose(-2, -1) on rank-2/3 float16 keys matching 'w$'"


def test_cast_selects_by_from_dtype_and_casts_to_dtype() -> None:
    source = {"w": ([3], "float32"), "steps": ([], "int64"), "h": ([2], "float64")}
    target = {"w": ([3], "float16"), "steps": ([], "int64"), "h": ([2], "float16")}
    rules = {"version": 1, "rules": [{"cast": {"match": ".", "dtype": "float16", "from_dtype": ["float32", "double"]}}]}
    p = make_plan(parse_rules(rules), source, target)
    assert p.ok, messages(p)
    assert ops_of(p) == {"w": ((3,), "float16", ("cast(float16)",)), "steps": ((), "int64", ()), "h": ((2,), "float16", ("cast(float16)",))}
    assert p.report.steps[0].summary == "cast to float16 on float32/float64 keys matching '.'"


def test_without_selectors_summaries_are_unchanged() -> None:
    rules = parse_rules({"version": 1, "rules": [{"transpose": "w$"}, {"transpose": {"match": ["a", "b"], "dims": [0, 1]}}]})
    assert [s.summary() for s in rules.steps] == ["transpose(-2, -1) on 'w$'", "transpose(0, 1) on 'a', 'b'"]


def test_every_tensor_step_takes_the_selectors() -> None:
    text = (
        "version: 1\n"
        "rules:\n"
        "  - reshape: {match: '^a$', rank: 2, shape: [-1]}\n"
        "  - slice: {match: '^b$', rank: 1, dtype: float32, dim: 0, stop: 2}\n"
        "  - pad: {match: '^c$', dtype: [float32], to: [4]}\n"
        "  - adapt: {match: '^d$', rank: 4, op: in_channels}\n"
        "  - cast: {match: '^e$', from_dtype: float64, dtype: float32}\n"
    )  # fmt: skip
    assert [s.summary() for s in parse_rules(text).steps] == [
        "reshape to [-1] on rank-2 keys matching '^a$'",
        "slice dim 0 [:2] on rank-1 float32 keys matching '^b$'",
        "pad to [4] with zeros on float32 keys matching '^c$'",
        "adapt in_channels on rank-4 keys matching '^d$'",
        "cast to float32 on float64 keys matching '^e$'",
    ]


# --------------------------------------------------------------------------- a filter that leaves nothing


def test_rank_filter_removing_every_match_fails_the_plan() -> None:
    text = "version: 1\nrules:\n  - transpose: {match: '\\.kernel$', rank: 4, dims: [3, 2, 0, 1]}\n"
    dense = {"dense.kernel": [4, 5], "head.kernel": [5, 6]}
    p = plan_text(text, dense, dense)
    assert messages(p) == [(
        "unmatched_step",
        "step 1 (transpose) (r.yaml:3:5): '\\.kernel$' matched 2 key(s), but the rank filter (rank 4) removed them all: "
        "'dense.kernel' (rank 2, float32), 'head.kernel' (rank 2, float32). Fix the pattern or the filter, or add "
        "`optional: true` beside the step if that is expected.",
    )]  # fmt: skip
    assert p.report.steps[0].matched == 0
    rows = format_report(p.report).splitlines()
    assert "  1  transpose(3, 2, 0, 1) on rank-4 keys matching '\\.kernel$'        0  matched nothing (r.yaml:3:5)" in rows


def test_filter_message_names_the_dtype_filter_and_counts_the_rest() -> None:
    source = {f"l{n}.w": ([2], "float16") for n in range(5)}
    p = make_plan(parse_rules({"version": 1, "rules": [{"cast": {"match": "w$", "dtype": "float32", "from_dtype": "bfloat16"}}]}), source, source)
    assert messages(p)[0] == (
        "unmatched_step",
        "step 1 (cast): 'w$' matched 5 key(s), but the dtype filter (dtype bfloat16) removed them all: 'l0.w' (rank 1, float16), "
        "'l1.w' (rank 1, float16), 'l2.w' (rank 1, float16) and 2 more. Fix the pattern or the filter, or add `optional: true` "
        "beside the step if that is expected.",
    )  # fmt: skip


def test_both_filters_named_when_both_turned_keys_away() -> None:
    source = {"a.w": ([2, 2], "float16"), "b.w": ([2], "float32")}
    p = make_plan(parse_rules({"version": 1, "rules": [{"transpose": {"match": "w$", "rank": 2, "dtype": "float32"}}]}), source, source)
    assert messages(p)[0][1].startswith(
        "step 1 (transpose): 'w$' matched 2 key(s), but the dtype and rank filters (rank 2, dtype float32) removed them all: "
        "'a.w' (rank 2, float16), 'b.w' (rank 1, float32)."
    )


def test_optional_step_whose_filter_leaves_nothing_passes() -> None:
    dense = {"dense.kernel": [4, 5]}
    p = plan_text("version: 1\nrules:\n  - transpose: {match: '\\.kernel$', rank: 4, dims: [3, 2, 0, 1]}\n    optional: true\n", dense, dense)
    assert p.ok and messages(p) == []
    assert ops_of(p) == {"dense.kernel": ((4, 5), "float32", ())}


def test_a_pattern_that_finds_no_name_keeps_the_plain_message() -> None:
    source = {"dense.kernel": [4, 5]}
    p = plan_text("version: 1\nrules:\n  - transpose: {match: ['\\.kernel$', '^nothing$'], rank: 2}\n", source, {"dense.kernel": [5, 4]})
    assert messages(p) == [(
        "unmatched_step",
        "step 1 (transpose) (r.yaml:3:5): '^nothing$' matched no key. Fix the pattern, or add `optional: true` beside the step "
        "if that is expected.",
    )]  # fmt: skip


# --------------------------------------------------------------------------- parse errors


@pytest.mark.parametrize(("step", "message"), [
    ("transpose: {match: a, rank: -1}", "r.yaml:3:33: step 1 (transpose): field 'rank': expected a number >= 0, found an integer -1"),
    ("transpose: {match: a, rank: [2, x]}",
     "r.yaml:3:37: step 1 (transpose): field 'rank': item 2: expected an integer, found a string 'x'"),
    ("transpose: {match: a, rank: 2.5}", "r.yaml:3:33: step 1 (transpose): field 'rank': expected an integer or a list, found a number 2.5"),
    ("transpose: {match: a, rank: []}", "r.yaml:3:33: step 1 (transpose): field 'rank': expected a non-empty list, found a list []"),
    ("transpose: {match: a, dtype: flaot32}",
     "r.yaml:3:34: step 1 (transpose): field 'dtype': expected a dtype, one of: float64, float32, float16, bfloat16, float8_e4m3fn, "
     "float8_e5m2, complex64, complex128, int64, int32, int16, int8, uint8, uint16, uint32, uint64, bool; found a string 'flaot32' "
     "(did you mean 'float32'?)"),
    ("reshape: {match: a, shape: [-1], dtype: [float32, 7]}",
     "r.yaml:3:55: step 1 (reshape): field 'dtype': item 2: expected a string, found an integer 7"),
    ("cast: {match: a, dtype: float16, from_dtype: [float32, cheese]}",
     "r.yaml:3:60: step 1 (cast): field 'from_dtype': item 2: expected a dtype, one of: float64, float32, float16, bfloat16, "
     "float8_e4m3fn, float8_e5m2, complex64, complex128, int64, int32, int16, int8, uint8, uint16, uint32, uint64, bool; found a "
     "string 'cheese'"),
    ("cast: {match: a, dtype: float16, form_dtype: float32}",
     "r.yaml:3:38: step 1 (cast): unknown field 'form_dtype' (did you mean 'from_dtype'?); expected one of: match, dtype, from_dtype, rank"),
    ("transpose: {match: a, rnak: 2}",
     "r.yaml:3:27: step 1 (transpose): unknown field 'rnak' (did you mean 'rank'?); expected one of: match, dims, rank, dtype"),
])  # fmt: skip
def test_selector_errors_name_file_line_and_column(step: str, message: str) -> None:
    assert parse_error(f"version: 1\nrules:\n  - {step}\n") == message


# --------------------------------------------------------------------------- loaded for real


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4, 5)


def test_selected_ops_load_the_right_tensors() -> None:
    """Keras-laid-out kernels (conv (kh, kw, in, out), dense (in, out)) into torch layers."""
    torch.manual_seed(0)
    conv_k, dense_k = torch.randn(3, 3, 2, 4), torch.randn(4, 5)
    source = {"conv.weight": conv_k, "conv.bias": torch.randn(4), "fc.weight": dense_k, "fc.bias": torch.randn(5)}
    model = Mixed()
    remap.load(model, source, rules={"version": 1, "rules": [
        {"transpose": {"match": r"\.weight$", "rank": 4, "dims": [3, 2, 0, 1]}},
        {"transpose": {"match": r"\.weight$", "rank": 2}},
    ]})  # fmt: skip
    assert torch.equal(model.conv.weight, conv_k.permute(3, 2, 0, 1))
    assert torch.equal(model.fc.weight, dense_k.T)
    assert torch.equal(model.conv.bias, source["conv.bias"])
