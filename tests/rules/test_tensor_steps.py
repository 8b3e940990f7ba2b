"""The tensor-op steps: parsed from rules, planned on shapes alone, then applied to real
tensors through ``remap.load``.

Planning tests use dicts of shapes (no tensor exists); engine tests use small modules
defined here, and compare every loaded tensor with a reference computation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import remap
from remap.rules import ops
from remap.errors import CheckError, RulesError
from remap.planning.planner import Plan, make_plan
from remap.report.render import format_report
from remap.rules.parse import parse_rules
from remap.sources.readers import Source
from weights import Small, perturb


def plan(rules: list[dict[str, Any]], source: dict[str, Any], target: dict[str, Any]) -> Plan:
    return make_plan(parse_rules({"version": 1, "rules": rules}), source, target)


def failures(p: Plan) -> list[tuple[str, str]]:
    return [(f.kind, f.message) for f in p.failures]


def op_failures(p: Plan) -> list[str]:
    return [f.message for f in p.failures if f.kind == "op"]


QKV_SPLIT = {"split": {"match": r"^(.*)\.qkv\.weight$", "into": [r"\1.q.weight", r"\1.k.weight", r"\1.v.weight"], "dim": 0}}
QKV_MERGE = {"merge": {"match": r"^(.*)\.(q|k|v)_proj\.weight$", "into": r"\1.in_proj_weight", "order": ["q", "k", "v"], "dim": 0}}


# --------------------------------------------------------------------------- planning: shapes, dtypes, ops

PLANNED = [
    pytest.param(
        [{"transpose": r"\.c_attn\.weight$"}],
        {"h.0.attn.c_attn.weight": ([8, 24], "float16"), "h.0.attn.c_attn.bias": ([24], "float16")},
        {"h.0.attn.c_attn.weight": ([24, 8], "float16"), "h.0.attn.c_attn.bias": ([24], "float16")},
        {"h.0.attn.c_attn.weight": ((24, 8), "float16", ("transpose(-2, -1)",)), "h.0.attn.c_attn.bias": ((24,), "float16", ())},
        id="transpose-conv1d",
    ),
    pytest.param(
        [{"transpose": {"match": "^w$", "dims": [0, 3, 1, 2]}}],
        {"w": [4, 3, 3, 2]},
        {"w": [4, 2, 3, 3]},
        {"w": ((4, 2, 3, 3), "float32", ("permute(0, 3, 1, 2)",))},
        id="transpose-permute",
    ),
    pytest.param(
        [{"transpose": {"match": "^w$", "dims": [0, 2]}}],
        {"w": [2, 3, 4]},
        {"w": [4, 3, 2]},
        {"w": ((4, 3, 2), "float32", ("transpose(0, 2)",))},
        id="transpose-dims",
    ),
    pytest.param(
        [{"reshape": {"match": r"\.proj\.weight$", "shape": [8, -1, 1, 1]}}],
        {"conv.proj.weight": [8, 4]},
        {"conv.proj.weight": [8, 4, 1, 1]},
        {"conv.proj.weight": ((8, 4, 1, 1), "float32", ("reshape([8, 4, 1, 1])",))},
        id="reshape-infer",
    ),
    pytest.param(
        [{"reshape": {"match": r"\.proj\.weight$", "shape": "target"}}],
        {"conv.proj.weight": [8, 4, 1, 1]},
        {"conv.proj.weight": [8, 4]},
        {"conv.proj.weight": ((8, 4), "float32", ("reshape([8, 4])",))},
        id="reshape-target",
    ),
    pytest.param(
        [{"slice": {"match": r"^fc\.(weight|bias)$", "dim": 0, "index": [7, 2, -1]}}],
        {"fc.weight": [10, 4], "fc.bias": [10]},
        {"fc.weight": [3, 4], "fc.bias": [3]},
        {"fc.weight": ((3, 4), "float32", ("slice(dim=0, index=[7, 2, -1])",)), "fc.bias": ((3,), "float32", ("slice(dim=0, index=[7, 2, -1])",))},
        id="slice-index",
    ),
    pytest.param(
        [{"slice": {"match": "^w$", "dim": 1, "start": 2, "stop": 8, "step": 2}}],
        {"w": [4, 10]},
        {"w": [4, 3]},
        {"w": ((4, 3), "float32", ("slice(dim=1, 2:8:2)",))},
        id="slice-range",
    ),
    pytest.param(
        [{"pad": {"match": r"^wte\.weight$", "fill": "mean"}}],
        {"wte.weight": ([10, 4], "bfloat16")},
        {"wte.weight": ([13, 4], "bfloat16")},
        {"wte.weight": ((13, 4), "bfloat16", ("pad(to=[13, 4], fill=mean)",))},
        id="pad-mean",
    ),
    pytest.param(
        [{"pad": {"match": "^b$", "fill": -1, "to": [6]}}],
        {"b": [4]},
        {"b": [6]},
        {"b": ((6,), "float32", ("pad(to=[6], fill=-1)",))},
        id="pad-to",
    ),
    pytest.param(
        [{"pad": {"match": "^b$"}}],
        {"b": [6]},
        {"b": [6]},
        {"b": ((6,), "float32", ())},
        id="pad-nothing-to-pad",
    ),
    pytest.param(
        [{"cast": {"match": ".*", "dtype": "float32"}}],
        {"w": ([4, 4], "float16"), "b": ([4], "float32")},
        {"w": [4, 4], "b": [4]},
        {"w": ((4, 4), "float32", ("cast(float32)",)), "b": ((4,), "float32", ())},
        id="cast",
    ),
    pytest.param(
        [QKV_MERGE],
        {"a.v_proj.weight": [4, 4], "a.k_proj.weight": [4, 4], "a.q_proj.weight": [4, 4]},
        {"a.in_proj_weight": [12, 4]},
        {"a.in_proj_weight": ((12, 4), "float32", ("cat(dim=0)[q, k, v]",))},
        id="merge",
    ),
    pytest.param(
        [{"merge": {"match": r"^(.*)\.(?P<part>q|k|v)_proj\.(weight|bias)$", "into": r"\1.in_proj_\3", "order": ["q", "k", "v"], "group": "part"}}],
        {f"a.{p}_proj.{n}": [4, 4] if n == "weight" else [4] for p in "qkv" for n in ("weight", "bias")},
        {"a.in_proj_weight": [12, 4], "a.in_proj_bias": [12]},
        {"a.in_proj_weight": ((12, 4), "float32", ("cat(dim=0)[q, k, v]",)), "a.in_proj_bias": ((12,), "float32", ("cat(dim=0)[q, k, v]",))},
        id="merge-named-group",
    ),
    pytest.param(
        [{"merge": {"match": r"^experts\.(\d+)\.w$", "into": "experts.w", "order": [0, 1], "stack": True, "dim": 0}}],
        {"experts.0.w": [4, 2], "experts.1.w": [4, 2]},
        {"experts.w": [2, 4, 2]},
        {"experts.w": ((2, 4, 2), "float32", ("stack(dim=0)[0, 1]",))},
        id="merge-stack",
    ),
    pytest.param(
        [QKV_SPLIT],
        {"blocks.0.attn.qkv.weight": ([12, 4], "float16")},
        {"blocks.0.attn.q.weight": ([4, 4], "float16"), "blocks.0.attn.k.weight": ([4, 4], "float16"), "blocks.0.attn.v.weight": ([4, 4], "float16")},
        {
            "blocks.0.attn.q.weight": ((4, 4), "float16", ("split(dim=0)[0 of 3]",)),
            "blocks.0.attn.k.weight": ((4, 4), "float16", ("split(dim=0)[1 of 3]",)),
            "blocks.0.attn.v.weight": ((4, 4), "float16", ("split(dim=0)[2 of 3]",)),
        },
        id="split",
    ),
    pytest.param(
        [{"split": {"match": "^qkv$", "into": ["q", "kv"], "dim": -1, "sizes": [4, 8]}}],
        {"qkv": [2, 12]},
        {"q": [2, 4], "kv": [2, 8]},
        {"q": ((2, 4), "float32", ("split(dim=-1)[0 of 2]",)), "kv": ((2, 8), "float32", ("split(dim=-1)[1 of 2]",))},
        id="split-sizes",
    ),
    pytest.param(
        [{"adapt": {"match": r"^conv1\.weight$", "op": "in_channels"}}],
        {"conv1.weight": [8, 3, 7, 7]},
        {"conv1.weight": [8, 1, 7, 7]},
        {"conv1.weight": ((8, 1, 7, 7), "float32", ("in_channels(3->1)",))},
        id="in-channels",
    ),
    pytest.param(
        [{"adapt": {"match": "pos_embed$", "op": "interpolate"}}],
        {"pos_embed": [1, 1 + 16, 8]},
        {"pos_embed": [1, 1 + 36, 8]},
        {"pos_embed": ((1, 37, 8), "float32", ("interpolate(17->37 tokens, 2d, bicubic)",))},
        id="interpolate",
    ),
    pytest.param(
        [{"adapt": {"match": "pos$", "op": "interpolate", "grid": "1d", "mode": "linear", "prefix_tokens": 0}}],
        {"pos": [10, 8]},
        {"pos": [17, 8]},
        {"pos": ((17, 8), "float32", ("interpolate(10->17 tokens, 1d, linear)",))},
        id="interpolate-1d",
    ),
    pytest.param(
        [{"transpose": r"_proj\.weight$"}, QKV_MERGE],
        {"a.q_proj.weight": [4, 2], "a.k_proj.weight": [4, 2], "a.v_proj.weight": [4, 2]},
        {"a.in_proj_weight": [6, 4]},
        {"a.in_proj_weight": ((6, 4), "float32", ("transpose(-2, -1)", "transpose(-2, -1)", "transpose(-2, -1)", "cat(dim=0)[q, k, v]"))},
        id="transpose-then-merge",
    ),
    pytest.param(
        [QKV_MERGE, {"split": {"match": r"^(.*)\.in_proj_weight$", "into": [r"\1.q", r"\1.k", r"\1.v"]}}],
        {"a.q_proj.weight": [4, 4], "a.k_proj.weight": [4, 4], "a.v_proj.weight": [4, 4]},
        {"a.q": [4, 4], "a.k": [4, 4], "a.v": [4, 4]},
        {
            "a.q": ((4, 4), "float32", ("cat(dim=0)[q, k, v]", "split(dim=0)[0 of 3]")),
            "a.k": ((4, 4), "float32", ("cat(dim=0)[q, k, v]", "split(dim=0)[1 of 3]")),
            "a.v": ((4, 4), "float32", ("cat(dim=0)[q, k, v]", "split(dim=0)[2 of 3]")),
        },
        id="merge-then-split",
    ),
    pytest.param(
        [{"rename": {r"^wte\.": "embed."}}, {"pad": {"match": r"^embed\.weight$", "fill": "zeros"}}, {"cast": {"match": "^embed", "dtype": "float16"}}],
        {"wte.weight": [10, 4]},
        {"embed.weight": ([12, 4], "float16")},
        {"embed.weight": ((12, 4), "float16", ("pad(to=[12, 4], fill=zeros)", "cast(float16)"))},
        id="rename-pad-cast",
    ),
]


@pytest.mark.parametrize(("rules", "source", "target", "expected"), PLANNED)
def test_planned_shapes_dtypes_and_ops(rules, source, target, expected) -> None:
    p = plan(rules, source, target)
    assert failures(p) == []
    got = {a.target: (a.meta.shape, a.meta.dtype, a.ops) for a in p.assignments}
    assert got == expected
    for key, (_, _, ops_) in expected.items():
        assert p.report.target_record(key).ops == ops_
        assert p.report.target_record(key).status == "loaded"


def test_merged_sources_follow_order_not_file_order() -> None:
    p = plan([QKV_MERGE], {"a.v_proj.weight": [4, 4], "a.k_proj.weight": [4, 4], "a.q_proj.weight": [4, 4]}, {"a.in_proj_weight": [12, 4]})
    assert p.report.target_record("a.in_proj_weight").sources == ("a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight")
    assert {s.key: s.fate for s in p.report.sources} == dict.fromkeys(["a.v_proj.weight", "a.k_proj.weight", "a.q_proj.weight"], "used")


def test_split_parts_share_their_source() -> None:
    p = plan([QKV_SPLIT], {"a.qkv.weight": [12, 4]}, {"a.q.weight": [4, 4], "a.k.weight": [4, 4], "a.v.weight": [4, 4]})
    record = p.report.source_record("a.qkv.weight")
    assert (record.fate, record.targets) == ("used", ("a.q.weight", "a.k.weight", "a.v.weight"))


# --------------------------------------------------------------------------- summaries

SUMMARIES = [
    pytest.param({"transpose": r"\.c_attn\.weight$"}, r"transpose(-2, -1) on '\.c_attn\.weight$'", id="transpose"),
    pytest.param({"transpose": {"match": ["^a", "^b"], "dims": [0, 2, 3, 1]}}, "transpose(0, 2, 3, 1) on '^a', '^b'", id="permute"),
    pytest.param({"reshape": {"match": "x", "shape": [768, -1, 1, 1]}}, "reshape to [768, -1, 1, 1] on 'x'", id="reshape"),
    pytest.param({"reshape": {"match": "x", "shape": "target"}}, "reshape to the target shape on 'x'", id="reshape-target"),
    pytest.param({"slice": {"match": "x", "index": [0, 5, 9]}}, "slice dim 0 [index=[0, 5, 9]] on 'x'", id="slice-index"),
    pytest.param({"slice": {"match": "x", "dim": 1, "start": 1, "stop": 8, "step": 2}}, "slice dim 1 [1:8:2] on 'x'", id="slice-range"),
    pytest.param({"slice": {"match": "x", "start": 2}}, "slice dim 0 [2:] on 'x'", id="slice-start"),
    pytest.param({"slice": {"match": "x", "step": -1}}, "slice dim 0 [::-1] on 'x'", id="slice-reverse"),
    pytest.param({"pad": {"match": "x"}}, "pad to the target shape with zeros on 'x'", id="pad"),
    pytest.param({"pad": {"match": "x", "fill": "mean"}}, "pad to the target shape with mean on 'x'", id="pad-mean"),
    pytest.param({"pad": {"match": "x", "fill": 0.5, "to": [10, 4]}}, "pad to [10, 4] with 0.5 on 'x'", id="pad-to"),
    pytest.param({"cast": {"match": ".*", "dtype": "bfloat16"}}, "cast to bfloat16 on '.*'", id="cast"),
    pytest.param(QKV_MERGE, r"merge '^(.*)\.(q|k|v)_proj\.weight$' into '\1.in_proj_weight' (cat dim 0, order q, k, v)", id="merge"),
    pytest.param(
        {"merge": {"match": r"^e\.(\d)$", "into": "e", "order": [0, 1], "stack": True, "dim": 1}}, r"merge '^e\.(\d)$' into 'e' (stack dim 1, order 0, 1)", id="merge-stack"
    ),
    pytest.param(QKV_SPLIT, r"split '^(.*)\.qkv\.weight$' into '\1.q.weight', '\1.k.weight', '\1.v.weight' (dim 0, 3 equal parts)", id="split"),
    pytest.param({"split": {"match": "^x$", "into": ["a", "b"], "sizes": [4, 8], "dim": 1}}, "split '^x$' into 'a', 'b' (dim 1, sizes [4, 8])", id="split-sizes"),
    pytest.param({"adapt": {"match": "conv1", "op": "in_channels"}}, "adapt in_channels on 'conv1'", id="in-channels"),
    pytest.param({"adapt": {"match": "pos", "op": "interpolate"}}, "adapt interpolate (2d, bicubic, 1 prefix token(s)) on 'pos'", id="interpolate"),
    pytest.param(
        {"adapt": {"match": "pos", "op": "interpolate", "grid": "1d", "mode": "nearest", "prefix_tokens": 2}},
        "adapt interpolate (1d, nearest, 2 prefix token(s)) on 'pos'",
        id="interpolate-1d",
    ),
]


@pytest.mark.parametrize(("step", "summary"), SUMMARIES)
def test_summary(step: dict[str, Any], summary: str) -> None:
    (parsed,) = parse_rules({"version": 1, "rules": [step]}).steps
    assert parsed.summary() == summary


def test_summary_is_the_report_step_text() -> None:
    p = plan([QKV_SPLIT], {"a.qkv.weight": [12, 4]}, {"a.q.weight": [4, 4], "a.k.weight": [4, 4], "a.v.weight": [4, 4]})
    (step,) = p.report.steps
    assert (step.index, step.kind, step.summary, step.matched) == (
        1, "split", r"split '^(.*)\.qkv\.weight$' into '\1.q.weight', '\1.k.weight', '\1.v.weight' (dim 0, 3 equal parts)", 1
    )  # fmt: skip


# --------------------------------------------------------------------------- planning failures

OP_FAILURES = [
    pytest.param(
        [{"reshape": {"match": "^w$", "shape": [5, 5]}}], {"w": [3, 4]}, {"w": [5, 5]},
        "step 1 (reshape): key 'w' [3, 4] float32: cannot reshape [3, 4] (12 elements) to [5, 5] (25 elements)",
        id="reshape-count",
    ),
    pytest.param(
        [{"reshape": {"match": "^w$", "shape": "target"}}], {"w": [3, 4]}, {"w": [5, 5]},
        "step 1 (reshape): key 'w' [3, 4] float32: cannot reshape [3, 4] (12 elements) to [5, 5] (25 elements)",
        id="reshape-to-target",
    ),
    pytest.param(
        [{"transpose": r"^fc\."}], {"fc.weight": [10, 4], "fc.bias": [10]}, {"fc.weight": [4, 10], "fc.bias": [10]},
        "step 1 (transpose): key 'fc.bias' [10] float32: cannot transpose a 1-d tensor of shape [10]",
        id="transpose-1d",
    ),
    pytest.param(
        [{"transpose": {"match": "^w$", "dims": [0, 2]}}], {"w": ([3, 4], "float16")}, {"w": [4, 3]},
        "step 1 (transpose): key 'w' [3, 4] float16: dim 2 is out of range for a 2-d tensor",
        id="transpose-dim",
    ),
    pytest.param(
        [{"slice": {"match": "^fc", "index": [0, 10]}}], {"fc": [10, 4]}, {"fc": [2, 4]},
        "step 1 (slice): key 'fc' [10, 4] float32: index 10 is out of range for dim 0 of size 10",
        id="slice-index",
    ),
    pytest.param(
        [{"slice": {"match": "^fc", "start": 8, "stop": 2}}], {"fc": [10, 4]}, {"fc": [2, 4]},
        "step 1 (slice): key 'fc' [10, 4] float32: the slice selects nothing from dim 0 of size 10",
        id="slice-empty",
    ),
    pytest.param(
        [{"pad": {"match": "^wte$"}}], {"wte": [10, 4]}, {"wte": [8, 4]},
        "step 1 (pad): key 'wte' [10, 4] float32: cannot pad [10, 4] to [8, 4]: dim 0 would shrink (use slice)",
        id="pad-shrink",
    ),
    pytest.param(
        [{"pad": {"match": "^ids$", "fill": 0.5}}], {"ids": ([3], "int64")}, {"ids": ([5], "int64")},
        "step 1 (pad): key 'ids' [3] int64: cannot pad with fill 0.5: the tensor is int64, which holds integers only",
        id="pad-int-fill",
    ),
    pytest.param(
        [{"adapt": {"match": "^conv$", "op": "in_channels"}}], {"conv": [8, 4, 3, 3]}, {"conv": [8, 2, 3, 3]},
        "step 1 (adapt): key 'conv' [8, 4, 3, 3] float32: in_channels cannot fit 4 input channels to 2: it sums any filters "
        "to 1 channel, repeats 3-channel (RGB) filters to any number, or sums the RGB triples of 3*k channels to k; "
        "[8, 4, 3, 3] cannot become [8, 2, 3, 3]",
        id="in-channels-4-to-2",
    ),
    pytest.param(
        [{"adapt": {"match": "^conv$", "op": "in_channels"}}], {"conv": [8, 3, 3, 3]}, {"conv": [8, 1, 5, 5]},
        "step 1 (adapt): key 'conv' [8, 3, 3, 3] float32: in_channels changes only dim 1: [8, 3, 3, 3] cannot become [8, 1, 5, 5]",
        id="in-channels-kernel",
    ),
    pytest.param(
        [{"adapt": {"match": "^pos$", "op": "interpolate"}}], {"pos": [1, 1 + 15, 8]}, {"pos": [1, 1 + 36, 8]},
        "step 1 (adapt): key 'pos' [1, 16, 8] float32: [1, 16, 8] has 15 position tokens after 1 prefix token(s), "
        "which do not form a square grid (grid: 1d resizes a sequence)",
        id="interpolate-not-square",
    ),
    pytest.param(
        [{"adapt": {"match": "^pos$", "op": "interpolate", "prefix_tokens": 0}}], {"pos": [1, 17, 8]}, {"pos": [1, 36, 8]},
        "step 1 (adapt): key 'pos' [1, 17, 8] float32: [1, 17, 8] has 17 position tokens after 0 prefix token(s), "
        "which do not form a square grid (grid: 1d resizes a sequence)",
        id="interpolate-prefix-forgotten",
    ),
    pytest.param(
        [{"adapt": {"match": "^pos$", "op": "interpolate"}}], {"pos": [1, 17, 8]}, {"pos": [1, 37, 16]},
        "step 1 (adapt): key 'pos' [1, 17, 8] float32: interpolate changes only the token dim: [1, 17, 8] cannot become [1, 37, 16]",
        id="interpolate-channels",
    ),
    pytest.param(
        [{"split": {"match": "^qkv$", "into": ["q", "k", "v"]}}], {"qkv": [10, 4]}, {"q": [4, 4], "k": [4, 4], "v": [2, 4]},
        "step 1 (split): key 'qkv' [10, 4] float32: dim 0 of [10, 4] has size 10, which does not divide into 3 equal parts",
        id="split-not-dividing",
    ),
    pytest.param(
        [{"split": {"match": "^qkv$", "into": ["q", "kv"], "sizes": [4, 4]}}], {"qkv": [12, 4]}, {"q": [4, 4], "kv": [8, 4]},
        "step 1 (split): key 'qkv' [12, 4] float32: sizes [4, 4] add up to 8, but dim 0 of [12, 4] is 12",
        id="split-sizes",
    ),
    pytest.param(
        [{"split": {"match": "^qkv$", "into": ["q", "kv"], "dim": 2}}], {"qkv": [12, 4]}, {"q": [6, 4], "kv": [6, 4]},
        "step 1 (split): key 'qkv' [12, 4] float32: dim 2 is out of range for a 2-d tensor",
        id="split-dim",
    ),
    pytest.param(
        [{"drop": "^other$"}, QKV_MERGE], {"other": [1], "a.q_proj.weight": [4, 4], "a.k_proj.weight": [4, 5], "a.v_proj.weight": [4, 4]},
        {"a.in_proj_weight": [12, 4]},
        "step 2 (merge): cannot merge into 'a.in_proj_weight': cannot concatenate along dim 0: the other dims differ: [[4, 4], [4, 5], [4, 4]]",
        id="merge-shapes",
    ),
    pytest.param(
        [QKV_MERGE], {"a.q_proj.weight": ([4, 4], "float16"), "a.k_proj.weight": [4, 4], "a.v_proj.weight": [4, 4]}, {"a.in_proj_weight": [12, 4]},
        "step 1 (merge): cannot merge into 'a.in_proj_weight': the parts have different dtypes: q float16, k float32, v float32; cast them first",
        id="merge-dtypes",
    ),
    pytest.param(
        [QKV_MERGE], {"a.q_proj.weight": [4, 4], "a.k_proj.weight": [4, 4]}, {"a.in_proj_weight": [12, 4]},
        "step 1 (merge): cannot merge into 'a.in_proj_weight': part 'v' is missing (have q from 'a.q_proj.weight', k from 'a.k_proj.weight')",
        id="merge-part-missing",
    ),
    pytest.param(
        [QKV_MERGE], {"a.k_proj.weight": [4, 4]}, {"a.in_proj_weight": [12, 4]},
        "step 1 (merge): cannot merge into 'a.in_proj_weight': parts 'q', 'v' are missing (have k from 'a.k_proj.weight')",
        id="merge-parts-missing",
    ),
    pytest.param(
        [{"merge": {"match": r"^(.*)\.(q|k|v)_proj\.(weight|bias)$", "into": r"\1.in_proj", "order": ["q", "k", "v"], "group": 2}}],
        {"a.q_proj.weight": [4, 4], "a.q_proj.bias": [4], "a.k_proj.weight": [4, 4], "a.v_proj.weight": [4, 4]},
        {"a.in_proj": [12, 4]},
        "step 1 (merge): cannot merge into 'a.in_proj': part 'q' appears twice: 'a.q_proj.weight' and 'a.q_proj.bias'",
        id="merge-part-twice",
    ),
    pytest.param(
        [{"merge": {"match": r"^(.*)\.(\w)_proj\.weight$", "into": r"\1.in_proj_weight", "order": ["q", "k", "v"]}}],
        {"a.q_proj.weight": [4, 4], "a.k_proj.weight": [4, 4], "a.o_proj.weight": [4, 4], "a.v_proj.weight": [4, 4]},
        {"a.in_proj_weight": [12, 4]},
        "step 1 (merge): cannot merge into 'a.in_proj_weight': key 'a.o_proj.weight' is part 'o', which order ['q', 'k', 'v'] does not list",
        id="merge-part-not-in-order",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("rules", "source", "target", "message"), OP_FAILURES)
def test_op_failures(rules, source, target, message: str) -> None:
    p = plan(rules, source, target)
    assert not p.ok
    assert op_failures(p) == [message]


def test_a_failed_op_leaves_the_key_as_it_was() -> None:
    """The key goes on unchanged, so the target names its shape as well: both shapes are said."""
    p = plan([{"reshape": {"match": "^w$", "shape": [5, 5]}}], {"w": [3, 4]}, {"w": [5, 5]})
    assert failures(p) == [
        ("op", "step 1 (reshape): key 'w' [3, 4] float32: cannot reshape [3, 4] (12 elements) to [5, 5] (25 elements)"),
        (
            "shape_mismatch",
            "1 mapped key(s) differ in shape from the target (shapes: error):\n  w: checkpoint [3, 4] (from 'w') vs model [5, 5]\n"
            "Fix the rules, or allow skipping them with `shapes: {skip: [pattern]}` and list them in expect.missing.",
        ),
    ]
    assert p.report.failures[0].keys == ("w",)


def test_failed_merge_leaves_its_parts_unused() -> None:
    p = plan([QKV_MERGE], {"a.q_proj.weight": [4, 4], "a.k_proj.weight": [4, 4]}, {"a.in_proj_weight": [12, 4]})
    assert failures(p) == [
        ("op", "step 1 (merge): cannot merge into 'a.in_proj_weight': part 'v' is missing (have q from 'a.q_proj.weight', k from 'a.k_proj.weight')"),
        ("missing", "1 target key(s) would keep their initial values and are not in expect.missing:\n  a.in_proj_weight"),
        ("unused", "2 source key(s) reach no target key and are not dropped or in expect.unused:\n  a.q_proj.weight\n  a.k_proj.weight"),
    ]
    assert p.report.failures[0].keys == ("a.q_proj.weight", "a.k_proj.weight")


@pytest.mark.parametrize(
    ("step", "kind"),
    [
        ({"pad": {"match": "^wte$", "fill": "mean"}}, "pad"),
        ({"adapt": {"match": "^wte$", "op": "in_channels"}}, "adapt in_channels"),
        ({"adapt": {"match": "^wte$", "op": "interpolate"}}, "adapt interpolate"),
        ({"reshape": {"match": "^wte$", "shape": "target"}}, "reshape"),
    ],
)
def test_fitting_a_key_that_is_not_a_target_key(step: dict[str, Any], kind: str) -> None:
    """pad, adapt and reshape-to-target look the key up among the target's keys, as named at that step."""
    p = plan([step, {"rename": {"^wte$": "embed.weight"}}], {"wte": [10, 4]}, {"embed.weight": [12, 4]})
    assert op_failures(p) == [
        f"step 1 ({step and next(iter(step))}): key 'wte' [10, 4] float32: no target key has this name, so there is no target shape "
        f"to fit; put {kind} after the steps that give the key its target name"
    ]
    fixed = plan([{"rename": {"^wte$": "embed.weight"}}, {"pad": {"match": "^embed", "fill": "mean"}}], {"wte": [10, 4]}, {"embed.weight": [12, 4]})
    assert fixed.ok


