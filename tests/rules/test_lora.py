"""The ``lora`` step on key metadata: what it merges, and every way it refuses, at plan time.

Numerical agreement with PEFT itself (LoRA, rsLoRA, DoRA, Conv1D, Conv2d, lora_bias) is in
tests/test_peft_conversion.py; here the plans are built from shapes alone.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from remap.errors import RulesError
from remap.planning.planner import make_plan
from remap.rules.parse import load_rules, parse_rules
from remap.rules.steps import run_recipe

P = "base_model.model."


def _rules(**lora: object) -> object:
    return parse_rules({"version": 1, "rules": [{"lora": {"match": r"\.q\.weight$", **lora}}]})


def _source(out: int = 6, inp: int = 5, r: int = 4, name: str = "", extra: dict | None = None) -> dict[str, list[int]]:
    n = f".{name}" if name else ""
    return {"l.q.weight": [out, inp], f"{P}l.q.lora_A{n}.weight": [r, inp], f"{P}l.q.lora_B{n}.weight": [out, r], **(extra or {})}


def _messages(plan: object) -> str:
    return "\n".join(f.message for f in plan.failures)  # type: ignore[attr-defined]


def test_the_factors_and_the_base_become_one_key_that_names_all_three() -> None:
    plan = make_plan(_rules(alpha=8), _source(), {"l.q.weight": [6, 5]})
    assert plan.ok, _messages(plan)
    (a,) = plan.assignments
    assert a.target == "l.q.weight" and a.sources == ("l.q.weight", f"{P}l.q.lora_A.weight", f"{P}l.q.lora_B.weight")
    assert a.ops == ("lora_merge(scale=2, rank=4)",)
    w, la, lb = torch.randn(6, 5), torch.randn(4, 5), torch.randn(6, 4)
    got = run_recipe(a.recipe, dict(zip(a.sources, (w, la, lb))))
    torch.testing.assert_close(got, w + 2 * lb @ la)


def test_a_wrapped_models_keys_with_the_adapter_name_and_base_layer_merge_too() -> None:
    source = {f"{P}l.q.base_layer.weight": [6, 5], f"{P}l.q.lora_A.default.weight": [4, 5], f"{P}l.q.lora_B.default.weight": [6, 4]}
    plan = make_plan(_rules(alpha=4, rank=4), source, {"l.q.weight": [6, 5]})
    assert plan.ok, _messages(plan)
    assert plan.assignments[0].ops == ("lora_merge(scale=1, rank=4)",)


def test_rslora_scales_by_the_square_root_of_the_rank() -> None:
    plan = make_plan(_rules(alpha=8, rslora=True), _source(), {"l.q.weight": [6, 5]})
    assert plan.assignments[0].ops == ("lora_merge(scale=4, rank=4)",)


def test_a_declared_rank_the_factors_do_not_have_fails_naming_keys_and_shapes() -> None:
    plan = make_plan(_rules(alpha=8, rank=8), _source(), {"l.q.weight": [6, 5]})
    assert not plan.ok
    text = _messages(plan)
    assert f"lora_A '{P}l.q.lora_A.weight' [4, 5]" in text and f"lora_B '{P}l.q.lora_B.weight' [6, 4]" in text
    assert "rank 4" in text and "the step says rank 8" in text


def test_factors_that_do_not_fit_the_base_fail_naming_the_base_key_and_both_shapes() -> None:
    source = {**_source(), "l.q.weight": [7, 5]}
    plan = make_plan(_rules(alpha=8), source, {"l.q.weight": [7, 5]})
    text = _messages(plan)
    assert "gives [6, 5]" in text and "the base weight 'l.q.weight' is [7, 5]" in text


def test_factors_of_two_ranks_fail() -> None:
    source = {**_source(), f"{P}l.q.lora_B.weight": [6, 3]}
    text = _messages(make_plan(_rules(alpha=8), source, {"l.q.weight": [6, 5]}))
    assert "has rank 3 (dim 1)" in text and "rank 4 (dim 0)" in text


def test_a_transposed_base_hints_at_fan_in_fan_out_and_fan_in_fan_out_merges_it() -> None:
    source = {**_source(), "l.q.weight": [5, 6]}
    text = _messages(make_plan(_rules(alpha=8), source, {"l.q.weight": [5, 6]}))
    assert "fan_in_fan_out: true" in text
    plan = make_plan(_rules(alpha=8, fan_in_fan_out=True), source, {"l.q.weight": [5, 6]})
    assert plan.ok, _messages(plan)
    (a,) = plan.assignments
    w, la, lb = torch.randn(5, 6), torch.randn(4, 5), torch.randn(6, 4)
    torch.testing.assert_close(run_recipe(a.recipe, dict(zip(a.sources, (w, la, lb)))), w + 2 * (lb @ la).T)


def test_a_missing_base_or_factor_fails_naming_what_is_there() -> None:
    source = _source()
    del source["l.q.weight"]
    text = _messages(make_plan(_rules(alpha=8), source, {"l.q.weight": [6, 5]}))
    assert "no base weight for the adapter: expected a key 'l.q.weight'" in text
    source = _source()
    del source[f"{P}l.q.lora_B.weight"]
    text = _messages(make_plan(_rules(alpha=8), source, {"l.q.weight": [6, 5]}))
    assert "expected both lora_A and lora_B" in text


def test_two_copies_of_the_base_fail_until_one_is_dropped() -> None:
    source = {**_source(), f"{P}l.q.base_layer.weight": [6, 5]}
    text = _messages(make_plan(_rules(alpha=8), source, {"l.q.weight": [6, 5]}))
    assert f"2 keys hold the base weight: 'l.q.weight', '{P}l.q.base_layer.weight'" in text


def test_several_adapters_need_a_name_and_the_name_picks_one() -> None:
    source = {**_source(name="one"), f"{P}l.q.lora_A.two.weight": [2, 5], f"{P}l.q.lora_B.two.weight": [6, 2]}
    text = _messages(make_plan(_rules(alpha=8), source, {"l.q.weight": [6, 5]}))
    assert "several adapters ('one', 'two')" in text
    rules = parse_rules({"version": 1, "rules": [{"lora": {"match": "q", "alpha": 8, "adapter": "two"}}, {"drop": r"\.one\."}]})
    plan = make_plan(rules, source, {"l.q.weight": [6, 5]})
    assert plan.ok, _messages(plan)
    assert plan.assignments[0].ops == ("lora_merge(scale=4, rank=2)",)


def test_dora_magnitude_must_have_one_entry_per_output_row() -> None:
    source = _source(extra={f"{P}l.q.lora_magnitude_vector": [5]})
    text = _messages(make_plan(_rules(alpha=8), source, {"l.q.weight": [6, 5]}))
    assert "has 5 entries, but the base weight 'l.q.weight' [6, 5] has 6 output rows" in text


def test_a_grouped_conv_is_refused_clearly() -> None:
    source = {"l.q.weight": [8, 2, 3, 3], f"{P}l.q.lora_A.weight": [2, 8, 3, 3], f"{P}l.q.lora_B.weight": [8, 2, 1, 1]}
    text = _messages(make_plan(_rules(alpha=2), source, {"l.q.weight": [8, 2, 3, 3]}))
    assert "grouped conv" in text and "not supported" in text


def test_a_conv_adapter_plans_and_runs_on_meta_tensors() -> None:
    source = {"l.q.weight": [8, 4, 3, 3], f"{P}l.q.lora_A.weight": [2, 4, 3, 3], f"{P}l.q.lora_B.weight": [8, 2, 1, 1]}
    plan = make_plan(_rules(alpha=2), source, {"l.q.weight": [8, 4, 3, 3]})
    assert plan.ok, _messages(plan)
    (a,) = plan.assignments
    metas = [torch.empty(s, device="meta") for s in source.values()]
    assert run_recipe(a.recipe, dict(zip(a.sources, metas))).shape == (8, 4, 3, 3)


def test_a_pattern_that_merges_nothing_fails_and_other_adapters_stay_unused() -> None:
    rules = parse_rules({"version": 1, "rules": [{"lora": {"match": r"\.k\.weight$", "alpha": 8}}]})
    plan = make_plan(rules, _source(), {"l.q.weight": [6, 5]})
    text = _messages(plan)
    assert "matched no key" in text and "reach no target key" in text


def test_the_step_needs_alpha_or_a_config_not_both() -> None:
    with pytest.raises(RulesError, match="missing 'alpha'"):
        _rules()
    with pytest.raises(RulesError, match="'alpha' is read from the adapter config"):
        _rules(alpha=8, config="adapter_config.json")


def _write(folder: Path, config: object, rules_text: str) -> Path:
    (folder / "adapter_config.json").write_text(json.dumps(config) if not isinstance(config, str) else config)
    path = folder / "rules.yaml"
    path.write_text(textwrap.dedent(rules_text).lstrip())
    return path


RULES = """
version: 1
rules:
  - lora: {match: '\\.q\\.weight$', config: adapter_config.json}
