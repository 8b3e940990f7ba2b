"""Verify inputs from a file (``input: {file: sample.safetensors}``), each model's copy in its
own dtype and device, and the ``verify`` section's new fields checked when the rules are parsed."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import save_file

import remap
from remap.errors import SourceError, UsageError
from remap.rules.verify_spec import VerifySpec
from remap.verifying.inputs import inputs_from_file, make_inputs, place_inputs
from remap.verifying.run import run_verify


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x, scale, *, bias):
        return self.fc(x) * scale + bias


def test_inputs_from_a_file_positional_and_named(tmp_path):
    x, scale, bias = torch.randn(2, 3), torch.tensor(2.0), torch.ones(2)
    save_file({"0": x, "1": scale, "bias": bias}, tmp_path / "sample.safetensors")
    args, kwargs = inputs_from_file("sample.safetensors", base_dir=tmp_path)
    assert torch.equal(args[0], x) and torch.equal(args[1], scale) and list(kwargs) == ["bias"] and torch.equal(kwargs["bias"], bias)
    model = TwoInputs()
    spec = VerifySpec.parse({"input": {"file": "sample.safetensors"}})
    result = run_verify(spec, model, copy.deepcopy(model), base_dir=tmp_path)
    assert result["ok"] and result["seeds"] == [] and "runs" not in result and result["input"] == {"file": "sample.safetensors"}


def test_a_gap_in_positional_inputs_and_an_empty_file_are_usage_errors(tmp_path):
    save_file({"0": torch.zeros(1), "2": torch.zeros(1)}, tmp_path / "gap.safetensors")
    with pytest.raises(UsageError, match=r"positional inputs must be named 0, 1, ... with no gap; found \[0, 2\]"):
        inputs_from_file(tmp_path / "gap.safetensors")
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(UsageError, match="holds no tensor"):
        inputs_from_file(tmp_path / "empty.safetensors")


@pytest.mark.hostile
def test_a_missing_or_garbage_input_file_is_a_source_error(tmp_path):
    with pytest.raises(SourceError):
        inputs_from_file(tmp_path / "nope.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(SourceError):
        inputs_from_file(tmp_path / "bad.safetensors")


@pytest.mark.hostile
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_as_input_file_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "in.safetensors")
    with pytest.raises(SourceError, match="FIFO"):
        inputs_from_file(tmp_path / "in.safetensors")


def test_a_torch_save_input_file_is_read_too(tmp_path):
    torch.save({"0": torch.zeros(2)}, tmp_path / "in.pt")  # plain tensors: read with torch's weights_only loader
    args, _ = inputs_from_file(tmp_path / "in.pt")
    assert torch.equal(args[0], torch.zeros(2))


def test_the_input_file_is_relative_to_the_rules_file(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    save_file({"0": torch.randn(4, 3)}, tmp_path / "sample.safetensors")
    (tmp_path / "rules.yaml").write_text("version: 1\nsource: {path: w.pth, model: torch.nn:Linear, args: [3, 2]}\n"
                                         "verify: {input: {file: sample.safetensors}}\n")  # fmt: skip
    report = remap.load(torch.nn.Linear(3, 2), None, rules=tmp_path / "rules.yaml", verify=True)
    assert report.verify["outcome"] == "agree" and report.verify["input"] == {"file": "sample.safetensors"}


def test_each_model_gets_inputs_in_its_own_dtype():
    ids, x = torch.tensor([[1, 2]]), torch.randn(1, 2)
    (a, b), kw = place_inputs([ids, x], {"m": torch.ones(1)}, torch.nn.Linear(2, 2).to(torch.bfloat16))
    assert (a.dtype, b.dtype, kw["m"].dtype) == (torch.int64, torch.bfloat16, torch.bfloat16)
    assert x.dtype == torch.float32  # the caller's tensors are untouched


def test_seeds_give_different_inputs():
    spec = VerifySpec.parse({"input": [3], "seeds": [0, 1]})
    first, second = make_inputs(spec, seed=0)[0][0], make_inputs(spec, seed=1)[0][0]
    assert torch.equal(first, torch.randn(3, generator=torch.Generator().manual_seed(0))) and not torch.equal(first, second)


@pytest.mark.parametrize(
    "section, message",
    [
        ("{seeds: [0, 1], seed: 2, input: [1]}", "2:31: verify: field 'seed': expected no 'seed' beside 'seeds' (list every seed in 'seeds'), found an integer 2"),
        ("{input: {file: a.safetensors}, seeds: [0, 1]}",
         "2:47: verify: field 'seeds': expected no 'seeds' with inputs from a file (every seed would run the same input), found a list [0, 1]"),
        ("{atol: 1}", "2:9: verify: missing required field 'input'"),
        ("{input: [1], metrics: {kl: 1, top5: 3}}", "2:39: verify: field 'metrics': unknown field 'top5' (did you mean 'topk'?); expected one of: kl, top1, greedy, topk"),
        ("{input: [1], metrics: {greedy: x}}", "2:40: verify: field 'metrics.greedy': expected a number of tokens such as 8, or {tokens: 8, min: 6}, found a string 'x'"),
        ("{input: [1], metrics: {top1: 2}}", "2:38: verify: field 'metrics.top1': expected a number <= 1, found an integer 2"),
        ("{input: [1], dtype: bf16}", "2:29: verify: field 'dtype': expected one of: bfloat16, float16, float32, float64; found a string 'bf16' (did you mean 'bfloat16'?)"),
        ("{input: [1], device: gpu}", "2:30: verify: field 'device': expected a device such as cpu, cuda or cuda:1, found a string 'gpu'"),
        ("{input: [1], task: lm}", "2:28: verify: field 'task': expected one of: causal_lm, classifier; found a string 'lm'"),
        ("{input: [1], uncovered: ['(']}", "2:34: verify: field 'uncovered': item 1: bad regex '(': missing ) at position 1"),
        ("{input: [1], metric: {kl: 1}}", "2:22: verify: unknown field 'metric' (did you mean 'metrics'?); expected one of: input, output, atol, "
                                          "rtol, seed, seeds, dtype, device, task, metrics, uncovered, reference"),
    ],
)
def test_verify_fields_are_checked_with_file_line_and_column(section, message):
    with pytest.raises(remap.RulesError) as info:
        remap.parse_rules(f"version: 1\nverify: {section}\n", filename="rules.yaml")
    assert str(info.value) == f"rules.yaml:{message}"


def test_the_new_fields_parse():
    spec = remap.parse_rules("version: 1\nverify: {reference: ref.safetensors, uncovered: 'head\\..*', seeds: [3, 4], dtype: float16, "
                             "device: 'cuda:1', task: classifier, metrics: {topk: {k: 3}}}\n").verify  # fmt: skip
    assert spec.inputs == () and spec.reference == "ref.safetensors" and spec.uncovered == ("head\\..*",)
    assert (spec.seeds, spec.seed, spec.dtype, spec.device) == ((3, 4), 3, "float16", "cuda:1")
    assert spec.metrics == {"topk": {"k": 3, "min": 1.0}, "top1": 1.0} and spec.metrics_given == ("topk",)
    assert not spec.atol_given and spec.atol == 1e-5