@pytest.mark.parametrize(
    "step",
    [
        {"transpose": "nothing"},
        {"reshape": {"match": "nothing", "shape": [-1]}},
        {"slice": {"match": "nothing", "index": [0]}},
        {"pad": {"match": "nothing"}},
        {"cast": {"match": "nothing", "dtype": "float16"}},
        {"adapt": {"match": "nothing", "op": "in_channels"}},
        {"merge": {"match": "^(nothing)$", "into": "x", "order": ["a", "b"]}},
        {"split": {"match": "^nothing$", "into": ["x", "y"]}},
    ],
    ids=lambda s: next(iter(s)),
)
def test_a_step_that_matches_nothing_fails_unless_optional(step: dict[str, Any]) -> None:
    kind = next(iter(step))
    pattern = step[kind] if isinstance(step[kind], str) else step[kind]["match"]
    p = plan([step], {"w": [4, 4]}, {"w": [4, 4]})
    assert failures(p) == [
        ("unmatched_step", f"step 1 ({kind}): '{pattern}' matched no key. Fix the pattern, or add `optional: true` beside the step if that is expected.")
    ]
    optional = make_plan(parse_rules({"version": 1, "rules": [{**step, "optional": True}]}), {"w": [4, 4]}, {"w": [4, 4]})
    assert optional.ok
    assert optional.report.target_record("w").ops == ()


