"""``verify``: the loaded target must compute what the source model computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conversion_models import EMBED_DIM, GPT, mha_stack, qkv_stack, timm_vit, torchvision_vit  # noqa: F401  (factories by name)
from weights import perturb

import remap
from remap.cli import main
from remap.errors import UsageError, VerifyError
from remap.rules.verify_spec import VerifySpec
from remap.verifying.compare import compare
from remap.verifying.inputs import make_inputs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def config_with(name: str, **sections) -> dict:
    rules = yaml.safe_load((CONFIGS / name).read_text())
    rules.pop("target", None)  # the tests pass small targets
    return {**rules, **sections}


def vit_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "vit.pth"
    torch.save(perturb(timm_vit(), seed=1).state_dict(), path)
    return path


def test_vit_conversion_verifies(tmp_path):
    path = vit_checkpoint(tmp_path)
    rules = config_with(
        "timm-vit-to-torchvision.yaml",
        source={"path": str(path), "model": "conversion_models:timm_vit"},
        verify={"input": [2, 3, 32, 32], "atol": 1e-5},
    )
    report = remap.load(torchvision_vit(), None, rules=rules, verify=True)
    assert report.ok and report.verify["ok"] and report.verify["tensors"] == 1
    assert report.verify["max_abs"] < 1e-5 and report.verify["input"] == [2, 3, 32, 32]


def test_swapped_q_and_k_load_the_right_shapes_and_fail_verify(tmp_path):
    src = perturb(qkv_stack(), seed=2)
    path = tmp_path / "qkv.pth"
    torch.save(src.state_dict(), path)
    rules = config_with("qkv-to-mha.yaml", source={"path": str(path), "model": "conversion_models:qkv_stack"},
                        verify={"input": [1, 5, EMBED_DIM]})  # fmt: skip
    rules["rules"][0]["merge"]["order"] = ["k", "q", "v"]  # the wrong tensors, in the right shapes
    target = mha_stack()
    with pytest.raises(VerifyError) as info:
        remap.load(target, None, rules=rules, verify=True)
    report = info.value.report
    assert [f.kind for f in report.failures] == ["verify"]
    assert report.failures[0].message.startswith("outputs differ: max abs diff ")
    assert info.value.exit_code == 1 and str(info.value).endswith("; the weights were loaded")
    assert report.totals.loaded == report.totals.target_keys  # every key loaded: only the outputs tell


def test_factory_source_verifies_against_its_own_model():
    rules = config_with("qkv-to-mha.yaml", source={"model": "conversion_models:qkv_stack"}, verify={"input": [1, 3, EMBED_DIM], "output": 0})
    report = remap.load(mha_stack(), None, rules=rules, verify=True)
    assert report.verify["ok"] and report.verify["output"] == [0, 0]


def test_token_ids_and_output_selectors_through_the_cli(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = perturb(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)), seed=3)
    path = tmp_path / "gpt2.pth"
    torch.save(hf.state_dict(), path)
    rules = config_with("hf-gpt2-to-linear.yaml", source={"path": str(path), "model": "tests.verifying.test_compare:small_hf_gpt2"},
                        verify={"input": {"ids": [2, 8], "high": 50}, "output": {"source": "logits", "target": None}, "atol": 1e-4})  # fmt: skip
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(yaml.safe_dump(rules))
    code = main(["apply", str(rules_path), "--target", "tests.verifying.test_compare:small_gpt", "--verify", "--report", str(tmp_path / "r.json"), "-q"])
    assert code == 0
    verify = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert verify["ok"] and verify["output"] == ["logits", None]


def small_hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16))


def small_gpt():
    return GPT(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2)


def test_verify_without_a_section_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="the rules have no `verify` section"):
        remap.load(qkv_stack(), {k: v.clone() for k, v in qkv_stack().state_dict().items()}, verify=True)


def test_a_selector_that_does_not_exist_names_what_there_is():
    rules = config_with("qkv-to-mha.yaml", source={"model": "conversion_models:qkv_stack"}, verify={"input": [1, 3, EMBED_DIM], "output": "logits"})
    with pytest.raises(UsageError) as info:
        remap.load(mha_stack(), None, rules=rules, verify=True)
    assert str(info.value) == "verify.output: the source model's output has no 'logits' (selector 'logits'); it is a Tensor"


@pytest.mark.parametrize(
    "spec, expect",
    [
        ({"input": [2, 3]}, ([(2, 3)], {})),
        ({"input": {"ids": [1, 4], "high": 7}}, ([(1, 4)], {})),
        ({"input": {"x": [2], "mask": {"ids": [2], "high": 2}}}, ([], {"x": (2,), "mask": (2,)})),
    ],
)
def test_inputs_are_seeded_and_shaped(spec, expect):
    parsed = VerifySpec.parse(spec)
    args, kwargs = make_inputs(parsed)
    again, _ = make_inputs(parsed)
    assert [tuple(a.shape) for a in args] == expect[0] and {k: tuple(v.shape) for k, v in kwargs.items()} == expect[1]
    assert all(torch.equal(a, b) for a, b in zip(args, again))


def test_compare_nested_outputs_and_nan():
    a = {"x": torch.ones(2), "y": (torch.zeros(3),)}
    b = {"x": torch.ones(2) + 1e-3, "y": (torch.zeros(3),)}
    result = compare(a, b, atol=1e-2, rtol=0)
    assert result["ok"] and result["tensors"] == 2 and result["worst"] == "x"
    assert compare(torch.tensor([float("nan")]), torch.tensor([float("nan")]), atol=1, rtol=1)["ok"]  # issue 12: NaN at the same place matches
    assert not compare(torch.tensor([float("nan")]), torch.tensor([0.0]), atol=1, rtol=1)["ok"]


def test_verify_rules_are_checked_when_parsed():
    with pytest.raises(remap.RulesError) as info:
        remap.parse_rules("version: 1\nverify: {input: [1, 3], atol: -1}\n", filename="rules.yaml")
    assert str(info.value) == "rules.yaml:2:31: verify: field 'atol': expected a number >= 0, found an integer -1"


def test_language_model_metrics_through_the_cli_report(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = perturb(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)), seed=3)
    path = tmp_path / "gpt2.pth"
    torch.save(hf.state_dict(), path)
    rules = config_with("hf-gpt2-to-linear.yaml", source={"path": str(path), "model": "tests.verifying.test_compare:small_hf_gpt2"},
                        verify={"input": {"ids": [1, 6], "high": 50}, "output": {"source": "logits", "target": None}, "task": "causal_lm",
                                "metrics": {"greedy": 3}, "seeds": [0, 1]})  # fmt: skip
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text(yaml.safe_dump(rules))
    code = main(["apply", str(rules_path), "--target", "tests.verifying.test_compare:small_gpt", "--verify", "--report", str(tmp_path / "r.json"), "-q"])
    verify = json.loads((tmp_path / "r.json").read_text())["verify"]
    assert code == 0 and verify["outcome"] == "agree" and verify["verdict_by"] == "metrics" and [r["seed"] for r in verify["runs"]] == [0, 1]
    assert verify["metrics"]["kl"] < 1e-9 and verify["metrics"]["greedy_match"] == 3 and verify["metrics"]["passed"]["greedy"]


@pytest.mark.parametrize("outcome", ["differ", "inconclusive"])
def test_differ_and_inconclusive_fail_with_exit_1(monkeypatch, outcome):
    import remap.verifying.run as run

    result = {"outcome": outcome, "ok": False, "close": True, "max_abs": 0.0, "max_rel": 0.0, "worst": "output", "atol": 1e-5, "rtol": 1e-5,
              "tensors": 1, "coverage": {"uncovered": ["w"], "declared": [], "input_sensitive": True}}  # fmt: skip
    monkeypatch.setattr(run, "run_verify", lambda *a, **k: result)
    rules = config_with("qkv-to-mha.yaml", source={"model": "conversion_models:qkv_stack"}, verify={"input": [1, 3, EMBED_DIM], "output": 0})
    with pytest.raises(VerifyError) as info:
        remap.load(mha_stack(), None, rules=rules, verify=True)
    assert info.value.exit_code == 1 and info.value.report.verify["outcome"] == outcome
    assert info.value.report.failures[0].message.startswith("inconclusive: " if outcome == "inconclusive" else "outputs differ: ")
