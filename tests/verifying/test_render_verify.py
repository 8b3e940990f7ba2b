"""The text report's verify section, for every outcome (agree, differ, inconclusive), from
verify dicts built by hand in the shapes the verifying modules produce; and the JSON schema
describes every key of them."""

from __future__ import annotations

import importlib.resources
import json

import jsonschema
import pytest

from remap.report.records import Failure, Report
from remap.report.render import format_report
from remap.verifying.compare import describe_failure

BF16_WHY = "atol 0.125, rtol 0.125: defaults for a bfloat16 run (16 × its epsilon 0.0078125); none given in the rules"
LOOSENED = "default of task causal_lm, loosened for a bfloat16 run"

AGREE = {
    "outcome": "agree", "ok": True, "close": True, "verdict_by": "metrics",
    "max_abs": 2.3e-3, "max_rel": 0.011, "atol": 0.125, "rtol": 0.125, "tensors": 1, "worst": "output", "worst_seed": 1,
    "nan_matched": 0, "inf_matched": 0, "nonfinite_mismatched": 0, "first_mismatch": None,
    "input": {"ids": [2, 6], "high": 50}, "output": ["logits", "logits"], "seeds": [0, 1],
    "tolerances": {"atol": 0.125, "rtol": 0.125, "given": False, "why": BF16_WHY},
    "dtypes": {"source": "float32", "target": "bfloat16", "precision": "bfloat16", "compared_in": "float64"},
    "devices": {"source": "cpu", "target": "cpu"},
    "metrics": {"positions": 24, "kl": 3.2e-4, "kl_mean": 1.1e-4, "top1_agreement": 0.9583, "greedy_tokens": 4, "greedy_match": 4,
                "greedy_first_mismatch": None, "thresholds": {"kl": 0.01, "top1": 0.9, "greedy": {"tokens": 4, "min": 4}},
                "why": {"kl": LOOSENED, "top1": LOOSENED, "greedy": "given in the rules"},
                "passed": {"kl": True, "top1": True, "greedy": True}, "ok": True},
    "runs": [{"seed": 0, "outcome": "agree", "close": True, "max_abs": 1.9e-3, "max_rel": 0.011, "worst": "output", "nonfinite_mismatched": 0,
              "metrics": {"kl": 3.2e-4, "top1_agreement": 1.0, "greedy_match": 4, "greedy_tokens": 4}},
             {"seed": 1, "outcome": "agree", "close": True, "max_abs": 2.3e-3, "max_rel": 0.008, "worst": "output", "nonfinite_mismatched": 0,
              "metrics": {"kl": 1e-4, "top1_agreement": 0.9167, "greedy_match": 4, "greedy_tokens": 4}}],
}  # fmt: skip

INCONCLUSIVE = {
    "outcome": "inconclusive", "ok": False, "close": True, "verdict_by": "tolerances",
    "max_abs": 1e-8, "max_rel": 1e-7, "atol": 1e-5, "rtol": 1e-5, "tensors": 1, "worst": "output",
    "reference": "ref/resnet.safetensors",
    "coverage": {"method": "gradient", "checked": 62,
                 "uncovered": [f"layer{i}.{j}.conv1.weight" for i in range(1, 5) for j in (0, 1)] + ["fc.bias"], "declared": ["fc.bias"],
                 "unmeasurable": [["bn1.num_batches_tracked", "integer buffer"]], "input_sensitive": False, "input_spread": 3e-9},
}  # fmt: skip