def test_a_pattern_of_a_list_that_matches_nothing_fails() -> None:
    p = plan([{"transpose": {"match": ["^w$", "^nothing$"]}}], {"w": [4, 3]}, {"w": [3, 4]})
    assert failures(p) == [
        ("unmatched_step", "step 1 (transpose): '^nothing$' matched no key. Fix the pattern, or add `optional: true` beside the step if that is expected.")
    ]


def test_dry_run_catches_an_impossible_reshape_before_any_tensor_exists() -> None:
    """Metadata only: make_plan reads shapes, and the impossible op fails the plan."""
    rules = parse_rules(
        "version: 1\nrules:\n  - reshape: {match: '\\.proj\\.weight$', shape: [768, 768, 1, 1]}\n", filename="rules.yaml"
    )
    p = make_plan(rules, {"blocks.0.proj.weight": [768, 2304]}, {"blocks.0.proj.weight": [768, 768, 1, 1]})
    assert p.report.dry_run
    assert op_failures(p) == [
        "step 1 (reshape): key 'blocks.0.proj.weight' [768, 2304] float32: cannot reshape [768, 2304] (1769472 elements) "
        "to [768, 768, 1, 1] (589824 elements)"
    ]


def test_dry_run_of_a_load_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = spy_reads(monkeypatch)
    model = nn.Linear(4, 3)
    with pytest.raises(CheckError) as info:
        remap.load(model, {"weight": torch.randn(4, 3), "bias": torch.randn(3)}, rules={"version": 1, "rules": [{"reshape": {"match": "^weight$", "shape": [4, 4]}}]})
    assert reads == []
    assert "step 1 (reshape): key 'weight' [4, 3] float32: cannot reshape [4, 3] (12 elements) to [4, 4] (16 elements)" in str(info.value)
    assert "the module was not touched" in str(info.value)