"""


def test_a_relative_config_is_read_from_the_rules_files_folder(tmp_path: Path) -> None:
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 16, "use_rslora": True, "fan_in_fan_out": False, "use_dora": False}
    rules = load_rules(_write(tmp_path, config, RULES))
    assert "alpha 16, rank 4, rslora" in rules.steps[0].summary()
    plan = make_plan(rules, _source(), {"l.q.weight": [6, 5]})
    assert plan.assignments[0].ops == ("lora_merge(scale=8, rank=4)",)


def test_rank_and_alpha_patterns_apply_per_module_as_peft_matches_them(tmp_path: Path) -> None:
    config = {"r": 8, "lora_alpha": 16, "rank_pattern": {"q": 4}, "alpha_pattern": {"l.q": 2}}
    plan = make_plan(load_rules(_write(tmp_path, config, RULES)), _source(), {"l.q.weight": [6, 5]})
    assert plan.ok, _messages(plan)
    assert plan.assignments[0].ops == ("lora_merge(scale=0.5, rank=4)",)


def test_the_config_saying_dora_needs_the_magnitude(tmp_path: Path) -> None:
    rules = load_rules(_write(tmp_path, {"r": 4, "lora_alpha": 8, "use_dora": True}, RULES))
    assert "use_dora, but there is no lora_magnitude_vector" in _messages(make_plan(rules, _source(), {"l.q.weight": [6, 5]}))


@pytest.mark.parametrize(("config", "said"), [
    ("{not json", "is not JSON"),
    ({"lora_alpha": 8}, "missing 'r'"),
    ({"r": "4", "lora_alpha": 8}, "field 'r': expected int"),
    ({"r": 4, "lora_alpha": 8, "peft_type": "IA3"}, "LoRA (and DoRA) adapters only"),
    ({"r": 4, "lora_alpha": 8, "rank_pattern": {"(": 2}}, "rank_pattern '('"),
    ([1, 2], "expected a JSON object"),
])  # fmt: skip
def test_a_bad_config_is_a_rules_error_at_the_step(tmp_path: Path, config: object, said: str) -> None:
    path = _write(tmp_path, config, RULES)
    with pytest.raises(RulesError) as err:
        load_rules(path)
    assert said in str(err.value) and "rules.yaml:3:" in str(err.value) and "adapter_config.json" in str(err.value)


def test_a_missing_config_validates_like_a_missing_source_path_and_fails_the_plan_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(RULES).lstrip())
    rules = load_rules(path)  # a shipped config names a file the user puts beside it: `remap validate` passes
    assert "(not read)" in rules.steps[0].summary()
    plan = make_plan(rules, _source(), {"l.q.weight": [6, 5]})
    assert not plan.ok
    assert any(f"the adapter config {str(tmp_path / 'adapter_config.json')!r} does not exist" in f.message for f in plan.report.failures)


def test_unknown_fields_are_rules_errors() -> None:
    with pytest.raises(RulesError, match="alpah"):
        _rules(alpah=8)


@pytest.mark.hostile
@pytest.mark.parametrize("text", ["[" * 100_000, "{" * 1000, '"' + "x" * 10])
def test_an_adapter_config_that_is_not_a_readable_json_object_is_a_rules_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "adapter_config.json").write_text(text)
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(RULES).lstrip())
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert info.value.exit_code == 2 and str(tmp_path / "adapter_config.json") in str(info.value)