DIFFER = {
    "outcome": "differ", "ok": False, "close": False, "verdict_by": "tolerances and metrics",
    "max_abs": 0.81, "max_rel": 3.2, "atol": 1e-5, "rtol": 1e-5, "tensors": 1, "worst": "logits", "worst_seed": 2, "seeds": [0, 2],
    "nan_matched": 1, "inf_matched": 0, "nonfinite_mismatched": 0, "first_mismatch": None,
    "tolerances": {"atol": 1e-5, "rtol": 1e-5, "given": True, "why": "atol 1e-05, rtol 1e-05: given in the rules"},
    "metrics": {"positions": 8, "kl": 0.31, "kl_mean": 0.2, "top1_agreement": 0.5, "topk_agreement": {"5": 0.6},
                "greedy_tokens": 8, "greedy_match": 3, "greedy_first_mismatch": 3,
                "thresholds": {"kl": 1e-4, "top1": 0.99, "topk": {"k": 5, "min": 0.99}, "greedy": {"tokens": 8, "min": 8}},
                "why": {"kl": "given in the rules", "top1": "given in the rules", "topk": "given in the rules", "greedy": "given in the rules"},
                "passed": {"kl": False, "top1": False, "topk": False, "greedy": False}, "ok": False},
    "runs": [{"seed": 0, "outcome": "agree", "close": True, "max_abs": 1e-6, "max_rel": 1e-6, "metrics": {"kl": 1e-9, "topk_agreement": {"5": 1.0}}},
             {"seed": 2, "outcome": "differ", "close": False, "max_abs": 0.81, "max_rel": 3.2, "metrics": {"kl": 0.31, "topk_agreement": {"5": 0.6}}}],
    "divergence": {"compared": 14, "pairs": [["encoder.layers.0", "blocks.0"]], "unpaired": {"target": ["encoder.ln"], "source": ["norm", "pre"]},
                   "first": {"target": "encoder.layers.3.self_attention", "source": "blocks.3.attn", "max_abs": 0.81, "max_rel": 3.2,
                             "keys": ["encoder.layers.3.self_attention.in_proj_weight", "encoder.layers.3.self_attention.in_proj_bias"],
                             "sources": ["blocks.3.attn.qkv.weight", "blocks.3.attn.qkv.bias"], "ops": ["split(qkv)"]}},
}  # fmt: skip


def verify_section(verify: dict) -> list[str]:
    failures = () if verify["ok"] else (Failure("verify", f"verify: {describe_failure(verify)}"),)
    text = format_report(Report(dry_run=False, source={"path": "a.pt"}, target={"model": "m:f"}, verify=verify, failures=failures), width=200)
    lines = text.split("\n")
    start = lines.index(next(line for line in lines if line.startswith("Verify")))
    return lines[start : lines.index("", start)]


def test_agree_with_metrics_tolerances_and_seeds():
    assert verify_section(AGREE) == [
        "Verify  outputs agree",
        "  max abs diff 0.0023, max rel diff 0.011 (atol 0.125, rtol 0.125) over 1 tensor(s), worst at seed 1",
        f"  tolerances: {BF16_WHY}",
        "  dtypes: source float32, target bfloat16; compared in float64",
        "  verdict by: the metrics (atol/rtol measured, not part of the verdict: none in the rules)",
        "  metrics:",
        f"    kl divergence 0.00032 (the worst of 24 position(s); mean 0.00011), at most 0.01: ok  ({LOOSENED})",
        f"    top-1 agreement 0.9583, at least 0.9: ok  ({LOOSENED})",
        "    greedy decoding: 4 of 4 new tokens agree, at least 4: ok  (given in the rules)",
        "  seed 0: agree, max abs diff 0.0019, max rel diff 0.011; kl 0.00032; top-1 1; greedy 4/4",
        "  seed 1: agree, max abs diff 0.0023, max rel diff 0.008; kl 0.0001; top-1 0.9167; greedy 4/4",
    ]


def test_inconclusive_lists_uncovered_tensors_folded_and_warns_about_the_input():
    assert verify_section(INCONCLUSIVE) == [
        "Verify  INCONCLUSIVE: the outputs agree, but this check does not vouch for every weight",
        "  max abs diff 1e-08, max rel diff 1e-07 (atol 1e-05, rtol 1e-05) over 1 tensor(s)",
        "  reference: ref/resnet.safetensors",
        "  coverage: 62 tensor(s) checked by gradient: 8 uncovered, 1 declared in verify.uncovered, 1 unmeasurable",
        "    uncovered (the outputs do not depend on them):",
        "      layer{1..4}.{0, 1}.conv1.weight",
        "    declared: fc.bias",
        "    unmeasurable (integer buffer): bn1.num_batches_tracked",
        "  warning: the outputs barely depend on the input (two inputs give outputs within 3e-09): this check proves little",
    ]
    assert describe_failure(INCONCLUSIVE) == (
        "inconclusive: the outputs agree, but 8 loaded tensor(s) do not influence the outputs on the verify input "
        "(layer{1..4}.{0, 1}.conv1.weight); declare the expected ones in verify.uncovered; the outputs barely depend on the input (two inputs give outputs within 3e-09)"
    )