# --------------------------------------------------------------------------- parse errors


def parse_error(step: str) -> str:
    with pytest.raises(RulesError) as info:
        parse_rules(f"version: 1\nrules:\n  - {step}\n", filename="rules.yaml")
    return str(info.value)


PARSE_ERRORS = [
    pytest.param("transpose: {match: x, dimz: [0, 1]}", "rules.yaml:3:27: step 1 (transpose): unknown field 'dimz' (did you mean 'dims'?); expected one of: match, dims, rank, dtype", id="transpose-unknown"),
    pytest.param("transpose: {dims: [0, 1]}", "rules.yaml:3:16: step 1 (transpose): missing required field 'match'", id="transpose-no-match"),
    pytest.param("transpose: {match: x, dims: [0]}", "rules.yaml:3:33: step 1 (transpose): field 'dims': expected two dims to swap, or every dim in a new order; found [0]", id="transpose-one-dim"),
    pytest.param("transpose: 5", "rules.yaml:3:16: step 1 (transpose): expected a string or a list or a mapping, found an integer 5", id="transpose-type"),
    pytest.param("transpose: '('", "rules.yaml:3:16: step 1 (transpose): bad regex '(': missing ) at position 1", id="transpose-regex"),
    pytest.param("transpose: [a, '(']", "rules.yaml:3:20: step 1 (transpose): item 2: bad regex '(': missing ) at position 1", id="transpose-regex-list"),
    pytest.param("transpose: {match: [a, '(']}", "rules.yaml:3:28: step 1 (transpose): field 'match': item 2: bad regex '(': missing ) at position 1", id="transpose-regex-match"),
    pytest.param("reshape: {shape: [1]}", "rules.yaml:3:14: step 1 (reshape): missing required field 'match'", id="reshape-no-match"),
    pytest.param("reshape: {match: x}", "rules.yaml:3:14: step 1 (reshape): missing required field 'shape'", id="reshape-no-shape"),
    pytest.param("reshape: {match: x, shape: tgt}", "rules.yaml:3:32: step 1 (reshape): field 'shape': expected a list of sizes or 'target', found a string 'tgt'", id="reshape-shape-word"),
    pytest.param("reshape: {match: x, shape: [1, a]}", "rules.yaml:3:36: step 1 (reshape): field 'shape': item 2: size 'a': 'a' is not in vars (defined: none); dims of the input are d0, d1, ...", id="reshape-shape-item"),
    pytest.param("reshape: {match: '(', shape: [1]}", "rules.yaml:3:22: step 1 (reshape): field 'match': bad regex '(': missing ) at position 1", id="reshape-regex"),
    pytest.param("slice: {match: x, index: [0], start: 1}", "rules.yaml:3:42: step 1 (slice): field 'start': give either 'index' or start/stop/step, not both (found 'index' and 'start')", id="slice-index-and-start"),
    pytest.param("slice: {match: x}", "rules.yaml:3:12: step 1 (slice): expected 'index: [list]' or start/stop/step to say what to keep", id="slice-nothing"),
    pytest.param("slice: {match: x, step: 0}", "rules.yaml:3:29: step 1 (slice): field 'step': expected a non-zero step, found 0", id="slice-step-zero"),
    pytest.param("slice: {match: x, index: []}", "rules.yaml:3:30: step 1 (slice): field 'index': expected a non-empty list, found a list []", id="slice-empty-index"),
    pytest.param("slice: {index: [1]}", "rules.yaml:3:12: step 1 (slice): missing required field 'match'", id="slice-no-match"),
    pytest.param("pad: {match: x, fil: mean}", "rules.yaml:3:21: step 1 (pad): unknown field 'fil' (did you mean 'fill'?); expected one of: match, fill, to, rank, dtype", id="pad-unknown"),
    pytest.param("pad: {match: x, fill: median}", "rules.yaml:3:27: step 1 (pad): field 'fill': expected zeros, mean or a number, found a string 'median'", id="pad-fill"),
    pytest.param("pad: {match: x, fill: true}", "rules.yaml:3:27: step 1 (pad): field 'fill': expected a string or a number, found a boolean True", id="pad-fill-bool"),
    pytest.param("cast: {match: x, dtype: float33}", "rules.yaml:3:29: step 1 (cast): field 'dtype': expected one of: float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2, complex64, complex128, int64, int32, int16, int8, uint8, uint16, uint32, uint64, bool; found a string 'float33' (did you mean 'float32'?)", id="cast-dtype"),
    pytest.param("cast: {match: x}", "rules.yaml:3:11: step 1 (cast): missing required field 'dtype'", id="cast-no-dtype"),
    pytest.param("cast: {dtype: float16}", "rules.yaml:3:11: step 1 (cast): missing required field 'match'", id="cast-no-match"),
    pytest.param("merge: {match: '^(.*)\\.(q|k|v)$', into: '\\1', order: [q, k, v], group: 3}", "rules.yaml:3:76: step 1 (merge): field 'group': group 3 does not exist in pattern '^(.*)\\.(q|k|v)$'", id="merge-group-number"),
    pytest.param("merge: {match: '^(.*)\\.(q|k|v)$', into: '\\1', order: [q, k, v], group: part}", "rules.yaml:3:76: step 1 (merge): field 'group': group 'part' does not exist in pattern '^(.*)\\.(q|k|v)$'", id="merge-group-name"),
    pytest.param("merge: {match: '^x$', into: 'y', order: [q, k]}", "rules.yaml:3:20: step 1 (merge): field 'match': pattern '^x$' has no group to tell the parts apart; capture the part, e.g. '(q|k|v)'", id="merge-no-group"),
    pytest.param("merge: {match: '^(x)$', into: '\\2', order: [q, k]}", "rules.yaml:3:35: step 1 (merge): field 'into': replacement '\\2' refers to group 2, but pattern '^(x)$' has 1 group(s)", id="merge-into-group"),
    pytest.param("merge: {match: '^(x)$', into: 'y', order: [q, q]}", "rules.yaml:3:47: step 1 (merge): field 'order': order lists a part twice: ['q', 'q']", id="merge-order-twice"),
    pytest.param("merge: {match: '^(x)$', into: 'y', order: [q]}", "rules.yaml:3:47: step 1 (merge): field 'order': expected at least 2 parts to merge, found 1: ['q']", id="merge-one-part"),
    pytest.param("merge: {match: '^(x)$', into: 'y'}", "rules.yaml:3:12: step 1 (merge): missing required field 'order'", id="merge-no-order"),
    pytest.param("merge: {into: 'y', order: [a, b]}", "rules.yaml:3:12: step 1 (merge): missing required field 'match'", id="merge-no-match"),
    pytest.param("merge: {match: '^(x)$', into: 'y', order: [a, b], cat: true}", "rules.yaml:3:55: step 1 (merge): unknown field 'cat'; expected one of: match, into, order, group, dim, stack", id="merge-unknown"),
    pytest.param("split: {match: '^(.*)\\.qkv$', into: ['\\1.q', '\\1.k', '\\1.v'], sizes: [4, 8]}", "rules.yaml:3:74: step 1 (split): field 'sizes': expected one size per part: 3 parts in 'into', 2 sizes", id="split-sizes-count"),
    pytest.param("split: {match: '^(.*)\\.qkv$', into: ['\\1.q']}", "rules.yaml:3:41: step 1 (split): field 'into': expected at least 2 keys to split into, found 1", id="split-one-part"),
    pytest.param("split: {match: '^(.*)\\.qkv$', into: ['\\1.q', '\\3.k']}", "rules.yaml:3:50: step 1 (split): field 'into': item 2: replacement '\\3.k' refers to group 3, but pattern '^(.*)\\.qkv$' has 1 group(s)", id="split-into-group"),
    pytest.param("split: {match: '^(.*)\\.qkv$', into: ['\\1.q', '\\1.k'], sizes: [0, 8]}", "rules.yaml:3:67: step 1 (split): field 'sizes': item 1: expected a number >= 1, found an integer 0", id="split-size-zero"),
    pytest.param("split: {match: '^(.*)\\.qkv$', into: ['\\1.q', '\\1.k'], chunks: 2}", "rules.yaml:3:59: step 1 (split): unknown field 'chunks'; expected one of: match, into, dim, sizes", id="split-unknown"),
    pytest.param("split: {into: [a, b]}", "rules.yaml:3:12: step 1 (split): missing required field 'match'", id="split-no-match"),
    pytest.param("adapt: {match: x, op: in_channels, prefix_tokens: 1}", "rules.yaml:3:40: step 1 (adapt): field 'prefix_tokens': 'prefix_tokens' applies to op: interpolate, not in_channels", id="adapt-in-channels-extra"),
    pytest.param("adapt: {match: x, op: resize}", "rules.yaml:3:27: step 1 (adapt): field 'op': expected one of: in_channels, interpolate; found a string 'resize'", id="adapt-op"),
    pytest.param("adapt: {match: x}", "rules.yaml:3:12: step 1 (adapt): missing required field 'op'", id="adapt-no-op"),
    pytest.param("adapt: {op: in_channels}", "rules.yaml:3:12: step 1 (adapt): missing required field 'match'", id="adapt-no-match"),
    pytest.param("adapt: {match: x, op: interpolate, mode: linear}", "rules.yaml:3:46: step 1 (adapt): field 'mode': mode 'linear' does not apply to a 2d grid; expected one of: bicubic, bilinear, nearest", id="adapt-mode-grid"),
    pytest.param("adapt: {match: x, op: interpolate, mode: area}", "rules.yaml:3:46: step 1 (adapt): field 'mode': expected one of: bicubic, bilinear, nearest, linear; found a string 'area'", id="adapt-mode"),
    pytest.param("adapt: {match: x, op: interpolate, prefix_tokens: -1}", "rules.yaml:3:55: step 1 (adapt): field 'prefix_tokens': expected a number >= 0, found an integer -1", id="adapt-prefix"),
    pytest.param("adapt: {match: x, op: interpolate, grid: 3d}", "rules.yaml:3:46: step 1 (adapt): field 'grid': expected one of: 2d, 1d; found a string '3d'", id="adapt-grid"),
]  # fmt: skip


@pytest.mark.parametrize(("step", "message"), PARSE_ERRORS)
def test_parse_errors(step: str, message: str) -> None:
    assert parse_error(step) == message


# --------------------------------------------------------------------------- engine: real tensors


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def load(module: nn.Module, state: dict[str, torch.Tensor], *rules: dict[str, Any]):
    return remap.load(module, state, rules={"version": 1, "rules": list(rules)})


def spy_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Source.read, by key."""
    reads: list[str] = []
    read = Source.read

    def spy(self: Source, key: str) -> torch.Tensor:
        reads.append(key)
        return read(self, key)

    monkeypatch.setattr(Source, "read", spy)
    return reads


def spy_loads(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Every tensor the engine hands to load_state_dict (of the module or of its submodules)."""
    given: list[torch.Tensor] = []
    load_state_dict = nn.Module.load_state_dict

    def spy(self: nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        given.extend(v for v in state_dict.values() if isinstance(v, torch.Tensor))
        return load_state_dict(self, state_dict, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "load_state_dict", spy)
    return given


class Attention(nn.Module):
    """Separate q/k/v projections, as HF attention modules have them."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)


class Fused(nn.Module):
    """One qkv projection, as timm's ViT blocks have it."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)


class PosEmbed(nn.Module):
    def __init__(self, tokens: int, dim: int = 8) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.proj = nn.Linear(dim, dim)


def test_transpose_conv1d_into_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2's Conv1D keeps weights [in, out]; nn.Linear wants [out, in]."""
    given = spy_loads(monkeypatch)
    sd = {"c_fc.weight": rand(4, 6), "c_fc.bias": rand(6, seed=1)}
    model = nn.Sequential()
    model.add_module("c_fc", nn.Linear(4, 6))
    report = load(model, sd, {"transpose": r"^c_fc\.weight$"})
    assert torch.equal(model.c_fc.weight, sd["c_fc.weight"].T)
    x = rand(3, 4, seed=2)
    torch.testing.assert_close(model(x), x @ sd["c_fc.weight"] + sd["c_fc.bias"])  # what Conv1D computes
    assert report.target_record("c_fc.weight").ops == ("transpose(-2, -1)",)
    assert report.target_record("c_fc.bias").ops == ()
    # the untouched bias is handed over as the source tensor itself; the transposed weight is a new tensor
    assert any(t is sd["c_fc.bias"] for t in given)
    assert not any(t is sd["c_fc.weight"] for t in given)


def test_untouched_tensors_are_not_copied(monkeypatch: pytest.MonkeyPatch) -> None:
    given = spy_loads(monkeypatch)
    reads = spy_reads(monkeypatch)
    sd = {"weight": rand(3, 4), "bias": rand(3, seed=1)}
    load(nn.Linear(4, 3), sd, {"cast": {"match": ".*", "dtype": "float32"}})  # already float32: no op
    assert sorted(reads) == ["bias", "weight"]
    assert any(t is sd["weight"] for t in given) and any(t is sd["bias"] for t in given)
    assert {t.data_ptr() for t in given} == {sd["weight"].data_ptr(), sd["bias"].data_ptr()}


def test_reshape_linear_into_1x1_conv() -> None:
    linear = nn.Linear(4, 8)
    sd = {k: v.detach().clone() for k, v in perturb(linear).state_dict().items()}
    conv = nn.Conv2d(4, 8, 1)
    report = load(conv, sd, {"reshape": {"match": "^weight$", "shape": [8, -1, 1, 1]}})
    assert torch.equal(conv.weight, sd["weight"].reshape(8, 4, 1, 1))
    x = rand(2, 4, 3, 3, seed=3)
    torch.testing.assert_close(conv(x), linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    assert report.target_record("weight").ops == ("reshape([8, 4, 1, 1])",)


def test_slice_head_to_a_subset_of_classes() -> None:
    """The logits of the kept classes are unchanged, in the order given."""
    index = [7, 2, 9, 0]
    full = perturb(nn.Linear(4, 10))
    sd = {k: v.detach().clone() for k, v in full.state_dict().items()}
    head = nn.Linear(4, len(index))
    report = load(head, sd, {"slice": {"match": r"^(weight|bias)$", "dim": 0, "index": index}})
    assert torch.equal(head.weight, sd["weight"][index]) and torch.equal(head.bias, sd["bias"][index])
    x = rand(5, 4, seed=4)
    torch.testing.assert_close(head(x), full(x)[:, index])
    assert report.target_record("weight").ops == ("slice(dim=0, index=[7, 2, 9, 0])",)


def test_slice_by_range() -> None:
    sd = {"weight": rand(10, 4), "bias": rand(10, seed=1)}
    head = nn.Linear(4, 3)
    load(head, sd, {"slice": {"match": ".", "start": 1, "stop": 8, "step": 3}})
    assert torch.equal(head.weight, sd["weight"][1:8:3]) and torch.equal(head.bias, sd["bias"][1:8:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pad_vocabulary_with_the_mean_embedding(dtype: torch.dtype) -> None:
    sd = {"weight": rand(10, 4, dtype=dtype)}
    emb = nn.Embedding(13, 4).to(dtype)
    report = load(emb, sd, {"pad": {"match": "^weight$", "fill": "mean"}})
    assert torch.equal(emb.weight[:10], sd["weight"])
    assert torch.equal(emb.weight[10:], sd["weight"].float().mean(0).to(dtype).expand(3, 4))
    assert report.target_record("weight").ops == ("pad(to=[13, 4], fill=mean)",)


def test_pad_with_a_number() -> None:
    sd = {"weight": rand(3, 4), "bias": rand(3, seed=1)}
    head = nn.Linear(4, 5)
    load(head, sd, {"pad": {"match": "^bias$", "fill": -100}}, {"pad": {"match": "^weight$"}})
    assert torch.equal(head.bias, torch.cat([sd["bias"], torch.full((2,), -100.0)]))
    assert torch.equal(head.weight, torch.cat([sd["weight"], torch.zeros(2, 4)]))


def test_cast() -> None:
    sd = {"weight": rand(3, 4, dtype=torch.float64), "bias": rand(3, seed=1, dtype=torch.float64)}
    head = nn.Linear(4, 3).half()
    report = load(head, sd, {"cast": {"match": ".*", "dtype": "float16"}})
    assert torch.equal(head.weight, sd["weight"].half()) and head.weight.dtype == torch.float16
    assert report.target_record("bias").ops == ("cast(float16)",)
    assert report.warnings == ()  # cast by the rules, not by load_state_dict


def test_merge_q_k_v_into_multihead_attention() -> None:
    src = perturb(Attention(8))
    sd = {f"attn.{k}": v.detach().clone() for k, v in src.state_dict().items()}
    sd.update({"attn.out_proj.weight": rand(8, 8), "attn.out_proj.bias": rand(8)})
    mha = nn.Module()
    mha.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    rules = {"merge": {"match": r"^(.*)\.(q|k|v)_proj\.(weight|bias)$", "into": r"\1.in_proj_\3", "order": ["q", "k", "v"], "group": 2}}
    report = load(mha, sd, rules)
    assert report.ok and report.totals.loaded == 4
    assert report.target_record("attn.out_proj.weight").ops == ()
    for name in ("weight", "bias"):
        ref = torch.cat([sd[f"attn.{p}_proj.{name}"] for p in "qkv"])
        assert torch.equal(getattr(mha.attn, f"in_proj_{name}"), ref)
        record = report.target_record(f"attn.in_proj_{name}")
        assert record.ops == ("cat(dim=0)[q, k, v]",)
        assert record.sources == tuple(f"attn.{p}_proj.{name}" for p in "qkv")


def test_merge_into_multihead_attention_gives_its_outputs() -> None:
    """q/k/v projections merged into nn.MultiheadAttention compute the same attention."""
    src = perturb(Attention(8))
    out_proj = perturb(nn.Linear(8, 8), seed=1)
    sd = {f"{k}": v.detach().clone() for k, v in src.state_dict().items()}
    sd.update({f"out_proj.{k}": v.detach().clone() for k, v in out_proj.state_dict().items()})
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    load(mha, sd, {"merge": {"match": r"^(q|k|v)_proj\.(weight|bias)$", "into": r"in_proj_\2", "order": ["q", "k", "v"], "group": 1}})
    x = rand(2, 5, 8, seed=5)
    q, k, v = (m(x).reshape(2, 5, 2, 4).transpose(1, 2) for m in (src.q_proj, src.k_proj, src.v_proj))
    ref = out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 5, 8))
    torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], ref, rtol=1e-5, atol=1e-5)