def test_differ_shows_failed_metrics_seeds_and_the_first_divergence():
    assert verify_section(DIFFER) == [
        "Verify  outputs DIFFER",
        "  max abs diff 0.81, max rel diff 3.2 (atol 1e-05, rtol 1e-05) over 1 tensor(s), worst at seed 2; 1 NaN and 0 Inf position(s) matched",
        "  tolerances: atol 1e-05, rtol 1e-05: given in the rules",
        "  verdict by: atol/rtol (given in the rules) and the metrics",
        "  metrics:",
        "    kl divergence 0.31 (the worst of 8 position(s); mean 0.2), at most 0.0001: FAILED  (given in the rules)",
        "    top-1 agreement 0.5, at least 0.99: FAILED  (given in the rules)",
        "    top-5 agreement 0.6, at least 0.99: FAILED  (given in the rules)",
        "    greedy decoding: 3 of 8 new tokens agree (first mismatch at new token 3), at least 8: FAILED  (given in the rules)",
        "  seed 0: agree, max abs diff 1e-06, max rel diff 1e-06; kl 1e-09; top-5 1",
        "  seed 2: DIFFER, max abs diff 0.81, max rel diff 3.2; kl 0.31; top-5 0.6",
        "  first divergence: target encoder.layers.3.self_attention <- source blocks.3.attn (max abs 0.81, max rel 3.2); weights through split(qkv)",
        "    encoder.layers.3.self_attention.{in_proj_bias, in_proj_weight} <- blocks.3.attn.qkv.{bias, weight}",
        "  divergence: 14 module pair(s) compared in execution order; no partner: 1 target, 2 source module(s)",
    ]
    assert describe_failure(DIFFER) == (
        "outputs differ: max abs diff 0.81 (at logits, seed 2), max rel diff 3.2; allowed atol 1e-05, rtol 1e-05; kl divergence 0.31 > 0.0001 "
        "(the worst position); top-1 agreement 0.5 < 0.99; top-5 agreement 0.6 < 0.99; greedy decoding: 3 of 8 tokens agree before the first "
        "mismatch (at 3), 8 needed; first divergence: target encoder.layers.3.self_attention <- source blocks.3.attn (max abs 0.81)"
    )


def test_a_report_from_before_outcome_existed_still_renders():
    old = {"max_abs": 0.5, "max_rel": 0.1, "ok": False, "tensors": 1, "worst": "output", "atol": 1e-5, "rtol": 1e-5}
    assert verify_section(old) == ["Verify  outputs DIFFER", "  max abs diff 0.5, max rel diff 0.1 (atol 1e-05, rtol 1e-05) over 1 tensor(s)"]


def test_no_divergence_found_says_so():
    verify = {**DIFFER, "divergence": {"compared": 3, "pairs": [], "unpaired": {"target": [], "source": []}, "first": None}}
    assert verify_section(verify)[-1] == "  divergence: 3 module pair(s) compared in execution order, none diverges"


@pytest.mark.parametrize("verify", [AGREE, INCONCLUSIVE, DIFFER], ids=["agree", "inconclusive", "differ"])
def test_the_schema_describes_every_key(verify):
    schema = json.loads(importlib.resources.files("remap.report").joinpath("report.schema.json").read_text(encoding="utf-8"))
    failures = () if verify["ok"] else (Failure("verify", "verify: x"),)
    report = json.loads(Report(dry_run=False, verify=verify, failures=failures).to_json())
    jsonschema.validate(report, schema)
    described = schema["properties"]["verify"]["properties"]
    assert set(verify) <= set(described)
    for part in ("metrics", "coverage", "divergence"):
        assert set(verify.get(part, {})) <= set(described[part]["properties"])
        assert all(p.get("description") for p in described[part]["properties"].values())
    assert all(p.get("description") for p in described.values())