def test_merge_stack() -> None:
    sd = {"experts.0.w": rand(4, 2), "experts.1.w": rand(4, 2, seed=1), "experts.2.w": rand(4, 2, seed=2)}
    model = nn.Module()
    model.w = nn.Parameter(torch.zeros(4, 3, 2))
    load(model, sd, {"merge": {"match": r"^experts\.(\d)\.w$", "into": "w", "order": [0, 1, 2], "stack": True, "dim": 1}})
    assert torch.equal(model.w, torch.stack([sd[f"experts.{i}.w"] for i in range(3)], 1))


def test_split_qkv(monkeypatch: pytest.MonkeyPatch) -> None:
    fused = perturb(Fused(8))
    sd = {f"blocks.0.attn.{k}": v.detach().clone() for k, v in fused.state_dict().items()}
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].attn = Attention(8)
    split = {"split": {"match": r"^(.*)\.qkv\.(weight|bias)$", "into": [r"\1.q_proj.\2", r"\1.k_proj.\2", r"\1.v_proj.\2"], "dim": 0}}
    report = load(model, sd, split)
    for n, p in enumerate("qkv"):
        for name in ("weight", "bias"):
            key = f"blocks.0.attn.{p}_proj.{name}"
            assert torch.equal(model.state_dict()[key], sd[f"blocks.0.attn.qkv.{name}"][8 * n : 8 * (n + 1)])
            assert report.target_record(key).ops == (f"split(dim=0)[{n} of 3]",)
            assert report.target_record(key).sources == (f"blocks.0.attn.qkv.{name}",)
    lines = format_report(report, width=200).splitlines()
    for n, p in enumerate("qkv"):
        assert f"    blocks.0.attn.{p}_proj.{{bias, weight}} <- blocks.0.attn.qkv.{{bias, weight}}  [split(dim=0)[{n} of 3]]" in lines


def test_split_by_sizes() -> None:
    sd = {"qkv": rand(2, 12)}
    model = nn.Module()
    model.q, model.kv = nn.Parameter(torch.zeros(2, 4)), nn.Parameter(torch.zeros(2, 8))
    load(model, sd, {"split": {"match": "^qkv$", "into": ["q", "kv"], "dim": -1, "sizes": [4, 8]}})
    assert torch.equal(model.q, sd["qkv"][:, :4]) and torch.equal(model.kv, sd["qkv"][:, 4:])


def test_a_split_source_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = spy_reads(monkeypatch)
    sd = {"qkv.weight": rand(24, 8)}
    model = nn.Module()
    model.q, model.k, model.v = (nn.Parameter(torch.zeros(8, 8)) for _ in range(3))
    load(model, sd, {"split": {"match": r"^qkv\.weight$", "into": ["q", "k", "v"]}})
    assert reads == ["qkv.weight"]


def test_every_merged_part_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = spy_reads(monkeypatch)
    sd = {f"{p}_proj.weight": rand(4, 4, seed=n) for n, p in enumerate("qkv")}
    model = nn.Module()
    model.in_proj_weight = nn.Parameter(torch.zeros(12, 4))
    load(model, sd, {"transpose": "_proj"}, {"merge": {"match": r"^(q|k|v)_proj\.weight$", "into": "in_proj_weight", "order": ["q", "k", "v"]}})
    assert sorted(reads) == ["k_proj.weight", "q_proj.weight", "v_proj.weight"]


def test_transpose_then_merge_computes_in_order() -> None:
    sd = {f"{p}_proj.weight": rand(4, 2, seed=n) for n, p in enumerate("qkv")}
    model = nn.Module()
    model.in_proj_weight = nn.Parameter(torch.zeros(6, 4))
    merge = {"merge": {"match": r"^(q|k|v)_proj\.weight$", "into": "in_proj_weight", "order": ["q", "k", "v"]}}
    report = load(model, sd, {"transpose": r"_proj\.weight$"}, merge)
    assert torch.equal(model.in_proj_weight, torch.cat([sd[f"{p}_proj.weight"].T for p in "qkv"]))
    assert report.target_record("in_proj_weight").ops == ("transpose(-2, -1)",) * 3 + ("cat(dim=0)[q, k, v]",)
    lines = format_report(report, width=200).splitlines()
    assert (
        "    in_proj_weight <- q_proj.weight + k_proj.weight + v_proj.weight  "
        "[transpose(-2, -1), transpose(-2, -1), transpose(-2, -1), cat(dim=0)[q, k, v]]"
    ) in lines


def test_merge_then_split_round_trip_restores_the_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, ...]] = []
    concat = ops.concat

    def counting(tensors: Any, dim: int, stack: bool) -> torch.Tensor:
        if not any(t.device.type == "meta" for t in tensors):
            calls.append(tuple(t.shape[0] for t in tensors))
        return concat(tensors, dim, stack)

    monkeypatch.setattr(ops, "concat", counting)
    src = perturb(Attention(8))
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    model = Attention(8)
    merge = {"merge": {"match": r"^()(q|k|v)_proj\.(weight|bias)$", "into": r"in_proj_\3", "order": ["q", "k", "v"], "group": 2}}
    split = {"split": {"match": r"^in_proj_(weight|bias)$", "into": [r"q_proj.\1", r"k_proj.\1", r"v_proj.\1"]}}
    report = load(model, sd, merge, split)
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key]), key
    assert report.target_record("k_proj.weight").ops == ("cat(dim=0)[q, k, v]", "split(dim=0)[1 of 3]")
    assert sorted(calls) == [(8, 8, 8), (8, 8, 8)]  # one merge per fused tensor, not one per part


def test_adapt_in_channels_gray_model_equals_rgb_model_on_repeated_input() -> None:
    rgb = perturb(Small(in_ch=3)).eval()
    sd = {k: v.detach().clone() for k, v in rgb.state_dict().items()}
    gray = Small(in_ch=1).eval()
    report = load(gray, sd, {"adapt": {"match": r"^conv\.weight$", "op": "in_channels"}})
    x = rand(2, 1, 8, 8, seed=6)
    torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-5)
    assert report.target_record("conv.weight").ops == ("in_channels(3->1)",)


def test_adapt_in_channels_to_four_matches_timm() -> None:
    pytest.importorskip("timm")
    from timm.models._manipulate import adapt_input_conv

    rgb = perturb(Small(in_ch=3))
    sd = {k: v.detach().clone() for k, v in rgb.state_dict().items()}
    rgbn = Small(in_ch=4)
    report = load(rgbn, sd, {"adapt": {"match": r"^conv\.weight$", "op": "in_channels"}})
    assert torch.equal(rgbn.conv.weight, adapt_input_conv(4, sd["conv.weight"].clone()))
    assert report.target_record("conv.weight").ops == ("in_channels(3->4)",)


@pytest.mark.parametrize(("prefix", "side", "new_side"), [(1, 4, 6), (0, 6, 4), (2, 4, 5)])
def test_adapt_interpolate_position_grid(prefix: int, side: int, new_side: int) -> None:
    src = perturb(PosEmbed(prefix + side * side))
    sd = {k: v.detach().clone() for k, v in src.state_dict().items()}
    model = PosEmbed(prefix + new_side * new_side)
    report = load(model, sd, {"adapt": {"match": "^pos_embed$", "op": "interpolate", "prefix_tokens": prefix}})
    pos = sd["pos_embed"]
    grid = pos[:, prefix:].reshape(1, side, side, 8).permute(0, 3, 1, 2)
    body = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, -1, 8)
    assert torch.equal(model.pos_embed, torch.cat([pos[:, :prefix], body], 1))
    assert report.target_record("pos_embed").ops == (f"interpolate({prefix + side * side}->{prefix + new_side * new_side} tokens, 2d, bicubic)",)
    assert torch.equal(model.proj.weight, sd["proj.weight"])


def test_adapt_interpolate_1d_sequence() -> None:
    sd = {"pos": rand(10, 8)}
    model = nn.Module()
    model.pos = nn.Parameter(torch.zeros(17, 8))
    load(model, sd, {"adapt": {"match": "^pos$", "op": "interpolate", "grid": "1d", "mode": "linear", "prefix_tokens": 0}})
    ref = F.interpolate(sd["pos"].T[None], size=17, mode="linear")[0].T
    assert torch.equal(model.pos, ref)


def test_failed_op_leaves_the_module_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    reads = spy_reads(monkeypatch)
    model = Small(in_ch=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: v.detach().clone() for k, v in perturb(Small(in_ch=4)).state_dict().items()}
    with pytest.raises(CheckError) as info:
        load(model, sd, {"adapt": {"match": r"^conv\.weight$", "op": "in_channels"}})
    assert info.value.report.failures[0].message.startswith(
        "step 1 (adapt): key 'conv.weight' [4, 4, 3, 3] float32: in_channels cannot fit 4 input channels to 2"
    )
    assert reads == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
